# test/t/80_memory.sh: memory over many calls in one session.  One backend
# makes TAPTALK_MEMORY_CALLS calls (default 10,000; scripts/soak: 100,000),
# in cycles that mix successes, TapTalk's error envelopes, validation
# failures, HTTP errors, invalid and oversized responses, resets, a retried
# 503, a timeout, a cancelled call and a cancelled batch (statement_timeout),
# a batch, a non-object ERROR, and HTTPS calls (new connections and a
# verification failure each cycle, since the base URL changes).  Every
# statement must give its expected answer each cycle, and the backend's RSS
# (VmRSS, from /proc) after the run must be less than 5 MB above where it was
# after a warm-up.
source "$ROOT/test/script_helpers.sh"

mem_calls=${TAPTALK_MEMORY_CALLS:-10000}
mem_per_cycle=123
mem_cycles=$(((mem_calls + mem_per_cycle - 1) / mem_per_cycle))
mem_warmup=5
mem_limit_kb=5120
mem_file=$WORK/memory.sql
mem_start=$(date +%s%N)
log_mark=$(t_log_mark)
t_memory_fn

# the API errors and hostile answers of a cycle, without retries (14 calls)
mem_api_sql="$(cat <<'SQL'
SELECT 'api', count(*), string_agg(coalesce(r.error_code, 'OK'), ',' ORDER BY k) FROM unnest(ARRAY[
	req('fault-envelope-field'), req('fault-envelope500'), req('fault-status-404'),
	req('mem-v') - 'fullName', req('mem-v') || '{"x": 1}', req('fault-badjson'), req('fault-nul'),
	req('fault-deep-10000'), req('fault-huge-2'), req('fault-bigticket'), req('fault-reset'),
	req('fault-close'), req('fault-status-503'), req('fault-notjson')]) WITH ORDINALITY AS t(j, k),
	LATERAL taptalk_auth_ticket(j) r;
SQL
)"

# mem_cycle N: the statements of one cycle (123 calls)
mem_cycle() {
	echo "SELECT 'ok', count(user_id) FROM generate_series(1, 40) i, LATERAL taptalk_auth_ticket(req('mem-' || i)) r;"
	echo "SET taptalk.max_retries = 0;"
	for _ in 1 2 3; do echo "$mem_api_sql"; done
	cat <<SQL
RESET taptalk.max_retries;
SELECT 'retried', coalesce(error_code, 'OK') FROM taptalk_auth_ticket(req('fault-flaky-1-mem-$1-$RANDOM'));
SET taptalk.timeout_ms = 30;
SELECT 'timeout', error_code FROM taptalk_auth_ticket(req('fault-slow-300'));
RESET taptalk.timeout_ms;
SET statement_timeout = 30;
SELECT 'not cancelled', error_code FROM taptalk_auth_ticket(req('fault-slow-1000'));
SET statement_timeout = 50;
SELECT 'not cancelled', count(*) FROM taptalk_auth_tickets(ARRAY(SELECT req('fault-slow-1000') FROM generate_series(1, 8)));
RESET statement_timeout;
SELECT 'batch', count(*), count(user_id), count(error_code) FROM taptalk_auth_tickets(
	ARRAY(SELECT req('mem-b' || i) FROM generate_series(1, 20) i) || ARRAY[req('fault-envelope-field'), '[1]', NULL]);
SELECT taptalk_auth_ticket('[1]');
SET taptalk.base_url = 'https://127.0.0.1:$MOCK_TLS_PORT';
SET taptalk.ca_file = '$TLS_DIR/ca.pem';
SELECT 'tls', count(user_id) FROM generate_series(1, 5) i, LATERAL taptalk_auth_ticket(req('mem-tls-' || i)) r;
RESET taptalk.ca_file;
SELECT 'tls unverified', error_code FROM taptalk_auth_ticket(req('mem-tls-x'));
RESET taptalk.base_url;
SQL
}

{
	echo "SET client_min_messages = warning;"
	for i in $(seq "$mem_warmup"); do mem_cycle "w$i"; done
	echo "SELECT 'MEM', 0, * FROM backend_memory();"
	for i in $(seq "$mem_cycles"); do
		mem_cycle "$i"
		if [ $((i % ((mem_cycles + 9) / 10))) = 0 ] || [ "$i" = "$mem_cycles" ]; then
			echo "SELECT 'MEM', $i, * FROM backend_memory();"
		fi
	done
} >"$mem_file"
chmod 644 "$mem_file"

set +e
psql_q -At -d contrib_regression -v ON_ERROR_STOP=0 -f "$mem_file" \
	>"$WORK/memory.out" 2>"$WORK/memory.err"
set -e
t_no_crash "memory" "$log_mark"

# every cycle answered the same, as expected
cycles=$((mem_warmup + mem_cycles))
api="14|40002,50000,HTTP_ERROR,40002,40002,INVALID_RESPONSE,INVALID_RESPONSE,INVALID_RESPONSE,INVALID_RESPONSE,INVALID_RESPONSE,CONNECTION_FAILED,CONNECTION_FAILED,HTTP_ERROR,INVALID_RESPONSE"
want=$(printf '%s\n' "$((3 * cycles)) api|$api" "$cycles batch|23|20|2" "$cycles ok|40" \
	"$cycles retried|OK" "$cycles timeout|TIMEOUT" "$cycles tls unverified|CONNECTION_FAILED" "$cycles tls|5")
got=$(grep -v '^MEM|' "$WORK/memory.out" | LC_ALL=C sort | uniq -c | sed 's/^ *//')
t_check "each of the $cycles cycles gave the expected answers" "$want" "$got"
want=$(printf '%s\n' "$((2 * cycles)) ERROR:  canceling statement due to statement timeout" \
	"$cycles ERROR:  taptalk request must be a JSON object, not an array" \
	"$cycles HINT:  Build the request with jsonb_build_object().")
got=$(sed 's/^psql:[^:]*:[0-9]*: //' "$WORK/memory.err" | LC_ALL=C sort | uniq -c | sed 's/^ *//')
t_check "and the expected errors: 2 cancels and 1 non-object per cycle" "$want" "$got"

mem_trend=$(grep '^MEM|' "$WORK/memory.out" | cut -d'|' -f3 | tr '\n' ' ')
read -r mem_rss0 mem_anon0 <<<"$(grep '^MEM|0|' "$WORK/memory.out" | awk -F'|' '{ print $3, $5 }')"
read -r mem_rss1 mem_anon1 <<<"$(grep "^MEM|$mem_cycles|" "$WORK/memory.out" | awk -F'|' '{ print $3, $5 }')"
mem_grow=$((mem_rss1 - mem_rss0))
mem_summary="$((mem_cycles * mem_per_cycle)) calls in $mem_cycles cycles (+$((mem_warmup * mem_per_cycle)) warm-up) in $(($(t_elapsed_ms "$mem_start") / 1000)) s; VmRSS $mem_rss0 -> $mem_rss1 kB (${mem_grow} kB; RssAnon $mem_anon0 -> $mem_anon1 kB); VmRSS trend: $mem_trend"
if [ "$mem_grow" -ge "$mem_limit_kb" ]; then
	t_fail "memory: the backend's RSS grew by less than $mem_limit_kb kB" "$mem_summary"
fi
t_ok "memory: $mem_summary"
rm -f "$mem_file" "$WORK/memory.out" "$WORK/memory.err"
