# t/240_rate_limit.pl: the queue's worker and TapTalk's rate limit.
#
# - A burst of 120 requests against a mock that lets 20 a second through
#   and answers the others 429, "Retry-After: 1" and TapTalk's envelope
#   (fault-quota-*): every request ends succeeded, none uses up an attempt
#   on a 429 (attempts 1, taptalk.max_attempts = 2), taptalk_worker shows
#   "rate limited" with paused_until while the worker waits, the server log
#   says it pauses, and after each 429 the mock gets no request during the
#   Retry-After window beyond those already in flight (none from 0.5 s to
#   0.95 s after it).
# - The status decides, whatever the body: a 429 in TapTalk's envelope and
#   a plain-text 429 without Retry-After are queued again without counting
#   an attempt, a 503 in TapTalk's envelope is retried (attempt 2), a 400
#   in TapTalk's envelope fails at once.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use JSON::PP;
use Test::More;

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node(
	'rate_limit',
	mock    => $mock,
	helpers => 1,
	conf    => "taptalk.max_attempts = 2");
my $log_offset = TaptalkTest::log_offset($node);

sub q1 { return $node->safe_psql('postgres', $_[0]); }

# ------------------------------------------------------------ the burst
my $N = 120;
my $mark = $mock->log_mark;
q1("SELECT count(taptalk_enqueue(req('fault-quota-20-burst-' || i))) FROM generate_series(1, $N) i");

ok( $node->poll_query_until('postgres',
		"SELECT state = 'rate limited' AND paused_until > state_since FROM taptalk_worker"),
	'taptalk_worker: rate limited, with the end of the pause');
TaptalkTest::queue_drained($node, 'the burst');

is( q1(q{SELECT format('%s %s %s', count(*) FILTER (WHERE state = 'succeeded'),
		count(*) FILTER (WHERE state = 'failed'), max(attempts))
	FROM taptalk_queue WHERE request->>'xcUserID' LIKE 'fault-quota-20-burst-%'}),
	"$N 0 1", 'every request succeeded, each at its first counted attempt');

my $json = JSON::PP->new;
my (@limited, @requests);
$mock->scan_log(
	$mark,
	sub {
		my $e = $json->decode($_[0]);
		push @limited, $e->{t} if $e->{event} eq 'ratelimited';
		push @requests, $e->{t}
		  if $e->{event} eq 'request' && $e->{body} =~ /fault-quota-20-burst-/;
	});
cmp_ok(scalar @limited, '>', 0, 'the mock answered 429s (' . scalar(@limited) . ')');
cmp_ok(scalar @requests, '<', 4 * $N,
	'the mock got fewer than 4 requests per request (' . scalar(@requests) . ')');
my $sent_in_pause = 0;
for my $t (@limited)
{
	$sent_in_pause += grep { $_ > $t + 0.5 && $_ < $t + 0.95 } @requests;
}
is($sent_in_pause, 0, 'no request was sent while a Retry-After ran');
ok( $node->log_contains(
		qr/taptalk worker: TapTalk's rate limit was reached; sending pauses for \d+ ms/,
		$log_offset),
	'the server log says that sending pauses');

# --------------------------------------------- the status decides
q1(q{SELECT taptalk_enqueue(req(x)) FROM unnest(ARRAY['fault-answer-429-env-1-1-qa',
	'fault-answer-429-text-none-1-qb', 'fault-answer-503-env-none-1-qc',
	'fault-answer-400-env-none-1-qd']) x});
TaptalkTest::queue_drained($node, 'the statuses');
is( q1(q{SELECT string_agg(format('%s %s %s %s', request->>'xcUserID', state, attempts,
		coalesce(error_code, '-')), E'\n' ORDER BY id)
	FROM taptalk_queue WHERE request->>'xcUserID' LIKE 'fault-answer-%'}),
	join("\n",
		'fault-answer-429-env-1-1-qa succeeded 1 -',
		'fault-answer-429-text-none-1-qb succeeded 1 -',
		'fault-answer-503-env-none-1-qc succeeded 2 -',
		'fault-answer-400-env-none-1-qd failed 1 40000'),
	'429s are retried without counting, a 503 envelope is retried, a 400 envelope is final');

TaptalkTest::no_crash($node, $log_offset, 'rate limit');
$node->stop;
done_testing();
