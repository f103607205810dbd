--
-- validation: every check made before any network I/O.  Each failure is a
-- row with TapTalk's code 40002, the field's code and the server's style of
-- message; the mock must receive nothing.
--
SELECT mock_mark() AS mark \gset

-- a non-object request is the caller's mistake: ERROR 22023
SELECT taptalk_auth_ticket('[1, 2]');
\echo SQLSTATE :SQLSTATE
SELECT taptalk_auth_ticket('"a string"');
SELECT taptalk_auth_ticket('42');
SELECT taptalk_auth_ticket('true');
SELECT taptalk_auth_ticket('null');

-- STRICT: a SQL NULL gives NULL, not a request
SELECT taptalk_auth_ticket(NULL) IS NULL AS is_null;

-- each required field: missing, JSON null, empty, blank
SELECT f.name, v.how, r.*
FROM (VALUES (1, 'userIPAddress'), (2, 'userAgent'), (3, 'userPlatform'),
			 (4, 'userDeviceID'), (5, 'xcUserID'), (6, 'fullName')) AS f(n, name),
	 (VALUES (1, 'missing'), (2, 'null'), (3, 'empty'), (4, 'blank')) AS v(m, how),
	 LATERAL taptalk_auth_ticket(
		CASE v.how
			WHEN 'missing' THEN req('v-1') - f.name
			WHEN 'null' THEN req('v-1') || jsonb_build_object(f.name, NULL)
			WHEN 'empty' THEN req('v-1') || jsonb_build_object(f.name, '')
			ELSE req('v-1') || jsonb_build_object(f.name, E' \t\n ')
		END) AS r
ORDER BY f.n, v.m;

-- wrong JSON types: every field is a string
SELECT t.val, r.*
FROM (VALUES (1, '12'), (2, 'true'), (3, '{"a": 1}'), (4, '["x"]'), (5, '1.5')) AS t(n, val),
	 LATERAL taptalk_auth_ticket(req('v-2') || jsonb_build_object('fullName', t.val::jsonb)) AS r
ORDER BY t.n;
SELECT * FROM taptalk_auth_ticket(req('v-3') || '{"email": 5}');
SELECT * FROM taptalk_auth_ticket(req('v-3') || '{"userRoleCode": false}');
SELECT * FROM taptalk_auth_ticket(req('v-3') || '{"photoFullsizeURL": {}}');

-- xcUserID may be an integral number, but nothing else
SELECT * FROM taptalk_auth_ticket(req('x') || '{"xcUserID": 1.5}');
SELECT * FROM taptalk_auth_ticket(req('x') || '{"xcUserID": true}');
SELECT * FROM taptalk_auth_ticket(req('x') || '{"xcUserID": [6]}');

-- userPlatform: android, ios or web, exactly
SELECT * FROM taptalk_auth_ticket(req('v-4') || '{"userPlatform": "windows"}');
SELECT * FROM taptalk_auth_ticket(req('v-4') || '{"userPlatform": "Android"}');
SELECT * FROM taptalk_auth_ticket(req('v-4') || '{"userPlatform": "ios "}');

-- xcUserID: at most 50 characters, counted as characters, not bytes
SELECT * FROM taptalk_auth_ticket(req(repeat('x', 51)));
SELECT * FROM taptalk_auth_ticket(req(repeat('é', 51)));
SELECT * FROM taptalk_auth_ticket(jsonb_set(req('x'), '{xcUserID}', '123456789012345678901234567890123456789012345678901'));

-- unrecognized keys: error_field is empty; the message names the key
SELECT * FROM taptalk_auth_ticket(req('v-5') || '{"xcUserId": "6"}');
SELECT * FROM taptalk_auth_ticket(req('v-5') || '{"": 1}');
-- a typo is reported before the "missing" field it explains
SELECT * FROM taptalk_auth_ticket((req('v-5') - 'xcUserID') || '{"xcUserId": "6"}');
-- with two unrecognized keys, the first in jsonb's key order is named
SELECT * FROM taptalk_auth_ticket(req('v-5') || '{"zzz": 1, "aa": 2}');

-- several failures: the first field in the documented order is reported
SELECT * FROM taptalk_auth_ticket('{}');
SELECT * FROM taptalk_auth_ticket(req('v-6') - 'fullName' - 'userAgent');
SELECT * FROM taptalk_auth_ticket(req('v-6') || '{"userPlatform": "x", "userDeviceID": null}');
SELECT * FROM taptalk_auth_ticket(req(repeat('y', 60)) || '{"fullName": 1}');

-- none of the above reached the server
SELECT count(*) AS requests_seen FROM mock_requests(:mark);

-- numbers at the edges of what a jsonb can hold, in every place a number
-- can go: each is a 40002 row or a sent request, never an ERROR.  An
-- integral xcUserID is sent as its digits ("6.0" as "6"), within the
-- 50-character limit; any non-zero fraction is refused; a string field
-- refuses every number.
CREATE TEMP TABLE numeric_edge (n int, label text, num jsonb);
INSERT INTO numeric_edge VALUES
	(1, '1e1000', '1e1000'),
	(2, '1e-1000', '1e-1000'),
	(3, '-0', '-0'),
	(4, '0.0', '0.0'),
	(5, '6.0', '6.0'),
	(6, '1e2', '1e2'),
	(7, '131072 nines .5', (repeat('9', 131072) || '.5')::jsonb),
	(8, '131072 nines', repeat('9', 131072)::jsonb),
	(9, '-131072 nines', ('-' || repeat('9', 131072))::jsonb),
	(10, '9e131071', '9e131071'),
	(11, '50 nines', repeat('9', 50)::jsonb),
	(12, '1e50', '1e50'),
	(13, '-49 nines', ('-' || repeat('9', 49))::jsonb),
	(14, '-50 nines', ('-' || repeat('9', 50))::jsonb),
	(15, '1e-16383', '1e-16383'),
	(16, '-1e-16383', '-1e-16383'),
	(17, '1.(16383 zeros)', ('1.' || repeat('0', 16383))::jsonb),
	(18, '-1e1000', '-1e1000');
SELECT mock_mark() AS mark \gset
SELECT e.label, r.*
FROM numeric_edge e,
	 LATERAL taptalk_auth_ticket(jsonb_set(req('x'), '{xcUserID}', e.num)) AS r
ORDER BY e.n;
SELECT e.label, r.*
FROM numeric_edge e,
	 LATERAL taptalk_auth_ticket(jsonb_set(req('x'), '{fullName}', e.num)) AS r
ORDER BY e.n;
SELECT e.label, r.*
FROM taptalk_auth_tickets(ARRAY(
		SELECT jsonb_set(req('x'), '{xcUserID}', num) FROM numeric_edge ORDER BY n)) AS r
	 JOIN numeric_edge e ON e.n = r.ord
ORDER BY r.ord;
-- what was sent: xcUserID as a JSON string, twice each (one call, one batch)
SELECT jsonb_typeof((e->>'body')::jsonb->'xcUserID') AS type,
	   (e->>'body')::jsonb->>'xcUserID' AS xc_user_id, count(*)
FROM mock_requests(:mark) e
GROUP BY 1, 2
ORDER BY 2;

-- sizes: each field at most 4096 bytes of UTF-8, counted after conversion
-- (2049 two-byte characters are 4098 bytes), the whole body at most 16384
-- bytes; a field over the limit fails however large it is, in every path
SELECT mock_mark() AS mark \gset
SELECT * FROM taptalk_auth_ticket(req('v-size') || jsonb_build_object('fullName', repeat('x', 4097)));
SELECT * FROM taptalk_auth_ticket(req('v-size') || jsonb_build_object('email', repeat('é', 2049)));
SELECT * FROM taptalk_auth_ticket(req('v-size') || jsonb_build_object(
	'email', repeat('a', 4000), 'phone', repeat('b', 4000), 'username', repeat('c', 4000),
	'userRoleCode', repeat('d', 4000), 'photoThumbnailURL', repeat('e', 4000)));
SELECT ord, error_code, error_field, error_message
FROM taptalk_auth_tickets(ARRAY[req('v-size') || jsonb_build_object('userAgent', repeat('x', 10000000)),
								req('v-size') || jsonb_build_object('xcUserID', repeat('1', 5000))]);
-- none of them was sent
SELECT count(*) AS sent FROM mock_requests(:mark);
