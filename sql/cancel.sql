--
-- cancel: query cancel and statement_timeout stop a request in flight, with
-- PostgreSQL's own error (57014), and the session stays usable.  (How soon
-- they stop it is measured in t/002_timing.pl.)
--

-- statement_timeout, caught inside one statement
CREATE FUNCTION timed_out(request jsonb) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	PERFORM taptalk_auth_ticket(request);
	RETURN 'not cancelled';
EXCEPTION WHEN query_canceled THEN
	RETURN format('%s: %s', SQLSTATE, SQLERRM);
END $$;

SET statement_timeout = '300ms';
SELECT timed_out(req('fault-slow-5000'));
-- the plain error, as a client sees it
SELECT * FROM taptalk_auth_ticket(req('fault-slow-5000'));
\echo SQLSTATE :SQLSTATE
RESET statement_timeout;
-- the session, and its connection cache, work afterwards
SELECT * FROM taptalk_auth_ticket(req('after-timeout'));

-- pg_cancel_backend from another session, while the request waits on the server
SELECT dblink_connect('victim', format('host=%s port=%s dbname=%s user=%s',
	current_setting('unix_socket_directories'), current_setting('port'),
	current_database(), current_user));
SELECT dblink_exec('victim', 'SET taptalk.timeout = 60000');
SELECT pid AS victim_pid FROM dblink('victim', 'SELECT pg_backend_pid()') AS t(pid int) \gset
SELECT dblink_send_query('victim', $q$SELECT * FROM taptalk_auth_ticket('$q$ || req('fault-slow-30000')::text || $q$')$q$);
-- wait until the request is on the wire
DO $$
BEGIN
	FOR i IN 1..100 LOOP
		EXIT WHEN EXISTS (SELECT 1 FROM pg_stat_activity
						  WHERE query LIKE '%fault-slow-30000%' AND state = 'active'
							AND pid <> pg_backend_pid());
		PERFORM pg_sleep(0.05);
	END LOOP;
	PERFORM pg_sleep(0.2);
END $$;
SELECT pg_cancel_backend(:victim_pid);
-- dblink reports the remote error as a local one
SELECT * FROM dblink_get_result('victim') AS t(user_id text, ticket text, error_code text, error_field text, error_message text);
-- (an async query's results are read to the end before the next query)
SELECT * FROM dblink_get_result('victim') AS t(user_id text, ticket text, error_code text, error_field text, error_message text);
-- the cancelled session is still usable
SELECT * FROM dblink('victim', $q$SELECT user_id, error_code FROM taptalk_auth_ticket('$q$ || req('after-cancel')::text || $q$')$q$) AS t(user_id text, error_code text);
SELECT dblink_disconnect('victim');
