--
-- faults: the network fails in each way the mock can; the function answers
-- with a row saying what happened, and the session carries on.
--
SET taptalk.timeout = 500;

-- TIMEOUT: the server answers after the time limit
SELECT * FROM taptalk_auth_ticket(req('fault-slow-3000'));
-- within the limit it is a success
SELECT user_id, error_code FROM taptalk_auth_ticket(req('fault-slow-100'));

-- a body that never ends, headers that never end
SELECT * FROM taptalk_auth_ticket(req('fault-endless'));
SELECT * FROM taptalk_auth_ticket(req('fault-endless-headers'));

-- an interim answer: "101 Switching Protocols", which nobody asked for, is
-- an INVALID_RESPONSE at once (statement_timeout, far inside
-- taptalk.timeout, would cancel a call that waited for the connection to
-- close); "102 Processing" and "103 Early Hints" are read past and the
-- final answer decides
SET taptalk.timeout = '60s';
SET statement_timeout = '10s';
SELECT * FROM taptalk_auth_ticket(req('fault-interim-101'));
SELECT user_id, error_code FROM taptalk_auth_ticket(req('fault-interim-102'));
SELECT user_id, error_code FROM taptalk_auth_ticket(req('fault-interim-103'));
RESET statement_timeout;
SET taptalk.timeout = 500;

-- CONNECTION_FAILED: reset, closed without an answer, refused, no such host
-- (libcurl's message varies with timings; its first words are shown)
SET taptalk.max_retries = 0;
SELECT error_code, error_field, split_part(error_message, ' after ', 1) AS message
FROM taptalk_auth_ticket(req('fault-reset'));
SELECT error_code, error_field, error_message FROM taptalk_auth_ticket(req('fault-close'));
SET taptalk.base_url = 'http://127.0.0.1:1';
SELECT error_code, error_field, split_part(error_message, ' after ', 1) AS message
FROM taptalk_auth_ticket(req('refused'));
SET taptalk.base_url = 'http://no-such-host.invalid';
SELECT error_code, error_field, error_message FROM taptalk_auth_ticket(req('dns'));
RESET taptalk.base_url;
RESET taptalk.max_retries;

-- redirects are not followed: the key does not travel to another port
SELECT mock_mark() AS mark \gset
SELECT * FROM taptalk_auth_ticket(req('fault-redirect-302'));
SELECT * FROM taptalk_auth_ticket(req('fault-redirect-307'));
SELECT * FROM taptalk_auth_ticket(req('fault-redirect-301'));
SELECT r->>'port' = current_setting('mock.port') AS first_port_only, count(*)
FROM mock_requests(:mark) r GROUP BY 1;

-- retries: connection failures and 502/503/504 are tried again ...
SELECT mock_mark() AS mark \gset
SELECT * FROM taptalk_auth_ticket(req('fault-flaky-2-a'));
SELECT * FROM taptalk_auth_ticket(req('fault-flakyreset-2-b'));
SELECT count(*) AS attempts FROM mock_requests(:mark);
-- ... up to taptalk.max_retries times
SET taptalk.max_retries = 1;
SELECT mock_mark() AS mark \gset
SELECT * FROM taptalk_auth_ticket(req('fault-flaky-2-c'));
SELECT count(*) AS attempts FROM mock_requests(:mark);
RESET taptalk.max_retries;
-- an envelope or a 4xx is never retried
SELECT mock_mark() AS mark \gset
SELECT error_code FROM taptalk_auth_ticket(req('fault-envelope500'));
SELECT error_code FROM taptalk_auth_ticket(req('fault-status-404'));
SELECT count(*) AS attempts FROM mock_requests(:mark);

-- a 503 is retried even when its body or its headers are too long to read:
-- its status says what happened (HTTP_ERROR), not its size
SET taptalk.timeout = 5000;
SELECT mock_mark() AS mark \gset
SELECT * FROM taptalk_auth_ticket(req('fault-huge503-2'));
SELECT count(*) AS attempts FROM mock_requests(:mark);
SELECT mock_mark() AS mark \gset
SELECT * FROM taptalk_auth_ticket(req('fault-headers503'));
SELECT count(*) AS attempts FROM mock_requests(:mark);
-- a body cut short by a closed connection is CONNECTION_FAILED, and retried
SELECT mock_mark() AS mark \gset
SELECT * FROM taptalk_auth_ticket(req('fault-partial'));
SELECT count(*) AS attempts FROM mock_requests(:mark);
SET taptalk.timeout = 500;

-- the session is still usable and the connection cache still works
SELECT * FROM taptalk_auth_ticket(req('faults-after'));
RESET taptalk.timeout;

-- configuration mistakes raise, with a hint naming the setting
SET taptalk.base_url = 'ftp://127.0.0.1/';
\echo SQLSTATE :SQLSTATE
SET taptalk.base_url = 'file:///etc/passwd';
SET taptalk.base_url = 'gopher://127.0.0.1/';
SET taptalk.base_url = 'http://';
SET taptalk.base_url = 'http://exa mple.com';
SET taptalk.base_url = '';
SELECT * FROM taptalk_auth_ticket(req('cfg'));
\echo SQLSTATE :SQLSTATE
RESET taptalk.base_url;
SET taptalk.server_key_id = '';
SELECT * FROM taptalk_auth_ticket(req('cfg'));
RESET taptalk.server_key_id;
SET taptalk.server_key_secret = '';
SELECT * FROM taptalk_auth_ticket(req('cfg'));
RESET taptalk.server_key_secret;
-- values outside a setting's range are refused (22023; the ranges are in
-- pg_settings, see privileges)
SELECT sqlstate_of('SET taptalk.timeout = 0');
SELECT sqlstate_of('SET taptalk.max_concurrency = 257');
SELECT sqlstate_of('SET taptalk.max_retries = 11');
-- a reserved prefix: a misspelled setting is an error, not a silent placeholder
SET taptalk.base_ulr = 'http://127.0.0.1';
SELECT user_id FROM taptalk_auth_ticket(req('cfg-ok'));
