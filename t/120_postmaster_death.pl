# t/120_postmaster_death.pl: a backend in the middle of a batch notices at
# once that its postmaster died and exits, instead of finishing the batch.
# The batch waits on a server that accepts connections and never answers.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $silent = TaptalkTest::silent_server();
my $node = TaptalkTest::silent_node('pmdeath', 'http://127.0.0.1:' . $silent->sockport);

my $REQUEST = q({"userIPAddress": "10.0.0.1", "userAgent": "t", "userPlatform": "web",
  "userDeviceID": "d", "xcUserID": "1", "fullName": "F"});

# 64 requests, 16 at a time, each allowed 60 s: the batch would take minutes
my $bg = $node->background_psql('postgres', on_error_stop => 0);
$bg->query_safe("SET taptalk.timeout = 60000; SET taptalk.max_concurrency = 16");
$bg->query_until(qr/started/,
	"\\echo started\nSELECT count(*) FROM taptalk_auth_tickets(array_fill('$REQUEST'::jsonb, ARRAY[64]));\n");
my $pid = TaptalkTest::active_pid($node, '%taptalk_auth_tickets%');
ok($pid, 'the batch is running');
usleep(300_000);
ok(kill(0, $pid), 'the batch is still running 300 ms later');

# gone, or a zombie that nobody has reaped yet (its parent is dead)
sub running
{
	my ($pid) = @_;
	open(my $fh, '<', "/proc/$pid/stat") or return 0;
	my $stat = <$fh>;
	return $stat !~ /\) Z /;
}

my $t0 = time;
$node->kill9;
usleep(2_000) while running($pid) && time - $t0 < 60;
my $ms = int((time - $t0) * 1000);
ok(!running($pid), 'the backend exited after its postmaster died');
cmp_ok($ms, '<', 1000, "... within a second ($ms ms)");

eval { $bg->quit };
done_testing();
