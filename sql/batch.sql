--
-- batch: taptalk_auth_tickets(jsonb[]) runs the requests concurrently and
-- answers one row per element, in input order.
--
GRANT EXECUTE ON FUNCTION taptalk_auth_tickets(jsonb[]) TO taptalk_caller;

-- an empty array gives no rows; a NULL array gives none either (STRICT)
SELECT * FROM taptalk_auth_tickets('{}');
SELECT * FROM taptalk_auth_tickets(NULL);

-- mixed results: each element's failure is its own row
SET taptalk.timeout = 500;
SET taptalk.max_retries = 0;
SELECT * FROM taptalk_auth_tickets(ARRAY[
	req('b-1'),
	NULL,
	req('b-3') - 'fullName',
	req('fault-slow-3000'),
	'[1]'::jsonb,
	req('fault-status-404'),
	req('fault-envelope-field'),
	req('b-8') || '{"xcUserId": 1}',
	req('fault-badjson'),
	req('b-10')
]);
RESET taptalk.timeout;
RESET taptalk.max_retries;

-- order is the input's even when later requests finish first
SELECT ord, user_id FROM taptalk_auth_tickets(ARRAY[
	req('fault-slow-400'), req('fault-slow-200'), req('fast')]);

-- max_concurrency bounds the requests in flight: with one, they run in turn
SET taptalk.max_concurrency = 1;
SELECT count(*), count(user_id) FROM taptalk_auth_tickets(
	ARRAY(SELECT req('seq-' || i) FROM generate_series(1, 20) i));
RESET taptalk.max_concurrency;

-- the backfill: provision existing users and join the results back
CREATE TABLE legacy_user (id int PRIMARY KEY, name text, platform text);
INSERT INTO legacy_user SELECT i, 'legacy ' || i, (ARRAY['android', 'ios', 'web', 'tv'])[1 + i % 4]
FROM generate_series(1, 40) i;
WITH u AS (SELECT array_agg(id ORDER BY id) AS ids,
				  array_agg(jsonb_build_object(
					'userIPAddress', '10.0.0.1', 'userAgent', 'backfill',
					'userPlatform', platform, 'userDeviceID', 'server',
					'xcUserID', id, 'fullName', name) ORDER BY id) AS reqs
		   FROM legacy_user)
SELECT count(*) AS rows,
	   count(*) FILTER (WHERE r.user_id = 'tt-' || u.ids[r.ord]) AS provisioned,
	   count(*) FILTER (WHERE r.error_code = '40002' AND r.error_field = '103') AS bad_platform
FROM u, taptalk_auth_tickets(u.reqs) r;

-- statement_timeout stops the whole batch (how soon: t/002_timing.pl)
CREATE FUNCTION batch_timed_out(requests jsonb[]) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	PERFORM count(*) FROM taptalk_auth_tickets(requests);
	RETURN 'not cancelled';
EXCEPTION WHEN query_canceled THEN
	RETURN format('%s: %s', SQLSTATE, SQLERRM);
END $$;
SET statement_timeout = '400ms';
SELECT batch_timed_out(ARRAY(SELECT req('fault-slow-5000') FROM generate_series(1, 50)));
RESET statement_timeout;
SELECT count(user_id) FROM taptalk_auth_tickets(ARRAY(SELECT req('after-' || i) FROM generate_series(1, 5) i));
