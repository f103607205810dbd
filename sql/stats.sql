--
-- stats: the statistics views count a known sequence of calls exactly.
--
-- the views' columns, in order
SELECT attrelid::regclass AS view, attnum, attname, format_type(atttypid, atttypmod)
FROM pg_attribute
WHERE attrelid IN ('taptalk_stats'::regclass, 'taptalk_stats_errors'::regclass,
                   'taptalk_stats_latency'::regclass)
  AND attnum > 0
ORDER BY attrelid::regclass::text, attnum;

-- a reset zeroes everything and sets stats_reset
SELECT stats_reset AS before_reset FROM taptalk_stats WHERE path = 'single' \gset
SELECT taptalk_stats_reset() > :'before_reset'::timestamptz AS reset_moves_time;
SELECT * FROM taptalk_stats_errors WHERE count <> 0;
SELECT path, requests, rejected, attempts, successes, failures, abandoned,
       connections, bytes_sent, bytes_received, latency_sum_ms, latency_buckets,
       stats_reset > :'before_reset'::timestamptz AS stats_reset_moved
FROM taptalk_stats ORDER BY path;
SELECT mock_mark() AS mark \gset

-- taptalk_auth_ticket: two successes
SELECT user_id FROM taptalk_auth_ticket(req('stats-1'));
SELECT user_id FROM taptalk_auth_ticket(req('stats-2'));
-- TapTalk's envelopes: 40002, 40001, 40101 (a wrong key), 50000, and 40009,
-- which counts as OTHER
SELECT error_code FROM taptalk_auth_ticket(req('fault-envelope-field'));
SELECT error_code FROM taptalk_auth_ticket(req('fault-unicode-code-raw-31'));
SET taptalk.server_key_secret = 'not-the-secret';
SELECT error_code FROM taptalk_auth_ticket(req('stats-3'));
RESET taptalk.server_key_secret;
SELECT error_code FROM taptalk_auth_ticket(req('fault-envelope500'));
SELECT error_code FROM taptalk_auth_ticket(req('fault-unicode-code-raw-39'));
-- our codes: TIMEOUT (one attempt: a timeout is not retried), then, without
-- retries, CONNECTION_FAILED, HTTP_ERROR and INVALID_RESPONSE
SET taptalk.timeout = 300;
SELECT error_code FROM taptalk_auth_ticket(req('fault-slow-1000'));
RESET taptalk.timeout;
SET taptalk.max_retries = 0;
SELECT error_code FROM taptalk_auth_ticket(req('fault-reset'));
SELECT error_code FROM taptalk_auth_ticket(req('fault-status-404'));
SELECT error_code FROM taptalk_auth_ticket(req('fault-badjson'));
RESET taptalk.max_retries;
-- a retried request that succeeds at the third attempt ...
SELECT user_id FROM taptalk_auth_ticket(req('fault-flaky-2-stats'));
-- ... and one whose two attempts both fail
SET taptalk.max_retries = 1;
SELECT error_code FROM taptalk_auth_ticket(req('fault-status-503'));
RESET taptalk.max_retries;
-- refused by our validation: counted as rejected, not as a request
SELECT error_code, error_field FROM taptalk_auth_ticket(req('stats-4') - 'fullName');

-- taptalk_auth_tickets: two successes, a 50000, a NULL element (nothing to
-- count) and two elements refused by our validation
SELECT ord, user_id, error_code
FROM taptalk_auth_tickets(ARRAY[req('stats-b1'), req('stats-b2'),
                                req('fault-envelope500'), NULL,
                                req('stats-b3') - 'xcUserID', '[1]'::jsonb]);

-- single: 13 requests, 16 attempts (the flaky one took 3, the 503 two),
-- 3 successes, 10 failures; batch: 3 requests
SELECT path, requests, rejected, attempts, successes, failures, abandoned,
       requests = successes + failures AS outcomes_add_up
FROM taptalk_stats ORDER BY path;
SELECT * FROM taptalk_stats_errors WHERE count <> 0 ORDER BY path, error_code;
-- every attempt reached the mock, and each connection it saw was counted
SELECT (SELECT sum(attempts) FROM taptalk_stats) =
       (SELECT count(*) FROM mock_requests(:mark)) AS attempts_match_mock,
       (SELECT sum(connections) FROM taptalk_stats) =
       mock_connections(:mark) AS connections_match_mock,
       (SELECT sum(connections) FROM taptalk_stats) BETWEEN 2 AND 19
         AS connections_reused;
-- bytes sent: the request line, the headers and the body of each request
-- the mock received
SELECT (SELECT sum(bytes_sent) FROM taptalk_stats) =
       (SELECT sum(octet_length(format('%s %s HTTP/1.1', r->>'method', r->>'path')) + 2
                   + (SELECT sum(octet_length(h->>0) + 2 + octet_length(h->>1) + 2)
                      FROM jsonb_array_elements(r->'headers') h)
                   + 2 + octet_length(convert_to(r->>'body', 'UTF8')))
        FROM mock_requests(:mark) r) AS bytes_sent_match_mock;
SELECT bytes_received > 0 AS received FROM taptalk_stats ORDER BY path;
-- the histogram holds every request; the TIMEOUT one took over 200 ms
SELECT s.path, (SELECT sum(c) FROM unnest(s.latency_buckets) c) = s.requests
         AS histogram_adds_up,
       cardinality(s.latency_buckets) AS buckets,
       s.latency_sum_ms >= 300 AS sum_has_the_timeout
FROM taptalk_stats s ORDER BY path;
SELECT path, sum(count) = (SELECT requests FROM taptalk_stats t WHERE t.path = l.path)
         AS latency_view_adds_up,
       sum(count) FILTER (WHERE le_ms > 200 OR le_ms IS NULL) >= 1 AS slow_one
FROM taptalk_stats_latency l WHERE path = 'single' GROUP BY path;
SELECT DISTINCT path, le_ms FROM taptalk_stats_latency ORDER BY path, le_ms;
-- no value holds the key or a ticket
SELECT count(*) AS secret_or_ticket
FROM (SELECT row_to_json(s)::text AS t FROM taptalk_stats s
      UNION ALL SELECT row_to_json(e)::text FROM taptalk_stats_errors e) v
WHERE t LIKE '%test-key%' OR t LIKE '%ticket-%';

-- the README's "is TapTalk healthy?" query: 10 of the 13 single requests
-- failed, 3 retries; the 95th percentile is at least the TIMEOUT's 300 ms
WITH l AS (
	SELECT path, le_ms,
		   sum(count) OVER (PARTITION BY path ORDER BY le_ms NULLS LAST) AS below,
		   sum(count) OVER (PARTITION BY path) AS total
	FROM taptalk_stats_latency)
SELECT s.path, s.requests,
	   round(100.0 * s.failures / nullif(s.requests, 0), 1) AS error_pct,
	   round(100.0 * (s.attempts - s.requests) / nullif(s.requests, 0), 1) AS retry_pct,
	   round((s.latency_sum_ms / nullif(s.requests, 0))::numeric, 1) > 0 AS has_mean_ms,
	   (SELECT min(le_ms) FROM l
		WHERE l.path = s.path AND l.total > 0 AND l.below >= 0.95 * l.total) >= 500
		AS p95_ms_at_least_500
FROM taptalk_stats s ORDER BY s.path;

-- a call cancelled by statement_timeout: its requests in flight are
-- abandoned, not finished
SELECT sum(requests) AS requests_before FROM taptalk_stats \gset
SET statement_timeout = 300;
SELECT * FROM taptalk_auth_ticket(req('fault-slow-3000'));
SELECT * FROM taptalk_auth_tickets(ARRAY[req('fault-slow-3000'), req('fault-slow-3001')]);
RESET statement_timeout;
SELECT path, abandoned FROM taptalk_stats ORDER BY path;
SELECT sum(requests) - :requests_before AS more_requests FROM taptalk_stats;

-- the bytes of one success, exactly: sent, 233 of request line and headers
-- (the mock's port has five digits) plus the body (177, as the mock received
-- it); received, 118 of status line and headers plus a body of 115
SELECT taptalk_stats_reset() IS NOT NULL AS reset;
SELECT mock_mark() AS mark \gset
SELECT user_id FROM taptalk_auth_ticket(req('stats-5'));
SELECT path, requests, attempts, successes, connections, bytes_sent,
       bytes_received
FROM taptalk_stats WHERE path = 'single';
SELECT octet_length(convert_to(r->>'body', 'UTF8')) AS body_bytes
FROM mock_requests(:mark) r;

-- a reset zeroes every counter again
SELECT taptalk_stats_reset() IS NOT NULL AS reset;
SELECT path, requests + rejected + attempts + successes + failures + abandoned
       + connections + bytes_sent + bytes_received AS total, latency_sum_ms,
       latency_buckets
FROM taptalk_stats ORDER BY path;
SELECT count(*) FROM taptalk_stats_errors WHERE count <> 0;

-- taptalk.stats_kind_id exists from PostgreSQL 18 on, set at server start,
-- 29 unless set (t/160_stats.pl tests what it does)
SELECT count(*) = (current_setting('server_version_num')::int >= 180000)::int
         AS stats_kind_id_where_expected
FROM pg_settings
WHERE name = 'taptalk.stats_kind_id' AND context = 'postmaster'
  AND boot_val = '29' AND min_val = '0' AND max_val = '32';

-- taptalk.track_stats = off: calls on every path in this session reach the
-- mock but count nothing (a success, a 404, a retried 503, a refused
-- request, a batch, a refused taptalk_enqueue); the views still read
SHOW taptalk.track_stats;
SET taptalk.track_stats = off;
SELECT mock_mark() AS mark \gset
SELECT user_id FROM taptalk_auth_ticket(req('stats-off-1'));
SELECT error_code FROM taptalk_auth_ticket(req('fault-status-404'));
SET taptalk.max_retries = 1;
SELECT error_code FROM taptalk_auth_ticket(req('fault-status-503'));
RESET taptalk.max_retries;
SELECT error_code FROM taptalk_auth_ticket(req('stats-off-2') - 'fullName');
SELECT ord, user_id, error_code
FROM taptalk_auth_tickets(ARRAY[req('stats-off-b1'), req('fault-envelope500'),
                                '[1]'::jsonb]);
SELECT taptalk_enqueue(req('stats-off-q') - 'fullName') AS off_id \gset
SELECT count(*) AS requests_the_mock_received FROM mock_requests(:mark);
SELECT path, requests + rejected + attempts + successes + failures + abandoned
       + connections + bytes_sent + bytes_received AS total, latency_sum_ms,
       latency_buckets
FROM taptalk_stats ORDER BY path;
SELECT count(*) FROM taptalk_stats_errors WHERE count <> 0;
SELECT count(*) FROM taptalk_stats_latency WHERE count <> 0;
DELETE FROM taptalk_queue WHERE id = :off_id;
-- on again, the next call counts
RESET taptalk.track_stats;
SELECT user_id FROM taptalk_auth_ticket(req('stats-on'));
SELECT path, requests, attempts, successes FROM taptalk_stats WHERE path = 'single';
SELECT taptalk_stats_reset() IS NOT NULL AS reset;

-- TapTalk's rate limit: each 429 answer counts in rate_limited, in every
-- path; rate_limit_wait_ms adds up the Retry-After waited (1 s here), not
-- the backoff after a 429 without one
SELECT taptalk_stats_reset() IS NOT NULL AS reset;
SELECT user_id FROM taptalk_auth_ticket(req('fault-answer-429-env-1-1-stats-a'));
SELECT ord, user_id
FROM taptalk_auth_tickets(ARRAY[req('fault-answer-429-text-none-1-stats-b'),
	req('fault-answer-429-env-none-2-stats-c'), req('stats-d')])
ORDER BY ord;
SELECT path, requests, attempts, successes, rate_limited,
	   rate_limit_wait_ms >= 1000 AS waited_1s, rate_limit_wait_ms < 2000 AS waited_under_2s
FROM taptalk_stats ORDER BY path;
SELECT taptalk_stats_reset() IS NOT NULL AS reset;
SELECT path, rate_limited, rate_limit_wait_ms FROM taptalk_stats ORDER BY path;

-- privileges: PUBLIC reads nothing and cannot reset; pg_read_all_stats
-- reads, and so pg_monitor, a member of it
CREATE ROLE taptalk_stats_monitor LOGIN IN ROLE pg_read_all_stats;
\c - taptalk_app
SELECT * FROM taptalk_stats;
SELECT * FROM taptalk_stats_errors;
SELECT * FROM taptalk_stats_latency;
SELECT * FROM taptalk_stats();
SELECT taptalk_stats_reset();
-- taptalk.track_stats is for superusers to set; anyone may read it
SET taptalk.track_stats = off;
SHOW taptalk.track_stats;
\c - taptalk_stats_monitor
SET taptalk.track_stats = off;
SELECT path, requests FROM taptalk_stats ORDER BY path;
SELECT count(*) FROM taptalk_stats_errors;
SELECT count(*) FROM taptalk_stats_latency;
SELECT count(*) FROM taptalk_stats();
SELECT taptalk_stats_reset();
\c - postgres
SELECT p.proname, p.proacl
FROM pg_proc p WHERE p.proname LIKE 'taptalk_stats%' ORDER BY 1;
SELECT relname, has_table_privilege('pg_read_all_stats', oid, 'SELECT') AS pg_read_all_stats_reads,
       has_table_privilege('pg_monitor', oid, 'SELECT') AS pg_monitor_reads,
       has_table_privilege('taptalk_app', oid, 'SELECT') AS public_reads
FROM pg_class WHERE relname LIKE 'taptalk_stats%' ORDER BY 1;
DROP ROLE taptalk_stats_monitor;
