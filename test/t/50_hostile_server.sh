# test/t/50_hostile_server.sh: a hostile server.  A 100 MiB body (with
# Content-Length, and chunked so that it is only known by reading), a body
# that never ends, headers that never end, 10,000- and 400,000-deep nesting, a
# 1 MiB ticket, NUL bytes, invalid UTF-8, and bodies right at the 1 MiB and
# 64-level limits; singly and many at once in a batch.  Each is answered with
# INVALID_RESPONSE (or TIMEOUT for the endless body), never a crash, and the
# backend's memory stays low: its peak resident size during each call
# (VmHWM from /proc, reset before the call) is far below the sizes sent, and
# its RSS is back near the start after.
source "$ROOT/test/script_helpers.sh"

log_mark=$(t_log_mark)
t_memory_fn

# with TAPTALK_HOSTILE_SLOW=1 (scripts/soak) also bodies that trickle in
# without end: cut off at 1 MiB as they arrive, after about 11 s (the mock
# sends 100 KiB/s)
hostile_slow=
if [ "${TAPTALK_HOSTILE_SLOW:-0}" = 1 ]; then
	hostile_slow="SELECT pg_temp.hostile('batch 8 x endless, 30 s budget', ARRAY(SELECT req('fault-endless') FROM generate_series(1, 8)), 30000);"
fi

hostile_out=$(t_sql <<SQL
CREATE TEMP TABLE hostile (
	n serial, what text, codes text, messages text, ms int,
	rss_before bigint, hwm_before bigint, rss_after bigint, hwm_after bigint);
CREATE FUNCTION pg_temp.hostile(what text, requests jsonb[], timeout_ms int DEFAULT 2000)
RETURNS void LANGUAGE plpgsql AS \$\$
DECLARE
	m0 record;
	m1 record;
	t0 timestamptz;
	codes text;
	messages text;
BEGIN
	PERFORM set_config('taptalk.timeout_ms', timeout_ms::text, false);
	PERFORM backend_memory_reset_peak();
	m0 := backend_memory();
	t0 := clock_timestamp();
	IF cardinality(requests) = 1 THEN
		SELECT coalesce(error_code, 'OK'), coalesce(error_message, user_id) INTO codes, messages
		FROM taptalk_auth_ticket(requests[1]);
	ELSE
		SELECT string_agg(DISTINCT coalesce(error_code, 'OK'), ','),
			   string_agg(DISTINCT coalesce(error_message, user_id), ',') INTO codes, messages
		FROM taptalk_auth_tickets(requests);
	END IF;
	m1 := backend_memory();
	INSERT INTO hostile (what, codes, messages, ms, rss_before, hwm_before, rss_after, hwm_after)
	VALUES (what, codes, messages, extract(epoch FROM clock_timestamp() - t0) * 1000,
			m0.rss_kb, m0.hwm_kb, m1.rss_kb, m1.hwm_kb);
	RESET taptalk.timeout_ms;
END \$\$;
-- warm up: the first call loads libcurl, TLS and the catalogs
SELECT pg_temp.hostile('warm-up', ARRAY[req('hostile-warm')]);
SELECT pg_temp.hostile('warm-up batch', ARRAY(SELECT req('hostile-w' || i) FROM generate_series(1, 16) i));
SELECT pg_temp.hostile('start', ARRAY[req('hostile-start')]);
SELECT pg_temp.hostile('huge-100', ARRAY[req('fault-huge-100')]);
SELECT pg_temp.hostile('huge-2', ARRAY[req('fault-huge-2')]);
SELECT pg_temp.hostile('hugechunked-100', ARRAY[req('fault-hugechunked-100')]);
SELECT pg_temp.hostile('huge-1', ARRAY[req('fault-huge-1')]);
SELECT pg_temp.hostile('hugechunked-1', ARRAY[req('fault-hugechunked-1')]);
SELECT pg_temp.hostile('bigticket', ARRAY[req('fault-bigticket')]);
SELECT pg_temp.hostile('endless', ARRAY[req('fault-endless')], 1000);
SELECT pg_temp.hostile('endless-headers', ARRAY[req('fault-endless-headers')]);
SELECT pg_temp.hostile('deep-10000', ARRAY[req('fault-deep-10000')]);
SELECT pg_temp.hostile('deep-400000', ARRAY[req('fault-deep-400000')]);
SELECT pg_temp.hostile('deep-64', ARRAY[req('fault-deep-64')]);
SELECT pg_temp.hostile('deep-63', ARRAY[req('fault-deep-63')]);
SELECT pg_temp.hostile('nul', ARRAY[req('fault-nul')]);
SELECT pg_temp.hostile('badutf8', ARRAY[req('fault-badutf8')]);
SELECT pg_temp.hostile('batch 16 x huge-100', ARRAY(SELECT req('fault-huge-100') FROM generate_series(1, 16)), 10000);
SELECT pg_temp.hostile('batch 16 x hugechunked-100', ARRAY(SELECT req('fault-hugechunked-100') FROM generate_series(1, 16)), 10000);
SELECT pg_temp.hostile('batch 16 x bigticket', ARRAY(SELECT req('fault-bigticket') FROM generate_series(1, 16)), 10000);
$hostile_slow
SELECT pg_temp.hostile('mixed batch', ARRAY[req('fault-huge-100'), req('fault-hugechunked-100'), req('fault-deep-10000'), req('fault-nul'),
	req('fault-badutf8'), req('fault-bigticket'), req('fault-endless-headers'), req('hostile-mixed')]);
SELECT pg_temp.hostile('end', ARRAY[req('hostile-end')]);
SELECT concat_ws('|', what, codes, messages, ms, rss_after - rss_before, hwm_after - rss_before, rss_after)
FROM hostile ORDER BY n;
SQL
)
t_no_crash "hostile server" "$log_mark"

# hostile_expect WHAT CODES MESSAGE [MAX_PEAK_GROWTH_KB]
hostile_expect() {
	local line codes msg ms grow peak
	line=$(awk -F'|' -v w="$1" '$1 == w' <<<"$hostile_out" | head -1)
	[ -n "$line" ] || t_fail "$1: ran" "$hostile_out"
	IFS='|' read -r _ codes msg ms grow peak _ <<<"$line"
	[ "$codes" = "$2" ] && [ "$msg" = "$3" ] ||
		t_fail "$1: $2 \"$3\"" "got: $codes \"$msg\""
	if [ -n "${4:-}" ] && [ "$peak" -gt "$4" ]; then
		t_fail "$1: the backend's peak RSS grew by less than $4 kB" "grew by $peak kB ($line)"
	fi
	t_ok "$1: $codes \"$msg\" in $ms ms, peak RSS +${peak} kB${4:+ (limit $4 kB)}"
}

hostile_expect "huge-100" INVALID_RESPONSE "response body exceeds 1048576 bytes" 8192
hostile_expect "huge-2" INVALID_RESPONSE "response body exceeds 1048576 bytes" 8192
hostile_expect "huge-1" INVALID_RESPONSE "response body is not valid JSON" 8192
hostile_expect "bigticket" INVALID_RESPONSE "response body exceeds 1048576 bytes" 8192
hostile_expect "endless" TIMEOUT "no response from TapTalk within 1000 ms" 8192
hostile_expect "endless-headers" INVALID_RESPONSE "response headers exceed 65536 bytes" 8192
hostile_expect "deep-10000" INVALID_RESPONSE "response body nests too deeply" 8192
hostile_expect "deep-400000" INVALID_RESPONSE "response body nests too deeply" 8192
hostile_expect "deep-64" INVALID_RESPONSE "response body nests too deeply" 8192
hostile_expect "deep-63" INVALID_RESPONSE "response has no data.ticket" 8192
hostile_expect "nul" INVALID_RESPONSE "response body is not valid UTF-8" 8192
hostile_expect "badutf8" INVALID_RESPONSE "response body is not valid UTF-8" 8192
hostile_expect "batch 16 x huge-100" INVALID_RESPONSE "response body exceeds 1048576 bytes" 32768
hostile_expect "hugechunked-100" INVALID_RESPONSE "response body exceeds 1048576 bytes" 8192
hostile_expect "hugechunked-1" INVALID_RESPONSE "response body is not valid JSON" 8192
hostile_expect "batch 16 x hugechunked-100" INVALID_RESPONSE "response body exceeds 1048576 bytes" 49152
hostile_expect "batch 16 x bigticket" INVALID_RESPONSE "response body exceeds 1048576 bytes" 32768
if [ -n "$hostile_slow" ]; then
	hostile_expect "batch 8 x endless, 30 s budget" INVALID_RESPONSE "response body exceeds 1048576 bytes" 32768
fi
hostile_expect "mixed batch" "INVALID_RESPONSE,OK" "response body exceeds 1048576 bytes,response body is not valid UTF-8,response body nests too deeply,response headers exceed 65536 bytes,tt-hostile-mixed" 32768
hostile_expect "end" OK "tt-hostile-end"

# afterwards the backend is back near where it started
start_rss=$(awk -F'|' '$1 == "start" { print $7 }' <<<"$hostile_out")
end_rss=$(awk -F'|' '$1 == "end" { print $7 }' <<<"$hostile_out")
if [ $((end_rss - start_rss)) -ge 8192 ]; then
	t_fail "the backend's RSS after all of it is within 8 MiB of the start" "start $start_rss kB, end $end_rss kB"
fi
t_ok "the backend's RSS after all of it is within 8 MiB of the start ($start_rss kB -> $end_rss kB)"
hostile_peak=$(awk -F'|' '$1 != "warm-up" && $1 != "warm-up batch" && $6 > m { m = $6 } END { print m + 0 }' <<<"$hostile_out")
t_ok "hostile server: $(($(wc -l <<<"$hostile_out") - 4)) hostile cases, each INVALID_RESPONSE or TIMEOUT as expected; largest peak RSS growth in a call ${hostile_peak} kB; RSS $start_rss -> $end_rss kB"
