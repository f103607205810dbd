# t/190_queue_faults.pl: the request queue under faults, at volume.
#
# - A callback counts its calls per request id (table calls).
# - kill -9 of the worker in the middle of draining 5,000 requests (the
#   mock answers after a delay): the server restarts (restart_after_crash),
#   every request ends succeeded, the mock saw each at least once and at
#   most taptalk.worker_concurrency of them twice (those in flight at the
#   crash), and each request's callback ran exactly once.
# - The same with an immediate shutdown and a start.
# - One request in five fails once (503) at the mock: all 500 end
#   succeeded, those at the second attempt, the others at the first;
#   permanent failures (400) end failed at the first attempt.
# - TapTalk down for 30 s (taptalk.base_url at a closed port, set by a
#   reload): 100 requests wait for their retries, none fails, the worker
#   uses little CPU time meanwhile (no spinning between retries); once TapTalk is back the queue drains.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use IO::Socket::INET;
use POSIX ();
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $CONCURRENCY = 32;	# taptalk.worker_concurrency's default
my $N = 5000;

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node(
	'queue_faults',
	mock    => $mock,
	helpers => 1,
	conf    => "taptalk.max_attempts = 20\n"
	  # PostgreSQL::Test::Cluster turns it off; the kill -9 test needs it
	  . "restart_after_crash = on");

sub q1 { return $node->safe_psql('postgres', $_[0]); }

sub set_base_url
{
	my ($url) = @_;
	q1("ALTER SYSTEM SET taptalk.base_url = '$url'");
	q1('SELECT pg_reload_conf()');
	usleep(500_000);	# the worker reloads when its latch is set by SIGHUP
}



# wait until at least $n requests of the batch $prefix succeeded
sub wait_succeeded
{
	my ($prefix, $n) = @_;
	return $node->poll_query_until('postgres',
		"SELECT count(*) >= $n FROM taptalk_queue "
		  . "WHERE request->>'xcUserID' LIKE '$prefix-%' AND state = 'succeeded'");
}

q1(q{
CREATE TABLE calls (id bigint NOT NULL, error_code text);
CREATE INDEX ON calls (id);
CREATE FUNCTION counted(request_id bigint, request jsonb,
						result taptalk_auth_ticket_result)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO public.calls VALUES (request_id, (result).error_code);
END $$;
});

sub enqueue_batch
{
	my ($prefix, $n) = @_;
	q1("SELECT count(taptalk_enqueue(req('$prefix-' || i), "
		  . "'counted(bigint, jsonb, taptalk_auth_ticket_result)')) "
		  . "FROM generate_series(1, $n) i");
}

# every request of the batch succeeded, the mock saw each, few twice, and
# each callback ran once
sub check_batch
{
	my ($prefix, $mark, $what) = @_;
	is( q1(qq{SELECT string_agg(format('%s %s', state, n), ', ' ORDER BY state)
		FROM (SELECT state, count(*) AS n FROM taptalk_queue
			  WHERE request->>'xcUserID' LIKE '$prefix-%' GROUP BY state) s}),
		"succeeded $N", "$what: all $N requests succeeded");
	my %seen;
	$mock->scan_log($mark,
		sub { $seen{$1}++ if $_[0] =~ /^\{"event":"request".*?\b(\Q$prefix\E-\d+)\b/ });
	is(scalar(keys %seen), $N, "$what: the mock saw each request");
	my $dups = 0;
	$dups += $_ - 1 for values %seen;
	note "$what: $dups requests sent again";
	cmp_ok($dups, '<=', $CONCURRENCY,
		"$what: at most taptalk.worker_concurrency requests sent again");
	is( q1(qq{SELECT count(*) FILTER (WHERE c = 1) || ' ' || count(*)
		FROM (SELECT q.id, (SELECT count(*) FROM calls k WHERE k.id = q.id) AS c
			  FROM taptalk_queue q WHERE q.request->>'xcUserID' LIKE '$prefix-%') s}),
		"$N $N", "$what: each request's callback ran exactly once");
}

# the mock answers after 20 ms: 5,000 requests take several seconds
set_base_url($mock->base_url . '/delay/20');

# ------------------------------------------------------------ kill -9
my $t0 = time;
my $mark = $mock->log_mark;
my $log_mark = -s $node->logfile;
enqueue_batch('fk', $N);
ok(wait_succeeded('fk', 500), 'kill -9: draining');
my $pid = TaptalkTest::worker_pid($node);
my $left = q1("SELECT count(*) FROM taptalk_queue WHERE request->>'xcUserID' LIKE 'fk-%' "
	  . "AND state IN ('queued', 'sending')");
ok($pid && kill('KILL', $pid), "the worker is killed with SIGKILL ($left requests left)");
cmp_ok($left, '>', 1000, 'in the middle of the drain');
ok($node->wait_for_log(qr/all server processes terminated; reinitializing/, $log_mark),
	'the server restarts');
TaptalkTest::queue_drained($node, 'after kill -9 of the worker');
check_batch('fk', $mark, 'kill -9');
note sprintf('kill -9 part: %.1f s', time - $t0);

# ------------------------------------------------- immediate shutdown
$t0 = time;
$mark = $mock->log_mark;
enqueue_batch('fi', $N);
ok(wait_succeeded('fi', 500), 'immediate shutdown: draining');
$left = q1("SELECT count(*) FROM taptalk_queue WHERE request->>'xcUserID' LIKE 'fi-%' "
	  . "AND state IN ('queued', 'sending')");
cmp_ok($left, '>', 1000, "in the middle of the drain ($left requests left)");
$node->stop('immediate');
$node->start;
TaptalkTest::queue_drained($node, 'after an immediate shutdown');
check_batch('fi', $mark, 'immediate shutdown');
note sprintf('immediate shutdown part: %.1f s', time - $t0);

# ------------------------------------------------ transient failures
$t0 = time;
set_base_url($mock->base_url);
q1(q{
SELECT count(taptalk_enqueue(
	req(CASE WHEN i % 5 = 0 THEN 'fault-flaky-1-ft' || i ELSE 'ft-' || i END),
	'counted(bigint, jsonb, taptalk_auth_ticket_result)'))
FROM generate_series(1, 500) i;
SELECT count(taptalk_enqueue(req('fault-status-400'),
	'counted(bigint, jsonb, taptalk_auth_ticket_result)'))
FROM generate_series(1, 3);
});
TaptalkTest::queue_drained($node, 'transient failures');
is( q1(q{SELECT string_agg(format('%s %s %s %s', kind, state, attempts, n), ', '
		ORDER BY kind, state, attempts)
	FROM (SELECT CASE WHEN request->>'xcUserID' LIKE 'fault-flaky-1-ft%' THEN 'flaky'
				 WHEN request->>'xcUserID' = 'fault-status-400' THEN 'permanent'
				 ELSE 'healthy' END AS kind, state, attempts, count(*) AS n
		  FROM taptalk_queue
		  WHERE request->>'xcUserID' LIKE 'ft-%'
			 OR request->>'xcUserID' LIKE 'fault-flaky-1-ft%'
			 OR request->>'xcUserID' = 'fault-status-400'
		  GROUP BY 1, 2, 3) s}),
	'flaky succeeded 2 100, healthy succeeded 1 400, permanent failed 1 3',
	'transient failures succeed at the second attempt, permanent ones fail at the first');
is( q1(q{SELECT count(*) FROM taptalk_queue q
	WHERE (request->>'xcUserID' LIKE 'ft-%' OR request->>'xcUserID' LIKE 'fault-flaky-1-ft%'
		   OR request->>'xcUserID' = 'fault-status-400')
	  AND (SELECT count(*) FROM calls k WHERE k.id = q.id) <> 1}),
	0, 'each of their callbacks ran exactly once');
note sprintf('transient failures part: %.1f s', time - $t0);

# ------------------------------------------------------ TapTalk down
$t0 = time;
my $sock = IO::Socket::INET->new(
	LocalAddr => '127.0.0.1', LocalPort => 0, Proto => 'tcp', Listen => 1)
  or die "socket: $!";
my $closed_port = $sock->sockport;
close $sock;
set_base_url("http://127.0.0.1:$closed_port");
$pid = TaptalkTest::worker_pid($node);
ok($pid, 'the worker runs');

sub cpu_ticks
{
	my $stat = slurp_file("/proc/$pid/stat");
	$stat =~ s/^.*\) //s;	# after the command name
	my @f = split / /, $stat;
	return $f[11] + $f[12];	# utime and stime, fields 14 and 15
}

$mark = $mock->log_mark;
enqueue_batch('fd', 100);
my $ticks0 = cpu_ticks();
my $attempts0 = q1("SELECT sum(attempts) FROM taptalk_queue WHERE request->>'xcUserID' LIKE 'fd-%'");
my $down_from = time;
# the worker saw the new setting: its attempts fail to connect
ok( $node->poll_query_until('postgres',
		"SELECT count(*) = 100 FROM taptalk_queue WHERE request->>'xcUserID' LIKE 'fd-%' "
		  . "AND state = 'queued' AND attempts >= 1 AND error_code = 'CONNECTION_FAILED'"),
	'TapTalk down: the requests wait for a retry');
ok( $node->poll_query_until('postgres',
		"SELECT state = 'backing off' AND queued = 100 AND last_error_code = 'CONNECTION_FAILED' "
		  . "AND last_error > last_success FROM taptalk_worker"),
	'taptalk_worker: backing off, the last error CONNECTION_FAILED');
usleep(1_000_000 * ($down_from + 30 - time)) if time < $down_from + 30;
my $cpu = (cpu_ticks() - $ticks0) / POSIX::sysconf(POSIX::_SC_CLK_TCK());
my $down_for = time - $down_from;
my $attempts = q1("SELECT sum(attempts) FROM taptalk_queue WHERE request->>'xcUserID' LIKE 'fd-%'")
  - $attempts0;
note sprintf('the worker used %.2f s of CPU in %.1f s while TapTalk was down, '
	  . 'for %d attempts (%.1f ms each)', $cpu, $down_for, $attempts,
	$attempts ? 1000 * $cpu / $attempts : 0);
# about 6 attempts per request in 30 s (backoff 1, 2, 4, 8, 16 s), each a
# refused connection and two short transactions: a few ms of CPU each;
# a worker that spun between retries would use most of a core
cmp_ok($cpu, '<', 5,
	'the worker used less than 5 s of CPU time in 30 s while TapTalk was down');
is( q1(q{SELECT count(*) FROM taptalk_queue WHERE request->>'xcUserID' LIKE 'fd-%'
		AND state NOT IN ('queued', 'sending')}),
	0, 'no request ended while TapTalk was down');
cmp_ok(q1("SELECT max(attempts) FROM taptalk_queue WHERE request->>'xcUserID' LIKE 'fd-%'"),
	'>=', 3, 'retried with backoff meanwhile');
is($mock->count($mark, 'request'), 0, 'nothing reached the mock');

my $up_at = time;
set_base_url($mock->base_url);
ok( $node->poll_query_until('postgres',
		"SELECT count(*) = 100 FROM taptalk_queue WHERE request->>'xcUserID' LIKE 'fd-%' "
		  . "AND state = 'succeeded'"),
	'TapTalk back: the queue drains');
note sprintf('drained %.1f s after TapTalk was back', time - $up_at);
ok( $node->poll_query_until('postgres',
		"SELECT state = 'idle' AND queued = 0 AND last_success > last_error FROM taptalk_worker"),
	'taptalk_worker: idle again, the last success after the last error');
cmp_ok(time - $up_at, '<', 90, 'within 90 s');
is( q1(q{SELECT count(*) FROM taptalk_queue q WHERE request->>'xcUserID' LIKE 'fd-%'
	AND (SELECT count(*) FROM calls k WHERE k.id = q.id) <> 1}),
	0, 'each of their callbacks ran exactly once');
note sprintf('TapTalk down part: %.1f s', time - $t0);

$node->stop;
$mock->stop;
done_testing();
