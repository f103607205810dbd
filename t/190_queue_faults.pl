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
# - TapTalk down for 30 s (the mock stopped) with 2,000 requests queued:
#   after ten failures in a row the worker pauses, then sends one request
#   at a time between doubling pauses, so it sends few requests and uses
#   little CPU time meanwhile, also while 2,000 enqueuing commits arrive
#   (they wake it once); none fails; once TapTalk is back on the same
#   address (no reload) the next probe finds it and the queue drains.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
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
my $DOWN_N = 2000;
$pid = TaptalkTest::worker_pid($node);
ok($pid, 'the worker runs');
my $log_offset = -s $node->logfile;
$mock->stop;
my $cpu0 = TaptalkTest::cpu_seconds($pid);
my $down_from = time;
enqueue_batch('fd', $DOWN_N);

sub attempts_fd
{
	return q1("SELECT sum(attempts) FROM taptalk_queue WHERE request->>'xcUserID' LIKE 'fd-%'");
}

ok( $node->poll_query_until('postgres',
		"SELECT state = 'backing off' AND queued + sending = $DOWN_N "
		  . "AND last_error_code = 'CONNECTION_FAILED' AND last_error > last_success "
		  . "FROM taptalk_worker"),
	'taptalk_worker: backing off, the last error CONNECTION_FAILED');
ok( $node->wait_for_log(
		qr/taptalk worker: \d+ requests in a row failed \(the last: CONNECTION_FAILED\); pausing/,
		$log_offset),
	'the worker says it pauses');
usleep(1_000_000 * ($down_from + 5 - time)) if time < $down_from + 5;
my $attempts_5s = attempts_fd();
usleep(1_000_000 * ($down_from + 30 - time)) if time < $down_from + 30;
my $cpu = TaptalkTest::cpu_seconds($pid) - $cpu0;
my $down_for = time - $down_from;
my $attempts = attempts_fd();
note sprintf('while TapTalk was down for %.1f s: %d attempts (%d after the first 5 s), '
	  . '%.2f s of worker CPU', $down_for, $attempts, $attempts - $attempts_5s, $cpu);
# a worker that tried every request with its own backoff: some 10,000
# attempts in 30 s, several seconds of CPU
cmp_ok($attempts, '<=', 2 * $CONCURRENCY + 10,
	"$DOWN_N requests, TapTalk down for 30 s: the worker sent the first few, "
	  . 'then one at a time between pauses');
cmp_ok($attempts - $attempts_5s, '>=', 2, 'and kept trying after the first 5 s');
cmp_ok($cpu, '<', 1,
	'the worker used less than 1 s of CPU time in 30 s while TapTalk was down');
is( q1(q{SELECT count(*) FROM taptalk_queue WHERE request->>'xcUserID' LIKE 'fd-%'
		AND state NOT IN ('queued', 'sending')}),
	0, 'no request ended while TapTalk was down');

# enqueuing commits meanwhile, a millisecond apart: the paused worker is
# woken once, not at each
my $BURST = 2000;
my $burst_cpu0 = TaptalkTest::cpu_seconds($pid);
my $burst_from = time;
q1(qq{DO \$\$ BEGIN
	FOR i IN 1..$BURST LOOP
		PERFORM taptalk_enqueue(req('fw-' || i));
		COMMIT;
		PERFORM pg_sleep(0.001);
	END LOOP;
END \$\$});
my $burst_for = time - $burst_from;
my $burst_cpu = TaptalkTest::cpu_seconds($pid) - $burst_cpu0;
note sprintf('%d enqueuing commits in %.2f s: %.2f s of worker CPU meanwhile',
	$BURST, $burst_for, $burst_cpu);
cmp_ok($burst_cpu, '<', 0.1 * $burst_for,
	"$BURST enqueuing commits while TapTalk is down: the worker used under a tenth of their time");

# TapTalk back on the same address: no reload, the next probe finds it
my $up_at = time;
$mock->restart;
$log_offset = -s $node->logfile;
ok( $node->poll_query_until('postgres',
		"SELECT count(*) = $DOWN_N FROM taptalk_queue WHERE request->>'xcUserID' LIKE 'fd-%' "
		  . "AND state = 'succeeded'"),
	'TapTalk back: the queue drains');
TaptalkTest::queue_drained($node, "TapTalk back: the $BURST requests enqueued meanwhile too");
note sprintf('drained %.1f s after TapTalk was back', time - $up_at);
cmp_ok(time - $up_at, '<', 90, 'within 90 s');
ok($node->log_contains(qr/taptalk worker: TapTalk answers again; sending resumes/, $log_offset),
	'the worker says sending resumes');
ok( $node->poll_query_until('postgres',
		"SELECT state = 'idle' AND queued = 0 AND last_success > last_error FROM taptalk_worker"),
	'taptalk_worker: idle again, the last success after the last error');
is( q1(q{SELECT count(*) FROM taptalk_queue q WHERE request->>'xcUserID' LIKE 'fd-%'
	AND (SELECT count(*) FROM calls k WHERE k.id = q.id) <> 1}),
	0, 'each of their callbacks ran exactly once');
note sprintf('TapTalk down part: %.1f s', time - $t0);

$node->stop;
$mock->stop;
done_testing();
