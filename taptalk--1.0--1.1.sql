/* taptalk--1.0--1.1.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION taptalk UPDATE TO '1.1'" to load this file. \quit

-- Statistics, kept in shared memory (taptalk must be preloaded), one row per
-- path: 'single' (taptalk_auth_ticket) and 'batch' (taptalk_auth_tickets).
-- The columns are described in README.md, "Monitoring".
CREATE FUNCTION taptalk_stats(
	OUT path text,
	OUT requests bigint,
	OUT rejected bigint,
	OUT attempts bigint,
	OUT successes bigint,
	OUT failures bigint,
	OUT abandoned bigint,
	OUT connections bigint,
	OUT bytes_sent bigint,
	OUT bytes_received bigint,
	OUT latency_sum_ms double precision,
	OUT latency_buckets bigint[],
	OUT stats_reset timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'taptalk_stats'
LANGUAGE C STRICT VOLATILE PARALLEL SAFE ROWS 3;

COMMENT ON FUNCTION taptalk_stats() IS
'taptalk''s statistics, one row per path';

CREATE FUNCTION taptalk_stats_errors(
	OUT path text,
	OUT error_code text,
	OUT count bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'taptalk_stats_errors'
LANGUAGE C STRICT VOLATILE PARALLEL SAFE ROWS 27;

COMMENT ON FUNCTION taptalk_stats_errors() IS
'taptalk''s failed requests, per path and error_code';

CREATE FUNCTION taptalk_stats_latency(
	OUT path text,
	OUT le_ms integer,
	OUT count bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'taptalk_stats_latency'
LANGUAGE C STRICT VOLATILE PARALLEL SAFE ROWS 42;

COMMENT ON FUNCTION taptalk_stats_latency() IS
'taptalk''s request latency histogram, per path and bucket';

CREATE FUNCTION taptalk_stats_reset()
RETURNS timestamptz
AS 'MODULE_PATHNAME', 'taptalk_stats_reset'
LANGUAGE C STRICT VOLATILE PARALLEL RESTRICTED;

COMMENT ON FUNCTION taptalk_stats_reset() IS
'set taptalk''s statistics to zero';

CREATE VIEW taptalk_stats AS
	SELECT * FROM taptalk_stats();

CREATE VIEW taptalk_stats_errors AS
	SELECT * FROM taptalk_stats_errors();

CREATE VIEW taptalk_stats_latency AS
	SELECT * FROM taptalk_stats_latency();

-- The statistics say something about the user base: pg_monitor and
-- superusers read them, PUBLIC does not.  Only a superuser resets them,
-- unless EXECUTE on taptalk_stats_reset() is granted.
REVOKE EXECUTE ON FUNCTION taptalk_stats() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION taptalk_stats_errors() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION taptalk_stats_latency() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION taptalk_stats_reset() FROM PUBLIC;
REVOKE ALL ON taptalk_stats, taptalk_stats_errors, taptalk_stats_latency FROM PUBLIC;
GRANT EXECUTE ON FUNCTION taptalk_stats() TO pg_monitor;
GRANT EXECUTE ON FUNCTION taptalk_stats_errors() TO pg_monitor;
GRANT EXECUTE ON FUNCTION taptalk_stats_latency() TO pg_monitor;
GRANT SELECT ON taptalk_stats, taptalk_stats_errors, taptalk_stats_latency TO pg_monitor;
