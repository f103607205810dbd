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
