# t/130_waiting.pl: how a request in flight waits.  It sleeps on the latch
# and libcurl's sockets (no periodic wake-ups), shows a wait event in
# pg_stat_activity, is cancelled at once, and counts libcurl's sockets
# against the backend's file descriptors.  The requests go to a server that
# accepts connections and never answers.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $silent = TaptalkTest::silent_server();

# few file descriptors, so that a batch can run out of them
my $node = TaptalkTest::silent_node('waiting', 'http://127.0.0.1:' . $silent->sockport,
	'max_files_per_process = 64');
my $version = $node->safe_psql('postgres', 'SHOW server_version_num');

my $REQUEST = q({"userIPAddress": "10.0.0.1", "userAgent": "t", "userPlatform": "web",
  "userDeviceID": "d", "xcUserID": "1", "fullName": "F"});

sub start_call
{
	my ($sql) = @_;
	my $bg = $node->background_psql('postgres', on_error_stop => 0);
	$bg->query_safe("SET taptalk.timeout = 60000");
	$bg->query_until(qr/started/, "\\echo started\n$sql;\n");
	my $pid = TaptalkTest::active_pid($node, '%taptalk_auth_ticket%');
	return ($bg, $pid);
}

sub voluntary_switches
{
	my ($pid) = @_;
	my ($n) = slurp_file("/proc/$pid/status") =~ /^voluntary_ctxt_switches:\s+(\d+)/m;
	return $n;
}

my ($bg, $pid) = start_call("SELECT * FROM taptalk_auth_ticket('$REQUEST')");
usleep(200_000);

# the wait event
my $expected = $version >= 170000 ? 'Extension|TaptalkRequest' : 'Extension|Extension';
is($node->safe_psql('postgres',
	"SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = $pid"),
	$expected, 'pg_stat_activity shows the wait event of a request in flight');

# no wake-ups while nothing happens: a poll every 100 ms would make 20 in 2 s
my $before = voluntary_switches($pid);
sleep 2;
my $wakeups = voluntary_switches($pid) - $before;
cmp_ok($wakeups, '<=', 4, "a waiting request sleeps ($wakeups wake-ups in 2 s)");

# cancel is seen at once: from the cancel to the session's next answer
my $ctl = $node->background_psql('postgres');
my $t0 = time;
$ctl->query_safe("SELECT pg_cancel_backend($pid)");
my $out = $bg->query('SELECT 1');
my $ms = int((time - $t0) * 1000);
like($bg->{stderr}, qr/canceling statement due to user request/, 'the request was cancelled');
is($out, '1', 'the session is usable after the cancel');
cmp_ok($ms, '<', 500, "cancel and the next statement took $ms ms");
$bg->quit;

# libcurl's sockets count against max_files_per_process: a batch wider than
# what is left gets CONNECTION_FAILED rows for the rest, never an ERROR, and
# the backend still has descriptors for its own files
$out = $node->safe_psql('postgres', qq{
SET taptalk.timeout = 1000;
SET taptalk.max_retries = 0;
SET taptalk.max_concurrency = 64;
SELECT error_code, error_message LIKE '%no file descriptor is left%', count(*)
FROM taptalk_auth_tickets(array_fill('$REQUEST'::jsonb, ARRAY[64]))
GROUP BY 1, 2 ORDER BY 1, 2});
note($out);
my %rows = map { my ($code, $nofd, $n) = split /\|/; ("$code|$nofd" => $n) } split /\n/, $out;
cmp_ok($rows{'CONNECTION_FAILED|t'} // 0, '>', 0,
	'requests beyond the backend\'s share of descriptors fail as CONNECTION_FAILED');
cmp_ok($rows{'TIMEOUT|f'} // 0, '>', 0, 'the others were sent (and timed out)');
is(($rows{'CONNECTION_FAILED|t'} // 0) + ($rows{'TIMEOUT|f'} // 0), 64, 'one row per request');
is($node->safe_psql('postgres',
	"CREATE TEMP TABLE t AS SELECT g FROM generate_series(1, 1000) g; "
	  . "CREATE INDEX ON t (g); SELECT count(*) FROM t"),
	'1000', 'the backend can still open its own files');

$ctl->quit;
$node->stop;
done_testing();
