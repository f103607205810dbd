--
-- request: exactly what TapTalk receives, as recorded by the mock.
--
SELECT mock_mark() AS mark \gset

-- every field, the optional ones included
SELECT * FROM taptalk_auth_ticket(req('6') || jsonb_build_object(
	'email', 'jony@email.com',
	'phone', '08991234567',
	'username', 'jony',
	'photoThumbnailURL', 'http://www.example.com/photo/thumb/6.jpg',
	'photoFullsizeURL', 'http://www.example.com/photo/full/6.jpg',
	'userRoleCode', 'user'));

-- one request, on the endpoint, with these headers in this order
SELECT r->>'method' AS method, r->>'path' AS path, jsonb_array_length(r->'headers') AS nheaders
FROM mock_requests(:mark) r;
SELECT h->>0 AS name,
	   CASE h->>0 WHEN 'Host' THEN replace(h->>1, current_setting('mock.port'), 'PORT')
				  WHEN 'Server-Key' THEN '(checked below)'
				  ELSE h->>1 END AS value
FROM mock_requests(:mark) r, jsonb_array_elements(r->'headers') h;
-- the Server-Key header is base64 of "key id:key secret" (the mock's test
-- secret, from postgresql.conf; SHOW shows it masked)
SELECT convert_from(decode(h->>1, 'base64'), 'UTF8') =
	   current_setting('taptalk.server_key_id') || ':test-key-secret-Zq8X' AS key_matches
FROM mock_requests(:mark) r, jsonb_array_elements(r->'headers') h
WHERE h->>0 = 'Server-Key';
-- the body, byte for byte: the documented order, compact, UTF-8
SELECT r->>'body' AS body, r->'body_is_json' AS body_is_json
FROM mock_requests(:mark) r;

-- optional fields given as JSON null are left out; xcUserID as a number is sent as a string
SELECT mock_mark() AS mark \gset
SELECT * FROM taptalk_auth_ticket(jsonb_set(req('x'), '{xcUserID}', '42') ||
	'{"email": null, "phone": null, "userRoleCode": "admin"}');
SELECT * FROM taptalk_auth_ticket(jsonb_set(req('x'), '{xcUserID}', '7.0'));
SELECT * FROM taptalk_auth_ticket(jsonb_set(req('x'), '{xcUserID}', '-3'));
SELECT r->>'body' AS body FROM mock_requests(:mark) r ORDER BY (r->>'seq')::int;

-- escaping: quotes, backslashes, control characters, non-ASCII; compared as bytes
SELECT mock_mark() AS mark \gset
SELECT user_id, error_code FROM taptalk_auth_ticket(req('esc') || jsonb_build_object(
	'fullName', E'Jo "the \\ one"\n\t\u0001 é 日本 😀',
	'username', '</script>'));
SELECT r->>'body' AS body,
	   decode(r->>'body_b64', 'base64') = convert_to(
		'{"userIPAddress":"182.253.177.234","userAgent":"AdvancedRestClient/12.1.14",'
		'"userPlatform":"android","userDeviceID":"aaaa-bbbb-cccc-dddd","xcUserID":"esc",'
		'"fullName":"Jo \"the \\ one\"\n\t\u0001 é 日本 😀","username":"</script>"}', 'UTF8') AS bytes_match,
	   (r->>'body')::jsonb->>'fullName' = E'Jo "the \\ one"\n\t\u0001 é 日本 😀' AS round_trips
FROM mock_requests(:mark) r;

-- 50 characters of xcUserID are fine even when they take 100 bytes
SELECT * FROM taptalk_auth_ticket(req(repeat('é', 50)));

-- the base URL may end with slashes: one slash between base and path
SELECT mock_mark() AS mark \gset
SELECT format('http://127.0.0.1:%s///', current_setting('mock.port')) AS url \gset
SET taptalk.base_url = :'url';
SELECT user_id FROM taptalk_auth_ticket(req('slash'));
RESET taptalk.base_url;
SELECT r->>'path' AS path FROM mock_requests(:mark) r;
