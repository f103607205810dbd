# t/193_queue_bounds.pl: the queue's worker is bounded in memory and fair
# between roles.
#
# - 32 requests with a 10 MB fullName, through taptalk_enqueue: stored
#   failed (40002, field 106) at once, never sent.
# - 32 such rows written into the queue table by hand: the worker fails
#   them (40002) without reading them, and its peak memory stays far below
#   their size (it was 650 MB); their callbacks get a NULL request.
# - Fairness: with 20,000 of one role's requests queued against a TapTalk
#   that takes 50 ms, another role's single request is sent within 2 s of
#   its commit (the backlog alone takes about 30 s).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node('bounds', mock => $mock, helpers => 1);

sub q1 { return $node->safe_psql('postgres', $_[0]); }

q1(q{
CREATE ROLE alice LOGIN;
CREATE ROLE bob LOGIN;
GRANT EXECUTE ON FUNCTION taptalk_enqueue(jsonb, regprocedure) TO alice, bob;
CREATE TABLE got (request_id bigint, request_is_null boolean, error_code text);
GRANT INSERT ON got TO alice, bob;
CREATE FUNCTION note(request_id bigint, request jsonb, result taptalk_auth_ticket_result)
RETURNS void LANGUAGE sql AS $$
	INSERT INTO public.got VALUES (request_id, request IS NULL, (result).error_code)
$$;
});
my $cb = 'public.note(bigint, jsonb, public.taptalk_auth_ticket_result)';

# ------------------------------------------------------------ memory
my $mark = $mock->log_mark;
$node->safe_psql('postgres',
	"SELECT taptalk_enqueue(req('big-' || i) || jsonb_build_object('fullName', repeat('x', 10 * 1024 * 1024)), '$cb')"
	  . " FROM generate_series(1, 32) i",
	extra_params => [ '-U', 'alice' ]);
is( q1(q{SELECT string_agg(DISTINCT format('%s %s %s %s | %s', state, attempts, error_code,
		error_field, error_message), ', ') FROM taptalk_queue}),
	"failed 0 40002 106 | Param 'fullName' must be at most 4096 bytes of UTF-8",
	'taptalk_enqueue: a 10 MB field is refused as 40002, never queued');
is(q1('SELECT count(*) FROM got WHERE NOT request_is_null'), 32,
	'their callbacks ran at once with the request');

my $pid = TaptalkTest::worker_pid($node);
q1("SELECT pg_sleep(0.2)");
# written by hand, as only a superuser can: queued, for the worker
q1(qq{
INSERT INTO taptalk_queue (enqueued_by, request, callback)
SELECT 'alice'::regrole, req('hand-' || i) || jsonb_build_object('fullName', repeat('y', 10 * 1024 * 1024)),
	'$cb'
FROM generate_series(1, 32) i;
});
TaptalkTest::queue_drained($node, '32 hand-written 10 MB requests');
is( q1(q{SELECT string_agg(DISTINCT format('%s %s %s', state, error_code, error_message), ', ')
		FROM taptalk_queue WHERE request->>'xcUserID' LIKE 'hand-%'}),
	'failed 40002 Request must be at most 65536 bytes as stored',
	'the worker failed them without sending them');
is(q1('SELECT count(*) FROM got WHERE request_is_null'), 32,
	'their callbacks got a NULL request');
is($mock->count($mark, 'request'), 0, 'TapTalk got none of them');
my $status = slurp_file("/proc/$pid/status");
my ($hwm) = $status =~ /VmHWM:\s+(\d+) kB/;
cmp_ok($hwm, '<', 100 * 1024,
	"the worker's peak memory stayed under 100 MB (it is ${hwm} kB) for 320 MB of requests");
is(TaptalkTest::worker_pid($node), $pid, 'the same worker');

# ---------------------------------------------------------- fairness
q1("TRUNCATE taptalk_queue");
$node->safe_psql('postgres',
	"SELECT taptalk_enqueue(req('fault-slow-50')) FROM generate_series(1, 20000)",
	extra_params => [ '-U', 'alice' ]);
ok( $node->poll_query_until('postgres',
		"SELECT count(*) > 200 FROM taptalk_queue WHERE state = 'succeeded'"),
	'the backlog is being sent');
$node->safe_psql('postgres', "SELECT taptalk_enqueue(req('bob-live'))",
	extra_params => [ '-U', 'bob' ]);
ok( $node->poll_query_until('postgres',
		"SELECT state = 'succeeded' FROM taptalk_queue WHERE request->>'xcUserID' = 'bob-live'"),
	"the other role's request was sent");
my ($took, $left) = split /\|/, q1(q{SELECT extract(epoch FROM finished_at - enqueued_at),
	(SELECT count(*) FROM taptalk_queue WHERE state IN ('queued', 'sending'))
	FROM taptalk_queue WHERE request->>'xcUserID' = 'bob-live'});
cmp_ok($took, '<', 2, "within 2 s of its commit (${took} s), not after the backlog");
cmp_ok($left, '>', 10000, "while most of the backlog ($left) was still queued");

done_testing();
