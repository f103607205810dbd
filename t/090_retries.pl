# t/090_retries.pl: retries stay within taptalk.timeout.  With
# max_retries = 10 and a short timeout, a server that always answers 503
# (fast or after 300 ms), always resets, or refuses connections gets a few
# attempts and the call returns within the timeout (plus 150 ms); a batch of
# 16 such requests too; max_retries is an upper bound (exactly 1 + 3 attempts
# with time to spare); and a cancel during the wait between attempts stops the
# call within 300 ms.  (That TLS verification failures are not retried is in
# t/010_tls.pl: one connection each, with max_retries = 2.)
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use Test::More;

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node('retries', mock => $mock, helpers => 1);
my $log_mark = TaptalkTest::log_offset($node);
my $token = sprintf('r%05d', rand(1e5));    # xcUserID: 50 characters at most
my $port = $mock->port;

$node->safe_psql(
	'postgres', q{
CREATE FUNCTION retry_timed(request jsonb, timeout_ms int, max_retries int,
	OUT ms int, OUT error_code text)
LANGUAGE plpgsql AS $$
DECLARE
	t0 timestamptz;
BEGIN
	PERFORM set_config('taptalk.timeout', timeout_ms::text, true);
	PERFORM set_config('taptalk.max_retries', max_retries::text, true);
	t0 := clock_timestamp();
	SELECT r.error_code INTO error_code FROM taptalk_auth_ticket(request) r;
	ms := extract(epoch FROM clock_timestamp() - t0) * 1000;
END $$;
CREATE FUNCTION retry_timed_batch(requests jsonb[], timeout_ms int, max_retries int,
	OUT ms int, OUT error_codes text)
LANGUAGE plpgsql AS $$
DECLARE
	t0 timestamptz;
BEGIN
	PERFORM set_config('taptalk.timeout', timeout_ms::text, true);
	PERFORM set_config('taptalk.max_retries', max_retries::text, true);
	t0 := clock_timestamp();
	SELECT string_agg(DISTINCT coalesce(r.error_code, 'OK'), ',') INTO error_codes
	FROM taptalk_auth_tickets(requests) r;
	ms := extract(epoch FROM clock_timestamp() - t0) * 1000;
END $$;});

# retry_case(NAME, TIMEOUT_MS, MIN_ATTEMPTS, MAX_ATTEMPTS, CODES, SQL_CALL
# [, PATTERN [, SQL_BEFORE]]): SQL_CALL is a retry_timed(...) or
# retry_timed_batch(...) call; attempts are the mock's requests whose body
# holds PATTERN (default: $token-NAME).
sub retry_case
{
	my ($name, $timeout, $min, $max, $codes, $call, $pattern, $before) = @_;
	$pattern //= "$token-$name";
	my $col = $call =~ /^retry_timed_batch/ ? 'error_codes' : 'error_code';
	my $mark = $mock->log_mark;
	my $out = $node->safe_psql('postgres',
		($before // '') . "\nSELECT ms || ' ' || $col FROM $call;");
	my ($ms, $code) = split / /, $out;
	my $attempts = $mock->count($mark, 'request', undef, qr/\Q$pattern\E/);
	ok((grep { $_ eq $code } split /,/, $codes),
		"$name: the call ended with $codes (got $code)");
	cmp_ok($ms, '<=', $timeout + 150,
		"$name: returned within $timeout ms + 150 ms (took $ms ms, $attempts attempts)");
	ok($attempts >= $min && $attempts <= $max,
		"$name: between $min and $max attempts ($attempts in $ms ms)");
	return;
}

# a 503 every time, answered at once: backoff 50-100, 100-200, 200-400 ms...
retry_case('always-503', 700, 3, 6, 'HTTP_ERROR',
	"retry_timed(req('fault-flaky-1000000-$token-always-503'), 700, 10)");
# a 503 every time, after 300 ms: the last attempt gets what is left of the budget
retry_case('slow-503', 1000, 2, 4, 'HTTP_ERROR,TIMEOUT',
	"retry_timed(req('$token-slow-503'), 1000, 10)",
	undef,
	"SET taptalk.base_url = 'http://127.0.0.1:$port/delay/300/failevery/1';");
# a reset every time
retry_case('always-reset', 500, 3, 6, 'CONNECTION_FAILED',
	"retry_timed(req('fault-flakyreset-1000000-$token-always-reset'), 500, 10)");
# a batch of 16 that always get 503
retry_case('batch-503', 700, 48, 96, 'HTTP_ERROR',
	"retry_timed_batch(ARRAY(SELECT req('fault-flaky-1000000-$token-batch-503-' || i) FROM generate_series(1, 16) i), 700, 10)",
	"$token-batch-503-");
# max_retries bounds the attempts when time is plenty
retry_case('max-retries-3', 10000, 4, 4, 'HTTP_ERROR',
	"retry_timed(req('fault-flaky-1000000-$token-max-retries-3'), 10000, 3)");

# refused connections: nothing reaches the mock; time is the measure
my ($ms, $code) = split / /, $node->safe_psql(
	'postgres', qq{
SET taptalk.base_url = 'http://127.0.0.1:1';
SELECT ms || ' ' || error_code FROM retry_timed(req('$token-refused'), 400, 10);});
is($code, 'CONNECTION_FAILED', 'refused: CONNECTION_FAILED');
ok($ms >= 120 && $ms <= 550,
	"refused: retried (more than 120 ms) within 400 ms + 150 ms (took $ms ms)");

# a cancel while waiting between attempts stops the call at once
my ($out, $err) = TaptalkTest::psql_out_err(
	$node, qq{
CREATE FUNCTION pg_temp.cancelled_after(request jsonb) RETURNS text LANGUAGE plpgsql AS \$\$
DECLARE
	t0 timestamptz := clock_timestamp();
BEGIN
	PERFORM taptalk_auth_ticket(request);
	RETURN 'not cancelled';
EXCEPTION WHEN query_canceled THEN
	RETURN (extract(epoch FROM clock_timestamp() - t0) * 1000)::int::text;
END \$\$;
SET taptalk.timeout = 60000;
SET taptalk.max_retries = 10;
SET statement_timeout = 1000;
SELECT pg_temp.cancelled_after(req('fault-flaky-1000000-$token-cancel'));});
ok($out =~ /^\d+$/ && $out <= 1300,
	"a statement_timeout of 1000 ms during the backoff stops the call within 300 ms (after $out ms)"
) or diag $err;
is( $node->safe_psql(
		'postgres', "SELECT user_id FROM taptalk_auth_ticket(req('retry-after'))"),
	'tt-retry-after',
	"the session's next call succeeds");
TaptalkTest::no_crash($node, $log_mark, 'retries');

$node->stop;
$mock->stop;
done_testing();
