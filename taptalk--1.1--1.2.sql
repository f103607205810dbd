/* taptalk--1.1--1.2.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION taptalk UPDATE TO '1.2'" to load this file. \quit

-- taptalk_worker_status() gains paused_until, when the pause the worker
-- waits out ends (TapTalk's rate limit, or TapTalk out of reach), and
-- concurrency, the worker's send window now.  Its OUT columns change, so the
-- function and the view over it are made again, with the same comment and
-- privileges.
DROP VIEW taptalk_worker;
DROP FUNCTION taptalk_worker_status();

CREATE FUNCTION taptalk_worker_status(
	OUT pid integer,
	OUT database text,
	OUT state text,
	OUT state_since timestamptz,
	OUT in_flight integer,
	OUT last_success timestamptz,
	OUT last_error timestamptz,
	OUT last_error_code text,
	OUT paused_until timestamptz,
	OUT concurrency integer)
RETURNS record
AS 'MODULE_PATHNAME', 'taptalk_worker_status'
LANGUAGE C STRICT VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION taptalk_worker_status() IS
'what taptalk''s background worker reports about itself';

CREATE VIEW taptalk_worker AS
	SELECT w.pid, w.database, w.state, w.state_since, w.paused_until,
		   w.in_flight, w.concurrency,
		   q.queued, q.sending, q.succeeded, q.failed,
		   pg_catalog.clock_timestamp() - q.oldest_queued AS oldest_queued_age,
		   w.last_success, w.last_error, w.last_error_code
	FROM taptalk_worker_status() w,
		 (SELECT count(*) FILTER (WHERE t.state = 'queued') AS queued,
				 count(*) FILTER (WHERE t.state = 'sending') AS sending,
				 count(*) FILTER (WHERE t.state = 'succeeded') AS succeeded,
				 count(*) FILTER (WHERE t.state = 'failed') AS failed,
				 min(t.enqueued_at) FILTER (WHERE t.state = 'queued') AS oldest_queued
		  FROM taptalk_queue t) q;

REVOKE EXECUTE ON FUNCTION taptalk_worker_status() FROM PUBLIC;
REVOKE ALL ON taptalk_worker FROM PUBLIC;
GRANT EXECUTE ON FUNCTION taptalk_worker_status() TO pg_read_all_stats;
GRANT SELECT ON taptalk_worker TO pg_read_all_stats;

-- taptalk_stats() gains rate_limited (429 answers) and rate_limit_wait_ms
-- (time waited for a Retry-After or for taptalk.max_rate), before
-- stats_reset; the function and the view are made again likewise.
DROP VIEW taptalk_stats;
DROP FUNCTION taptalk_stats();

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
	OUT rate_limited bigint,
	OUT rate_limit_wait_ms double precision,
	OUT stats_reset timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'taptalk_stats'
LANGUAGE C STRICT VOLATILE PARALLEL SAFE ROWS 3;

COMMENT ON FUNCTION taptalk_stats() IS
'taptalk''s statistics, one row per path';

CREATE VIEW taptalk_stats AS
	SELECT * FROM taptalk_stats();

REVOKE EXECUTE ON FUNCTION taptalk_stats() FROM PUBLIC;
REVOKE ALL ON taptalk_stats FROM PUBLIC;
GRANT EXECUTE ON FUNCTION taptalk_stats() TO pg_read_all_stats;
GRANT SELECT ON taptalk_stats TO pg_read_all_stats;
