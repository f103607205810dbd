# scripts/lib.sh: shared by the demo, test, bench and soak scripts.
#
# Installs what is missing (Debian 12 packages), builds and installs the
# extension, and starts and stops a throwaway PostgreSQL cluster and the mock
# TapTalk server, all on this machine only (Unix socket and 127.0.0.1).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PG_CONFIG=${PG_CONFIG:-$PGBIN/pg_config}
PYTHON=${PYTHON:-/usr/bin/python3}
export PGPORT=${TAPTALK_PGPORT:-55432}
MOCK_PORT=${TAPTALK_MOCK_PORT:-58480}
MOCK_PORT2=${TAPTALK_MOCK_PORT2:-58481}
MOCK_TLS_PORT=${TAPTALK_MOCK_TLS_PORT:-58443}
export PGUSER=postgres
export PGDATABASE=postgres
# test credentials of the mock server, not a real key
KEY_ID=test-key-id
KEY_SECRET=test-key-secret-Zq8X

as_root() {
	if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# The server cannot run as root: run it as postgres when we are root.
as_pg() {
	if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

install_deps() {
	local pkgs=(make gcc postgresql-15 postgresql-server-dev-15
		libcurl4-openssl-dev python3 openssl ca-certificates "$@")
	local missing=()
	for p in "${pkgs[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
			missing+=("$p")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		echo "== installing: ${missing[*]}"
		as_root apt-get update -qq
		as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends "${missing[@]}" >/dev/null
	fi
}

build_install() {
	echo "== building and installing taptalk"
	make -C "$ROOT" -s PG_CONFIG="$PG_CONFIG" >/dev/null
	as_root make -C "$ROOT" -s PG_CONFIG="$PG_CONFIG" install >/dev/null
}

# start_services [extra postgresql.conf lines...]
start_services() {
	WORK=$(mktemp -d /tmp/taptalk.XXXXXX)
	chmod 755 "$WORK"
	[ "$(id -u)" = 0 ] && chown postgres "$WORK"
	export PGHOST=$WORK
	PGDATA=$WORK/data
	MOCK_LOG=$WORK/mock.jsonl
	trap stop_services EXIT

	"$PYTHON" "$ROOT/test/mock_taptalk.py" --host 127.0.0.1 \
		--port "$MOCK_PORT" --port "$MOCK_PORT2" ${MOCK_TLS_ARGS:-} \
		--key-id "$KEY_ID" --key-secret "$KEY_SECRET" \
		--log "$MOCK_LOG" --pidfile "$WORK/mock.pid" >"$WORK/mock.out" 2>&1 &
	for _ in $(seq 100); do
		grep -q "mock ready" "$WORK/mock.out" 2>/dev/null && break
		sleep 0.1
	done
	grep -q "mock ready" "$WORK/mock.out" || { cat "$WORK/mock.out"; echo "mock server did not start"; exit 1; }

	as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >"$WORK/initdb.log"
	cat >>"$PGDATA/postgresql.conf" <<CONF
port = $PGPORT
listen_addresses = ''
unix_socket_directories = '$WORK'
fsync = off
max_connections = 60
shared_preload_libraries = 'taptalk'
taptalk.base_url = 'http://127.0.0.1:$MOCK_PORT'
taptalk.server_key_id = '$KEY_ID'
taptalk.server_key_secret = '$KEY_SECRET'
mock.log = '$MOCK_LOG'
mock.port = '$MOCK_PORT'
mock.port2 = '$MOCK_PORT2'
mock.tls_port = '$MOCK_TLS_PORT'
mock.dir = '$WORK'
CONF
	for line in "$@"; do echo "$line" >>"$PGDATA/postgresql.conf"; done
	as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/postgres.log" -w -s start
}

stop_services() {
	local rc=$?
	if [ -n "${PGDATA:-}" ] && [ -f "$PGDATA/postmaster.pid" ]; then
		as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate -w -s stop || true
	fi
	if [ -f "${WORK:-}/mock.pid" ]; then
		kill "$(cat "$WORK/mock.pid")" 2>/dev/null || true
	fi
	if [ "$rc" != 0 ] && [ -n "${WORK:-}" ]; then
		echo "== failed; server log tail ($WORK/postgres.log):"
		tail -n 30 "$WORK/postgres.log" 2>/dev/null || true
	elif [ -n "${WORK:-}" ]; then
		rm -rf "$WORK"
	fi
	exit "$rc"
}

psql_q() {
	"$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 "$@"
}
