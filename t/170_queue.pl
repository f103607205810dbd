# t/170_queue.pl: the request queue end to end, through the background
# worker (taptalk_enqueue, the worker, callbacks, retries, crash safety).
#
# - The worker runs, with its own backend_type, in database postgres.
# - A trigger enqueues each inserted user; a rolled-back insert sends
#   nothing; a committed one is sent once, soon after COMMIT (the commit
#   wakes the worker), and its callback, run as the enqueuing role, gets
#   the ticket and writes the user's TapTalk id; the queue never holds the
#   ticket.
# - Retries: fault-flaky-2 succeeds at the third attempt; a 503 that never
#   ends, and a 500 in TapTalk's envelope (the status decides, not the
#   body), fail at taptalk.max_attempts (3 here); other 4xx fail at once
#   with attempts = 1.
# - A callback that raises, or reads a table its role may not read: the
#   error goes to callback_error, the result is kept.
# - Crash: 50 slow requests (the mock's /delay/400), an immediate shutdown while they are in
#   flight, a restart: all 50 end succeeded, each seen at least once.
# - kill -9 of the worker: the same; a fast shutdown with requests in
#   flight takes less than 2 s.
# - A prepared transaction's enqueue is sent after COMMIT PREPARED (found
#   by the worker's poll).
# - Succeeded requests are removed after taptalk.retention, failed ones kept.
# - Without the extension in its database the worker waits and says so;
#   after CREATE EXTENSION it works.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node(
	'queue',
	mock    => $mock,
	helpers => 1,
	conf    => "taptalk.max_attempts = 3\nmax_prepared_transactions = 5\n"
	  # PostgreSQL::Test::Cluster turns it off; the kill -9 test needs it
	  . "restart_after_crash = on");

sub q1 { return $node->safe_psql($_[1] // 'postgres', $_[0]); }


q1(q{
GRANT EXECUTE ON FUNCTION taptalk_enqueue(jsonb, regprocedure) TO taptalk_caller;
CREATE TABLE users (xc text PRIMARY KEY, taptalk_user_id text, calls int NOT NULL DEFAULT 0);
CREATE TABLE cb_calls (request_id bigint, ticket_seen boolean, who name, error_code text);
CREATE TABLE secret (x int);
GRANT SELECT, INSERT, UPDATE ON users TO taptalk_caller;
GRANT INSERT ON cb_calls TO taptalk_caller;
CREATE FUNCTION provisioned(request_id bigint, request jsonb,
							result taptalk_auth_ticket_result)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO public.cb_calls
	VALUES (request_id, (result).ticket = 'ticket-' || (request->>'xcUserID'),
			current_user, (result).error_code);
	UPDATE public.users SET taptalk_user_id = (result).user_id, calls = calls + 1
	WHERE xc = request->>'xcUserID';
END $$;
CREATE FUNCTION boom(request_id bigint, request jsonb,
					 result taptalk_auth_ticket_result)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO public.cb_calls VALUES (request_id, NULL, current_user, 'boom');
	RAISE EXCEPTION 'boom for %', request->>'xcUserID';
END $$;
CREATE FUNCTION leak(request_id bigint, request jsonb,
					 result taptalk_auth_ticket_result)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	RAISE EXCEPTION 'leaking %', (result).ticket;
END $$;
CREATE FUNCTION snoop(request_id bigint, request jsonb,
					  result taptalk_auth_ticket_result)
RETURNS void LANGUAGE sql AS $$ SELECT count(*) FROM public.secret $$;
CREATE FUNCTION users_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	PERFORM public.taptalk_enqueue(public.req(NEW.xc),
		'public.provisioned(bigint, jsonb, public.taptalk_auth_ticket_result)');
	RETURN NEW;
END $$;
CREATE TRIGGER users_enqueue AFTER INSERT ON users
	FOR EACH ROW EXECUTE FUNCTION users_enqueue();
});

# ------------------------------------------------------------- the worker
is(q1("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'taptalk worker'"),
	1, 'the worker runs, with its own backend_type');
ok( $node->poll_query_until('postgres', "SELECT state = 'idle' FROM taptalk_worker"),
	'taptalk_worker: the worker goes idle');
is( q1(q{SELECT format('%s %s %s %s %s %s %s %s %s %s %s', pid = (SELECT pid FROM pg_stat_activity
			WHERE backend_type = 'taptalk worker'), database, in_flight, queued, sending,
			succeeded, failed, oldest_queued_age IS NULL, last_success IS NULL,
			last_error IS NULL, last_error_code IS NULL)
		FROM taptalk_worker}),
	't postgres 0 0 0 0 0 t t t t',
	'taptalk_worker: its pid, its database, an empty queue, nothing sent yet');

# ------------------------------------------------- trigger and callback
my $mark = $mock->log_mark;
$node->safe_psql('postgres',
	"BEGIN; INSERT INTO users (xc) VALUES ('q-rolled-back'); ROLLBACK;",
	extra_params => [ '-U', 'taptalk_caller' ]);

usleep(500_000);	# let the worker go idle
my $t0 = time;
$node->safe_psql('postgres',
	"INSERT INTO users (xc) VALUES ('q-1'), ('q-2')",
	extra_params => [ '-U', 'taptalk_caller' ]);
TaptalkTest::queue_drained($node, 'two users');
my $elapsed = time - $t0;
# the worker polls every 5 s; the commit wakes it at once
cmp_ok($elapsed, '<', 3, 'the commit woke the worker');

is( q1(q{SELECT string_agg(format('%s %s %s %s %s', request->>'xcUserID', state,
		attempts, user_id, finished_at IS NOT NULL), ', ' ORDER BY id) FROM taptalk_queue}),
	'q-1 succeeded 1 tt-q-1 t, q-2 succeeded 1 tt-q-2 t',
	'both requests succeeded at the first attempt');
is(q1("SELECT string_agg(xc || ' ' || taptalk_user_id || ' ' || calls, ', ' ORDER BY xc) FROM users"),
	'q-1 tt-q-1 1, q-2 tt-q-2 1', 'the callback wrote each user\'s TapTalk id, once');
is(q1("SELECT string_agg(format('%s %s', ticket_seen, who), ', ') FROM cb_calls"),
	't taptalk_caller, t taptalk_caller',
	'the callback got the ticket and ran as the enqueuing role');
is($mock->count($mark, 'request', undef, qr/q-1/), 1, 'q-1 sent once');
is( q1(q{SELECT format('%s %s %s %s', state, succeeded,
			last_success > now() - interval '1 minute', last_error IS NULL)
		FROM taptalk_worker}),
	'idle 2 t t', 'taptalk_worker: two succeeded, the last success just now');
is($mock->count($mark, 'request', undef, qr/q-rolled-back/),
	0, 'the rolled-back insert sent nothing');
is(q1("SELECT count(*) FROM taptalk_queue WHERE request->>'xcUserID' = 'q-rolled-back'"),
	0, 'and left nothing in the queue');

# ------------------------------------------------- prepared transaction
$mark = $mock->log_mark;
q1(q{BEGIN; SELECT taptalk_enqueue(req('q-prepared')); PREPARE TRANSACTION 'p1'});
usleep(1_000_000);
is($mock->count($mark, 'request', undef, qr/q-prepared/),
	0, 'a prepared enqueue sends nothing');
q1(q{COMMIT PREPARED 'p1'});
# no commit callback runs for COMMIT PREPARED: the worker's poll finds it
ok( $node->poll_query_until('postgres',
		"SELECT state = 'succeeded' FROM taptalk_queue WHERE request->>'xcUserID' = 'q-prepared'"),
	'after COMMIT PREPARED the request is sent');
is($mock->count($mark, 'request', undef, qr/q-prepared/), 1, 'once');

# ------------------------------------------------------------- retries
$mark = $mock->log_mark;
q1(q{
SELECT taptalk_enqueue(req('fault-flaky-2-qa'));
SELECT taptalk_enqueue(req('fault-status-503'));
SELECT taptalk_enqueue(req('fault-status-400'));
SELECT taptalk_enqueue(req('fault-envelope500'));
});
# between its attempts the 503 waits for its retry (1 s, then 2 s)
ok( $node->poll_query_until('postgres',
		"SELECT state = 'backing off' AND queued >= 1 AND last_error_code = 'HTTP_ERROR'"
		  . " AND oldest_queued_age > interval '0' FROM taptalk_worker"),
	'taptalk_worker: backing off while a request waits for its retry');
TaptalkTest::queue_drained($node, 'retries');
is( q1(q{SELECT format('%s %s %s %s', state, queued, failed,
		last_error_code IN ('HTTP_ERROR', '50000'))
		FROM taptalk_worker}),
	'idle 0 3 t',
	'taptalk_worker: idle again, three failed, the last error is the 503\'s or the 500\'s');
is( q1(q{SELECT string_agg(format('%s %s %s %s', request->>'xcUserID', state,
		attempts, error_code), ', ' ORDER BY id) FROM taptalk_queue
		WHERE request->>'xcUserID' LIKE 'fault-%'}),
	'fault-flaky-2-qa succeeded 3 , fault-status-503 failed 3 HTTP_ERROR, '
	  . 'fault-status-400 failed 1 HTTP_ERROR, fault-envelope500 failed 3 50000',
	'transient failures (5xx, with an envelope too) retried until success or taptalk.max_attempts, others failed at once');
is($mock->count($mark, 'request', undef, qr/fault-flaky-2-qa/),
	3, 'the flaky request was sent three times');
is($mock->count($mark, 'request', undef, qr/fault-status-503/),
	3, 'the endless 503 was sent taptalk.max_attempts times');
is($mock->count($mark, 'request', undef, qr/fault-status-400/),
	1, 'the 400 was sent once');
is(q1("SELECT count(*) FROM taptalk_stats WHERE path = 'queue' AND requests >= 6"),
	1, 'the statistics count the queue\'s requests');

# ---------------------------------------------------- failing callbacks
q1(q{
SELECT taptalk_enqueue(req('q-boom'), 'boom(bigint, jsonb, taptalk_auth_ticket_result)');
SELECT taptalk_enqueue(req('q-snoop'), 'snoop(bigint, jsonb, taptalk_auth_ticket_result)');
SELECT taptalk_enqueue(req('q-after'), 'provisioned(bigint, jsonb, taptalk_auth_ticket_result)');
SELECT taptalk_enqueue(req('q-leak'), 'leak(bigint, jsonb, taptalk_auth_ticket_result)');
}, 'postgres');
# as taptalk_caller, whose callback may not read public.secret
$node->safe_psql('postgres', q{
GRANT EXECUTE ON FUNCTION snoop(bigint, jsonb, taptalk_auth_ticket_result) TO taptalk_caller;
SELECT taptalk_enqueue(req('q-snoop-caller'), 'snoop(bigint, jsonb, taptalk_auth_ticket_result)');
}, extra_params => [ '-U', 'taptalk_caller' ]);
TaptalkTest::queue_drained($node, 'failing callbacks');
is( q1(q{SELECT string_agg(format('%s %s %s %s', request->>'xcUserID', state, user_id,
		coalesce(callback_error, '-')), ', ' ORDER BY id) FROM taptalk_queue
		WHERE request->>'xcUserID' IN ('q-boom', 'q-snoop', 'q-after', 'q-snoop-caller')}),
	'q-boom succeeded tt-q-boom boom for q-boom, q-snoop succeeded tt-q-snoop -, '
	  . 'q-after succeeded tt-q-after -, '
	  . 'q-snoop-caller succeeded tt-q-snoop-caller permission denied for table secret',
	'a failing callback leaves its error in callback_error and the result in place');
is(q1("SELECT callback_error FROM taptalk_queue WHERE request->>'xcUserID' = 'q-leak'"),
	'leaking ********',
	'a callback\'s error that quotes the ticket is stored with the ticket masked');
is(q1("SELECT count(*) FROM cb_calls WHERE error_code = 'boom'"),
	0, 'the raising callback\'s writes were rolled back');

# ------------------------------------------------- the ticket is nowhere
is(q1("SELECT count(*) FROM taptalk_queue q WHERE q::text LIKE '%ticket-%'"),
	0, 'no row of the queue holds a ticket');
ok(!$node->log_contains(qr/ticket-q-/), 'no ticket in the server log');

# ------------------------------------------------------------- a crash
# the mock answers after 400 ms, so that requests are in flight
q1("ALTER SYSTEM SET taptalk.base_url = '" . $mock->base_url . "/delay/400'");
q1('SELECT pg_reload_conf()');
usleep(500_000);
$mark = $mock->log_mark;
q1(q{SELECT taptalk_enqueue(req('q-c' || i)) FROM generate_series(1, 50) i});
ok( $node->poll_query_until('postgres',
		"SELECT count(*) > 0 FROM taptalk_queue WHERE state = 'sending'"),
	'requests in flight');
is( q1(q{SELECT format('%s %s', state, in_flight = sending) FROM taptalk_worker}),
	'sending t', 'taptalk_worker: sending, with the requests in flight');
$node->stop('immediate');
$node->start;
TaptalkTest::queue_drained($node, 'after an immediate shutdown');
is( q1(q{SELECT count(*) FROM taptalk_queue
		WHERE request->>'xcUserID' LIKE 'q-c%' AND state = 'succeeded'}),
	50, 'all 50 requests succeeded after the crash');
my %seen;
$mock->scan_log($mark,
	sub { $seen{$1}++ if $_[0] =~ /^\{"event":"request".*?(q-c\d+)/ });
is(scalar(keys %seen), 50, 'the mock saw each of them at least once');
ok($node->log_contains(qr/requests left in state "sending" are queued again/),
	'the restarted worker queued the requests in flight again');

# kill -9 of the worker: the server restarts (restart_after_crash), the
# worker queues its requests again
$mark = $mock->log_mark;
my $log_mark = -s $node->logfile;
q1(q{SELECT taptalk_enqueue(req('q-k' || i)) FROM generate_series(1, 20) i});
ok( $node->poll_query_until('postgres',
		"SELECT count(*) > 0 FROM taptalk_queue WHERE state = 'sending'"),
	'requests in flight again');
my $worker_pid = TaptalkTest::worker_pid($node);
ok($worker_pid && kill('KILL', $worker_pid), 'the worker is killed with SIGKILL');
ok($node->wait_for_log(qr/all server processes terminated; reinitializing/, $log_mark),
	'the server restarts');
TaptalkTest::queue_drained($node, 'after kill -9 of the worker');
is( q1(q{SELECT count(*) FROM taptalk_queue
		WHERE request->>'xcUserID' LIKE 'q-k%' AND state = 'succeeded'}),
	20, 'all 20 requests succeeded after the kill');
%seen = ();
$mock->scan_log($mark,
	sub { $seen{$1}++ if $_[0] =~ /^\{"event":"request".*?(q-k\d+)/ });
is(scalar(keys %seen), 20, 'the mock saw each of them at least once');

# a fast shutdown with requests in flight is quick: the worker stops at once
q1(q{SELECT taptalk_enqueue(req('q-f' || i)) FROM generate_series(1, 40) i});
ok( $node->poll_query_until('postgres',
		"SELECT count(*) > 0 FROM taptalk_queue WHERE state = 'sending'"),
	'requests in flight at shutdown');
my $t1 = time;
$node->stop('fast');
cmp_ok(time - $t1, '<', 2, 'a fast shutdown with requests in flight takes less than 2 s');
$node->start;
TaptalkTest::queue_drained($node, 'after the fast shutdown');

q1('ALTER SYSTEM RESET taptalk.base_url');
q1('SELECT pg_reload_conf()');

# ------------------------------------------------------------ retention
q1("ALTER SYSTEM SET taptalk.retention = '1s'");
q1('SELECT pg_reload_conf()');
ok( $node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM taptalk_queue WHERE state = 'succeeded'"),
	'succeeded requests are removed after taptalk.retention');
is(q1("SELECT count(*) FROM taptalk_queue WHERE state = 'failed'"),
	3, 'failed requests are kept');
q1('ALTER SYSTEM RESET taptalk.retention');
q1('SELECT pg_reload_conf()');

# -------------------------------------------------- no extension, then one
my $log_offset = -s $node->logfile;
q1('CREATE DATABASE other');
q1('CREATE EXTENSION taptalk', 'other');
q1('DROP EXTENSION taptalk CASCADE');
q1('SELECT 1');
# the next poll (at most 5 s) finds the extension gone
ok( $node->wait_for_log(
		qr/extension "taptalk" is not installed in database "postgres"; waiting/,
		$log_offset),
	'the worker says the extension is missing');
is( q1(q{SELECT format('%s %s %s', state, database, queued) FROM taptalk_worker}, 'other'),
	'waiting for extension postgres 0',
	'taptalk_worker, from another database: waiting for the extension');
q1('CREATE EXTENSION taptalk');
$mark = $mock->log_mark;
q1(q{SELECT taptalk_enqueue(req('q-new'))});
ok( $node->poll_query_until('postgres',
		"SELECT state = 'succeeded' FROM taptalk_queue WHERE request->>'xcUserID' = 'q-new'"),
	'after CREATE EXTENSION the worker sends again');
is(q1("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'taptalk worker'"),
	1, 'the worker still runs');
# every worker's ERROR and FATAL lines, but for the shutdown's
my $log = slurp_file($node->logfile);
my %workers = map { $_ => 1 } ($log =~ /\[(\d+)\] LOG:  taptalk worker started/g);
my @errors = grep {
	/\[(\d+)\] (?:ERROR|FATAL):/ && $workers{$1}
	  && !/terminating background worker "taptalk worker" due to administrator command/
} split /\n/, $log;
is(join("\n", @errors), '', 'the worker never failed');

$node->stop;
$mock->stop;
done_testing();
