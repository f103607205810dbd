# t/050_hostile_server.pl: a hostile server.  A 100 MiB body (with
# Content-Length, and chunked so that it is only known by reading), a body
# that never ends, headers that never end, 10,000- and 400,000-deep nesting, a
# 1 MiB ticket, NUL bytes, invalid UTF-8, and bodies right at the 1 MiB and
# 64-level limits; singly and many at once in a batch.  Each is answered with
# INVALID_RESPONSE (or TIMEOUT for the endless body), never a crash, and the
# backend's memory stays low: its peak resident size during each call
# (VmHWM from /proc, reset before the call) is far below the sizes sent, and
# its RSS is back near the start after.
#   TAPTALK_HOSTILE_SLOW=1 (scripts/soak): also bodies that trickle in
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use Test::More;

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node('hostile', mock => $mock, helpers => 1);
my $log_mark = TaptalkTest::log_offset($node);
TaptalkTest::create_memory_functions($node);

# with TAPTALK_HOSTILE_SLOW=1 also bodies that trickle in without end: cut
# off at 1 MiB as they arrive, after about 11 s (the mock sends 100 KiB/s)
my $slow = $ENV{TAPTALK_HOSTILE_SLOW} ? 1 : 0;
my $slow_sql =
  $slow
  ? "SELECT pg_temp.hostile('batch 8 x endless, 30 s budget', ARRAY(SELECT req('fault-endless') FROM generate_series(1, 8)), 30000);"
  : '';

my $out = $node->safe_psql(
	'postgres', qq{
CREATE TEMP TABLE hostile (
	n serial, what text, codes text, messages text, ms int,
	rss_before bigint, hwm_before bigint, rss_after bigint, hwm_after bigint);
CREATE FUNCTION pg_temp.hostile(what text, requests jsonb[], timeout_ms int DEFAULT 2000)
RETURNS void LANGUAGE plpgsql AS \$\$
DECLARE
	m0 record;
	m1 record;
	t0 timestamptz;
	codes text;
	messages text;
BEGIN
	PERFORM set_config('taptalk.timeout', timeout_ms::text, false);
	PERFORM backend_memory_reset_peak();
	m0 := backend_memory();
	t0 := clock_timestamp();
	IF cardinality(requests) = 1 THEN
		SELECT coalesce(error_code, 'OK'), coalesce(error_message, user_id) INTO codes, messages
		FROM taptalk_auth_ticket(requests[1]);
	ELSE
		SELECT string_agg(DISTINCT coalesce(error_code, 'OK'), ','),
			   string_agg(DISTINCT coalesce(error_message, user_id), ',') INTO codes, messages
		FROM taptalk_auth_tickets(requests);
	END IF;
	m1 := backend_memory();
	INSERT INTO hostile (what, codes, messages, ms, rss_before, hwm_before, rss_after, hwm_after)
	VALUES (what, codes, messages, extract(epoch FROM clock_timestamp() - t0) * 1000,
			m0.rss_kb, m0.hwm_kb, m1.rss_kb, m1.hwm_kb);
	RESET taptalk.timeout;
END \$\$;
-- warm up: the first call loads libcurl, TLS and the catalogs
SELECT pg_temp.hostile('warm-up', ARRAY[req('hostile-warm')]);
SELECT pg_temp.hostile('warm-up batch', ARRAY(SELECT req('hostile-w' || i) FROM generate_series(1, 16) i));
SELECT pg_temp.hostile('start', ARRAY[req('hostile-start')]);
SELECT pg_temp.hostile('huge-100', ARRAY[req('fault-huge-100')]);
SELECT pg_temp.hostile('huge-2', ARRAY[req('fault-huge-2')]);
SELECT pg_temp.hostile('hugechunked-100', ARRAY[req('fault-hugechunked-100')]);
SELECT pg_temp.hostile('huge-1', ARRAY[req('fault-huge-1')]);
SELECT pg_temp.hostile('hugechunked-1', ARRAY[req('fault-hugechunked-1')]);
SELECT pg_temp.hostile('bigticket', ARRAY[req('fault-bigticket')]);
SELECT pg_temp.hostile('endless', ARRAY[req('fault-endless')], 1000);
SELECT pg_temp.hostile('endless-headers', ARRAY[req('fault-endless-headers')]);
SELECT pg_temp.hostile('deep-10000', ARRAY[req('fault-deep-10000')]);
SELECT pg_temp.hostile('deep-400000', ARRAY[req('fault-deep-400000')]);
SELECT pg_temp.hostile('deep-64', ARRAY[req('fault-deep-64')]);
SELECT pg_temp.hostile('deep-63', ARRAY[req('fault-deep-63')]);
SELECT pg_temp.hostile('nul', ARRAY[req('fault-nul')]);
SELECT pg_temp.hostile('badutf8', ARRAY[req('fault-badutf8')]);
SELECT pg_temp.hostile('batch 16 x huge-100', ARRAY(SELECT req('fault-huge-100') FROM generate_series(1, 16)), 10000);
SELECT pg_temp.hostile('batch 16 x hugechunked-100', ARRAY(SELECT req('fault-hugechunked-100') FROM generate_series(1, 16)), 10000);
SELECT pg_temp.hostile('batch 16 x bigticket', ARRAY(SELECT req('fault-bigticket') FROM generate_series(1, 16)), 10000);
$slow_sql
SELECT pg_temp.hostile('mixed batch', ARRAY[req('fault-huge-100'), req('fault-hugechunked-100'), req('fault-deep-10000'), req('fault-nul'),
	req('fault-badutf8'), req('fault-bigticket'), req('fault-endless-headers'), req('hostile-mixed')]);
SELECT pg_temp.hostile('end', ARRAY[req('hostile-end')]);
SELECT concat_ws('|', what, codes, messages, ms, rss_after - rss_before, hwm_after - rss_before, rss_after)
FROM hostile ORDER BY n;});
TaptalkTest::no_crash($node, $log_mark, 'hostile server');

# what => [codes, messages, ms, rss growth, peak growth, rss after]
my %result;
for my $line (grep { /\|/ } split /\n/, $out)    # not the void calls' lines
{
	my ($what, @f) = split /\|/, $line, -1;
	$result{$what} //= \@f;
}

# expect(WHAT, CODES, MESSAGE [, MAX_PEAK_GROWTH_KB])
sub expect
{
	my ($what, $codes, $message, $max_peak) = @_;
	my $r = $result{$what};
	if (!$r)
	{
		fail("$what: ran");
		diag $out;
		return;
	}
	my ($got_codes, $got_message, $ms, undef, $peak) = @$r;
	is("$got_codes \"$got_message\"", "$codes \"$message\"",
		"$what: $codes \"$message\" in $ms ms");
	cmp_ok($peak, '<=', $max_peak,
		"$what: the backend's peak RSS grew by at most $max_peak kB (+$peak kB)")
	  if defined $max_peak;
	return;
}

expect('huge-100', 'INVALID_RESPONSE', 'response body exceeds 1048576 bytes', 8192);
expect('huge-2', 'INVALID_RESPONSE', 'response body exceeds 1048576 bytes', 8192);
expect('huge-1', 'INVALID_RESPONSE', 'response body is not valid JSON', 8192);
expect('bigticket', 'INVALID_RESPONSE', 'response body exceeds 1048576 bytes', 8192);
expect('endless', 'TIMEOUT', 'no response from TapTalk within 1000 ms', 8192);
expect('endless-headers', 'INVALID_RESPONSE', 'response headers exceed 65536 bytes', 8192);
expect('deep-10000', 'INVALID_RESPONSE', 'response body nests too deeply', 8192);
expect('deep-400000', 'INVALID_RESPONSE', 'response body nests too deeply', 8192);
expect('deep-64', 'INVALID_RESPONSE', 'response body nests too deeply', 8192);
expect('deep-63', 'INVALID_RESPONSE', 'response has no data.ticket', 8192);
expect('nul', 'INVALID_RESPONSE', 'response body is not valid UTF-8', 8192);
expect('badutf8', 'INVALID_RESPONSE', 'response body is not valid UTF-8', 8192);
expect('batch 16 x huge-100', 'INVALID_RESPONSE',
	'response body exceeds 1048576 bytes', 32768);
expect('hugechunked-100', 'INVALID_RESPONSE',
	'response body exceeds 1048576 bytes', 8192);
expect('hugechunked-1', 'INVALID_RESPONSE', 'response body is not valid JSON',
	8192);
expect('batch 16 x hugechunked-100', 'INVALID_RESPONSE',
	'response body exceeds 1048576 bytes', 49152);
expect('batch 16 x bigticket', 'INVALID_RESPONSE',
	'response body exceeds 1048576 bytes', 32768);
expect('batch 8 x endless, 30 s budget', 'INVALID_RESPONSE',
	'response body exceeds 1048576 bytes', 32768)
  if $slow;
expect('mixed batch', 'INVALID_RESPONSE,OK',
	'response body exceeds 1048576 bytes,response body is not valid UTF-8,response body nests too deeply,response headers exceed 65536 bytes,tt-hostile-mixed',
	32768);
expect('end', 'OK', 'tt-hostile-end');

# afterwards the backend is back near where it started
my $start_rss = $result{start}[5];
my $end_rss = $result{end}[5];
cmp_ok($end_rss - $start_rss, '<', 8192,
	"the backend's RSS after all of it is within 8 MiB of the start ($start_rss kB -> $end_rss kB)"
);
my ($max_peak) = sort { $b <=> $a }
  map { $result{$_}[4] } grep { !/^warm-up/ } keys %result;
note sprintf(
	'hostile server: %d hostile cases, each INVALID_RESPONSE or TIMEOUT as expected; largest peak RSS growth in a call %d kB; RSS %d -> %d kB',
	scalar(keys %result) - 4,
	$max_peak, $start_rss, $end_rss);

$node->stop;
$mock->stop;
done_testing();
