--
-- init: the extension, the roles and the helpers the other tests use.
-- The cluster was started by t/001_regress.pl with taptalk preloaded and the
-- settings pointing at the mock TapTalk server (see TaptalkTest::node).
--
CREATE EXTENSION taptalk;
CREATE EXTENSION dblink;

-- the extension's members (array types and the row types of views and
-- tables are left out: PostgreSQL 18 records them as members too, 15 does not)
SELECT pg_describe_object(classid, objid, objsubid) AS member
FROM pg_depend
WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
  AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'taptalk')
  AND NOT (classid = 'pg_type'::regclass
           AND objid IN (SELECT t.oid FROM pg_type t
                         LEFT JOIN pg_class c ON c.oid = t.typrelid
                         WHERE t.typcategory = 'A' OR c.relkind IN ('v', 'r')))
ORDER BY 1;

-- the result type, column by column, in the specified order
SELECT attnum, attname, format_type(atttypid, atttypmod)
FROM pg_attribute
WHERE attrelid = 'taptalk_auth_ticket_result'::regclass AND attnum > 0
ORDER BY attnum;

-- EXECUTE is not granted to PUBLIC
SELECT p.proname, p.proisstrict, p.provolatile, p.proacl
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE p.proname LIKE 'taptalk%'
ORDER BY 1;

-- an application role, and one that may call the function
CREATE ROLE taptalk_app LOGIN;
CREATE ROLE taptalk_caller LOGIN;
GRANT EXECUTE ON FUNCTION taptalk_auth_ticket(jsonb) TO taptalk_caller;

-- A valid request; the tests change one thing at a time with ||.
CREATE FUNCTION req(xc text) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
	SELECT jsonb_build_object(
		'userIPAddress', '182.253.177.234',
		'userAgent', 'AdvancedRestClient/12.1.14',
		'userPlatform', 'android',
		'userDeviceID', 'aaaa-bbbb-cccc-dddd',
		'xcUserID', xc,
		'fullName', 'Jony')
$$;

-- Position in the mock's log, and the events logged after a position.
CREATE FUNCTION mock_mark() RETURNS bigint LANGUAGE sql AS $$
	SELECT (pg_stat_file(current_setting('mock.log'))).size
$$;
CREATE FUNCTION mock_events(since bigint) RETURNS SETOF jsonb LANGUAGE sql AS $$
	SELECT line::jsonb
	FROM regexp_split_to_table(
		pg_read_file(current_setting('mock.log'), since, mock_mark() - since),
		E'\n') AS line
	WHERE line <> ''
$$;
CREATE FUNCTION mock_requests(since bigint) RETURNS SETOF jsonb LANGUAGE sql AS $$
	SELECT e FROM mock_events(since) e WHERE e->>'event' = 'request'
$$;
CREATE FUNCTION mock_connections(since bigint) RETURNS bigint LANGUAGE sql AS $$
	SELECT count(*) FROM mock_events(since) e WHERE e->>'event' = 'connection'
$$;

-- the mock answers, so the set-up works end to end
SELECT * FROM taptalk_auth_ticket(req('init-1'));

-- the SQLSTATE a statement fails with, for the checks whose message
-- PostgreSQL words differently from one version to the next
CREATE FUNCTION sqlstate_of(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE;
END $$;
