# test/t/20_secrets.sh: the server key never shows up where it should not.
#
# For a part of the run the server logs everything it can (log_min_messages
# and client_min_messages = debug5, log_statement = all, verbose errors,
# connections); success, validation, API error, HTTP error, invalid response,
# timeout, cancel, connection and TLS failures run, as a superuser and as a
# non-superuser, and the non-superuser tries every route to read the secret.
# Then the server log, every result row and every error and notice text are
# scanned for the secret and for base64 forms of it: zero occurrences.  The
# secret itself is never written in SQL here: it comes from postgresql.conf.
# A positive control runs the same scan over the mock's log, which must find
# the Server-Key header there.
source "$ROOT/test/script_helpers.sh"

sec_client=$WORK/secrets-client.out
sec_log=$WORK/secrets-server.log
: >"$sec_client"

# sec_wait_setting NAME VALUE: wait until a new session sees NAME = VALUE
sec_wait_setting() {
	for _ in $(seq 50); do
		[ "$(t_sql -c "SHOW $1")" = "$2" ] && return 0
		sleep 0.1
	done
	t_fail "the server took the new value of $1" "still: $(t_sql -c "SHOW $1")"
}

# sec_scan FILE...: how often the secret or a base64 form of it occurs
sec_scan() {
	SEC_SECRET=$KEY_SECRET SEC_IDS="$KEY_ID wrong-key-id" "$PYTHON" - "$@" <<'PY'
import base64, os, sys
secret = os.environ["SEC_SECRET"].encode()
pats = {secret}
for key_id in os.environ["SEC_IDS"].split():
    pats.add(base64.b64encode(key_id.encode() + b":" + secret))
# the secret's base64 at each of the three alignments, without the quads
# that also hold bytes around it: found in any base64 text that has it
for pad in range(3):
    enc = base64.b64encode(b"\0" * pad + secret + b"\0\0\0")
    pats.add(enc[4 if pad else 0:-8])
n = 0
for path in sys.argv[1:]:
    data = open(path, "rb").read()
    n += sum(data.count(p) for p in pats)
print(n)
PY
}

log_mark=$(t_log_mark)
mock_mark=$(t_mock_mark)

# everything on, from the configuration (ALTER SYSTEM + reload)
t_sql -q >/dev/null <<'SQL'
ALTER SYSTEM SET log_min_messages = debug5;
ALTER SYSTEM SET log_min_error_statement = debug5;
ALTER SYSTEM SET log_statement = 'all';
ALTER SYSTEM SET log_error_verbosity = verbose;
ALTER SYSTEM SET log_connections = on;
ALTER SYSTEM SET log_disconnections = on;
SELECT pg_reload_conf();
SQL
sec_wait_setting log_min_messages debug5
sec_wait_setting log_statement all

# a superuser session: every kind of outcome, with every message shown
psql_q -X -a -d contrib_regression -v ON_ERROR_STOP=0 >>"$sec_client" 2>&1 <<SQL || true
\\set VERBOSITY verbose
\\set SHOW_CONTEXT always
SET client_min_messages = debug5;
SET taptalk.timeout_ms = 1000;
SELECT * FROM taptalk_auth_ticket(req('sec-ok'));
SELECT * FROM taptalk_auth_tickets(ARRAY[req('sec-b1'), req('fault-status-503'), '[1]',
	req('fault-envelope-field'), req('sec-b5') - 'fullName']);
SELECT * FROM taptalk_auth_ticket(req('sec-v') - 'fullName');
SELECT * FROM taptalk_auth_ticket(req('sec-v') || '{"secret": "x"}');
SELECT * FROM taptalk_auth_ticket('[1]');
SELECT * FROM taptalk_auth_ticket(req('fault-envelope-field'));
SELECT * FROM taptalk_auth_ticket(req('fault-envelope500'));
SELECT * FROM taptalk_auth_ticket(req('fault-html500'));
SELECT * FROM taptalk_auth_ticket(req('fault-status-503'));
SELECT * FROM taptalk_auth_ticket(req('fault-badjson'));
SELECT * FROM taptalk_auth_ticket(req('fault-nul'));
SELECT * FROM taptalk_auth_ticket(req('fault-badutf8'));
SELECT * FROM taptalk_auth_ticket(req('fault-deep-10000'));
SELECT * FROM taptalk_auth_ticket(req('fault-huge-3'));
SELECT * FROM taptalk_auth_ticket(req('fault-endless-headers'));
SELECT * FROM taptalk_auth_ticket(req('fault-reset'));
SELECT * FROM taptalk_auth_ticket(req('fault-close'));
SELECT * FROM taptalk_auth_ticket(req('fault-slow-3000'));
SELECT * FROM taptalk_auth_ticket(req('fault-redirect-302'));
SET statement_timeout = 200;
SELECT * FROM taptalk_auth_ticket(req('fault-slow-3000'));
RESET statement_timeout;
-- a key id the server does not know: 40101, with a key built from the secret
SET taptalk.server_key_id = 'wrong-key-id';
SELECT * FROM taptalk_auth_ticket(req('sec-wrong-id'));
RESET taptalk.server_key_id;
SET taptalk.server_key_id = '';
SELECT * FROM taptalk_auth_ticket(req('sec-no-id'));
RESET taptalk.server_key_id;
SET taptalk.base_url = 'http://127.0.0.1:1';
SELECT * FROM taptalk_auth_ticket(req('sec-refused'));
SET taptalk.base_url = 'http://no-such-host.invalid';
SELECT * FROM taptalk_auth_ticket(req('sec-dns'));
SET taptalk.base_url = 'https://127.0.0.1:$MOCK_TLS_PORT';
SELECT * FROM taptalk_auth_ticket(req('sec-tls-unverified'));
SET taptalk.ca_file = '$TLS_DIR/ca.pem';
SELECT * FROM taptalk_auth_ticket(req('sec-tls-ok'));
SET taptalk.base_url = 'ftp://127.0.0.1/';
RESET ALL;
SELECT * FROM taptalk_auth_ticket(req('sec-after'));
SQL

# a non-superuser that may call the function: every route to the secret
psql_q -X -a -d contrib_regression -U taptalk_caller -v ON_ERROR_STOP=0 >>"$sec_client" 2>&1 <<'SQL' || true
\set VERBOSITY verbose
SET client_min_messages = debug5;
SELECT * FROM taptalk_auth_ticket(req('sec-caller'));
SELECT * FROM taptalk_auth_ticket(req('fault-envelope-field'));
SHOW taptalk.server_key_secret;
SELECT current_setting('taptalk.server_key_secret');
SELECT current_setting('taptalk.server_key_secret', true);
SHOW ALL;
SELECT name, setting, reset_val, boot_val FROM pg_settings WHERE name LIKE 'taptalk.%';
SELECT * FROM pg_file_settings;
SELECT * FROM pg_show_all_file_settings();
SELECT pg_read_file('postgresql.conf');
SELECT pg_read_file('postgresql.auto.conf');
SELECT * FROM pg_db_role_setting;
SELECT set_config('taptalk.server_key_secret', 'x', false);
RESET taptalk.server_key_secret;
SQL

# back to the usual logging
t_sql -q >/dev/null <<'SQL'
ALTER SYSTEM RESET log_min_messages;
ALTER SYSTEM RESET log_min_error_statement;
ALTER SYSTEM RESET log_statement;
ALTER SYSTEM RESET log_error_verbosity;
ALTER SYSTEM RESET log_connections;
ALTER SYSTEM RESET log_disconnections;
SELECT pg_reload_conf();
SQL
sec_wait_setting log_statement none
sec_wait_setting log_min_messages warning
tail -c +"$((log_mark + 1))" "$WORK/postgres.log" >"$sec_log"

# the part ran as intended, so the scan means something
got=$(grep -c 'statement: SELECT \* FROM taptalk_auth_ticket' "$sec_log" || true)
[ "$got" -ge 29 ] || t_fail "the statements were logged (log_statement = all)" "found $got"
got=$(grep -c 'DEBUG:' "$sec_log" || true)
[ "$got" -ge 100 ] || t_fail "debug messages were logged (log_min_messages = debug5)" "found $got"
t_ok "verbose logging was in effect ($(wc -l <"$sec_log") server log lines, $got at DEBUG)"
for want in tt-sec-ok 40101 CONNECTION_FAILED TIMEOUT INVALID_RESPONSE HTTP_ERROR \
	'canceling statement due to statement timeout' tt-sec-tls-ok tt-sec-after \
	'must be superuser' tt-sec-caller; do
	grep -q -- "$want" "$sec_client" || t_fail "the client output has \"$want\"" "see $sec_client"
done
t_ok "every kind of outcome ran ($(wc -l <"$sec_client") lines of client output)"
# the non-superuser got the secret by no route (its rows are in the scan below)
got=$(t_sql -U taptalk_caller -c "SELECT count(*) FROM pg_settings WHERE name = 'taptalk.server_key_secret'")
t_check "a non-superuser does not see the secret in pg_settings" 0 "$got"

# positive control: the scan finds the key where it legitimately is
got=$(tail -c +"$((mock_mark + 1))" "$MOCK_LOG" >"$WORK/secrets-mock.jsonl"; sec_scan "$WORK/secrets-mock.jsonl")
[ "$got" -gt 0 ] || t_fail "control: the scan finds the Server-Key in the mock's log" "found $got"
t_ok "control: the scan finds the Server-Key in the mock's log ($got times)"

t_check "the secret (plain or base64) is not in the server log" 0 "$(sec_scan "$sec_log")"
t_check "the secret (plain or base64) is not in any result row, error or notice" 0 "$(sec_scan "$sec_client")"
rm -f "$sec_log" "$sec_client" "$WORK/secrets-mock.jsonl"

# Rotating the key as the README says (edit postgresql.conf, reload): the
# server log must get neither the new secret nor the old one when it comes
# back.  PostgreSQL logs 'parameter "..." changed to "..."' for every changed
# setting; the extension's log hook masks the secret in those lines.
log_mark=$(t_log_mark)
conf=$PGDATA/postgresql.conf
rotated="rotated-$RANDOM-$RANDOM-secret"

# reload_secret VALUE: write VALUE to postgresql.conf, reload, and wait until
# this session's new backends see it; prints its md5 as the server sees it
reload_secret() {
	local want
	sed -i "s/^taptalk.server_key_secret = .*/taptalk.server_key_secret = '$1'/" "$conf"
	t_sql -q -c "SELECT pg_reload_conf()" >/dev/null
	want=$(printf '%s' "$1" | md5sum | cut -d' ' -f1)
	for _ in $(seq 50); do
		[ "$(t_sql -c "SELECT md5(current_setting('taptalk.server_key_secret'))")" = "$want" ] && break
		sleep 0.1
	done
	t_sql -c "SELECT md5(current_setting('taptalk.server_key_secret'))"
}

t_check "after the rotation the server uses the new secret" \
	"$(printf '%s' "$rotated" | md5sum | cut -d' ' -f1)" "$(reload_secret "$rotated")"
reload_secret "$KEY_SECRET" >/dev/null
t_check "the original secret is back" "tt-sec-restored" \
	"$(t_sql -c "SELECT user_id FROM taptalk_auth_ticket(req('sec-restored'))")"
t_check "the reloads logged the change, masked" 2 \
	"$(tail -c +"$((log_mark + 1))" "$WORK/postgres.log" | grep -c 'parameter "taptalk.server_key_secret" changed to "\*\*\*\*\*\*\*\*"' || true)"
t_check "a key rotated by reload is not written to the server log" 0 \
	"$(tail -c +"$((log_mark + 1))" "$WORK/postgres.log" | grep -c -e "$rotated" -e "$KEY_SECRET" || true)"
