/* taptalk--1.1--1.2.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION taptalk UPDATE TO '1.2'" to load this file. \quit

-- taptalk_worker_status() gains paused_until: when the pause the worker
-- waits out ends (TapTalk's rate limit, or TapTalk out of reach).  Its OUT
-- columns change, so the function and the view over it are made again, with
-- the same comment and privileges.
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
	OUT paused_until timestamptz)
RETURNS record
AS 'MODULE_PATHNAME', 'taptalk_worker_status'
LANGUAGE C STRICT VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION taptalk_worker_status() IS
'what taptalk''s background worker reports about itself';

CREATE VIEW taptalk_worker AS
	SELECT w.pid, w.database, w.state, w.state_since, w.paused_until,
		   w.in_flight,
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
