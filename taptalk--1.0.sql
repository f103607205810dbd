/* taptalk--1.0.sql */

-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION taptalk" to load this file. \quit

-- What one Request Auth Ticket call answered: user_id and ticket on success,
-- otherwise error_code (TapTalk's code, or one of ours), error_field (the
-- request field's code, when known) and error_message.
CREATE TYPE taptalk_auth_ticket_result AS (
	user_id text,
	ticket text,
	error_code text,
	error_field text,
	error_message text
);

CREATE FUNCTION taptalk_auth_ticket(request jsonb)
RETURNS taptalk_auth_ticket_result
AS 'MODULE_PATHNAME', 'taptalk_auth_ticket'
LANGUAGE C STRICT VOLATILE;

COMMENT ON FUNCTION taptalk_auth_ticket(jsonb) IS
'request a TapTalk auth ticket for one user';

CREATE FUNCTION taptalk_auth_tickets(requests jsonb[])
RETURNS TABLE (ord int, user_id text, ticket text, error_code text,
			   error_field text, error_message text)
AS 'MODULE_PATHNAME', 'taptalk_auth_tickets'
LANGUAGE C STRICT VOLATILE ROWS 100;

COMMENT ON FUNCTION taptalk_auth_tickets(jsonb[]) IS
'request TapTalk auth tickets for many users, concurrently';

-- Each call sends the server key to TapTalk: callers must be granted EXECUTE.
REVOKE EXECUTE ON FUNCTION taptalk_auth_ticket(jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION taptalk_auth_tickets(jsonb[]) FROM PUBLIC;
