# t/160_stats.pl: the statistics views under concurrency, across the upgrade
# from 1.0, across a clean restart and across a crash restart.
#
# - ALTER EXTENSION taptalk UPDATE TO '1.1' then '1.2' from 1.0, and to 1.2
#   from 1.1, give the same objects
#   and privileges as CREATE EXTENSION taptalk (which installs 1.0 and runs
#   the same update scripts); the new library reads the worker's state
#   through version 1.1's function too.
# - pgbench, 8 clients, each with its own mix of calls: the counters of all
#   sessions add up exactly to what was called, and to what the mock saw.
# - A clean restart: on PostgreSQL 18 the counters and stats_reset are kept
#   exactly (a kind of the server's cumulative statistics, written to its
#   statistics file at shutdown); before 18 they start again at zero.
# - A backend killed with SIGKILL while a request is in flight restarts the
#   server; the views are readable afterwards and the counters start again
#   at zero, on every version (PostgreSQL discards statistics after a crash).
# - PostgreSQL 18 with taptalk.stats_kind_id = 0: the kind is not registered
#   and a clean restart zeroes the counters; an ID outside 24..32 is refused.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

# whether this server keeps the counters across a clean restart
my $pg18 = 0;

my $mock = TaptalkTest::Mock->start;
# PostgreSQL::Test::Cluster turns restart_after_crash off; the crash test
# needs the server's own restart
my $node = TaptalkTest::node(
	'stats',
	mock    => $mock,
	helpers => 1,
	conf    => 'restart_after_crash = on');

sub q1 { return $node->safe_psql($_[1] // 'postgres', $_[0]); }

$pg18 = $node->pg_version >= 18;

# every counter of every view, and stats_reset, as one string
my $everything = q{
SELECT (SELECT string_agg(format('%s: requests=%s rejected=%s attempts=%s successes=%s failures=%s '
			|| 'abandoned=%s connections=%s bytes=%s/%s latency_sum_ms=%s buckets=%s',
			path, requests, rejected, attempts, successes, failures, abandoned, connections,
			bytes_sent, bytes_received, latency_sum_ms, latency_buckets), '; ' ORDER BY path)
		FROM taptalk_stats)
	|| ' | ' || (SELECT string_agg(path || ' ' || error_code || '=' || count, ', '
			ORDER BY path, error_code) FROM taptalk_stats_errors)
	|| ' | ' || (SELECT string_agg(path || ' ' || coalesce(le_ms::text, 'more') || '=' || count, ', '
			ORDER BY path, le_ms) FROM taptalk_stats_latency)
	|| ' | reset ' || (SELECT DISTINCT stats_reset FROM taptalk_stats)};
my $totals = q{
SELECT string_agg(format('%s %s', path, requests + rejected + attempts + successes + failures
		+ abandoned + connections + bytes_sent + bytes_received), ', ' ORDER BY path)
FROM taptalk_stats};
my $zeros = 'batch 0, queue 0, single 0';

# known calls on both paths: 2 successes, a 404, a refused request, and a
# batch of a success and a 50000
sub known_calls
{
	my ($tag) = @_;
	q1(qq{SELECT taptalk_auth_ticket(req('$tag-1')), taptalk_auth_ticket(req('$tag-2')),
		taptalk_auth_ticket(req('fault-status-404')),
		taptalk_auth_ticket(req('$tag-3') - 'fullName')});
	q1(qq{SELECT count(*) FROM taptalk_auth_tickets(ARRAY[req('$tag-b1'), req('fault-envelope500')])});
	return;
}

# ---------------------------------------------------------------- upgrade
my $members = q{
SELECT string_agg(m, ', ' ORDER BY m) FROM (
SELECT pg_describe_object(classid, objid, objsubid) AS m
FROM pg_depend
WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
  AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'taptalk')
  AND NOT (classid = 'pg_type'::regclass
           AND objid IN (SELECT oid FROM pg_type WHERE typcategory = 'A'))) s};
my $acls = q{
SELECT string_agg(n || ' ' || coalesce(a, '-'), ', ' ORDER BY n, a) FROM (
	SELECT proname AS n, proacl::text AS a FROM pg_proc
	WHERE proname LIKE 'taptalk_stats%' OR proname = 'taptalk_worker_status'
	UNION ALL
	SELECT relname, relacl::text FROM pg_class
	WHERE relname LIKE 'taptalk_stats%' OR relname = 'taptalk_worker') s};

is(q1("SELECT extversion FROM pg_extension WHERE extname = 'taptalk'"),
	'1.2', 'CREATE EXTENSION installs 1.2');
q1('CREATE DATABASE upgrade');
q1("CREATE EXTENSION taptalk VERSION '1.0'", 'upgrade');
is(q1("SELECT count(*) FROM pg_proc WHERE proname LIKE 'taptalk_stats%'", 'upgrade'),
	0, 'version 1.0 has no statistics');
q1("ALTER EXTENSION taptalk UPDATE TO '1.1'", 'upgrade');
is(q1("SELECT extversion FROM pg_extension WHERE extname = 'taptalk'", 'upgrade'),
	'1.1', 'ALTER EXTENSION UPDATE reaches 1.1');
# the library serves version 1.1's taptalk_worker_status() and
# taptalk_stats() too, until the update to 1.2
is(q1("SELECT state IS NOT NULL FROM taptalk_worker", 'upgrade'),
	't', 'version 1.1 reads the worker with the new library');
is( q1("SELECT count(*) FROM taptalk_stats WHERE stats_reset BETWEEN now() - interval '1 day' AND now()",
		'upgrade'),
	'3', "version 1.1 reads the statistics with the new library, stats_reset in 1.1's place");
q1("ALTER EXTENSION taptalk UPDATE TO '1.2'", 'upgrade');
is(q1("SELECT extversion FROM pg_extension WHERE extname = 'taptalk'", 'upgrade'),
	'1.2', 'ALTER EXTENSION UPDATE reaches 1.2 from 1.1');
q1('CREATE DATABASE upgrade11');
q1("CREATE EXTENSION taptalk VERSION '1.1'", 'upgrade11');
q1("ALTER EXTENSION taptalk UPDATE", 'upgrade11');
is(q1("SELECT extversion FROM pg_extension WHERE extname = 'taptalk'", 'upgrade11'),
	'1.2', 'ALTER EXTENSION UPDATE reaches 1.2 from a new 1.1');
for my $db ('upgrade', 'upgrade11')
{
	is(q1($members, $db), q1($members),
		"$db: the updated extension has the same members as a new one");
	is(q1($acls, $db), q1($acls),
		"$db: and the same privileges on the statistics and the worker");
	is(q1('SELECT count(*) FROM taptalk_stats', $db),
		3, "$db: its views read the same statistics");
	is(q1('SELECT paused_until IS NULL, count(*) FROM taptalk_worker GROUP BY 1', $db),
		't|1', "$db: taptalk_worker has paused_until");
}
# the tables as \d shows them: columns, defaults, indexes, constraints, views
my $tables = q{SELECT string_agg(d, E'\n' ORDER BY d) FROM (
	SELECT format('%s.%s %s %s %s', c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
		a.attnotnull, pg_get_expr(ad.adbin, ad.adrelid)) AS d
	FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
	LEFT JOIN pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
	WHERE c.relname LIKE 'taptalk%'
	UNION ALL SELECT pg_get_indexdef(indexrelid) FROM pg_index
	WHERE indrelid = 'taptalk_queue'::regclass
	UNION ALL SELECT conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
	WHERE conrelid = 'taptalk_queue'::regclass
	UNION ALL SELECT c.relname || ' ' || pg_get_viewdef(c.oid) FROM pg_class c
	WHERE c.relkind = 'v' AND c.relname LIKE 'taptalk%') s};
is(q1($tables, 'upgrade'), q1($tables),
	'and the same tables, columns, defaults, indexes, constraints and views');
is(q1($tables, 'upgrade11'), q1($tables),
	'upgrade11: the same tables, columns, defaults, indexes, constraints and views');
# and the same function signatures (the OUT columns of taptalk_worker_status)
my $functions = q{SELECT string_agg(p.proname || '(' || pg_get_function_arguments(p.oid)
	|| ') ' || pg_get_function_result(p.oid), E'\n' ORDER BY 1)
	FROM pg_proc p WHERE proname LIKE 'taptalk%'};
is(q1($functions, 'upgrade'), q1($functions), 'upgrade: the same functions');
is(q1($functions, 'upgrade11'), q1($functions), 'upgrade11: the same functions');
unlike(q1($tables), qr/ reg(proc|procedure|oper|operator|config|dictionary|namespace|collation) /,
	'no column of a type pg_upgrade refuses');

# ---------------------------------------------------------------- pgbench
my $clients = 8;
my $tx      = 25;

q1('SELECT taptalk_stats_reset()');
my $mock_mark = $mock->log_mark;
my $log_mark  = TaptalkTest::log_offset($node);

# per transaction: a success and an HTTP_ERROR (404, not retried) on the
# single path; a batch of three valid elements (one a 50000 envelope) and
# one refused by our validation
my $script = PostgreSQL::Test::Utils::tempdir('stats') . '/stats.pgbench';
append_to_file(
	$script, q{\set id random(1, 1000000000)
SELECT user_id FROM taptalk_auth_ticket(req('stats-' || :client_id || '-' || :id));
SELECT error_code FROM taptalk_auth_ticket(req('fault-status-404'));
SELECT count(*) FROM taptalk_auth_tickets(ARRAY[req('b1-' || :id), req('b2-' || :id),
	req('fault-envelope500'), req('b3') - 'fullName']);
});
my ($out, $err) = ('', '');
my $ok = IPC::Run::run(
	[
		'pgbench', '-n', '-h', $node->host, '-p', $node->port,
		'-c', $clients, '-j', 2, '-t', $tx, '-f', $script, 'postgres'
	],
	'>', \$out, '2>', \$err);
ok($ok && "$out$err" !~ /aborted|error/i, 'pgbench ran without an error')
  or diag "$out\n$err";
TaptalkTest::no_crash($node, $log_mark, 'pgbench');

my $n = $clients * $tx;
is( q1(
		q{SELECT string_agg(format('%s: requests=%s rejected=%s attempts=%s successes=%s failures=%s abandoned=%s',
			path, requests, rejected, attempts, successes, failures, abandoned), '; ' ORDER BY path)
		FROM taptalk_stats}),
	sprintf(
		'batch: requests=%d rejected=%d attempts=%d successes=%d failures=%d abandoned=0; '
		  . 'queue: requests=0 rejected=0 attempts=0 successes=0 failures=0 abandoned=0; '
		  . 'single: requests=%d rejected=0 attempts=%d successes=%d failures=%d abandoned=0',
		3 * $n, $n, 3 * $n, 2 * $n, $n, 2 * $n, 2 * $n, $n, $n),
	"$clients clients x $tx transactions: every counter adds up exactly");
is( q1(
		q{SELECT string_agg(path || ' ' || error_code || '=' || count, ', ' ORDER BY path, error_code)
		FROM taptalk_stats_errors WHERE count <> 0}),
	"batch 50000=$n, single HTTP_ERROR=$n",
	'the failures by error_code');
is( q1(
		q{SELECT bool_and((SELECT sum(c) FROM unnest(latency_buckets) c) = requests)
		FROM taptalk_stats}),
	't', 'the latency histograms hold every request');
my $attempts = q1('SELECT sum(attempts) FROM taptalk_stats');
is($mock->count($mock_mark, 'request'), $attempts,
	'the mock received as many requests as were counted');
is($mock->count($mock_mark, 'connection'),
	q1('SELECT sum(connections) FROM taptalk_stats'),
	'and accepted as many connections as were counted');

# ---------------------------------------------------------------- clean restart
q1('SELECT taptalk_stats_reset()');
known_calls('restart');
my $before = q1($everything);
like($before, qr/^batch: requests=2 rejected=0 attempts=2 successes=1 failures=1 .*single: requests=3 rejected=1 attempts=3 successes=2 failures=1 /,
	'known calls are counted');
my $reset_before = q1('SELECT DISTINCT stats_reset FROM taptalk_stats');
$log_mark = TaptalkTest::log_offset($node);
$node->restart;
if ($pg18)
{
	is(q1($everything), $before,
		'PostgreSQL 18: a clean restart keeps every counter and stats_reset exactly');
	ok( $node->log_contains(
			'registered custom cumulative statistics "taptalk" with ID 29', $log_mark),
		'under the default ID, 29');
}
else
{
	is(q1($totals), $zeros,
		'before PostgreSQL 18: the counters start at zero after a clean restart');
	is( q1(
			"SELECT stats_reset > '$reset_before' FROM taptalk_stats WHERE path = 'single'"),
		't', 'and stats_reset is the start');
}

# ---------------------------------------------------------------- crash
# counters to lose, and on 18 a statistics file the restart above read
known_calls('crash');
isnt(q1($totals), $zeros, 'the counters are not zero before the crash');
$reset_before = q1('SELECT DISTINCT stats_reset FROM taptalk_stats');
$log_mark = TaptalkTest::log_offset($node);

# a request that waits 60 s at the mock; its backend is killed meanwhile
my $bg = $node->background_psql('postgres', on_error_stop => 0);
$bg->query_until(qr/started/,
	"\\echo started\nSELECT * FROM taptalk_auth_ticket(req('fault-slow-60000'));\n");
my $pid;
for (1 .. 500)
{
	$pid = q1("SELECT pid FROM pg_stat_activity WHERE state = 'active' "
		  . "AND query LIKE '%fault-slow-60000%' AND pid <> pg_backend_pid()");
	last if $pid;
	usleep(10_000);
}
ok($pid, 'a request is in flight');
ok(kill('KILL', $pid), 'its backend is killed with SIGKILL');
# psql may have exited already, its connection lost: then telling it to
# quit fails on a closed pipe, which is no failure of the test
eval { $bg->quit; };

# the postmaster restarts the cluster; wait until it accepts connections
my $up = 0;
for (1 .. 300)
{
	my ($rc) = $node->psql('postgres', 'SELECT 1');
	if ($rc == 0)
	{
		$up = 1;
		last;
	}
	usleep(100_000);
}
ok($up, 'the server is back after the crash restart');
ok($node->log_contains('all server processes terminated; reinitializing', $log_mark),
	'the server did restart');
is( q1(
		q{SELECT string_agg(format('%s %s %s', path, requests + rejected + attempts, failures), ', ' ORDER BY path)
		FROM taptalk_stats}),
	'batch 0 0, queue 0 0, single 0 0',
	'the views are readable; the counters start again at zero');
is(q1($totals), $zeros, 'every counter is zero');
is( q1("SELECT stats_reset > '$reset_before' FROM taptalk_stats WHERE path = 'single'"),
	't', 'stats_reset says when they were zeroed');
is(q1('SELECT count(*) FROM taptalk_stats_errors'), 27, 'taptalk_stats_errors is readable');
is(q1('SELECT count(*) FROM taptalk_stats_latency'), 42, 'taptalk_stats_latency is readable');
is(q1("SELECT user_id FROM taptalk_auth_ticket(req('after-crash'))"),
	'tt-after-crash', 'a call works after the restart');
is(q1("SELECT requests || ' ' || successes FROM taptalk_stats WHERE path = 'single'"),
	'1 1', 'and is counted');

# ---------------------------------------------------------------- no kind ID
if ($pg18)
{
	# the statistics file written at this shutdown holds the kind, which the
	# next start does not know: the server discards its whole file once
	$node->append_conf('postgresql.conf', 'taptalk.stats_kind_id = 0');
	$log_mark = TaptalkTest::log_offset($node);
	$node->restart;
	is(q1('SHOW taptalk.stats_kind_id'), '0', 'taptalk.stats_kind_id = 0');
	ok( !$node->log_contains('registered custom cumulative statistics', $log_mark),
		'no statistics kind is registered');
	ok($node->log_contains('could not find information of kind 29', $log_mark),
		"the server discarded the statistics file that held taptalk's kind");
	is(q1($totals), $zeros, 'the counters start at zero');

	known_calls('no-kind');
	like(q1($everything), qr/single: requests=3 rejected=1 attempts=3 successes=2 failures=1 /,
		'calls are counted without the kind');
	$reset_before = q1('SELECT DISTINCT stats_reset FROM taptalk_stats');
	$node->restart;
	is(q1($totals), $zeros, 'and a clean restart zeroes them');
	is( q1("SELECT stats_reset > '$reset_before' FROM taptalk_stats WHERE path = 'single'"),
		't', 'stats_reset is the start');

	# an ID outside the custom range is refused, as PostgreSQL refuses a
	# bad value of any extension's setting: a warning, and the default
	$node->append_conf('postgresql.conf', 'taptalk.stats_kind_id = 23');
	$log_mark = TaptalkTest::log_offset($node);
	$node->restart;
	ok( $node->log_contains(
			'WARNING:  invalid value for parameter "taptalk.stats_kind_id": 23', $log_mark),
		'taptalk.stats_kind_id = 23 is refused');
	is(q1('SHOW taptalk.stats_kind_id'), '29', 'and the default ID is used');
}

$node->stop;
$mock->stop;
done_testing();
