# test/t/90_retries.sh: retries stay within taptalk.timeout_ms.  With
# max_retries = 10 and a short timeout, a server that always answers 503
# (fast or after 300 ms), always resets, or refuses connections gets a few
# attempts and the call returns within the timeout (plus 150 ms); a batch of
# 16 such requests too; max_retries is an upper bound (exactly 1 + 3 attempts
# with time to spare); and a cancel during the wait between attempts stops the
# call within 300 ms.  (That TLS verification failures are not retried is in
# 10_tls.sh: one connection each, with max_retries = 2.)
source "$ROOT/test/script_helpers.sh"

log_mark=$(t_log_mark)
retry_token="r$$-$RANDOM"
t_sql -q <<'SQL'
CREATE OR REPLACE FUNCTION retry_timed(request jsonb, timeout_ms int, max_retries int,
	OUT ms int, OUT error_code text)
LANGUAGE plpgsql AS $$
DECLARE
	t0 timestamptz;
BEGIN
	PERFORM set_config('taptalk.timeout_ms', timeout_ms::text, true);
	PERFORM set_config('taptalk.max_retries', max_retries::text, true);
	t0 := clock_timestamp();
	SELECT r.error_code INTO error_code FROM taptalk_auth_ticket(request) r;
	ms := extract(epoch FROM clock_timestamp() - t0) * 1000;
END $$;
CREATE OR REPLACE FUNCTION retry_timed_batch(requests jsonb[], timeout_ms int, max_retries int,
	OUT ms int, OUT error_codes text)
LANGUAGE plpgsql AS $$
DECLARE
	t0 timestamptz;
BEGIN
	PERFORM set_config('taptalk.timeout_ms', timeout_ms::text, true);
	PERFORM set_config('taptalk.max_retries', max_retries::text, true);
	t0 := clock_timestamp();
	SELECT string_agg(DISTINCT coalesce(r.error_code, 'OK'), ',') INTO error_codes
	FROM taptalk_auth_tickets(requests) r;
	ms := extract(epoch FROM clock_timestamp() - t0) * 1000;
END $$;
SQL

# retry_case NAME TIMEOUT_MS MIN_ATTEMPTS MAX_ATTEMPTS CODES SQL_CALL [PATTERN [SQL_BEFORE]]
# SQL_CALL is a retry_timed(...) or retry_timed_batch(...) call; attempts are
# the mock's request lines holding PATTERN (default: $retry_token-NAME).
retry_case() {
	local name=$1 timeout=$2 min=$3 max=$4 codes=$5 call=$6 pattern=${7:-$retry_token-$1}
	local before=${8:-} col=error_code mark out ms code attempts
	[[ $call == retry_timed_batch* ]] && col=error_codes
	mark=$(t_mock_mark)
	out=$(t_sql <<SQL
$before
SELECT ms || ' ' || $col FROM $call;
SQL
)
	read -r ms code <<<"$out"
	attempts=$(tail -c +"$((mark + 1))" "$MOCK_LOG" | grep '"event":"request"' | grep -c -- "$pattern" || true)
	[[ ",$codes," == *",$code,"* ]] || t_fail "$name: the call ended with $codes" "got: $out"
	[ "$ms" -le $((timeout + 150)) ] || t_fail "$name: returned within $timeout ms + 150 ms" "took $ms ms ($attempts attempts)"
	if [ "$attempts" -lt "$min" ] || [ "$attempts" -gt "$max" ]; then
		t_fail "$name: between $min and $max attempts" "$attempts attempts in $ms ms"
	fi
	t_ok "$name: $code after $attempts attempts in $ms ms (timeout $timeout ms)"
}

# a 503 every time, answered at once: backoff 50-100, 100-200, 200-400 ms...
retry_case always-503 700 3 6 HTTP_ERROR \
	"retry_timed(req('fault-flaky-1000000-$retry_token-always-503'), 700, 10)"
# a 503 every time, after 300 ms: the last attempt gets what is left of the budget
retry_case slow-503 1000 2 4 HTTP_ERROR,TIMEOUT \
	"retry_timed(req('$retry_token-slow-503'), 1000, 10)" "" \
	"SET taptalk.base_url = 'http://127.0.0.1:$MOCK_PORT/delay/300/failevery/1';"
# a reset every time
retry_case always-reset 500 3 6 CONNECTION_FAILED \
	"retry_timed(req('fault-flakyreset-1000000-$retry_token-always-reset'), 500, 10)"
# a batch of 16 that always get 503
retry_case batch-503 700 48 96 HTTP_ERROR \
	"retry_timed_batch(ARRAY(SELECT req('fault-flaky-1000000-$retry_token-batch-503-' || i) FROM generate_series(1, 16) i), 700, 10)" \
	"$retry_token-batch-503-"
# max_retries bounds the attempts when time is plenty
retry_case max-retries-3 10000 4 4 HTTP_ERROR \
	"retry_timed(req('fault-flaky-1000000-$retry_token-max-retries-3'), 10000, 3)"

# refused connections: nothing reaches the mock; time is the measure
out=$(t_sql <<SQL
SET taptalk.base_url = 'http://127.0.0.1:1';
SELECT ms || ' ' || error_code FROM retry_timed(req('$retry_token-refused'), 400, 10);
SQL
)
read -r ms code <<<"$out"
if [ "$code" != CONNECTION_FAILED ] || [ "$ms" -gt 550 ] || [ "$ms" -lt 120 ]; then
	t_fail "refused: CONNECTION_FAILED after retrying within 400 ms + 150 ms" "$code in $ms ms"
fi
t_ok "refused: $code in $ms ms (retried: more than 120 ms; within 400 ms + 150 ms)"

# a cancel while waiting between attempts stops the call at once
out=$(t_sql -v ON_ERROR_STOP=0 2>&1 <<SQL
CREATE OR REPLACE FUNCTION pg_temp.cancelled_after(request jsonb) RETURNS text LANGUAGE plpgsql AS \$\$
DECLARE
	t0 timestamptz := clock_timestamp();
BEGIN
	PERFORM taptalk_auth_ticket(request);
	RETURN 'not cancelled';
EXCEPTION WHEN query_canceled THEN
	RETURN (extract(epoch FROM clock_timestamp() - t0) * 1000)::int::text;
END \$\$;
SET taptalk.timeout_ms = 60000;
SET taptalk.max_retries = 10;
SET statement_timeout = 1000;
SELECT pg_temp.cancelled_after(req('fault-flaky-1000000-$retry_token-cancel'));
SQL
)
if ! [[ "$out" =~ ^[0-9]+$ ]] || [ "$out" -gt 1300 ]; then
	t_fail "a statement_timeout of 1000 ms during the backoff stops the call within 300 ms" "got: $out"
fi
t_ok "a statement_timeout of 1000 ms during the backoff stops the call after $out ms"
t_check "the session's next call succeeds" "tt-retry-after" \
	"$(t_sql -c "SELECT user_id FROM taptalk_auth_ticket(req('retry-after'))")"
t_no_crash "retries" "$log_mark"
t_sql -q -c "DROP FUNCTION retry_timed(jsonb, int, int), retry_timed_batch(jsonb[], int, int)"
t_ok "retries: every retry loop ended within taptalk.timeout_ms + 150 ms"
