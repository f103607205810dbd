# t/010_tls.pl: HTTPS to the mock with a throwaway CA (made by TaptalkTest).
# A certificate is accepted only when it chains to taptalk.ca_file (or the
# system bundle) and names the host of the URL; a rejected server never
# receives a request, so never sees the Server-Key; a verification failure is
# not retried; a connection verified under one CA file is not reused after
# the setting changes; a handshake that never completes ends within the time
# limit, or at a cancel.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use Test::More;

my $mock = TaptalkTest::Mock->start(tls => 1);
my $node = TaptalkTest::node('tls', mock => $mock, helpers => 1);
my $tls_dir = $mock->tls_dir;
my $ca = "$tls_dir/ca.pem";
my $tls_port = $mock->tls_port;
my $url_ip = "https://127.0.0.1:$tls_port";
my $url_name = "https://localhost:$tls_port";

# tls_call(URL, XC, SQL before the call...): one fresh session; returns
# "user_id|error_code|error_message" of one call with base_url = URL and the
# default max_retries (2).
sub tls_call
{
	my ($url, $xc, @before) = @_;
	return $node->safe_psql(
		'postgres', join("\n",
			"SET taptalk.base_url = '$url';",
			'SET taptalk.timeout = 5000;',
			@before,
			"SELECT concat_ws('|', coalesce(user_id, ''), coalesce(error_code, ''), coalesce(error_message, ''))",
			"FROM taptalk_auth_ticket(req('$xc'));"));
}

# tls_refused(NAME, URL, XC, SQL...): the call fails with CONNECTION_FAILED
# after a TLS verification failure, on exactly one connection and with no
# request.
sub tls_refused
{
	my ($name, $url, $xc, @before) = @_;
	my $mark = $mock->log_mark;
	my $got = tls_call($url, $xc, @before);
	like($got, qr/^\|CONNECTION_FAILED\|/, "$name: CONNECTION_FAILED")
	  and note "$name: $got";
	is($mock->count($mark, 'request', $tls_port),
		0, "$name: the server received no request");
	is($mock->count($mark, 'connection', $tls_port),
		1, "$name: not retried (one connection with max_retries = 2)");
	return;
}

# the CA that signed the mock's certificate: success, over TLS
my $mark = $mock->log_mark;
is(tls_call($url_ip, 'tls-ok', "SET taptalk.ca_file = '$ca';"),
	'tt-tls-ok||', 'https://127.0.0.1 with taptalk.ca_file = the test CA succeeds');
is($mock->count($mark, 'request', $tls_port),
	1, 'the request went to the TLS port');
is(tls_call($url_name, 'tls-localhost', "SET taptalk.ca_file = '$ca';"),
	'tt-tls-localhost||',
	"https://localhost (the certificate's DNS name) succeeds");

# without ca_file the system bundle is used, which does not know the test CA
tls_refused('without ca_file', $url_ip, 'tls-no-ca');
# a CA file that did not sign the certificate
tls_refused('with another CA in ca_file', $url_ip, 'tls-other-ca',
	"SET taptalk.ca_file = '$tls_dir/other-ca.pem';");
# a CA file that does not exist: refused, not silently unverified
tls_refused('with a ca_file that does not exist', $url_ip, 'tls-missing-ca',
	"SET taptalk.ca_file = '$tls_dir/missing.pem';");

# a verified connection is kept for reuse, but not once ca_file changes
$mark = $mock->log_mark;
my $got = $node->safe_psql(
	'postgres', qq{
SET taptalk.base_url = '$url_ip';
SET taptalk.ca_file = '$ca';
SELECT coalesce(user_id, error_code) FROM taptalk_auth_ticket(req('tls-reuse-1'));
SELECT coalesce(user_id, error_code) FROM taptalk_auth_ticket(req('tls-reuse-2'));
RESET taptalk.ca_file;
SELECT coalesce(user_id, error_code) FROM taptalk_auth_ticket(req('tls-reuse-3'));});
is( join(' ', split /\n/, $got),
	'tt-tls-reuse-1 tt-tls-reuse-2 CONNECTION_FAILED',
	'after RESET taptalk.ca_file the verified connection is not reused');
is( $mock->count($mark, 'request', $tls_port) . ' '
	  . $mock->count($mark, 'connection', $tls_port),
	'2 2',
	'after RESET taptalk.ca_file: 2 requests on 2 connections (1 reused, 1 refused)');

# the mock again, now with a certificate (signed by the same CA) for another
# host name: the chain verifies, the name does not
$mock->restart(cert => 'wrong');
tls_refused('certificate for wrong.example at https://127.0.0.1',
	$url_ip, 'tls-wrong-host', "SET taptalk.ca_file = '$ca';");
tls_refused('certificate for wrong.example at https://localhost',
	$url_name, 'tls-wrong-host-2', "SET taptalk.ca_file = '$ca';");
$mock->restart(cert => 'server');

# control: the connection count above does see retries when there are some
$mark = $mock->log_mark;
$got = tls_call($url_ip, 'fault-reset', "SET taptalk.ca_file = '$ca';");
is( (split /\|/, $got)[1] . ' '
	  . $mock->count($mark, 'connection', $tls_port) . ' '
	  . $mock->count($mark, 'request', $tls_port),
	'CONNECTION_FAILED 3 3',
	'control: a reset over TLS is retried (3 connections, 3 requests)');
is(tls_call($url_ip, 'tls-again', "SET taptalk.ca_file = '$ca';"),
	'tt-tls-again||', 'after the restarts, https with the CA succeeds again');

# a server that never completes the handshake (the mock's plain HTTP port
# waits for a request line that a TLS ClientHello never gives): the call ends
# within its time limit, a connect timeout is retried within that limit, and
# a cancel stops it at once; no request is ever made
$mark = $mock->log_mark;
my $plain = $mock->port;
$got = $node->safe_psql(
	'postgres', qq{
SET taptalk.base_url = 'https://127.0.0.1:$plain';
SET taptalk.ca_file = '$ca';
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
SET taptalk.timeout = 1000;
SELECT concat_ws(' ', code, ms <= 1300, ms) FROM pg_temp.timed(req('tls-stall-1'));
SET taptalk.connect_timeout = 300;
SELECT concat_ws(' ', CASE WHEN code IN ('CONNECTION_FAILED', 'TIMEOUT') THEN 'failed' ELSE code END,
	ms BETWEEN 600 AND 1300, ms) FROM pg_temp.timed(req('tls-stall-2'));
SET taptalk.timeout = 60000;
SET taptalk.connect_timeout = 60000;
SET statement_timeout = 500;
SELECT concat_ws(' ', code, ms <= 1000, ms) FROM pg_temp.timed(req('tls-stall-3'));});
my @stall = map { [ split / / ] } split /\n/, $got;
is("$stall[0][0] $stall[0][1]", 'TIMEOUT t',
	"a stalled TLS handshake: TIMEOUT within taptalk.timeout = 1000 ms + 300 ms ($stall[0][2] ms)");
is("$stall[1][0] $stall[1][1]", 'failed t',
	"a stalled TLS handshake with taptalk.connect_timeout = 300 ms: the connect timeouts are retried within taptalk.timeout, 600 to 1300 ms ($stall[1][2] ms)");
is("$stall[2][0] $stall[2][1]", 'cancelled t',
	"a stalled TLS handshake: statement_timeout = 500 ms cancels it within 1000 ms ($stall[2][2] ms)");
my $conns = $mock->count($mark, 'connection', $plain);
ok($conns >= 4 && $conns <= 6,
	"a stalled TLS handshake: 1 + (2 or 3) + 1 connections: $conns (the connect timeouts were retried)");
is($mock->count($mark, 'request', $plain),
	0, 'a stalled TLS handshake: no request reached the server');

$node->stop;
$mock->stop;
done_testing();
