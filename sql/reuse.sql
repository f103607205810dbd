--
-- reuse: each backend keeps its connections, so sequential calls do not pay
-- a new TCP handshake each; a change of settings takes effect at once.
--
\c
SELECT mock_mark() AS mark \gset
DO $$
BEGIN
	FOR i IN 1..200 LOOP
		IF (taptalk_auth_ticket(req('reuse-' || i))).user_id IS NULL THEN
			RAISE EXCEPTION 'call % failed', i;
		END IF;
	END LOOP;
END $$;
SELECT count(*) AS requests, mock_connections(:mark) <= 2 AS at_most_2_connections
FROM mock_requests(:mark);

-- a new base URL: the next call goes to the new server at once
SELECT mock_mark() AS mark \gset
SELECT format('http://127.0.0.1:%s', current_setting('mock.port2')) AS url \gset
SET taptalk.base_url = :'url';
SELECT user_id FROM taptalk_auth_ticket(req('reuse-port2'));
RESET taptalk.base_url;
SELECT user_id FROM taptalk_auth_ticket(req('reuse-port1'));
SELECT r->>'port' = current_setting('mock.port2') AS on_port2, (r->>'body')::jsonb->>'xcUserID' AS xc_user_id
FROM mock_requests(:mark) r ORDER BY (r->>'seq')::int;

-- a new key: the next call sends it
SELECT mock_mark() AS mark \gset
SET taptalk.server_key_secret = 'rotated';
SELECT error_code FROM taptalk_auth_ticket(req('reuse-key'));
RESET taptalk.server_key_secret;
SELECT convert_from(decode(h->>1, 'base64'), 'UTF8') AS sent_key
FROM mock_requests(:mark) r, jsonb_array_elements(r->'headers') h
WHERE h->>0 = 'Server-Key';

-- after a timed-out request the handle is reused safely
SET taptalk.timeout = 200;
SELECT error_code FROM taptalk_auth_ticket(req('fault-slow-2000'));
RESET taptalk.timeout;
SELECT user_id FROM taptalk_auth_ticket(req('reuse-after-timeout'));
