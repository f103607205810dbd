# test/t/70_trigger_load.sh: provisioning triggers under load.  pgbench, 8
# clients, each inserting users one by one into a table whose BEFORE INSERT
# trigger calls taptalk_auth_ticket, while the mock fails every fifth request
# with a 503 (/failevery/5).  First without retries: every row is there,
# once, with either its TapTalk user_id or the error code, exactly one row in
# five has HTTP_ERROR, and the mock received each user exactly once.  Then
# with the default retries: still every row, and far fewer errors.
#   TAPTALK_TRIGGER_ROWS (default 1000; scripts/soak: 10000)
source "$ROOT/test/script_helpers.sh"

trig_rows=${TAPTALK_TRIGGER_ROWS:-1000}
trig_clients=8
trig_per_client=$((trig_rows / trig_clients))
trig_rows=$((trig_per_client * trig_clients))
trig_script=$WORK/trigger.pgbench
log_mark=$(t_log_mark)
trig_start=$(date +%s%N)

t_sql -q <<'SQL'
SET client_min_messages = warning;
DROP TABLE IF EXISTS load_user, load_seen;
CREATE TABLE load_user (
	id bigserial PRIMARY KEY,
	run int NOT NULL,
	full_name text NOT NULL,
	taptalk_user_id text,
	taptalk_error text
);
CREATE OR REPLACE FUNCTION load_user_provision() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
	r taptalk_auth_ticket_result;
BEGIN
	r := taptalk_auth_ticket(jsonb_build_object(
		'userIPAddress', '10.0.0.1', 'userAgent', 'load-test', 'userPlatform', 'web',
		'userDeviceID', 'server', 'xcUserID', 'load-' || NEW.id, 'fullName', NEW.full_name));
	NEW.taptalk_user_id := r.user_id;
	NEW.taptalk_error := r.error_code;
	RETURN NEW;
END $$;
CREATE TRIGGER load_user_provision BEFORE INSERT ON load_user
	FOR EACH ROW EXECUTE FUNCTION load_user_provision();
CREATE TABLE load_seen (xc text);
SQL
cat >"$trig_script" <<'SQL'
INSERT INTO load_user (run, full_name) VALUES (:run, 'user of client ' || :client_id);
SQL
chmod 644 "$trig_script"

# trig_run RUN MAX_RETRIES: one pgbench run; sets trig_mock_mark
trig_run() {
	local rc
	trig_mock_mark=$(t_mock_mark)
	set +e
	PGOPTIONS="-c taptalk.base_url=http://127.0.0.1:$MOCK_PORT/failevery/5 -c taptalk.max_retries=$2" \
		"$PGBIN/pgbench" -n -c "$trig_clients" -j 2 -t "$trig_per_client" -D run="$1" \
		-f "$trig_script" contrib_regression >"$WORK/trigger.out" 2>&1
	rc=$?
	set -e
	if [ "$rc" != 0 ] || grep -q -E 'aborted|error' "$WORK/trigger.out"; then
		t_fail "run $1: pgbench ran every insert without an error (exit $rc)" "$(tail -20 "$WORK/trigger.out")"
	fi
	t_check "run $1 (max_retries = $2): pgbench committed $trig_rows inserts, none failed" \
		"$trig_rows 0" \
		"$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$WORK/trigger.out") $(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$WORK/trigger.out")"
}

# trig_rows_ok RUN: every row of the run is there once, provisioned or marked
trig_rows_ok() {
	t_check "run $1: every inserted row is in the table" "$trig_rows" \
		"$(t_sql -c "SELECT count(*) FROM load_user WHERE run = $1")"
	t_check "run $1: each row has its user_id or the error code, never both or neither" 0 \
		"$(t_sql -c "SELECT count(*) FROM load_user WHERE run = $1 AND NOT (
			(taptalk_user_id = 'tt-load-' || id AND taptalk_error IS NULL)
			OR (taptalk_user_id IS NULL AND taptalk_error = 'HTTP_ERROR'))")"
}

# run 1: no retries, so exactly the mock's failures show
trig_run 1 0
t_no_crash "trigger load, run 1" "$log_mark"
trig_rows_ok 1
trig_errors1=$(t_sql -c "SELECT count(*) FROM load_user WHERE run = 1 AND taptalk_error IS NOT NULL")
t_check "run 1: one row in five has HTTP_ERROR (the mock's every fifth request)" \
	"$((trig_rows / 5))" "$trig_errors1"
tail -c +"$((trig_mock_mark + 1))" "$MOCK_LOG" | "$PYTHON" -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    if e.get("event") == "request" and e["path"].startswith("/failevery/5/"):
        print(json.loads(e["body"])["xcUserID"])' >"$WORK/trigger-seen.txt"
chmod 644 "$WORK/trigger-seen.txt"
got=$(t_sql <<SQL
\\copy load_seen FROM '$WORK/trigger-seen.txt'
SELECT concat_ws(' ', (SELECT count(*) FROM load_seen), (SELECT count(DISTINCT xc) FROM load_seen),
	(SELECT count(*) FROM load_user u WHERE run = 1 AND NOT EXISTS (SELECT 1 FROM load_seen s WHERE s.xc = 'load-' || u.id)),
	(SELECT count(*) FROM load_seen s WHERE NOT EXISTS (SELECT 1 FROM load_user u WHERE run = 1 AND s.xc = 'load-' || u.id)));
SQL
)
t_check "run 1: the mock received each user exactly once, and only those (requests, distinct, missing, extra)" \
	"$trig_rows $trig_rows 0 0" "$got"

# run 2: the default retries cure most of the failures
trig_run 2 2
t_no_crash "trigger load, run 2" "$log_mark"
trig_rows_ok 2
trig_errors2=$(t_sql -c "SELECT count(*) FROM load_user WHERE run = 2 AND taptalk_error IS NOT NULL")
trig_requests2=$(tail -c +"$((trig_mock_mark + 1))" "$MOCK_LOG" | grep -c '"event":"request".*"path":"/failevery/5/' || true)
if [ "$trig_errors2" -ge $((trig_rows / 20)) ]; then
	t_fail "run 2: with retries fewer than 1 row in 20 has an error" "$trig_errors2 of $trig_rows"
fi
t_ok "run 2: with retries $trig_errors2 of $trig_rows rows have an error ($trig_requests2 requests for $trig_rows rows)"
t_ok "trigger load: $trig_clients clients, $trig_rows rows per run in $(($(t_elapsed_ms "$trig_start") / 1000)) s; no retries: $trig_errors1 HTTP_ERROR; 2 retries: $trig_errors2 HTTP_ERROR; nothing lost or duplicated"
t_sql -q -c "DROP TABLE load_user, load_seen; DROP FUNCTION load_user_provision()"
rm -f "$trig_script" "$WORK/trigger.out" "$WORK/trigger-seen.txt"
