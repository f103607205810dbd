# t/241_rate_budget.pl: taptalk.max_rate, the server's one budget of
# requests, and the worker's send window without a Retry-After.
#
# - max_rate = 20: taptalk_auth_tickets in two sessions, taptalk_auth_ticket
#   in a third and the queue's worker, all at once: the mock gets at most
#   21 requests in any second and the whole lot takes at least as long as
#   20 a second allows; every request succeeds; taptalk_stats counts the
#   time waited (rate_limit_wait_ms) in every path.
# - The wait counts against the request's own taptalk.timeout: with
#   max_rate = 2 and a 1.5 s timeout, a batch of 10 sends three (at 0, 0.5
#   and 1 s) and returns the others as TIMEOUT "not sent", none of them
#   sent.  A cancel (statement_timeout) ends a wait for max_rate at
#   once.
# - Without a Retry-After (a plain 429 from a mock that lets 50 a second
#   through and answers after 50 ms): the worker cuts its window and settles
#   far below taptalk.worker_concurrency; every request succeeds, at most
#   15% of the attempts are 429s, and it drains at two thirds of the quota
#   at least.  taptalk_worker shows the window (concurrency), taptalk_stats
#   counts the 429s.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use IPC::Run;
use JSON::PP;
use Test::More;
use Time::HiRes qw(time sleep);

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node(
	'rate_budget',
	mock    => $mock,
	helpers => 1,
	conf    => "taptalk.max_attempts = 3");
my $log_offset = TaptalkTest::log_offset($node);

sub q1 { return $node->safe_psql('postgres', $_[0]); }

sub set_conf
{
	my ($setting) = @_;
	q1("ALTER SYSTEM SET $setting");
	q1("SELECT pg_reload_conf()");
	# the worker and new sessions read it at their next look
	sleep(0.5);
}

my $json = JSON::PP->new;

# the mock's request times since $mark whose body matches $re
sub request_times
{
	my ($mark, $re) = @_;
	my @t;
	$mock->scan_log(
		$mark,
		sub {
			my $e = $json->decode($_[0]);
			push @t, $e->{t} if $e->{event} eq 'request' && $e->{body} =~ $re;
		});
	return sort { $a <=> $b } @t;
}

# the most requests in any window of one second
sub max_per_second
{
	my @t = @_;
	my ($max, $j) = (0, 0);
	for my $i (0 .. $#t)
	{
		$j++ while $t[$i] - $t[$j] >= 1.0;
		$max = $i - $j + 1 if $i - $j + 1 > $max;
	}
	return $max;
}

# ------------------------------------------- one budget for every path
set_conf("taptalk.max_rate = 20");
is(q1("SHOW taptalk.max_rate"), '20', 'taptalk.max_rate is set');
q1("SELECT taptalk_stats_reset()");

my $mark = $mock->log_mark;
my $connstr = $node->connstr('postgres');
# a psql session running $sql in the background: [harness, \$output]
sub background_sql
{
	my ($sql) = @_;
	my $out = '';
	my $h = IPC::Run::start(
		[ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d', $connstr, '-c', $sql ],
		'>', \$out, '2>', \$out);
	return [ $h, \$out ];
}
my @runs = map {
	background_sql("SELECT count(*) FILTER (WHERE error_code IS NULL) FROM taptalk_auth_tickets("
		  . "ARRAY(SELECT req('budget-b$_-' || i) FROM generate_series(1, 30) i))")
} 1 .. 2;
push @runs,
  background_sql("SELECT count(*) FILTER (WHERE t.error_code IS NULL) FROM generate_series(1, 20) i,"
	  . " LATERAL taptalk_auth_ticket(req('budget-s-' || i)) t");
q1("SELECT count(taptalk_enqueue(req('budget-q-' || i))) FROM generate_series(1, 40) i");
my @counts;
for my $r (@runs)
{
	$r->[0]->finish;
	my $o = ${ $r->[1] };
	chomp $o;
	push @counts, $o;
}
is(join(' ', @counts), '30 30 20', 'the sessions: every request succeeded');
TaptalkTest::queue_drained($node, 'the budget');
is(q1("SELECT count(*) FROM taptalk_queue WHERE state = 'succeeded' AND request->>'xcUserID' LIKE 'budget-q-%'"),
	'40', 'the queue: every request succeeded');

my @t = request_times($mark, qr/budget-/);
is(scalar @t, 120, 'the mock got each of the 120 requests once');
my $max = max_per_second(@t);
cmp_ok($max, '<=', 21, "at most 21 requests in any second ($max)");
my $span = $t[-1] - $t[0];
cmp_ok($span, '>=', 119 / 20 * 0.97,
	sprintf('120 requests took as long as 20 a second allows (%.2f s)', $span));
is( q1(q{SELECT string_agg(format('%s %s', path, rate_limit_wait_ms > 0), ' ' ORDER BY path)
		FROM taptalk_stats}),
	'batch t queue t single t',
	'taptalk_stats: every path waited for taptalk.max_rate');

# --------------------------------- the wait is within the request's budget
set_conf("taptalk.max_rate = 2");
# nothing reserved from before
sleep(1);
$mark = $mock->log_mark;
my $t0 = time;
my $rows = q1(
	q{SET taptalk.timeout = 1500;
	SELECT string_agg(coalesce(error_code, 'ok'), ' ' ORDER BY ord)
	FROM taptalk_auth_tickets(ARRAY(SELECT req('budget-t-' || i) FROM generate_series(1, 10) i))});
my $took = time - $t0;
like($rows, qr/^ok ok ok( TIMEOUT){7}$/,
	'max_rate 2, timeout 1.5 s: the three requests that fit (at 0, 0.5 and 1 s) were sent, the others are TIMEOUT');
my @sent = request_times($mark, qr/budget-t-/);
is(scalar @sent, 3, 'the requests that did not fit were not sent');
cmp_ok($took, '<', 3, sprintf('the batch returned within its budget (%.2f s)', $took));
like(
	q1(q{SET taptalk.timeout = 1500;
	SELECT error_message FROM taptalk_auth_tickets(ARRAY(SELECT req('budget-u-' || i)
		FROM generate_series(1, 5) i)) ORDER BY ord DESC LIMIT 1}),
	qr/^not sent: "taptalk\.max_rate" \(2 requests\/s\) left no time to send it within its timeout of 1500 ms$/,
	'the error says why');

# a cancel ends the wait at once
set_conf("taptalk.max_rate = 0.5");
sleep(2);
$t0 = time;
my ($ret, $stdout, $stderr) = $node->psql('postgres',
	q{SET statement_timeout = 500; SET taptalk.timeout = 60000;
	SELECT count(*) FROM taptalk_auth_tickets(ARRAY(SELECT req('budget-c-' || i) FROM generate_series(1, 5) i))});
$took = time - $t0;
like($stderr, qr/canceling statement due to statement timeout/, 'statement_timeout cancels a wait for max_rate');
cmp_ok($took, '<', 2, sprintf('at once (%.2f s; the rate alone would take 8 s)', $took));

# a higher rate applies at once: the send times the cancelled batch took at
# 0.5 a second (up to 8 s ahead) hold no one back
set_conf("taptalk.max_rate = 20");
$t0 = time;
is( q1(q{SELECT count(*) FILTER (WHERE error_code IS NULL)
	FROM taptalk_auth_tickets(ARRAY(SELECT req('budget-r-' || i) FROM generate_series(1, 5) i))}),
	'5', 'after raising max_rate, a batch succeeds');
$took = time - $t0;
cmp_ok($took, '<', 1.5, sprintf('at the new rate at once (%.2f s)', $took));
set_conf("taptalk.max_rate = 0");

# ----------------------- the worker's window without a Retry-After
# 50 a second through, each answer after 50 ms: 2 requests in flight are
# what the quota allows (40 a second; 3 would be 60); 32 are sent at first
set_conf("taptalk.base_url = '" . $mock->base_url . "/delay/50'");
q1("SELECT taptalk_stats_reset()");
my $N = 600;
$mark = $mock->log_mark;
$t0 = time;
q1("SELECT count(taptalk_enqueue(req('fault-quotaplain-50-adapt-' || i))) FROM generate_series(1, $N) i");
my @windows;
for (1 .. 100)
{
	my $w = q1("SELECT concurrency FROM taptalk_worker WHERE state IN ('sending', 'rate limited')");
	push @windows, $w if $w ne '';
	sleep(0.2);
	last if q1("SELECT count(*) FROM taptalk_queue WHERE state IN ('queued', 'sending')") == 0;
}
TaptalkTest::queue_drained($node, 'the adaptive window');
my $drain = time - $t0;
is( q1(q{SELECT format('%s %s', count(*) FILTER (WHERE state = 'succeeded'), max(attempts))
	FROM taptalk_queue WHERE request->>'xcUserID' LIKE 'fault-quotaplain-50-adapt-%'}),
	"$N 1", 'every request succeeded, at its first counted attempt');
my ($attempts, $limited) = split /\|/,
  q1("SELECT attempts, rate_limited FROM taptalk_stats WHERE path = 'queue'");
my @received = request_times($mark, qr/fault-quotaplain-50-adapt-/);
is($attempts, scalar @received, "taptalk_stats counts every attempt ($attempts)");
cmp_ok($limited, '>', 0, "taptalk_stats counts the 429s ($limited)");
cmp_ok($limited, '<=', 0.15 * $attempts,
	"at most 15% of the attempts were 429s ($limited of $attempts)");
{
	my %per;
	$per{ int($_ - $received[0]) }++ for @received;
	note('requests per second: ' . join(' ', map { $per{$_} // 0 } 0 .. int($received[-1] - $received[0])));
}
my @late = @windows[ int(@windows / 2) .. $#windows ];
my ($wmax) = sort { $b <=> $a } @late;
note("windows seen: @windows");
cmp_ok(scalar @late, '>', 0, 'taptalk_worker showed the window');
cmp_ok($wmax, '<=', 8, "the window settled far below 32 (at most $wmax in the second half)");
cmp_ok($drain, '<=', $N / 50 * 1.5,
	sprintf('drained at two thirds of the quota at least (%.1f s for %d at 50/s)', $drain, $N));

TaptalkTest::no_crash($node, $log_offset, 'rate budget');
$node->stop;
done_testing();
