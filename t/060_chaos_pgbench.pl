# t/060_chaos_pgbench.pl: faults under load.  pgbench, 16 clients, each
# calling taptalk_auth_ticket against the mock's /chaos/<period> prefix, which
# cycles healthy / 2 s slow / TCP reset / 503 every 500 ms; taptalk.timeout = 700 ms,
# so that a timed-out call ends in a later phase; a pause of up to 30 ms
# between calls; half the clients with the default 2 retries, half with none.
# No backend crashes, no transaction fails (pgbench would report the error
# and abort the client), every result is a success or one of TIMEOUT,
# CONNECTION_FAILED, HTTP_ERROR, each of which occurs; then, in the same 16
# sessions, the base URL is pointed at the healthy mock and every call
# succeeds.
#   TAPTALK_CHAOS_SECONDS (default 10; scripts/soak: 30)
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use Test::More;
use PostgreSQL::Test::Utils;

my $secs = $ENV{TAPTALK_CHAOS_SECONDS} || 10;
my $after_secs = 3;
my $clients = 16;
my $period = 500;

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node('chaos', mock => $mock, helpers => 1,
	conf => 'log_statement = none');
my $url = $mock->base_url;
my $log_mark = TaptalkTest::log_offset($node);
my $mock_mark = $mock->log_mark;

$node->safe_psql(
	'postgres', q{
CREATE TABLE chaos_log (
	n bigserial, pid int, part text, user_id text, error_code text, error_message text);});

my $script = PostgreSQL::Test::Utils::tempdir('chaos') . '/chaos.pgbench';
append_to_file(
	$script, qq{\\set id random(1, 1000000000)
\\set retries 2 * (:client_id % 2)
\\set pause random(0, 30)
\\sleep :pause ms
SELECT (extract(epoch FROM clock_timestamp()) > :deadline)::int AS after \\gset
\\if :after = 1
SET taptalk.base_url = '$url';
INSERT INTO chaos_log (pid, part, user_id, error_code, error_message)
SELECT pg_backend_pid(), 'after', user_id, error_code, error_message
FROM taptalk_auth_ticket(req('chaos-after-' || :id));
\\else
SET taptalk.max_retries = :retries;
INSERT INTO chaos_log (pid, part, user_id, error_code, error_message)
SELECT pg_backend_pid(), 'chaos', user_id, error_code, error_message
FROM taptalk_auth_ticket(req('chaos-' || :id));
\\endif
});

my $deadline = time + $secs;
my ($out, $err) = ('', '');
my $ok;
{
	local $ENV{PGOPTIONS} =
	  "-c taptalk.base_url=$url/chaos/$period -c taptalk.timeout=700";
	$ok = IPC::Run::run(
		[
			'pgbench', '-n', '-h', $node->host, '-p', $node->port,
			'-c', $clients, '-j', 2,
			'-T', $secs + $after_secs,
			'-D', "deadline=$deadline",
			'-f', $script, 'postgres'
		],
		'>', \$out, '2>', \$err);
}
TaptalkTest::no_crash($node, $log_mark, 'chaos');
my $all = "$out\n$err";
ok($ok && $all !~ /aborted|error/,
	'pgbench: every client ran to the end without an error')
  or diag $all;
my ($tx) = $out =~ /^number of transactions actually processed: (\d+)/m;
my ($failed) = $out =~ /^number of failed transactions: (\d+)/m;
is($failed, 0, 'pgbench: ' . ($tx // '?') . ' transactions, none failed');

sub q1 { return $node->safe_psql('postgres', $_[0]); }

is(q1('SELECT count(*) FROM chaos_log'), $tx,
	'every transaction left its result');
my $mix = q1(
	"SELECT string_agg(c || '=' || n, ' ' ORDER BY c) FROM (
	SELECT coalesce(error_code, 'OK') AS c, count(*) AS n FROM chaos_log WHERE part = 'chaos' GROUP BY 1) s"
);
is( q1(
		"SELECT count(*) FROM chaos_log WHERE NOT (
	(error_code IS NULL AND user_id IS NOT NULL)
	OR (user_id IS NULL AND error_code IN ('TIMEOUT', 'CONNECTION_FAILED', 'HTTP_ERROR')))"
	),
	0,
	"every result is a success or TIMEOUT, CONNECTION_FAILED, HTTP_ERROR ($mix)");
# the chaos did happen: successes, timeouts and failures
is( q1(
		"SELECT count(DISTINCT coalesce(error_code, 'OK')) FROM chaos_log WHERE part = 'chaos'"
	),
	4,
	'the run saw each outcome: OK, TIMEOUT, CONNECTION_FAILED, HTTP_ERROR');

is(q1("SELECT count(DISTINCT pid) FROM chaos_log WHERE part = 'chaos'"),
	$clients, "all $clients sessions took part");
is( q1(
		"SELECT count(*) FROM (SELECT DISTINCT pid FROM chaos_log WHERE part = 'chaos') c
	WHERE EXISTS (SELECT 1 FROM chaos_log a WHERE a.part = 'after' AND a.pid = c.pid)"
	),
	$clients,
	"afterwards each of the $clients sessions made healthy calls");
my $after = q1(
	"SELECT count(*) || ' calls, ' || count(*) FILTER (WHERE error_code IS NULL) || ' succeeded' FROM chaos_log WHERE part = 'after'"
);
is( q1(
		"SELECT count(*) FROM chaos_log WHERE part = 'after' AND (error_code IS NOT NULL OR user_id IS NULL)"
	),
	0,
	"afterwards every call succeeded in each session ($after)");
my $chaos_requests =
  $mock->count($mock_mark, 'request', undef, qr/"path":"\/chaos\//);
note "chaos: $clients clients, $secs s of chaos + $after_secs s healthy, "
  . ($tx // '?')
  . " transactions ($mix; after: $after), $chaos_requests requests to /chaos/";

$node->stop;
$mock->stop;
done_testing();
