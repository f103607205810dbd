# t/192_queue_callbacks.pl: callbacks of different roles, run by the one
# worker, are limited and isolated from each other.
#
# - A callback that sleeps is cancelled after taptalk.callback_timeout; its
#   request keeps its outcome, callback_error says why, and another role's
#   request, enqueued after it, is sent and its callback run meanwhile.
# - Nothing one role's callback leaves behind reaches the next role's:
#   open cursors (and the rows they could FETCH), SET CONSTRAINTS ALL
#   DEFERRED, session advisory locks, settings changed with SET.  (PREPARE,
#   temporary tables, WITH HOLD cursors and LISTEN are refused inside a
#   callback by SECURITY_RESTRICTED_OPERATION.)  Inside a callback session_user and current_user are the
#   enqueuing role.
# - A callback that stops the worker every time (it terminates the worker
#   through a SECURITY DEFINER function) does not loop forever: its request
#   fails as WORKER_STOPPED at the third stop, its callback no longer runs,
#   and the other requests drain.  The postmaster never restarts.
# - The queue keeps a callback's qualified signature, resolved when it runs:
#   one whose schema was renamed meanwhile gives a clear callback_error.
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
	'callbacks',
	mock    => $mock,
	helpers => 1,
	conf    => "taptalk.callback_timeout = '2s'");
my $offset = TaptalkTest::log_offset($node);

sub q1 { return $node->safe_psql('postgres', $_[0]); }

q1(q{
CREATE ROLE alice LOGIN;
CREATE ROLE bob LOGIN;
GRANT EXECUTE ON FUNCTION taptalk_enqueue(jsonb, regprocedure) TO alice, bob;
CREATE TABLE alice_secret (s text);
INSERT INTO alice_secret VALUES ('alice-only');
GRANT SELECT ON alice_secret TO alice;
CREATE TABLE seen (request_id bigint, who name, session_who name, cursors text,
	fetched text, prepared text, advisory bigint, setting text, constraints text);
GRANT INSERT ON seen TO alice, bob;
CREATE TABLE uniq (k int UNIQUE DEFERRABLE INITIALLY IMMEDIATE);
INSERT INTO uniq VALUES (1);
GRANT INSERT, DELETE ON uniq TO alice, bob;
CREATE TABLE slept (request_id bigint);
GRANT INSERT ON slept TO alice;

-- records what it finds of the callbacks before it, then leaves all it can
CREATE FUNCTION messy(request_id bigint, request jsonb, result taptalk_auth_ticket_result)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
	cur refcursor;
	fetched text := '-';
	mode text;
BEGIN
	BEGIN
		EXECUTE 'FETCH 1 FROM ' || quote_ident(
			(SELECT name FROM pg_catalog.pg_cursors WHERE name LIKE 'c_%' LIMIT 1))
			INTO fetched;
	EXCEPTION WHEN others THEN
		fetched := '-';
	END;
	BEGIN
		INSERT INTO public.uniq VALUES (1);
		DELETE FROM public.uniq WHERE ctid = (SELECT max(ctid) FROM public.uniq);
		mode := 'deferred';
	EXCEPTION WHEN unique_violation THEN
		mode := 'immediate';
	END;
	INSERT INTO public.seen VALUES (request_id, current_user, session_user,
		(SELECT coalesce(string_agg(name, ','), '-') FROM pg_catalog.pg_cursors),
		coalesce(fetched, '-'),
		(SELECT coalesce(string_agg(name, ','), '-') FROM pg_catalog.pg_prepared_statements),
		(SELECT count(*) FROM pg_catalog.pg_locks
			WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()),
		coalesce(nullif(pg_catalog.current_setting('leak.x', true), ''), '-'),
		mode);

	cur := 'c_' || current_user;
	IF current_user = 'alice' THEN
		OPEN cur FOR SELECT s FROM public.alice_secret;
	ELSE
		OPEN cur FOR SELECT 'nothing';
	END IF;
	SET CONSTRAINTS ALL DEFERRED;
	PERFORM pg_catalog.pg_advisory_lock(42);
	PERFORM pg_catalog.pg_advisory_xact_lock(43);
	PERFORM pg_catalog.set_config('leak.x', current_user, false);
END $$;

CREATE FUNCTION sleeper(request_id bigint, request jsonb, result taptalk_auth_ticket_result)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO public.slept VALUES (request_id);
	PERFORM pg_catalog.pg_sleep(3600);
END $$;

-- a superuser's function, granted to alice: ends the process it runs in
CREATE FUNCTION end_me() RETURNS void LANGUAGE sql SECURITY DEFINER
	AS $$ SELECT pg_catalog.pg_terminate_backend(pg_catalog.pg_backend_pid()) $$;
REVOKE EXECUTE ON FUNCTION end_me() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION end_me() TO alice;
CREATE FUNCTION killer(request_id bigint, request jsonb, result taptalk_auth_ticket_result)
RETURNS void LANGUAGE sql AS $$ SELECT public.end_me() $$;
});

sub enqueue_as
{
	my ($role, $sql) = @_;
	$node->safe_psql('postgres', $sql, extra_params => [ '-U', $role ]);
}

my $cb = '(bigint, jsonb, public.taptalk_auth_ticket_result)';

# ---------------------------------------------------------- the sleeper
enqueue_as('alice', "SELECT taptalk_enqueue(req('cb-sleeper'), 'public.sleeper$cb')");
ok( $node->poll_query_until('postgres',
		"SELECT wait_event = 'PgSleep' FROM pg_stat_activity WHERE backend_type = 'taptalk worker'"),
	'the sleeping callback started');
my $t0 = time;
enqueue_as('bob', "SELECT taptalk_enqueue(req('cb-bob-0'), 'public.messy$cb')");
ok( $node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM seen s JOIN taptalk_queue q ON q.id = s.request_id"
		  . " WHERE q.request->>'xcUserID' = 'cb-bob-0'"),
	'another role\'s request was sent and its callback ran');
my $waited = time - $t0;
cmp_ok($waited, '<', 30, "... after ${waited}s, not after the sleeper's hour");
is( q1(q{SELECT format('%s %s %s', state, user_id, callback_error) FROM taptalk_queue
		WHERE request->>'xcUserID' = 'cb-sleeper'}),
	'succeeded tt-cb-sleeper callback cancelled after taptalk.callback_timeout (2000 ms)',
	'the sleeper: its outcome is recorded, callback_error says it was cancelled');
is(q1('SELECT count(*) FROM slept'), 0, 'what the sleeper wrote was rolled back with it');

# ------------------------------------------------ isolation between roles
q1('TRUNCATE seen');
for my $round (1 .. 5)
{
	# both in one step of the worker: enqueued together
	q1(qq{
SET ROLE alice; SELECT taptalk_enqueue(req('cb-a-$round'), 'public.messy$cb');
SET ROLE bob; SELECT taptalk_enqueue(req('cb-b-$round'), 'public.messy$cb');
RESET ROLE;
});
}
TaptalkTest::queue_drained($node, 'ten callbacks of two roles');
is(q1('SELECT count(*) FROM seen'), 10, 'every callback ran');
is( q1(q{SELECT string_agg(DISTINCT format('%s/%s cursors=%s fetched=%s prepared=%s advisory=%s setting=%s constraints=%s',
		who, session_who, cursors, fetched, prepared, advisory, setting, constraints), E'\n')
		FROM seen}),
	"alice/alice cursors=- fetched=- prepared=- advisory=0 setting=- constraints=immediate\n"
	  . "bob/bob cursors=- fetched=- prepared=- advisory=0 setting=- constraints=immediate",
	'no callback saw anything another callback left: cursors, rows, prepared statements, locks, settings, deferred constraints; session_user is the enqueuing role');
is( q1(q{SELECT string_agg(DISTINCT format('%s %s', state, callback_error), ', ')
		FROM taptalk_queue WHERE request->>'xcUserID' LIKE 'cb-%'
		AND request->>'xcUserID' <> 'cb-sleeper'}),
	'succeeded ', 'every one of them succeeded, callback included');

# ------------------------------------- callbacks are stored by their name
# (a function's OID survives neither pg_upgrade nor a dump and restore)
q1(q{
CREATE SCHEMA cbs;
GRANT USAGE ON SCHEMA cbs TO bob;
CREATE FUNCTION cbs.note(request_id bigint, request jsonb, result taptalk_auth_ticket_result)
RETURNS void LANGUAGE sql AS $$ INSERT INTO public.seen (request_id, who) VALUES (request_id, current_user) $$;
});
enqueue_as('bob', "SELECT taptalk_enqueue(req('fault-slow-1500'), 'cbs.note$cb')");
is( q1(q{SELECT callback FROM taptalk_queue WHERE request->>'xcUserID' = 'fault-slow-1500'}),
	'cbs.note(bigint,pg_catalog.jsonb,public.taptalk_auth_ticket_result)',
	'the queue keeps the callback\'s qualified signature');
q1('ALTER SCHEMA cbs RENAME TO cbs_renamed');
ok( $node->poll_query_until('postgres',
		"SELECT state = 'succeeded' FROM taptalk_queue WHERE request->>'xcUserID' = 'fault-slow-1500'"),
	'a request whose callback\'s schema was renamed meanwhile succeeds');
is( q1(q{SELECT callback_error FROM taptalk_queue WHERE request->>'xcUserID' = 'fault-slow-1500'}),
	'callback function cbs.note(bigint,pg_catalog.jsonb,public.taptalk_auth_ticket_result) does not exist',
	'... and callback_error says its callback no longer resolves');
q1('ALTER SCHEMA cbs_renamed RENAME TO cbs');
enqueue_as('bob', "SELECT taptalk_enqueue(req('cb-named'), 'cbs.note$cb')");
TaptalkTest::queue_drained($node, 'the callback by name');
is( q1(q{SELECT s.who FROM seen s JOIN taptalk_queue q ON q.id = s.request_id
		WHERE q.request->>'xcUserID' = 'cb-named' AND q.callback_error IS NULL}),
	'bob', 'a callback resolves by its name when it runs');

# ----------------------------------------------- a callback that stops the worker
my $mark = $mock->log_mark;
enqueue_as('alice', "SELECT taptalk_enqueue(req('cb-killer'), 'public.killer$cb')");
enqueue_as('bob', "SELECT taptalk_enqueue(req('cb-after-' || i), 'public.messy$cb')"
	  . " FROM generate_series(1, 20) i");
ok( $node->poll_query_until('postgres',
		"SELECT state = 'failed' FROM taptalk_queue WHERE request->>'xcUserID' = 'cb-killer'"),
	'the request whose callback stops the worker ends failed');
is( q1(q{SELECT format('%s %s %s | %s | %s', error_code, interruptions, attempts, error_message,
		callback_error) FROM taptalk_queue WHERE request->>'xcUserID' = 'cb-killer'}),
	'WORKER_STOPPED 3 3 | the worker stopped 3 times while sending this request, or running its callback'
	  . ' | callback not run: the worker stopped while sending this request, or running its callback, too often',
	'... as WORKER_STOPPED at the third stop, without its callback');
is($mock->count($mark, 'request', undef, qr/cb-killer/), 3, 'it was sent three times');
TaptalkTest::queue_drained($node, 'the other requests');
is( q1(q{SELECT format('%s %s', count(*), string_agg(DISTINCT state || ' ' || callback_error, ', '))
		FROM taptalk_queue WHERE request->>'xcUserID' LIKE 'cb-after-%'}),
	'20 ', 'the other role\'s requests all succeeded, callbacks included');
my $log = slurp_file($node->logfile, $offset);
unlike($log, qr/terminated by signal|all server processes terminated|PANIC/,
	'no crash, no restart of the server');
is(scalar(() = $log =~ /request \d+ failed: the worker stopped 3 times while sending it/g),
	1, 'the worker says why it failed the request');

done_testing();
