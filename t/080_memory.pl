# t/080_memory.pl: memory over many calls in one session.  One backend makes
# TAPTALK_MEMORY_CALLS calls (default 10,000; scripts/soak: 100,000), in
# cycles that mix successes, TapTalk's error envelopes, validation failures,
# HTTP errors, invalid and oversized responses, resets, a retried 503, a
# timeout, a cancelled call and a cancelled batch (statement_timeout), a
# batch, a non-object ERROR, and HTTPS calls (new connections and a
# verification failure each cycle, since the base URL changes).  Every
# statement must give its expected answer each cycle, and the backend's RSS
# (VmRSS, from /proc) after the run must be less than 5 MB above where it was
# after a warm-up.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use Test::More;
use PostgreSQL::Test::Utils;
use Time::HiRes qw(time);

my $calls = $ENV{TAPTALK_MEMORY_CALLS} || 10000;
my $per_cycle = 123;
my $cycles = int(($calls + $per_cycle - 1) / $per_cycle);
my $warmup = 5;
my $limit_kb = 5120;
my $started = time;

my $mock = TaptalkTest::Mock->start(tls => 1);
my $node = TaptalkTest::node('memory', mock => $mock, helpers => 1,
	conf => 'log_statement = none');
my $tls_port = $mock->tls_port;
my $ca = $mock->tls_dir . '/ca.pem';
my $log_mark = TaptalkTest::log_offset($node);
TaptalkTest::create_memory_functions($node);

# the API errors and hostile answers of a cycle, without retries (14 calls)
my $api_sql = q{
SELECT 'api', count(*), string_agg(coalesce(r.error_code, 'OK'), ',' ORDER BY k) FROM unnest(ARRAY[
	req('fault-envelope-field'), req('fault-envelope500'), req('fault-status-404'),
	req('mem-v') - 'fullName', req('mem-v') || '{"x": 1}', req('fault-badjson'), req('fault-nul'),
	req('fault-deep-10000'), req('fault-huge-2'), req('fault-bigticket'), req('fault-reset'),
	req('fault-close'), req('fault-status-503'), req('fault-notjson')]) WITH ORDINALITY AS t(j, k),
	LATERAL taptalk_auth_ticket(j) r;
};

# the statements of one cycle (123 calls)
sub cycle
{
	my ($name) = @_;
	my $flaky = sprintf('fault-flaky-1-mem-%s-%d', $name, rand(1e5));
	return
	    "SELECT 'ok', count(user_id) FROM generate_series(1, 40) i, LATERAL taptalk_auth_ticket(req('mem-' || i)) r;\n"
	  . "SET taptalk.max_retries = 0;\n"
	  . $api_sql x 3 . qq{
RESET taptalk.max_retries;
SELECT 'retried', coalesce(error_code, 'OK') FROM taptalk_auth_ticket(req('$flaky'));
SET taptalk.timeout = 30;
SELECT 'timeout', error_code FROM taptalk_auth_ticket(req('fault-slow-300'));
RESET taptalk.timeout;
SET statement_timeout = 30;
SELECT 'not cancelled', error_code FROM taptalk_auth_ticket(req('fault-slow-1000'));
SET statement_timeout = 50;
SELECT 'not cancelled', count(*) FROM taptalk_auth_tickets(ARRAY(SELECT req('fault-slow-1000') FROM generate_series(1, 8)));
RESET statement_timeout;
SELECT 'batch', count(*), count(user_id), count(error_code) FROM taptalk_auth_tickets(
	ARRAY(SELECT req('mem-b' || i) FROM generate_series(1, 20) i) || ARRAY[req('fault-envelope-field'), '[1]', NULL]);
SELECT taptalk_auth_ticket('[1]');
SET taptalk.base_url = 'https://127.0.0.1:$tls_port';
SET taptalk.ca_file = '$ca';
SELECT 'tls', count(user_id) FROM generate_series(1, 5) i, LATERAL taptalk_auth_ticket(req('mem-tls-' || i)) r;
RESET taptalk.ca_file;
SELECT 'tls unverified', error_code FROM taptalk_auth_ticket(req('mem-tls-x'));
RESET taptalk.base_url;
};
}

my $dir = PostgreSQL::Test::Utils::tempdir('memory');
my $sql = "SET client_min_messages = warning;\n";
$sql .= cycle("w$_") for 1 .. $warmup;
$sql .= "SELECT 'MEM', 0, * FROM backend_memory();\n";
my $every = int(($cycles + 9) / 10);
for my $i (1 .. $cycles)
{
	$sql .= cycle($i);
	$sql .= "SELECT 'MEM', $i, * FROM backend_memory();\n"
	  if $i % $every == 0 || $i == $cycles;
}
append_to_file("$dir/memory.sql", $sql);

my ($out, $err) = ('', '');
IPC::Run::run(
	[
		'psql', '-X', '-q', '-At', '-v', 'ON_ERROR_STOP=0',
		'-h', $node->host, '-p', $node->port, '-d', 'postgres',
		'-f', "$dir/memory.sql"
	],
	'>', \$out, '2>', \$err);
TaptalkTest::no_crash($node, $log_mark, 'memory');

# count(LINES): "N line" for each distinct line, sorted as LC_ALL=C sort does
sub count_lines
{
	my %n;
	$n{$_}++ for @_;
	return join("\n", map { "$n{$_} $_" } sort keys %n);
}

# every cycle answered the same, as expected
my $all = $warmup + $cycles;
my $api =
  '14|40002,50000,HTTP_ERROR,40002,40002,INVALID_RESPONSE,INVALID_RESPONSE,INVALID_RESPONSE,INVALID_RESPONSE,INVALID_RESPONSE,CONNECTION_FAILED,CONNECTION_FAILED,HTTP_ERROR,INVALID_RESPONSE';
is( count_lines(grep { !/^MEM\|/ } split /\n/, $out),
	join("\n",
		3 * $all . " api|$api",
		"$all batch|23|20|2",
		"$all ok|40",
		"$all retried|OK",
		"$all timeout|TIMEOUT",
		"$all tls unverified|CONNECTION_FAILED",
		"$all tls|5"),
	"each of the $all cycles gave the expected answers");
(my $errors = $err) =~ s/^psql:[^:]*:\d+: //mg;
is( count_lines(split /\n/, $errors),
	join("\n",
		2 * $all . ' ERROR:  canceling statement due to statement timeout',
		"$all ERROR:  taptalk request must be a JSON object, not an array",
		"$all HINT:  Build the request with jsonb_build_object()."),
	'and the expected errors: 2 cancels and 1 non-object per cycle');

my %mem = map { my @f = split /\|/; $f[1] => { rss => $f[2], anon => $f[4] } }
  grep { /^MEM\|/ } split /\n/, $out;
my $trend = join(' ', map { $mem{$_}{rss} } sort { $a <=> $b } keys %mem);
my ($rss0, $rss1) = ($mem{0}{rss}, $mem{$cycles}{rss});
my $grow = $rss1 - $rss0;
my $figures = sprintf(
	'%d calls in %d cycles (+%d warm-up) in %d s; VmRSS %d -> %d kB (%d kB; RssAnon %d -> %d kB)',
	$cycles * $per_cycle, $cycles, $warmup * $per_cycle, time - $started,
	$rss0, $rss1, $grow, $mem{0}{anon}, $mem{$cycles}{anon});
cmp_ok($grow, '<', $limit_kb,
	"the backend's RSS grew by less than $limit_kb kB: $figures; VmRSS trend: $trend");
note "memory: $figures";

$node->stop;
$mock->stop;
done_testing();
