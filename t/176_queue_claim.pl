# t/176_queue_claim.pl: claiming due requests costs the same whatever the
# planner's statistics say about the queue.
#
# The worker claims due requests in the order they fell due, reading the
# index of queued requests from its start (or after the last key it took)
# and stopping after as many as it has room for.  A plan chosen from
# statistics that say few requests are due (a bitmap scan and a sort of all
# of them) reads the whole backlog for every claim: the worker then spends
# its time claiming.  Here: 3,000 requests drained from a small queue (the
# baseline), then the first 3,000 requests of a backlog of 60,000 whose
# statistics were taken when they fell due an hour earlier than they do now
# (as when requests are enqueued after the last ANALYZE; autovacuum leaves
# the table alone meanwhile).  The worker's CPU time per request in the
# second may be at most 3 times the baseline's.  A claim by bitmap scan and
# sort made it 18 times here; the planner was seen choosing that plan on a
# backlog of 128,000 (~90 ms per claim).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $N = 3000;
my $BACKLOG = 60000;
my $MAX_RATIO = 3;

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node('queue_claim', mock => $mock, helpers => 1);

sub q1 { return $node->safe_psql('postgres', $_[0]); }

sub succeeded
{
	my ($prefix) = @_;
	return q1("SELECT count(*) FROM taptalk_queue "
		  . "WHERE request->>'xcUserID' LIKE '$prefix-%' AND state = 'succeeded'");
}

my $pid = TaptalkTest::worker_pid($node);
ok($pid, 'the worker runs');

# the baseline: a small queue
my $cpu0 = TaptalkTest::cpu_seconds($pid);
q1("SELECT count(taptalk_enqueue(req('s-' || i))) FROM generate_series(1, $N) i");
TaptalkTest::queue_drained($node, 'the small queue');
is(succeeded('s'), $N, "all $N requests of the small queue succeeded");
my $small = (TaptalkTest::cpu_seconds($pid) - $cpu0) / $N;

# the backlog: analyzed while due an hour ago, then due a second ago
q1(qq{
ALTER TABLE taptalk_queue SET (autovacuum_enabled = off);
INSERT INTO taptalk_queue (enqueued_by, request, next_attempt_at)
	SELECT current_user::regrole, req('b-' || i), now() - interval '1 hour'
	FROM generate_series(1, $BACKLOG) i;
ANALYZE taptalk_queue;
UPDATE taptalk_queue SET next_attempt_at = now() - interval '1 second'
	WHERE state = 'queued';
});
$cpu0 = TaptalkTest::cpu_seconds($pid);
ok( $node->poll_query_until('postgres',
		"SELECT count(*) >= $N FROM taptalk_queue "
		  . "WHERE request->>'xcUserID' LIKE 'b-%' AND state = 'succeeded'"),
	"$N requests of the backlog succeeded");
my $done = succeeded('b');
my $backlog = (TaptalkTest::cpu_seconds($pid) - $cpu0) / $done;

note sprintf('worker CPU per request: %.3f ms from a small queue, '
	  . '%.3f ms from a backlog of %d (%d requests), ratio %.2f',
	1000 * $small, 1000 * $backlog, $BACKLOG, $done,
	$small > 0 ? $backlog / $small : 0);
cmp_ok($backlog, '<=', $MAX_RATIO * $small,
	"a backlog of $BACKLOG with stale statistics costs the worker at most "
	  . "$MAX_RATIO times the CPU per request of a small queue");

$node->stop;
$mock->stop;
done_testing();
