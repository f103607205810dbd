# test/script_helpers.sh: helpers for the script tests in test/t/*.sh.
#
# Sourced by each of them (they are themselves sourced by scripts/test and
# scripts/soak, with the cluster and the mock running and scripts/lib.sh's
# variables set).  Every name here starts with t_ so that nothing clashes with
# lib.sh or with a test's own variables.

# t_ok MESSAGE / t_fail MESSAGE [DETAIL...]: one TAP-style line; t_fail stops
# the run (exit 1).
t_ok() {
	echo "ok - $1"
}
t_fail() {
	echo "not ok - $1"
	shift
	for line in "$@"; do echo "  $line"; done
	exit 1
}

# t_check NAME EXPECTED ACTUAL
t_check() {
	if [ "$2" = "$3" ]; then
		t_ok "$1"
	else
		t_fail "$1" "expected: $2" "got:      $3"
	fi
}

# t_sql [psql options...]: psql on the regression database, unaligned, tuples
# only, stopping at the first error; the SQL comes from -c or stdin.
t_sql() {
	psql_q -At -d contrib_regression "$@"
}

# t_mock_mark: the current end of the mock's log (a byte offset).
t_mock_mark() {
	stat -c %s "$MOCK_LOG"
}

# t_mock_count MARK EVENT PORT: how many EVENT lines (connection, request)
# the mock logged for PORT after MARK.
t_mock_count() {
	tail -c +"$(($1 + 1))" "$MOCK_LOG" | grep -c "^{\"event\":\"$2\",\"port\":$3," || true
}

# t_log_mark: the current end of the server's log.
t_log_mark() {
	stat -c %s "$WORK/postgres.log"
}

# t_no_crash NAME MARK: fail when the server's log shows, after MARK, a
# backend that died (signal, exception, non-zero exit), a PANIC or a restart.
t_no_crash() {
	local found
	found=$(tail -c +"$(($2 + 1))" "$WORK/postgres.log" |
		grep -E 'terminated by signal|terminated by exception|exited with exit code|all server processes terminated|PANIC:|TRAP:|server process .* was terminated' |
		head -5 || true)
	if [ -n "$found" ]; then
		t_fail "$1: no backend crashed" "$found"
	fi
	t_ok "$1: no backend crashed"
}

# t_elapsed_ms START_NS: milliseconds since START_NS (from date +%s%N).
t_elapsed_ms() {
	echo $((($(date +%s%N) - $1) / 1000000))
}

# t_memory_fn: create backend_memory(), this backend's VmRSS, VmHWM (peak)
# and RssAnon in kB, read from /proc/self/status, and
# backend_memory_reset_peak(), which sets VmHWM back to VmRSS through
# /proc/self/clear_refs (superuser only).
t_memory_fn() {
	t_sql -q <<'SQL'
CREATE OR REPLACE FUNCTION backend_memory(OUT rss_kb bigint, OUT hwm_kb bigint, OUT anon_kb bigint)
LANGUAGE sql VOLATILE AS $$
	SELECT (regexp_match(s, 'VmRSS:\s+(\d+)'))[1]::bigint,
		   (regexp_match(s, 'VmHWM:\s+(\d+)'))[1]::bigint,
		   (regexp_match(s, 'RssAnon:\s+(\d+)'))[1]::bigint
	FROM pg_read_file('/proc/self/status') AS s
$$;
CREATE OR REPLACE FUNCTION backend_memory_reset_peak() RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
	EXECUTE $c$COPY (SELECT 5) TO '/proc/self/clear_refs'$c$;
END $$;
SQL
}
