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
# ports below the ephemeral range (32768-60999), so no client connection holds them
export PGPORT=${TAPTALK_PGPORT:-25432}
MOCK_PORT=${TAPTALK_MOCK_PORT:-28480}
MOCK_PORT2=${TAPTALK_MOCK_PORT2:-28481}
MOCK_TLS_PORT=${TAPTALK_MOCK_TLS_PORT:-28443}
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

# install_proxies: tinyproxy and microsocks, the real proxies t/230_proxy.pl
# runs requests through (it starts its own instances on free ports of
# 127.0.0.1 and stops them).  Debian's tinyproxy package comes with a service
# on a fixed port (8888) that must not run: while the packages install, a
# policy-rc.d (unless the machine has one already) keeps their scripts from
# starting it, and afterwards the service is stopped if it started anyway
# and disabled for the next boot.
install_proxies() {
	local missing=() p policy=/usr/sbin/policy-rc.d own_policy=0
	for p in tinyproxy microsocks; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
			missing+=("$p")
	done
	[ ${#missing[@]} -gt 0 ] || return 0
	if [ ! -e "$policy" ]; then
		printf '#!/bin/sh\n# no service starts while taptalk installs test packages\nexit 101\n' |
			as_root tee "$policy" >/dev/null
		as_root chmod 755 "$policy"
		own_policy=1
	fi
	install_deps "${missing[@]}" || { [ $own_policy = 0 ] || as_root rm -f "$policy"; return 1; }
	[ $own_policy = 0 ] || as_root rm -f "$policy"
	if [ -x /etc/init.d/tinyproxy ]; then
		as_root /etc/init.d/tinyproxy stop >/dev/null 2>&1 || true
	fi
	# systemctl disables without a running systemd too (and the SysV links)
	if command -v systemctl >/dev/null; then
		as_root systemctl disable --now tinyproxy.service >/dev/null 2>&1 ||
			as_root systemctl disable tinyproxy.service >/dev/null 2>&1 || true
	elif command -v update-rc.d >/dev/null; then
		as_root update-rc.d tinyproxy disable >/dev/null 2>&1 || true
	fi
}

build_install() {
	echo "== building and installing taptalk"
	# from scratch: objects built for another PostgreSQL would be reused
	make -C "$ROOT" -s PG_CONFIG="$PG_CONFIG" clean
	make -C "$ROOT" -s PG_CONFIG="$PG_CONFIG" >/dev/null
	as_root make -C "$ROOT" -s PG_CONFIG="$PG_CONFIG" install >/dev/null
}

# make_test_certs DIR: a throwaway CA (ca.pem) and, signed by it, server.pem
# for 127.0.0.1 and localhost and wrong.pem for the host name wrong.example
# (keys NAME.key); other-ca.pem is a second CA that signed neither.  Files
# are readable by the server (keys only by us).
make_test_certs() {
	local dir=$1
	mkdir -p "$dir"
	chmod 755 "$dir"
	(
		cd "$dir"
		umask 077
		for ca in ca other-ca; do
			openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
				-nodes -keyout "$ca.key" -out "$ca.pem" -days 2 -subj "/CN=taptalk test $ca" \
				-addext "basicConstraints=critical,CA:TRUE" \
				-addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
		done
		for leaf in "server 127.0.0.1 DNS:localhost,IP:127.0.0.1" \
			"wrong wrong.example DNS:wrong.example"; do
			set -- $leaf
			local name=$1 cn=$2 san=$3
			openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
				-keyout "$name.key" -out "$name.csr" -subj "/CN=$cn" 2>/dev/null
			printf '%s\n' "basicConstraints=critical,CA:FALSE" \
				"keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
				"subjectAltName=$san" >"$name.ext"
			openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
				-days 2 -extfile "$name.ext" -out "$name.pem" 2>/dev/null
			rm -f "$name.csr" "$name.ext"
		done
		chmod 644 ./*.pem
	)
}

# start_mock [CERT]: the mock TapTalk server on MOCK_PORT and MOCK_PORT2, and
# on MOCK_TLS_PORT with $TLS_DIR/CERT.pem (default: server, the certificate
# for 127.0.0.1).  MOCK_TLS_ARGS, when set, replaces the TLS arguments.
start_mock() {
	local cert=${1:-server}
	local tls_args=${MOCK_TLS_ARGS-"--tls-port $MOCK_TLS_PORT --tls-cert $TLS_DIR/$cert.pem --tls-key $TLS_DIR/$cert.key"}
	"$PYTHON" "$ROOT/test/mock_taptalk.py" --host 127.0.0.1 \
		--port "$MOCK_PORT" --port "$MOCK_PORT2" $tls_args \
		--key-id "$KEY_ID" --key-secret "$KEY_SECRET" \
		--log "$MOCK_LOG" --pidfile "$WORK/mock.pid" >"$WORK/mock.out" 2>&1 &
	for _ in $(seq 100); do
		grep -q "mock ready" "$WORK/mock.out" 2>/dev/null && break
		sleep 0.1
	done
	grep -q "mock ready" "$WORK/mock.out" || { cat "$WORK/mock.out"; echo "mock server did not start"; exit 1; }
}

# stop_mock: stop the mock server and wait until it has released its ports.
stop_mock() {
	local pid
	[ -f "$WORK/mock.pid" ] || return 0
	pid=$(cat "$WORK/mock.pid")
	kill "$pid" 2>/dev/null || true
	for _ in $(seq 100); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.05
	done
	rm -f "$WORK/mock.pid"
}

# restart_mock [CERT]: as start_mock, after stopping the running one.  The
# mock's log starts anew (mock_mark() positions taken before are void).
restart_mock() {
	stop_mock
	start_mock "$@"
}

# start_services [extra postgresql.conf lines...]
start_services() {
	WORK=$(mktemp -d /tmp/taptalk.XXXXXX)
	chmod 755 "$WORK"
	[ "$(id -u)" = 0 ] && chown postgres "$WORK"
	export PGHOST=$WORK
	PGDATA=$WORK/data
	MOCK_LOG=$WORK/mock.jsonl
	TLS_DIR=$WORK/tls
	trap stop_services EXIT

	make_test_certs "$TLS_DIR"
	start_mock

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
mock.tls_dir = '$TLS_DIR'
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

# run_installcheck [make arguments...]: make installcheck, which runs the TAP
# tests in t/ (each starts its own cluster and mock server; t/001_regress.pl
# runs sql/*.sql).  PostgreSQL's servers do not run as root: as root, the
# tests run as postgres on a copy of the checkout, removed when they pass and
# kept (with tmp_check/log) when they fail, unless KEEP_FAILED_CHECK=0.
run_installcheck() {
	if [ "$(id -u)" != 0 ]; then
		make -C "$ROOT" -s PG_CONFIG="$PG_CONFIG" installcheck "$@"
		return
	fi
	local dir rc=0
	dir=$(mktemp -d /tmp/taptalk-check.XXXXXX)
	tar -C "$ROOT" --exclude=./.git --exclude=./tmp_check --exclude=./results -cf - . |
		tar -C "$dir" -xf -
	chown -R postgres "$dir"
	runuser -u postgres -- env HOME="$dir" \
		make -C "$dir" -s PG_CONFIG="$PG_CONFIG" installcheck "$@" || rc=$?
	if [ "$rc" = 0 ] || [ "${KEEP_FAILED_CHECK:-1}" = 0 ]; then
		rm -rf "$dir"
	else
		echo "== the tests' logs: $dir/tmp_check/log"
	fi
	return "$rc"
}
