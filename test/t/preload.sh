# test/t/preload.sh: without shared_preload_libraries the secret is a
# placeholder anyone can read, so the functions must refuse to run.
# Sourced by scripts/test with the cluster running; restores it after.

check() {	# check NAME EXPECTED ACTUAL
	if [ "$2" = "$3" ]; then
		echo "ok - $1"
	else
		echo "not ok - $1"; echo "  expected: $2"; echo "  got:      $3"; exit 1
	fi
}

conf=$PGDATA/postgresql.conf
sed -i "s/^shared_preload_libraries = 'taptalk'/shared_preload_libraries = ''/" "$conf"
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/postgres.log" -w -s restart

# before the library is loaded, the value is a placeholder: readable by anyone
got=$(psql_q -At -d contrib_regression -U taptalk_app -c "SELECT current_setting('taptalk.server_key_secret', true) IS NOT NULL")
check "without preload, a placeholder secret is visible (why preload is required)" t "$got"

# the functions refuse, with a hint saying what to do
got=$(psql_q -At -d contrib_regression -c "SELECT taptalk_auth_ticket(req('p'))" 2>&1 || true)
check "without preload, the function refuses" \
	"ERROR:  taptalk must be loaded via shared_preload_libraries
DETAIL:  The server key settings are protected only when the library is loaded at server start.
HINT:  Add taptalk to shared_preload_libraries in postgresql.conf and restart the server." "$got"
got=$(psql_q -At -d contrib_regression -c "SELECT * FROM taptalk_auth_tickets(ARRAY[req('p')])" 2>&1 | head -1 || true)
check "without preload, the batch function refuses" \
	"ERROR:  taptalk must be loaded via shared_preload_libraries" "$got"

sed -i "s/^shared_preload_libraries = ''/shared_preload_libraries = 'taptalk'/" "$conf"
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/postgres.log" -w -s restart

# preloaded again: a fresh non-superuser session cannot read it
got=$(psql_q -At -d contrib_regression -U taptalk_app -c "SHOW taptalk.server_key_secret" 2>&1 || true)
check "with preload, a fresh non-superuser session cannot read the secret" \
	'ERROR:  must be superuser or have privileges of pg_read_all_settings to examine "taptalk.server_key_secret"' "$got"
got=$(psql_q -At -d contrib_regression -c "SELECT user_id FROM taptalk_auth_ticket(req('p'))")
check "with preload, the function works" tt-p "$got"
