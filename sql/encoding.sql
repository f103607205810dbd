--
-- encoding: databases that are not UTF-8.  TapTalk speaks UTF-8 both ways:
-- request strings are converted to UTF-8 (an element that cannot be is a
-- 40002 row), the answer is parsed as UTF-8 whatever the database encoding,
-- and only the values returned are converted to the database encoding.
-- Nothing TapTalk sends raises an error: a returned value the database
-- cannot hold makes the row INVALID_RESPONSE, and in TapTalk's error message
-- such a character becomes '?'.
--
-- The mock's fault-unicode-<place>-<form>-<hex> answers put U+<hex> in one
-- place of the answer, raw (UTF-8) or as a \u escape: 4e2d is a CJK
-- character no single-byte encoding has, e9 is e-acute (LATIN1 has it),
-- 1f600 an emoji (an escaped surrogate pair).
--
SELECT current_database() AS regress_db \gset
CREATE DATABASE taptalk_latin1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'
	TEMPLATE template0;
CREATE DATABASE taptalk_sql_ascii ENCODING 'SQL_ASCII' LC_COLLATE 'C'
	LC_CTYPE 'C' TEMPLATE template0;
CREATE DATABASE taptalk_win1252 ENCODING 'WIN1252' LC_COLLATE 'C' LC_CTYPE 'C'
	TEMPLATE template0;

--
-- LATIN1
--
\c taptalk_latin1
-- this file and its expected output are UTF-8; the server converts
SET client_encoding = 'UTF8';
SHOW server_encoding;
CREATE EXTENSION taptalk;
CREATE FUNCTION req(xc text) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
	SELECT jsonb_build_object(
		'userIPAddress', '182.253.177.234',
		'userAgent', 'AdvancedRestClient/12.1.14',
		'userPlatform', 'android',
		'userDeviceID', 'aaaa-bbbb-cccc-dddd',
		'xcUserID', xc,
		'fullName', 'Jony')
$$;
-- the request bodies the mock received after a position in its log, as
-- bytes (the log is ASCII, so reading it works in any encoding)
CREATE FUNCTION mock_mark() RETURNS bigint LANGUAGE sql AS $$
	SELECT (pg_stat_file(current_setting('mock.log'))).size
$$;
CREATE FUNCTION mock_bodies(since bigint) RETURNS SETOF bytea LANGUAGE sql AS $$
	SELECT decode(substring(line FROM '"body_b64":"([^"]*)"'), 'base64')
	FROM regexp_split_to_table(
		pg_read_file(current_setting('mock.log'), since, mock_mark() - since),
		E'\n') AS line
	WHERE line LIKE '{"event":"request",%'
$$;
-- the xcUserID member of a body, with bytes above 127 in octal
CREATE FUNCTION sent_user_id(body bytea) RETURNS text LANGUAGE sql AS $$
	SELECT encode(substring(body FROM position('"xcUserID"'::bytea IN body)
							FOR position('","fullName"'::bytea IN body)
								- position('"xcUserID"'::bytea IN body) + 1),
				  'escape')
$$;

-- e-acute, which LATIN1 has, goes out as UTF-8 (\303\251) and comes back
SELECT mock_mark() AS mark \gset
SELECT * FROM taptalk_auth_ticket(req('é-latin1'));
SELECT sent_user_id(b) FROM mock_bodies(:mark) b;

-- each place and form: only the values returned must fit in LATIN1
SELECT t.x, r.*
FROM unnest(ARRAY[
		-- ignored members: never looked at, whatever they hold
		'fault-unicode-note-raw-4e2d',
		'fault-unicode-note-esc-4e2d',
		'fault-unicode-note-esc-1f600',
		-- returned values LATIN1 has: converted
		'fault-unicode-userid-raw-e9',
		'fault-unicode-userid-esc-e9',
		'fault-unicode-ticket-esc-e9',
		-- returned values LATIN1 does not have: INVALID_RESPONSE
		'fault-unicode-userid-raw-4e2d',
		'fault-unicode-userid-esc-4e2d',
		'fault-unicode-ticket-raw-4e2d',
		'fault-unicode-ticket-esc-1f600',
		'fault-unicode-code-raw-4e2d',
		'fault-unicode-field-esc-4e2d',
		-- TapTalk's error: code and field kept, the message made to fit
		'fault-unicode-code-esc-e9',
		'fault-unicode-message-raw-e9',
		'fault-unicode-message-raw-4e2d',
		'fault-unicode-message-esc-4e2d',
		'fault-unicode-message-esc-1f600'
	]) WITH ORDINALITY AS t(x, n),
	LATERAL taptalk_auth_ticket(req(t.x)) AS r
ORDER BY t.n;

-- in a batch, each element is its own row and none fails the others
SELECT * FROM taptalk_auth_tickets(ARRAY[
	req('é-batch'),
	req('fault-unicode-userid-raw-4e2d'),
	req('fault-unicode-note-esc-4e2d'),
	req('fault-unicode-message-esc-4e2d'),
	req('fault-unicode-ticket-esc-1f600'),
	req('b-6')
]);

--
-- SQL_ASCII: strings are bytes; those TapTalk gets must be UTF-8
--
\c taptalk_sql_ascii
SHOW server_encoding;
SHOW client_encoding;
CREATE EXTENSION taptalk;
CREATE FUNCTION req(xc text) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
	SELECT jsonb_build_object(
		'userIPAddress', '182.253.177.234',
		'userAgent', 'AdvancedRestClient/12.1.14',
		'userPlatform', 'android',
		'userDeviceID', 'aaaa-bbbb-cccc-dddd',
		'xcUserID', xc,
		'fullName', 'Jony')
$$;
CREATE FUNCTION mock_mark() RETURNS bigint LANGUAGE sql AS $$
	SELECT (pg_stat_file(current_setting('mock.log'))).size
$$;

-- a string that is not UTF-8 (here the LATIN1 byte of e-acute, \351) is a
-- 40002 row for its field, before anything is sent
SELECT mock_mark() AS mark \gset
SELECT * FROM taptalk_auth_ticket(req('x') || jsonb_build_object('fullName', E'caf\351'));
SELECT * FROM taptalk_auth_ticket(req(E'caf\351'));
SELECT * FROM taptalk_auth_ticket(req('x') || jsonb_build_object('email', E'\377@example.com'));
-- a truncated UTF-8 sequence (the first byte of e-acute alone)
SELECT * FROM taptalk_auth_ticket(req('x') || jsonb_build_object('userAgent', E'agent \303'));
SELECT (pg_stat_file(current_setting('mock.log'))).size = :mark AS nothing_sent;

-- valid UTF-8 is sent as it is and comes back as it is; xcUserID's limit
-- counts its UTF-8 characters: 50 e-acutes (100 bytes) pass, 51 do not
SELECT * FROM taptalk_auth_ticket(req('é-ascii'));
SELECT length(user_id) AS bytes FROM taptalk_auth_ticket(req(repeat('é', 50)));
SELECT * FROM taptalk_auth_ticket(req(repeat('é', 51)));
-- whatever TapTalk returns is UTF-8, which SQL_ASCII holds as it is
SELECT t.x, r.*
FROM unnest(ARRAY[
		'fault-unicode-userid-raw-4e2d',
		'fault-unicode-userid-esc-4e2d',
		'fault-unicode-ticket-esc-1f600',
		'fault-unicode-message-raw-4e2d'
	]) WITH ORDINALITY AS t(x, n),
	LATERAL taptalk_auth_ticket(req(t.x)) AS r
ORDER BY t.n;

-- in a batch, the element that is not UTF-8 is its own 40002 row
SELECT * FROM taptalk_auth_tickets(ARRAY[
	req('a-1'),
	req('x') || jsonb_build_object('fullName', E'caf\351'),
	req('é-3'),
	req('fault-unicode-userid-esc-4e2d')
]);

--
-- WIN1252: a byte with no Unicode character (0x81) is a 40002 row; the euro
-- sign (0x80 here, U+20AC in UTF-8) converts both ways
--
\c taptalk_win1252
SET client_encoding = 'UTF8';
SHOW server_encoding;
CREATE EXTENSION taptalk;
CREATE FUNCTION req(xc text) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
	SELECT jsonb_build_object(
		'userIPAddress', '182.253.177.234',
		'userAgent', 'AdvancedRestClient/12.1.14',
		'userPlatform', 'android',
		'userDeviceID', 'aaaa-bbbb-cccc-dddd',
		'xcUserID', xc,
		'fullName', 'Jony')
$$;
SELECT * FROM taptalk_auth_ticket(req('x') || jsonb_build_object('fullName', convert_from('\x81'::bytea, 'WIN1252')));
SELECT * FROM taptalk_auth_tickets(ARRAY[
	req('€-1'),
	req('x') || jsonb_build_object('phone', convert_from('\x2b81'::bytea, 'WIN1252')),
	req('fault-unicode-userid-raw-20ac'),
	req('fault-unicode-userid-raw-4e2d')
]);

--
-- UTF8, for comparison: every character fits
--
\c :regress_db
SHOW server_encoding;
SELECT t.x, r.*
FROM unnest(ARRAY[
		'fault-unicode-note-esc-4e2d',
		'fault-unicode-userid-raw-4e2d',
		'fault-unicode-userid-esc-4e2d',
		'fault-unicode-ticket-esc-1f600',
		'fault-unicode-code-raw-4e2d',
		'fault-unicode-field-esc-4e2d',
		'fault-unicode-message-esc-4e2d'
	]) WITH ORDINALITY AS t(x, n),
	LATERAL taptalk_auth_ticket(req(t.x)) AS r
ORDER BY t.n;

-- the strings read from the answer are de-escaped here, to UTF-8, and not by
-- the server's lexer (which de-escapes to the database encoding): every JSON
-- escape, in a key and in a value, upper- and lower-case hex, a surrogate pair
SELECT user_id = E'a"b\\c/d\b\f\n\r\teé😀' AS user_id_decoded, ticket,
	   error_code
FROM taptalk_auth_ticket(req('fault-escapes-all'));
-- an escape that is no character (a lone or unpaired surrogate, \u0000) in
-- a value that is read makes the answer invalid; in one that is not, it is
-- ignored
SELECT t.x, r.*
FROM unnest(ARRAY[
		'fault-escapes-lone',
		'fault-escapes-unpaired',
		'fault-escapes-low',
		'fault-escapes-nul',
		'fault-escapes-ignored'
	]) WITH ORDINALITY AS t(x, n),
	LATERAL taptalk_auth_ticket(req(t.x)) AS r
ORDER BY t.n;

DROP DATABASE taptalk_latin1;
DROP DATABASE taptalk_sql_ascii;
DROP DATABASE taptalk_win1252;
