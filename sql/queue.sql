--
-- queue: taptalk_enqueue, the view taptalk_requests and taptalk_requeue.
-- The background worker sends the queue of database postgres, not this
-- one, so requests stay where these tests put them; t/170_queue.pl tests
-- the worker end to end.
--

-- the table is LOGGED and granted to nobody; the view of requests is
-- readable by all, the worker's view by pg_read_all_stats, of which
-- pg_monitor is a member (the grants to roles other than the owner)
SELECT c.relname, c.relkind, c.relpersistence,
	   ARRAY(SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END
					|| ' ' || a.privilege_type
			 FROM aclexplode(c.relacl) a
			 WHERE a.grantee <> c.relowner ORDER BY 1) AS grants
FROM pg_class c
WHERE c.relname IN ('taptalk_queue', 'taptalk_queue_id_seq', 'taptalk_requests',
					'taptalk_worker')
ORDER BY 1;

-- the table's columns: there is no column for the ticket
SELECT attnum, attname, format_type(atttypid, atttypmod), attnotnull
FROM pg_attribute
WHERE attrelid = 'taptalk_queue'::regclass AND attnum > 0 AND NOT attisdropped
ORDER BY attnum;

GRANT EXECUTE ON FUNCTION taptalk_enqueue(jsonb, regprocedure) TO taptalk_caller;
GRANT EXECUTE ON FUNCTION taptalk_requeue(bigint[]) TO taptalk_caller;

-- callbacks write here
CREATE TABLE cb_log (request_id bigint, xc text, error_code text,
					 has_ticket boolean, who name);
GRANT SELECT, INSERT ON cb_log TO taptalk_caller;
CREATE FUNCTION cb(request_id bigint, request jsonb,
				   result taptalk_auth_ticket_result)
RETURNS void LANGUAGE sql AS $$
	INSERT INTO public.cb_log
	VALUES (request_id, request->>'xcUserID', (result).error_code,
			(result).ticket IS NOT NULL, current_user)
$$;
-- a callback only the superuser may execute
CREATE FUNCTION cb_private(request_id bigint, request jsonb,
						   result taptalk_auth_ticket_result)
RETURNS void LANGUAGE sql AS $$ SELECT $$;
REVOKE EXECUTE ON FUNCTION cb_private(bigint, jsonb, taptalk_auth_ticket_result) FROM PUBLIC;
-- functions with other signatures
CREATE FUNCTION cb_two(request_id bigint, request jsonb)
RETURNS void LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION cb_text(request_id bigint, request jsonb, result text)
RETURNS void LANGUAGE sql AS $$ SELECT $$;

SET ROLE taptalk_caller;

-- a valid request is queued, not sent: its id comes back
SELECT taptalk_enqueue(req('queue-1')) > 0 AS enqueued;
SELECT taptalk_enqueue(req('queue-2'), 'cb(bigint, jsonb, taptalk_auth_ticket_result)') > 0 AS enqueued;
SELECT request->>'xcUserID' AS xc, enqueued_by, callback, state, attempts,
	   next_attempt_at <= now() AS due, lease_until, finished_at, user_id,
	   error_code, error_field, error_message, callback_error
FROM taptalk_requests ORDER BY id;
-- nothing ran yet: callbacks run when the outcome is known
SELECT count(*) FROM cb_log;

-- an invalid request is stored already failed with its 40002 result,
-- attempts 0, and its callback runs at once
SELECT taptalk_enqueue(req('queue-3') - 'fullName', 'cb(bigint, jsonb, taptalk_auth_ticket_result)') AS bad_id \gset
SELECT request->>'xcUserID' AS xc, state, attempts, finished_at IS NOT NULL AS finished,
	   error_code, error_field, error_message
FROM taptalk_requests WHERE id = :bad_id;
SELECT request_id = :bad_id AS same_id, xc, error_code, has_ticket, who FROM cb_log;

-- a request that is not a JSON object raises, as taptalk_auth_ticket does
SELECT taptalk_enqueue('[1, 2]');
SELECT taptalk_enqueue('"text"');
-- so does a NULL request
SELECT taptalk_enqueue(NULL);

-- callbacks: wrong signature, not executable by the caller, no such function
SELECT taptalk_enqueue(req('queue-4'), 'cb_two(bigint, jsonb)');
SELECT taptalk_enqueue(req('queue-4'), 'cb_text(bigint, jsonb, text)');
SELECT taptalk_enqueue(req('queue-4'), 'cb_private(bigint, jsonb, taptalk_auth_ticket_result)');
SELECT taptalk_enqueue(req('queue-4'), 424242::oid::regprocedure);
-- none of them was stored
SELECT count(*) FROM taptalk_requests WHERE request->>'xcUserID' = 'queue-4';

-- the table itself is closed to the caller, for reading and for writing
SELECT count(*) FROM taptalk_queue;
INSERT INTO taptalk_queue (enqueued_by, request) VALUES ('taptalk_caller', req('forged'));
UPDATE taptalk_requests SET state = 'succeeded';

RESET ROLE;

-- the superuser enqueues too, with the private callback
SELECT taptalk_enqueue(req('queue-5') || '{"userPlatform": "windows"}',
	'cb_private(bigint, jsonb, taptalk_auth_ticket_result)') AS su_bad_id \gset
SELECT taptalk_enqueue(req('queue-6')) > 0 AS enqueued;

-- the superuser sees every request, each role only its own
SELECT request->>'xcUserID' AS xc, enqueued_by, state FROM taptalk_requests ORDER BY id;
SET ROLE taptalk_caller;
SELECT request->>'xcUserID' AS xc, enqueued_by, state FROM taptalk_requests ORDER BY id;
SET ROLE taptalk_app;
SELECT count(*) FROM taptalk_requests;
-- without EXECUTE no role enqueues or requeues
SELECT taptalk_enqueue(req('queue-7'));
SELECT taptalk_requeue(ARRAY[:bad_id]::bigint[]);
RESET ROLE;

-- requeue: the caller's own failed request goes back to the queue with a
-- fresh attempt count; a queued one and another role's are left alone
SET ROLE taptalk_caller;
SELECT taptalk_requeue(ARRAY[:bad_id, :su_bad_id, 1]::bigint[]);
SELECT request->>'xcUserID' AS xc, state, attempts, finished_at, error_code,
	   error_message, next_attempt_at <= now() AS due
FROM taptalk_requests WHERE id = :bad_id;
-- only failed requests are requeued
SELECT taptalk_requeue(ARRAY[:bad_id]::bigint[]);
SELECT taptalk_requeue('{}');
RESET ROLE;
SELECT request->>'xcUserID' AS xc, state FROM taptalk_requests WHERE id = :su_bad_id;
-- a superuser requeues any role's failed request
UPDATE taptalk_queue SET state = 'failed' WHERE id = :bad_id;
SELECT taptalk_requeue(ARRAY[:bad_id, :su_bad_id]::bigint[]);
SELECT request->>'xcUserID' AS xc, state, attempts FROM taptalk_requests ORDER BY id;

-- taptalk_worker counts this database's queue by state (the worker sends
-- the queue of database postgres, so these requests stay as they are);
-- pg_read_all_stats and pg_monitor read it, other roles do not
SELECT state, count(*) FROM taptalk_queue GROUP BY state ORDER BY state;
BEGIN;
UPDATE taptalk_queue SET state = 'sending' WHERE id = (SELECT min(id) FROM taptalk_queue);
UPDATE taptalk_queue SET state = 'succeeded' WHERE id = (SELECT max(id) FROM taptalk_queue);
UPDATE taptalk_queue SET state = 'failed' WHERE id = :bad_id;
SELECT database, queued, sending, succeeded, failed,
	   oldest_queued_age > interval '0' AS oldest_queued_age_positive
FROM taptalk_worker;
ROLLBACK;
SET ROLE pg_read_all_stats;
SELECT database, queued + sending + succeeded + failed AS requests FROM taptalk_worker;
SELECT database FROM taptalk_worker_status();
SET ROLE pg_monitor;
SELECT database, queued + sending + succeeded + failed AS requests FROM taptalk_worker;
SELECT database FROM taptalk_worker_status();
SET ROLE taptalk_app;
SELECT count(*) FROM taptalk_worker;
SELECT count(*) FROM taptalk_worker_status();
RESET ROLE;

-- a rolled-back enqueue leaves nothing
BEGIN;
SELECT taptalk_enqueue(req('queue-rolled-back')) > 0 AS enqueued;
ROLLBACK;
SELECT count(*) FROM taptalk_queue WHERE request->>'xcUserID' = 'queue-rolled-back';

-- taptalk_enqueue writes its row itself: what it does not set stays null,
-- and the table's constraints still hold; a column with a default it would
-- not apply is refused (a superuser's changes, undone)
\set VERBOSITY terse
BEGIN;
ALTER TABLE taptalk_queue ADD COLUMN note text;
SELECT taptalk_enqueue(req('queue-extra-column')) > 0 AS enqueued;
SELECT note IS NULL AS note_null, state, attempts, enqueued_at = now() AS enqueued_now
FROM taptalk_queue WHERE request->>'xcUserID' = 'queue-extra-column';
DELETE FROM taptalk_queue;
ALTER TABLE taptalk_queue ALTER note SET NOT NULL;
SELECT taptalk_enqueue(req('queue-not-null'));
ROLLBACK;
BEGIN;
DELETE FROM taptalk_queue;
ALTER TABLE taptalk_queue ADD CONSTRAINT queue_nothing_queued CHECK (state <> 'queued');
SELECT taptalk_enqueue(req('queue-check'));
ROLLBACK;
BEGIN;
ALTER TABLE taptalk_queue ADD COLUMN priority int DEFAULT 1;
SELECT taptalk_enqueue(req('queue-default'));
ROLLBACK;
\set VERBOSITY default
SELECT taptalk_enqueue(req('queue-after-changes')) > 0 AS enqueued;

DELETE FROM taptalk_queue;
DROP TABLE cb_log;
DROP FUNCTION cb, cb_private, cb_two, cb_text;
