# test/t/30_protocols.sh: a base URL with another scheme in the places SQL
# cannot reach (sql/protocols.sql has SET, set_config, ALTER SYSTEM, ALTER
# DATABASE and ALTER ROLE).  In postgresql.conf on reload: refused, the old
# URL stays in force; at server start: refused, the setting stays empty and
# the functions raise before any I/O; in connection options: the connection
# is refused.  The mock receives nothing from any of it.
source "$ROOT/test/script_helpers.sh"

conf=$PGDATA/postgresql.conf
good_url="http://127.0.0.1:$MOCK_PORT"
mock_mark=$(t_mock_mark)

# proto_conf_url URL: put URL as taptalk.base_url in postgresql.conf
proto_conf_url() {
	sed -i "s|^taptalk.base_url = .*|taptalk.base_url = '$1'|" "$conf"
}

# on reload
log_mark=$(t_log_mark)
proto_conf_url "file:///etc/passwd"
t_sql -q -c "SELECT pg_reload_conf()" >/dev/null
for _ in $(seq 50); do
	tail -c +"$((log_mark + 1))" "$WORK/postgres.log" | grep -q 'taptalk.base_url' && break
	sleep 0.1
done
got=$(tail -c +"$((log_mark + 1))" "$WORK/postgres.log" | grep -m1 -o 'invalid value for parameter "taptalk.base_url": "file:///etc/passwd"' || true)
t_check "a file:// URL in postgresql.conf is refused on reload" \
	'invalid value for parameter "taptalk.base_url": "file:///etc/passwd"' "$got"
t_check "file:// on reload: the URL in force is still the mock's" "$good_url" "$(t_sql -c "SHOW taptalk.base_url")"
t_check "file:// on reload: calls still go to the mock" "tt-proto-reload" \
	"$(t_sql -c "SELECT user_id FROM taptalk_auth_ticket(req('proto-reload'))")"

# at server start
proto_conf_url "gopher://127.0.0.1:$MOCK_PORT/"
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/postgres.log" -w -s restart
mock_mark=$(t_mock_mark)
t_check "a gopher:// URL in postgresql.conf at start leaves the setting empty" "" \
	"$(t_sql -c "SHOW taptalk.base_url")"
got=$(t_sql -c "SELECT taptalk_auth_ticket(req('proto-start'))" 2>&1 || true)
t_check "gopher:// at start: the function raises" 'ERROR:  parameter "taptalk.base_url" is not set
HINT:  Set taptalk.base_url in postgresql.conf or with ALTER SYSTEM, for example to https://taptalk.io.' "$got"
got=$(t_sql -c "SELECT count(*) FROM taptalk_auth_tickets(ARRAY[req('proto-start')])" 2>&1 | head -1 || true)
t_check "gopher:// at start: the batch function raises" 'ERROR:  parameter "taptalk.base_url" is not set' "$got"

# in connection options (a superuser's, since others may not set it at all)
got=$(PGOPTIONS="-c taptalk.base_url=ftp://127.0.0.1:$MOCK_PORT/" t_sql -c "SELECT 1" 2>&1 | grep -o 'invalid value for parameter "taptalk.base_url"' || true)
t_check "an ftp:// URL in the connection options refuses the connection" \
	'invalid value for parameter "taptalk.base_url"' "$got"
t_check "none of it reached the mock" 0 "$(t_mock_count "$mock_mark" connection "$MOCK_PORT")"

proto_conf_url "$good_url"
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/postgres.log" -w -s restart
t_check "with the URL back, calls succeed" "tt-proto-back" \
	"$(t_sql -c "SELECT user_id FROM taptalk_auth_ticket(req('proto-back'))")"
