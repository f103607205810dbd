# test/t/60_chaos_pgbench.sh: faults under load.  pgbench, 16 clients, each
# calling taptalk_auth_ticket against the mock's /chaos/<period> prefix, which
# cycles healthy / 2 s slow / TCP reset / 503 every 500 ms; timeout_ms = 700,
# so that a timed-out call ends in a later phase; a pause of up to 30 ms
# between calls; half the clients with the default 2 retries, half with none.
# No backend crashes, no transaction fails (pgbench would report the error
# and abort the client), every result is a success or one of TIMEOUT,
# CONNECTION_FAILED, HTTP_ERROR, each of which occurs; then, in the same 16
# sessions, the base URL is pointed at the healthy mock and every call
# succeeds.
#   TAPTALK_CHAOS_SECONDS (default 10; scripts/soak: 30)
source "$ROOT/test/script_helpers.sh"

chaos_secs=${TAPTALK_CHAOS_SECONDS:-10}
chaos_after_secs=3
chaos_clients=16
chaos_period=500
chaos_script=$WORK/chaos.pgbench
log_mark=$(t_log_mark)
mock_mark=$(t_mock_mark)

t_sql -q <<'SQL'
SET client_min_messages = warning;
DROP TABLE IF EXISTS chaos_log;
CREATE TABLE chaos_log (
	n bigserial, pid int, part text, user_id text, error_code text, error_message text);
SQL

cat >"$chaos_script" <<SQL
\\set id random(1, 1000000000)
\\set retries 2 * (:client_id % 2)
\\set pause random(0, 30)
\\sleep :pause ms
SELECT (extract(epoch FROM clock_timestamp()) > :deadline)::int AS after \\gset
\\if :after = 1
SET taptalk.base_url = 'http://127.0.0.1:$MOCK_PORT';
INSERT INTO chaos_log (pid, part, user_id, error_code, error_message)
SELECT pg_backend_pid(), 'after', user_id, error_code, error_message
FROM taptalk_auth_ticket(req('chaos-after-' || :id));
\\else
SET taptalk.max_retries = :retries;
INSERT INTO chaos_log (pid, part, user_id, error_code, error_message)
SELECT pg_backend_pid(), 'chaos', user_id, error_code, error_message
FROM taptalk_auth_ticket(req('chaos-' || :id));
\\endif
SQL
chmod 644 "$chaos_script"

deadline=$(($(date +%s) + chaos_secs))
set +e
PGOPTIONS="-c taptalk.base_url=http://127.0.0.1:$MOCK_PORT/chaos/$chaos_period -c taptalk.timeout_ms=700" \
	"$PGBIN/pgbench" -n -c "$chaos_clients" -j 2 \
	-T "$((chaos_secs + chaos_after_secs))" -D deadline="$deadline" -f "$chaos_script" \
	contrib_regression >"$WORK/chaos.out" 2>&1
chaos_rc=$?
set -e
t_no_crash "chaos" "$log_mark"
if [ "$chaos_rc" != 0 ] || grep -q -E 'aborted|error' "$WORK/chaos.out"; then
	t_fail "pgbench: every client ran to the end without an error (exit $chaos_rc)" "$(tail -20 "$WORK/chaos.out")"
fi
chaos_tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$WORK/chaos.out")
chaos_failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$WORK/chaos.out")
t_check "pgbench: $chaos_tx transactions, none failed" 0 "${chaos_failed:-missing}"

t_check "every transaction left its result" "$chaos_tx" "$(t_sql -c "SELECT count(*) FROM chaos_log")"
got=$(t_sql -c "SELECT count(*) FROM chaos_log WHERE NOT (
	(error_code IS NULL AND user_id IS NOT NULL)
	OR (user_id IS NULL AND error_code IN ('TIMEOUT', 'CONNECTION_FAILED', 'HTTP_ERROR')))")
chaos_mix=$(t_sql -c "SELECT string_agg(c || '=' || n, ' ' ORDER BY c) FROM (
	SELECT coalesce(error_code, 'OK') AS c, count(*) AS n FROM chaos_log WHERE part = 'chaos' GROUP BY 1) s")
t_check "every result is a success or TIMEOUT, CONNECTION_FAILED, HTTP_ERROR ($chaos_mix)" 0 "$got"
# the chaos did happen: successes, timeouts and failures
got=$(t_sql -c "SELECT count(DISTINCT coalesce(error_code, 'OK')) FROM chaos_log WHERE part = 'chaos'")
t_check "the run saw each outcome: OK, TIMEOUT, CONNECTION_FAILED, HTTP_ERROR" 4 "$got"

got=$(t_sql -c "SELECT count(DISTINCT pid) FROM chaos_log WHERE part = 'chaos'")
t_check "all $chaos_clients sessions took part" "$chaos_clients" "$got"
got=$(t_sql -c "SELECT count(*) FROM (SELECT DISTINCT pid FROM chaos_log WHERE part = 'chaos') c
	WHERE EXISTS (SELECT 1 FROM chaos_log a WHERE a.part = 'after' AND a.pid = c.pid)")
t_check "afterwards each of the $chaos_clients sessions made healthy calls" "$chaos_clients" "$got"
chaos_after=$(t_sql -c "SELECT count(*) || ' calls, ' || count(*) FILTER (WHERE error_code IS NULL) || ' succeeded' FROM chaos_log WHERE part = 'after'")
got=$(t_sql -c "SELECT count(*) FROM chaos_log WHERE part = 'after' AND (error_code IS NOT NULL OR user_id IS NULL)")
t_check "afterwards every call succeeded in each session ($chaos_after)" 0 "$got"
chaos_resets=$(tail -c +"$((mock_mark + 1))" "$MOCK_LOG" | grep -c '"event":"request".*"path":"/chaos/' || true)
t_ok "chaos: $chaos_clients clients, ${chaos_secs} s of chaos + ${chaos_after_secs} s healthy, $chaos_tx transactions ($chaos_mix; after: $chaos_after), $chaos_resets requests to /chaos/"
t_sql -q -c "DROP TABLE chaos_log"
rm -f "$chaos_script" "$WORK/chaos.out"
