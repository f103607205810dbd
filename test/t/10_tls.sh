# test/t/10_tls.sh: HTTPS to the mock with a throwaway CA (made by lib.sh's
# make_test_certs).  A certificate is accepted only when it chains to
# taptalk.ca_file (or the system bundle) and names the host of the URL; a
# rejected server never receives a request, so never sees the Server-Key; a
# verification failure is not retried; a connection verified under one CA file
# is not reused after the setting changes; a handshake that never completes
# ends within the time limit, or at a cancel.
source "$ROOT/test/script_helpers.sh"

tls_url="https://127.0.0.1:$MOCK_TLS_PORT"
tls_ca="$TLS_DIR/ca.pem"

# tls_call XC [SQL before the call...]: one fresh session; prints
# "user_id|error_code|error_message" of one call with base_url = tls_url and
# the default max_retries (2).
tls_call() {
	local xc=$1
	shift
	t_sql <<SQL
SET taptalk.base_url = '$tls_url';
SET taptalk.timeout_ms = 5000;
$(printf '%s\n' "$@")
SELECT concat_ws('|', coalesce(user_id, ''), coalesce(error_code, ''), coalesce(error_message, ''))
FROM taptalk_auth_ticket(req('$xc'));
SQL
}

# tls_refused NAME XC [SQL...]: the call fails with CONNECTION_FAILED after a
# TLS verification failure, on exactly one connection and with no request.
tls_refused() {
	local name=$1 xc=$2 mark got
	shift 2
	mark=$(t_mock_mark)
	got=$(tls_call "$xc" "$@")
	case "$got" in
	"|CONNECTION_FAILED|"*) ;;
	*) t_fail "$name: CONNECTION_FAILED" "got: $got" ;;
	esac
	t_ok "$name: CONNECTION_FAILED (${got#|CONNECTION_FAILED|})"
	t_check "$name: the server received no request" 0 "$(t_mock_count "$mark" request "$MOCK_TLS_PORT")"
	t_check "$name: not retried (one connection with max_retries = 2)" 1 \
		"$(t_mock_count "$mark" connection "$MOCK_TLS_PORT")"
}

# the CA that signed the mock's certificate: success, over TLS
mark=$(t_mock_mark)
t_check "https://127.0.0.1 with taptalk.ca_file = the test CA succeeds" \
	"tt-tls-ok||" "$(tls_call tls-ok "SET taptalk.ca_file = '$tls_ca';")"
t_check "the request went to the TLS port" 1 "$(t_mock_count "$mark" request "$MOCK_TLS_PORT")"
tls_url="https://localhost:$MOCK_TLS_PORT"
t_check "https://localhost (the certificate's DNS name) succeeds" \
	"tt-tls-localhost||" "$(tls_call tls-localhost "SET taptalk.ca_file = '$tls_ca';")"
tls_url="https://127.0.0.1:$MOCK_TLS_PORT"

# without ca_file the system bundle is used, which does not know the test CA
tls_refused "without ca_file" tls-no-ca
# a CA file that did not sign the certificate
tls_refused "with another CA in ca_file" tls-other-ca "SET taptalk.ca_file = '$TLS_DIR/other-ca.pem';"
# a CA file that does not exist: refused, not silently unverified
tls_refused "with a ca_file that does not exist" tls-missing-ca "SET taptalk.ca_file = '$TLS_DIR/missing.pem';"

# a verified connection is kept for reuse, but not once ca_file changes
mark=$(t_mock_mark)
got=$(t_sql <<SQL
SET taptalk.base_url = '$tls_url';
SET taptalk.ca_file = '$tls_ca';
SELECT coalesce(user_id, error_code) FROM taptalk_auth_ticket(req('tls-reuse-1'));
SELECT coalesce(user_id, error_code) FROM taptalk_auth_ticket(req('tls-reuse-2'));
RESET taptalk.ca_file;
SELECT coalesce(user_id, error_code) FROM taptalk_auth_ticket(req('tls-reuse-3'));
SQL
)
t_check "after RESET taptalk.ca_file the verified connection is not reused" \
	"tt-tls-reuse-1 tt-tls-reuse-2 CONNECTION_FAILED" "$(echo $got)"
t_check "after RESET taptalk.ca_file: 2 requests on 2 connections (1 reused, 1 refused)" "2 2" \
	"$(t_mock_count "$mark" request "$MOCK_TLS_PORT") $(t_mock_count "$mark" connection "$MOCK_TLS_PORT")"

# the mock again, now with a certificate (signed by the same CA) for another
# host name: the chain verifies, the name does not
restart_mock wrong
tls_refused "certificate for wrong.example at https://127.0.0.1" tls-wrong-host \
	"SET taptalk.ca_file = '$tls_ca';"
tls_url="https://localhost:$MOCK_TLS_PORT"
tls_refused "certificate for wrong.example at https://localhost" tls-wrong-host-2 \
	"SET taptalk.ca_file = '$tls_ca';"
tls_url="https://127.0.0.1:$MOCK_TLS_PORT"
restart_mock

# control: the connection count above does see retries when there are some
mark=$(t_mock_mark)
got=$(tls_call fault-reset "SET taptalk.ca_file = '$tls_ca';")
t_check "control: a reset over TLS is retried (3 connections, 3 requests)" \
	"CONNECTION_FAILED 3 3" \
	"$(echo "$got" | cut -d'|' -f2) $(t_mock_count "$mark" connection "$MOCK_TLS_PORT") $(t_mock_count "$mark" request "$MOCK_TLS_PORT")"
t_check "after the restarts, https with the CA succeeds again" \
	"tt-tls-again||" "$(tls_call tls-again "SET taptalk.ca_file = '$tls_ca';")"

# a server that never completes the handshake (the mock's plain HTTP port
# waits for a request line that a TLS ClientHello never gives): the call ends
# within its time limit, a connect timeout is retried within that limit, and
# a cancel stops it at once; no request is ever made
mark=$(t_mock_mark)
got=$(t_sql <<SQL
SET taptalk.base_url = 'https://127.0.0.1:$MOCK_PORT';
SET taptalk.ca_file = '$tls_ca';
CREATE FUNCTION pg_temp.timed(request jsonb, OUT ms int, OUT code text) LANGUAGE plpgsql AS \$\$
DECLARE
	t0 timestamptz := clock_timestamp();
BEGIN
	SELECT error_code INTO code FROM taptalk_auth_ticket(request);
	ms := extract(epoch FROM clock_timestamp() - t0) * 1000;
EXCEPTION WHEN query_canceled THEN
	ms := extract(epoch FROM clock_timestamp() - t0) * 1000;
	code := 'cancelled';
END \$\$;
SET taptalk.timeout_ms = 1000;
SELECT concat_ws(' ', code, ms <= 1300) FROM pg_temp.timed(req('tls-stall-1'));
SET taptalk.connect_timeout_ms = 300;
SELECT concat_ws(' ', CASE WHEN code IN ('CONNECTION_FAILED', 'TIMEOUT') THEN 'failed' ELSE code END,
	ms BETWEEN 600 AND 1300) FROM pg_temp.timed(req('tls-stall-2'));
SET taptalk.timeout_ms = 60000;
SET taptalk.connect_timeout_ms = 60000;
SET statement_timeout = 500;
SELECT concat_ws(' ', code, ms <= 1000) FROM pg_temp.timed(req('tls-stall-3'));
SQL
)
t_check "a stalled TLS handshake: TIMEOUT within timeout_ms; connect timeouts retried within it; cancel at once" \
	"TIMEOUT t failed t cancelled t" "$(echo $got)"
got=$(t_mock_count "$mark" connection "$MOCK_PORT")
if [ "$got" -lt 4 ] || [ "$got" -gt 6 ]; then
	t_fail "a stalled TLS handshake: 1 + (2 or 3) + 1 connections" "$got connections"
fi
t_ok "a stalled TLS handshake: $got connections (the connect timeouts were retried)"
t_check "a stalled TLS handshake: no request reached the server" 0 "$(t_mock_count "$mark" request "$MOCK_PORT")"
