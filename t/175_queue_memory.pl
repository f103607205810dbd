# t/175_queue_memory.pl: the background worker's memory stays flat while it
# drains the queue.
#
# The worker lives as long as the server and sends in runs that last as long
# as the queue has work, so what it allocates for a request must go with the
# request.  Three batches of 3,000 requests, the mock answering at once:
# from the end of the first to the end of the third, the worker's
# TopMemoryContext (as pg_log_backend_memory_contexts reports it) may grow by
# at most 64 kB.  It grew by about 200 bytes per request, 1.2 MB here, when
# request bodies were built in it.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $N = 3000;
my $GROWTH_LIMIT = 64 * 1024;

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node('queue_memory', mock => $mock, helpers => 1);

sub q1 { return $node->safe_psql('postgres', $_[0]); }

sub drain_batch
{
	my ($prefix) = @_;
	q1("SELECT count(taptalk_enqueue(req('$prefix-' || i))) FROM generate_series(1, $N) i");
	ok( $node->poll_query_until('postgres',
			"SELECT count(*) = 0 FROM taptalk_queue WHERE state IN ('queued', 'sending')"),
		"batch $prefix drained");
	is( q1("SELECT count(*) FROM taptalk_queue "
			  . "WHERE request->>'xcUserID' LIKE '$prefix-%' AND state = 'succeeded'"),
		$N, "batch $prefix: all $N requests succeeded");
}

# the bytes the worker's TopMemoryContext has in use, from the server log
sub worker_memory
{
	my $pid = TaptalkTest::worker_pid($node);
	my $offset = -s $node->logfile;
	q1("SELECT pg_log_backend_memory_contexts($pid)");
	my $re = qr/\[$pid\] .*?level: \d+; TopMemoryContext: .*?; (\d+) used/;
	$node->wait_for_log($re, $offset);
	my ($used) = slurp_file($node->logfile, $offset) =~ $re;
	return $used;
}

drain_batch('m1');
my $before = worker_memory();
drain_batch('m2');
drain_batch('m3');
my $after = worker_memory();
note "worker TopMemoryContext: $before bytes used after the first batch, $after after the third";
cmp_ok($after - $before, '<=', $GROWTH_LIMIT,
	"the worker's memory stays flat over " . 2 * $N . " requests");

$node->stop;
$mock->stop;
done_testing();
