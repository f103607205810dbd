/* taptalk--1.0--1.1.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION taptalk UPDATE TO '1.1'" to load this file. \quit

-- Statistics, kept in shared memory (taptalk must be preloaded), one row per
-- path: 'single' (taptalk_auth_ticket), 'batch' (taptalk_auth_tickets) and
-- 'queue' (the background worker that sends taptalk_enqueue()'s requests).
-- The columns are described in README.md, "Monitoring".
CREATE FUNCTION taptalk_stats(
	OUT path text,
	OUT requests bigint,
	OUT rejected bigint,
	OUT attempts bigint,
	OUT successes bigint,
	OUT failures bigint,
	OUT abandoned bigint,
	OUT connections bigint,
	OUT bytes_sent bigint,
	OUT bytes_received bigint,
	OUT latency_sum_ms double precision,
	OUT latency_buckets bigint[],
	OUT stats_reset timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'taptalk_stats'
LANGUAGE C STRICT VOLATILE PARALLEL SAFE ROWS 3;

COMMENT ON FUNCTION taptalk_stats() IS
'taptalk''s statistics, one row per path';

CREATE FUNCTION taptalk_stats_errors(
	OUT path text,
	OUT error_code text,
	OUT count bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'taptalk_stats_errors'
LANGUAGE C STRICT VOLATILE PARALLEL SAFE ROWS 27;

COMMENT ON FUNCTION taptalk_stats_errors() IS
'taptalk''s failed requests, per path and error_code';

CREATE FUNCTION taptalk_stats_latency(
	OUT path text,
	OUT le_ms integer,
	OUT count bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'taptalk_stats_latency'
LANGUAGE C STRICT VOLATILE PARALLEL SAFE ROWS 42;

COMMENT ON FUNCTION taptalk_stats_latency() IS
'taptalk''s request latency histogram, per path and bucket';

CREATE FUNCTION taptalk_stats_reset()
RETURNS timestamptz
AS 'MODULE_PATHNAME', 'taptalk_stats_reset'
LANGUAGE C STRICT VOLATILE PARALLEL RESTRICTED;

COMMENT ON FUNCTION taptalk_stats_reset() IS
'set taptalk''s statistics to zero';

CREATE VIEW taptalk_stats AS
	SELECT * FROM taptalk_stats();

CREATE VIEW taptalk_stats_errors AS
	SELECT * FROM taptalk_stats_errors();

CREATE VIEW taptalk_stats_latency AS
	SELECT * FROM taptalk_stats_latency();

-- The statistics say something about the user base: pg_read_all_stats (and
-- so pg_monitor, a member of it) and superusers read them, PUBLIC does not.
-- Granted to pg_read_all_stats, not pg_monitor, so that a monitoring role
-- needs no pg_read_all_settings.  Only a superuser resets them, unless
-- EXECUTE on taptalk_stats_reset() is granted.
REVOKE EXECUTE ON FUNCTION taptalk_stats() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION taptalk_stats_errors() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION taptalk_stats_latency() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION taptalk_stats_reset() FROM PUBLIC;
REVOKE ALL ON taptalk_stats, taptalk_stats_errors, taptalk_stats_latency FROM PUBLIC;
GRANT EXECUTE ON FUNCTION taptalk_stats() TO pg_read_all_stats;
GRANT EXECUTE ON FUNCTION taptalk_stats_errors() TO pg_read_all_stats;
GRANT EXECUTE ON FUNCTION taptalk_stats_latency() TO pg_read_all_stats;
GRANT SELECT ON taptalk_stats, taptalk_stats_errors, taptalk_stats_latency TO pg_read_all_stats;

-- The queue: requests enqueued with taptalk_enqueue() and sent by the
-- background worker outside the enqueuing transaction (README.md,
-- "Provisioning through the queue").  The table is LOGGED, so a committed
-- request survives a crash.  It never holds a ticket: the ticket goes to the
-- request's callback only.  Nobody but its owner reads or writes the table;
-- roles see their own requests through the view taptalk_requests.
--
-- Every enqueuing insert writes a row here, so the table carries only what
-- the worker needs: state ('queued', 'sending', 'succeeded' or 'failed') is
-- written by the extension's functions and its worker alone, and has no
-- CHECK constraint, whose expression PostgreSQL prepares anew for every
-- INSERT statement (it cost an enqueuing insert about a tenth of its
-- speed).  callback is the callback's qualified signature, as
-- taptalk_enqueue checked it (schema.name(argument types)), looked up again
-- when it runs: a function's OID survives neither pg_upgrade nor a dump
-- and restore, and pg_upgrade refuses tables with a regprocedure column.
-- interruptions counts the times the worker stopped (a crash, a kill, a
-- restart) while the request was being sent.
CREATE TABLE taptalk_queue (
	id bigserial PRIMARY KEY,
	enqueued_at timestamptz NOT NULL DEFAULT now(),
	enqueued_by regrole NOT NULL,
	request jsonb NOT NULL,
	callback text,
	state text NOT NULL DEFAULT 'queued',
	attempts integer NOT NULL DEFAULT 0,
	interruptions integer NOT NULL DEFAULT 0,
	next_attempt_at timestamptz NOT NULL DEFAULT now(),
	lease_until timestamptz,
	finished_at timestamptz,
	user_id text,
	error_code text,
	error_field text,
	error_message text,
	callback_error text
);

-- What the worker claims: each enqueuing role's queued requests in the
-- order they fall due (it takes them round robin between the roles, reading
-- each role's part of the index from its start, or after what it last
-- claimed, and stops when it has enough), and requests whose lease expired
-- (their worker died while sending).  An entry turns dead when its request
-- is claimed or recorded; the index scans mark the dead ones, so later
-- scans pass them without reading the table.
CREATE INDEX taptalk_queue_due ON taptalk_queue (enqueued_by, next_attempt_at, id)
	WHERE state = 'queued';
-- requests the worker stopped while sending: it sends them one at a time
CREATE INDEX taptalk_queue_suspect ON taptalk_queue (next_attempt_at, id)
	WHERE state = 'queued' AND interruptions > 0;
CREATE INDEX taptalk_queue_leased ON taptalk_queue (lease_until)
	WHERE state = 'sending';
-- what the worker removes after taptalk.retention
CREATE INDEX taptalk_queue_succeeded ON taptalk_queue (finished_at)
	WHERE state = 'succeeded';

REVOKE ALL ON taptalk_queue FROM PUBLIC;
REVOKE ALL ON SEQUENCE taptalk_queue_id_seq FROM PUBLIC;

CREATE FUNCTION taptalk_enqueue(request jsonb, callback regprocedure DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'taptalk_enqueue'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION taptalk_enqueue(jsonb, regprocedure) IS
'queue a request for a TapTalk auth ticket, sent by the background worker after COMMIT';

CREATE FUNCTION taptalk_requeue(ids bigint[])
RETURNS bigint
AS 'MODULE_PATHNAME', 'taptalk_requeue'
LANGUAGE C STRICT VOLATILE;

COMMENT ON FUNCTION taptalk_requeue(bigint[]) IS
'put failed requests back in the queue with a fresh attempt count';

-- Each role sees the requests it enqueued; superusers see all.  The view's
-- owner reads the table, so granting SELECT on the view is enough.
CREATE VIEW taptalk_requests WITH (security_barrier) AS
	SELECT q.*
	FROM taptalk_queue q
	WHERE q.enqueued_by::oid =
		  (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = current_user)
	   OR (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user);

REVOKE EXECUTE ON FUNCTION taptalk_enqueue(jsonb, regprocedure) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION taptalk_requeue(bigint[]) FROM PUBLIC;
REVOKE ALL ON taptalk_requests FROM PUBLIC;
GRANT SELECT ON taptalk_requests TO PUBLIC;

-- What the background worker is doing (it reports itself in shared memory)
-- and the depth of this database's queue, for monitoring (README.md,
-- "Monitoring").  The view's owner counts the queue's rows, so members of
-- pg_read_all_stats (pg_monitor among them) see counts, never a request.
CREATE FUNCTION taptalk_worker_status(
	OUT pid integer,
	OUT database text,
	OUT state text,
	OUT state_since timestamptz,
	OUT in_flight integer,
	OUT last_success timestamptz,
	OUT last_error timestamptz,
	OUT last_error_code text)
RETURNS record
AS 'MODULE_PATHNAME', 'taptalk_worker_status'
LANGUAGE C STRICT VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION taptalk_worker_status() IS
'what taptalk''s background worker reports about itself';

CREATE VIEW taptalk_worker AS
	SELECT w.pid, w.database, w.state, w.state_since, w.in_flight,
		   q.queued, q.sending, q.succeeded, q.failed,
		   pg_catalog.clock_timestamp() - q.oldest_queued AS oldest_queued_age,
		   w.last_success, w.last_error, w.last_error_code
	FROM taptalk_worker_status() w,
		 (SELECT count(*) FILTER (WHERE t.state = 'queued') AS queued,
				 count(*) FILTER (WHERE t.state = 'sending') AS sending,
				 count(*) FILTER (WHERE t.state = 'succeeded') AS succeeded,
				 count(*) FILTER (WHERE t.state = 'failed') AS failed,
				 min(t.enqueued_at) FILTER (WHERE t.state = 'queued') AS oldest_queued
		  FROM taptalk_queue t) q;

REVOKE EXECUTE ON FUNCTION taptalk_worker_status() FROM PUBLIC;
REVOKE ALL ON taptalk_worker FROM PUBLIC;
GRANT EXECUTE ON FUNCTION taptalk_worker_status() TO pg_read_all_stats;
GRANT SELECT ON taptalk_worker TO pg_read_all_stats;

-- pg_dump keeps the queue's rows (requests not yet sent must not be lost)
SELECT pg_catalog.pg_extension_config_dump('taptalk_queue', '');
SELECT pg_catalog.pg_extension_config_dump('taptalk_queue_id_seq', '');
