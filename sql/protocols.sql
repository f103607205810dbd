--
-- protocols: the key goes only to the configured http or https URL.  Every
-- other scheme is refused when the setting is made, by any route, before any
-- I/O; a redirect of any kind is answered and never followed, so nothing at
-- all reaches the port it points to.  (faults.sql has SET with ftp, file and
-- gopher, and 301/302/307 staying on the first port.)
--
SELECT mock_mark() AS mark \gset
SELECT current_setting('taptalk.base_url') AS configured_url \gset

-- what setting the base URL to a value does: accepted, or the check's DETAIL
CREATE FUNCTION try_base_url(url text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	detail text;
BEGIN
	PERFORM set_config('taptalk.base_url', url, true);
	RETURN 'accepted';
EXCEPTION WHEN invalid_parameter_value THEN
	GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;
	RETURN SQLSTATE || ': ' || detail;
END $$;

-- every scheme libcurl knows but http and https, aimed at the mock's port
SELECT scheme, try_base_url(format('%s://127.0.0.1:%s/', scheme, current_setting('mock.port'))) AS result
FROM unnest(ARRAY['dict', 'file', 'ftp', 'ftps', 'gopher', 'gophers', 'imap', 'imaps',
				  'ldap', 'ldaps', 'mqtt', 'pop3', 'pop3s', 'rtmp', 'rtsp', 'scp', 'sftp',
				  'smb', 'smbs', 'smtp', 'smtps', 'telnet', 'tftp', 'ws', 'wss',
				  'FILE', 'Ftp', 'httpx', 'http+unix']) AS scheme;

-- look-alikes of http:// and https://
SELECT format('%L', u) AS url, try_base_url(replace(u, 'PORT', current_setting('mock.port'))) AS result
FROM unnest(ARRAY['127.0.0.1:PORT', '//127.0.0.1:PORT', 'http:/127.0.0.1:PORT',
				  'http:127.0.0.1:PORT', 'http:\\127.0.0.1:PORT', ' http://127.0.0.1:PORT',
				  E'http://127.0.0.1:PORT\n', E'http://127.0.0.1:PORT/\r\nX-Injected: 1',
				  'https:///etc/passwd', 'http://', 'HTTP://127.0.0.1:PORT',
				  'hTtPs://127.0.0.1:PORT']) AS u;

-- scheme://host[:port][/path] only: a query, a fragment or a user name and
-- password (which libcurl would send as an Authorization header) is refused
SELECT format('%L', u) AS url, try_base_url(replace(u, 'PORT', current_setting('mock.port'))) AS result
FROM unnest(ARRAY['http://127.0.0.1:PORT/?', 'http://127.0.0.1:PORT/api?key=1',
				  'http://127.0.0.1:PORT?x', 'http://127.0.0.1:PORT/#', 'http://127.0.0.1:PORT#top',
				  'http://user:pass@127.0.0.1:PORT/', 'http://user@127.0.0.1:PORT',
				  'https://:pass@127.0.0.1:PORT/', 'http://@127.0.0.1:PORT',
				  'http://127.0.0.1:PORT@evil.example/',
				  -- accepted: a port, a path, an "@" inside the path
				  'http://127.0.0.1:PORT', 'http://127.0.0.1:PORT/base/v1/',
				  'http://127.0.0.1:PORT/a@b']) AS u;
SET taptalk.base_url = 'https://user:password@taptalk.io';

-- the other routes to the setting check it too, and write nothing
ALTER SYSTEM SET taptalk.base_url = 'file:///etc/passwd';
ALTER SYSTEM SET taptalk.base_url = 'ldap://127.0.0.1/';
ALTER SYSTEM SET taptalk.base_url = 'https://taptalk.io/?token=x';
ALTER DATABASE contrib_regression SET taptalk.base_url = 'gopher://127.0.0.1/';
ALTER ROLE taptalk_app SET taptalk.base_url = 'dict://127.0.0.1/';
BEGIN;
SET LOCAL taptalk.base_url = 'tftp://127.0.0.1/';
ROLLBACK;
SELECT count(*) AS stored_settings FROM pg_db_role_setting s, unnest(s.setconfig) c
WHERE c LIKE 'taptalk.%';
SELECT count(*) AS auto_conf_settings FROM pg_file_settings
WHERE name LIKE 'taptalk.%' AND sourcefile LIKE '%postgresql.auto.conf';

-- the setting is what it was, and nothing reached the mock
SELECT current_setting('taptalk.base_url') = :'configured_url' AS unchanged;
SELECT count(*) AS mock_events FROM mock_events(:mark);

-- the upper-case schemes that were accepted do work
SELECT format('HTTP://127.0.0.1:%s', current_setting('mock.port')) AS url \gset
SET taptalk.base_url = :'url';
SELECT user_id, error_code FROM taptalk_auth_ticket(req('proto-upper'));
RESET taptalk.base_url;

-- redirects of every kind, singly and in a batch, with the default retries:
-- answered as HTTP_ERROR, never retried, and the port in Location (the
-- mock's second port) gets not even a connection
SELECT mock_mark() AS mark \gset
SELECT code, r.user_id, r.error_code, r.error_message
FROM unnest(ARRAY[301, 302, 303, 307, 308]) AS code,
	 LATERAL taptalk_auth_ticket(req('fault-redirect-' || code)) AS r
ORDER BY code;
SELECT ord, user_id, error_code, error_message
FROM taptalk_auth_tickets(ARRAY(SELECT req('fault-redirect-' || c) FROM unnest(ARRAY[301, 302, 303, 307, 308]) c));
SELECT count(*) FILTER (WHERE e->>'event' = 'request') AS requests,
	   count(*) FILTER (WHERE e->>'port' = current_setting('mock.port2')) AS events_on_location_port
FROM mock_events(:mark) e;

DROP FUNCTION try_base_url(text);
