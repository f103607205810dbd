# t/210_pg_upgrade.pl: pg_upgrade of a cluster with taptalk and a full queue
# from an older major version (PostgreSQL 15, the old install) to the
# version under test, with the old version's build of taptalk in the old
# cluster and this build in the new one.
#
# The old cluster (the install of TAPTALK_OLD_PG_BINDIR, by default
# /usr/lib/postgresql/15/bin when its pkglibdir holds taptalk.so and it is
# older than the version under test; otherwise the test is skipped):
# - database app has the extension and a queue of two non-superuser roles,
#   taptalk_app (callback public.provisioned) and taptalk_caller (callback
#   cbs.provisioned_b, in a schema of its own); each callback writes
#   current_user to public.cb_calls;
# - failed requests: while TapTalk is out of reach (taptalk.base_url at a
#   closed port, taptalk.max_attempts = 1) two requests per role fail with
#   CONNECTION_FAILED; one invalid request per role is stored failed at once
#   (40002);
# - queued requests: 25 per role, which must stay queued until the upgrade.
#   For that the cluster is restarted with taptalk.database = 'postgres', a
#   database without the extension: its worker waits there and sends
#   nothing of app's queue, and taptalk.base_url points at the mock again,
#   so that a request sent before the upgrade would show in the mock's log
#   (none does) and the statistics can be made non-zero with three
#   taptalk_auth_ticket calls (PostgreSQL 15 keeps them in shared memory
#   only, so after the last restart).
# Then pg_upgrade --check and pg_upgrade (both clusters initialized with
# data checksums, as PostgreSQL 18 does by default; run in a directory of
# the test's own, since pg_upgrade writes there) to a new cluster configured
# as an operator would (taptalk preloaded, taptalk.database = 'app', the
# mock).  The restore of the old catalog needs one thing unrelated to
# taptalk: Debian's PostgreSQL 15 gives every column a hidden attribute
# option, pg_attver, which PostgreSQL 18 built from the upstream sources
# rejects; it is removed from the old catalog first (see below).
# - Nothing is sent while pg_upgrade runs, although it starts the new
#   cluster with the old data files in place: the worker does not run in
#   binary-upgrade mode.
# The new cluster starts, and:
# - each of the 50 queued requests is sent exactly once (the mock's log),
#   succeeds, and its callback runs once, as the role that enqueued it, with
#   the ticket;
# - the failed requests came along failed; each role requeues its own with
#   taptalk_requeue: the CONNECTION_FAILED ones are sent once and succeed,
#   the invalid ones fail again with 40002 (attempts 1, as any request the
#   worker fails at once) without being sent; their callbacks run as their
#   roles;
# - a request enqueued after the upgrade gets an id above every old one;
# - taptalk_stats, taptalk_stats_errors, taptalk_stats_latency,
#   taptalk_worker and taptalk_requests (each role sees its own) read;
# - no backend crashed.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use File::Basename qw(dirname);
use IPC::Run;
use PostgreSQL::Test::Utils;
use PostgreSQL::Version;
use Test::More;

# ------------------------------------------------------ the old install
my $pg_config = $ENV{PG_CONFIG} || 'pg_config';
my $new_bindir = `$pg_config --bindir`;
chomp $new_bindir;
my $new_version = PostgreSQL::Version->new(scalar `$pg_config --version`);

my $old_bindir = $ENV{TAPTALK_OLD_PG_BINDIR} // '/usr/lib/postgresql/15/bin';
my $old_pg_config = "$old_bindir/pg_config";
my $skip;
if (!-x $old_pg_config)
{
	die "TAPTALK_OLD_PG_BINDIR: no pg_config in $old_bindir\n"
	  if defined $ENV{TAPTALK_OLD_PG_BINDIR};
	$skip = "no old PostgreSQL in $old_bindir (set TAPTALK_OLD_PG_BINDIR)";
}
else
{
	my $old_version = PostgreSQL::Version->new(scalar `$old_pg_config --version`);
	my $pkglibdir = `$old_pg_config --pkglibdir`;
	my $sharedir = `$old_pg_config --sharedir`;
	chomp($pkglibdir, $sharedir);
	if ($old_version->major >= $new_version->major)
	{
		$skip = "the old PostgreSQL in $old_bindir ($old_version) is not older "
		  . "than the version under test ($new_version)";
	}
	elsif (!-f "$pkglibdir/taptalk.so"
		|| !-f "$sharedir/extension/taptalk.control")
	{
		$skip = "taptalk is not installed in the old PostgreSQL ($old_version, $old_bindir)";
	}
}
plan skip_all => $skip if $skip;

my $mock = TaptalkTest::Mock->start;
my $old = TaptalkTest::node(
	'old',
	mock         => $mock,
	install_path => dirname($old_bindir),
	initdb       => ['--data-checksums'],
	extension    => 0,
	conf         => 'taptalk.max_attempts = 1');
note 'old cluster: ' . $old->safe_psql('postgres', 'SELECT version()');

my (%role, %callback);

{
	my ($r, $c) = TaptalkTest::app_with_role_callbacks($old);
	%role = %$r;
	%callback = %$c;
}

# as role $k (a or b): enqueue upg-$k-$kind-1..$n with the role's callback;
# $invalid: without fullName
sub enqueue
{
	my ($node, $k, $kind, $n, $invalid) = @_;
	return TaptalkTest::enqueue_as($node, $role{$k}, $callback{$k}, "upg-$k-$kind", $n,
		$invalid);
}

# ------------------------------------ failed requests: TapTalk out of reach
my $closed = PostgreSQL::Test::Cluster::get_free_port();
$old->append_conf('postgresql.conf',
	"taptalk.database = 'app'\ntaptalk.base_url = 'http://127.0.0.1:$closed'");
$old->restart;
ok( $old->poll_query_until('app', "SELECT state = 'idle' FROM taptalk_worker"),
	'old: the worker sends app\'s queue');
for my $k ('a', 'b')
{
	enqueue($old, $k, 'down', 2);
	enqueue($old, $k, 'invalid', 1, 1);
}
TaptalkTest::queue_drained($old, 'old: TapTalk out of reach', 'app');
is( $old->safe_psql('app', q{SELECT string_agg(format('%s %s %s %s %s',
		request->>'xcUserID', enqueued_by, state, attempts, error_code), ', ' ORDER BY id)
		FROM taptalk_queue}),
	'upg-a-down-1 taptalk_app failed 1 CONNECTION_FAILED, '
	  . 'upg-a-down-2 taptalk_app failed 1 CONNECTION_FAILED, '
	  . 'upg-a-invalid-1 taptalk_app failed 0 40002, '
	  . 'upg-b-down-1 taptalk_caller failed 1 CONNECTION_FAILED, '
	  . 'upg-b-down-2 taptalk_caller failed 1 CONNECTION_FAILED, '
	  . 'upg-b-invalid-1 taptalk_caller failed 0 40002',
	'old: the requests sent while TapTalk is out of reach failed, the invalid ones at once');
is( $old->safe_psql('app', q{SELECT string_agg(format('%s %s %s', xc, who, error_code), ', '
		ORDER BY xc) FROM cb_calls}),
	'upg-a-down-1 taptalk_app CONNECTION_FAILED, upg-a-down-2 taptalk_app CONNECTION_FAILED, '
	  . 'upg-a-invalid-1 taptalk_app 40002, '
	  . 'upg-b-down-1 taptalk_caller CONNECTION_FAILED, upg-b-down-2 taptalk_caller CONNECTION_FAILED, '
	  . 'upg-b-invalid-1 taptalk_caller 40002',
	'old: their callbacks ran as their roles');

# ------------------------------- queued requests: the worker is elsewhere
$old->append_conf('postgresql.conf',
	"taptalk.database = 'postgres'\ntaptalk.base_url = '" . $mock->base_url . "'");
$old->restart;
ok( $old->poll_query_until('app',
		"SELECT state = 'waiting for extension' FROM taptalk_worker"),
	'old: the worker waits in database postgres');
my $mark = $mock->log_mark;
is(enqueue($old, 'a', 'q', 25), 25, 'old: taptalk_app enqueues 25 requests');
is(enqueue($old, 'b', 'q', 25), 25, 'old: taptalk_caller enqueues 25 requests');
is( $old->safe_psql('app',
		"SELECT count(*) FILTER (WHERE ok) FROM (SELECT (taptalk_auth_ticket(req('upg-stats-' || i))).user_id"
		  . " = 'tt-upg-stats-' || i AS ok FROM generate_series(1, 3) i) s"),
	3, 'old: three synchronous calls to the mock');
is( $old->safe_psql('app',
		"SELECT format('%s %s', requests, successes) FROM taptalk_stats WHERE path = 'single'"),
	'3 3', 'old: taptalk_stats counts them');
is( $old->safe_psql('app', q{SELECT format('%s %s %s %s', database, state, queued, failed)
		FROM taptalk_worker}),
	'postgres waiting for extension 50 6',
	'old: taptalk_worker: 50 queued, 6 failed, the worker elsewhere');
is($mock->count($mark, 'request', undef, qr/upg-[ab]-q-/),
	0, 'old: no queued request was sent');
my $max_old_id = $old->safe_psql('app', 'SELECT max(id) FROM taptalk_queue');

# Debian's PostgreSQL 15 packages give every column a hidden attribute
# option pg_attver, which their own pg_dump leaves out and PostgreSQL 18
# built from the upstream sources (scripts/pg18) does not know: pg_upgrade's
# restore of any user table fails with 'unrecognized parameter
# "pg_attver"', whatever the extension.  It is no part of what is tested
# here, so it is removed from the old catalog, where present, before the
# upgrade.
for my $db ('postgres', 'app')
{
	my $n = $old->safe_psql($db, q{
		WITH s AS (
			UPDATE pg_catalog.pg_attribute
			SET attoptions = NULLIF(ARRAY(SELECT o FROM unnest(attoptions) o
										  WHERE o NOT LIKE 'pg\_attver=%'), '{}')
			WHERE attrelid >= 16384 AND attoptions::text LIKE '%pg\_attver=%'
			RETURNING 1)
		SELECT count(*) FROM s});
	note "old: pg_attver removed from $n columns of database $db" if $n;
}
$old->stop;

# ------------------------------------------------------------ pg_upgrade
my $new = TaptalkTest::node(
	'new',
	mock   => $mock,
	initdb => ['--data-checksums'],
	start  => 0,
	conf   => "taptalk.database = 'app'");

# pg_upgrade writes its scripts into the current directory
my $workdir = PostgreSQL::Test::Utils::tempdir('pg_upgrade');
chdir $workdir or die "chdir $workdir: $!";

sub pg_upgrade
{
	my ($what, @extra) = @_;
	my @cmd = (
		"$new_bindir/pg_upgrade", '--no-sync',
		'--old-datadir' => $old->data_dir,
		'--new-datadir' => $new->data_dir,
		'--old-bindir'  => $old_bindir,
		'--new-bindir'  => $new_bindir,
		'--socketdir'   => $new->host,
		'--old-port'    => $old->port,
		'--new-port'    => $new->port,
		'--username'    => 'postgres',
		@extra);
	note join(' ', @cmd);
	my ($out, $err) = ('', '');
	my $ok = IPC::Run::run(\@cmd, '>', \$out, '2>', \$err);
	note $out;
	return 1 if ok($ok, $what);
	# what pg_upgrade found: its reports, and the end of its restores' logs
	my $output = $new->data_dir . '/pg_upgrade_output.d';
	diag($out, $err,
		(map { "--- $_:\n" . slurp_file($_) } glob("$output/*/*.txt")),
		map {
			my @lines = split /\n/, slurp_file($_);
			"--- $_:\n" . join("\n", @lines > 10 ? @lines[ -10 .. -1 ] : @lines)
		} glob("$output/*/log/pg_upgrade_dump_*.log"));
	return 0;
}

my $upgrade_mark = $mock->log_mark;
my $upgraded = pg_upgrade('pg_upgrade --check', '--check')
  && pg_upgrade('pg_upgrade');
chdir $TaptalkTest::ROOT;
# pg_upgrade starts the new cluster, its data files in place, before it is
# done: the worker must not run then
is($mock->count($upgrade_mark, 'request'), 0, 'nothing was sent while pg_upgrade ran');
unless ($upgraded)
{
	# nothing to start
	done_testing();
	exit;
}

# ---------------------------------------------- the new cluster starts
$new->start;
note 'new cluster: ' . $new->safe_psql('postgres', 'SELECT version()');
TaptalkTest::queue_drained($new, 'new: the queue', 'app');

my %sent;
$mock->scan_log($upgrade_mark,
	sub { $sent{$1}++ if $_[0] =~ /^\{"event":"request".*?(upg-[ab]-[a-z]+-\d+)/ });
my @expected = map { my $k = $_; map { "upg-$k-q-$_" } 1 .. 25 } 'a', 'b';
is_deeply(\%sent, { map { $_ => 1 } @expected },
	'new: each queued request was sent exactly once, and nothing else');
is( $new->safe_psql('app', q{SELECT count(*) FROM taptalk_queue
		WHERE request->>'xcUserID' LIKE 'upg-_-q-%' AND state = 'succeeded'
		  AND attempts = 1 AND user_id = 'tt-' || (request->>'xcUserID')
		  AND callback_error IS NULL}),
	50, 'new: the 50 requests succeeded, their callbacks without error');
is( $new->safe_psql('app', q{SELECT count(*) FROM (
		SELECT c.request_id FROM cb_calls c JOIN taptalk_queue q ON q.id = c.request_id
		WHERE c.xc LIKE 'upg-_-q-%' AND c.ticket_seen AND c.error_code IS NULL
		  AND c.who = q.enqueued_by::text
		  AND c.who = CASE WHEN c.xc LIKE 'upg-a-%' THEN 'taptalk_app' ELSE 'taptalk_caller' END
		GROUP BY c.request_id HAVING count(*) = 1) s}),
	50, 'new: each callback ran once, as the role that enqueued its request, with the ticket');
is($new->safe_psql('app', q{SELECT count(*) FROM cb_calls WHERE xc LIKE 'upg-_-q-%'}),
	50, 'new: and no callback ran twice');

# ------------------------------------------------- the failed ones
is( $new->safe_psql('app',
		q{SELECT count(*) FROM taptalk_queue WHERE state = 'failed'}),
	6, 'new: the six failed requests came along, failed');
$mark = $mock->log_mark;
for my $k ('a', 'b')
{
	is( $new->safe_psql('app',
			"SELECT taptalk_requeue(array_agg(id)) FROM taptalk_requests WHERE state = 'failed'",
			extra_params => [ '-U', $role{$k} ]),
		3, "new: $role{$k} requeues its three failed requests");
}
TaptalkTest::queue_drained($new, 'new: the requeued ones', 'app');
is( $new->safe_psql('app', q{SELECT string_agg(format('%s %s %s %s', request->>'xcUserID',
		state, attempts, coalesce(error_code, user_id)), ', ' ORDER BY id)
		FROM taptalk_queue WHERE request->>'xcUserID' NOT LIKE 'upg-_-q-%'}),
	'upg-a-down-1 succeeded 1 tt-upg-a-down-1, upg-a-down-2 succeeded 1 tt-upg-a-down-2, '
	  . 'upg-a-invalid-1 failed 1 40002, '
	  . 'upg-b-down-1 succeeded 1 tt-upg-b-down-1, upg-b-down-2 succeeded 1 tt-upg-b-down-2, '
	  . 'upg-b-invalid-1 failed 1 40002',
	'new: the requeued requests succeeded, the invalid ones failed again');
%sent = ();
$mock->scan_log($mark,
	sub { $sent{$1}++ if $_[0] =~ /^\{"event":"request".*?(upg-[ab]-[a-z]+-\d+)/ });
is_deeply(
	\%sent,
	{ map { $_ => 1 } qw(upg-a-down-1 upg-a-down-2 upg-b-down-1 upg-b-down-2) },
	'new: each requeued request was sent once, the invalid ones not at all');
is( $new->safe_psql('app', q{SELECT string_agg(format('%s %s %s', xc, who,
		coalesce(error_code, ticket_seen::text)), ', ' ORDER BY xc)
		FROM (SELECT DISTINCT ON (xc) * FROM cb_calls WHERE xc NOT LIKE 'upg-_-q-%'
			  ORDER BY xc, ctid DESC) c}),
	'upg-a-down-1 taptalk_app true, upg-a-down-2 taptalk_app true, '
	  . 'upg-a-invalid-1 taptalk_app 40002, '
	  . 'upg-b-down-1 taptalk_caller true, upg-b-down-2 taptalk_caller true, '
	  . 'upg-b-invalid-1 taptalk_caller 40002',
	'new: their callbacks ran again, as their roles');

# ------------------------------------------------ a new request, the views
my $new_id = $new->safe_psql('app', "SELECT taptalk_enqueue(req('upg-after-1'), '$callback{a}')",
	extra_params => [ '-U', 'taptalk_app' ]);
cmp_ok($new_id, '>', $max_old_id, 'new: a request enqueued now gets a fresh id');
TaptalkTest::queue_drained($new, 'new: the new request', 'app');

is( $new->safe_psql('app', q{SELECT format('%s %s', requests >= 55, successes)
		FROM taptalk_stats WHERE path = 'queue'}),
	't 55', 'new: taptalk_stats counts the queue\'s requests');
ok( $new->safe_psql('app', q{SELECT count(*) > 0 FROM taptalk_stats_errors WHERE path = 'queue'})
	  && $new->safe_psql('app', q{SELECT count(*) > 0 FROM taptalk_stats_latency}),
	'new: taptalk_stats_errors and taptalk_stats_latency read');
is( $new->safe_psql('app', q{SELECT format('%s %s %s %s %s %s', pid IS NOT NULL, database,
		state, queued, succeeded, failed) FROM taptalk_worker}),
	't app idle 0 55 2', 'new: taptalk_worker: the worker idle, 55 succeeded, 2 failed');
for my $k ('a', 'b')
{
	is( $new->safe_psql('app',
			"SELECT format('%s %s', count(*), bool_and(enqueued_by::text = current_user)) FROM taptalk_requests",
			extra_params => [ '-U', $role{$k} ]),
		($k eq 'a' ? 29 : 28) . ' t',
		"new: taptalk_requests shows $role{$k} its own requests");
}
is( $new->safe_psql('app', q{SELECT extversion = default_version FROM pg_extension e
		JOIN pg_available_extensions a ON a.name = e.extname WHERE extname = 'taptalk'}),
	't', 'new: the extension is at its default version');
TaptalkTest::no_crash($new, 0, 'new');

$new->stop;
done_testing();
