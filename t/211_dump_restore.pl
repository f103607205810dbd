# t/211_dump_restore.pl: pg_dump -Fc of a database with a queue and
# pg_restore into a new cluster of the same version (the one under test).
#
# - The source cluster: database app has the extension and the requests of
#   two non-superuser roles, taptalk_app (callback public.provisioned) and
#   taptalk_caller (callback cbs.provisioned_b, in a schema of its own);
#   each callback writes current_user to public.cb_calls.  15 queued
#   requests per role (the worker waits in database postgres, which has no
#   extension, so they stay queued: the mock sees none of them) and one
#   invalid request per role, stored failed at once.
# - pg_dump -Fc of app; the roles go first to the new cluster, as an
#   operator does it, with pg_dumpall --roles-only (the only error: role
#   "postgres" already exists); then createdb and pg_restore.
# - The queue's rows came along (extension config dump), identical, ids
#   included, and so did its sequence: a request enqueued after the restore
#   gets the next id, above every restored one.
# - With taptalk.database = 'app' and a restart, the new cluster's worker
#   sends each restored queued request exactly once (the mock's log); each
#   callback runs once, as the role that enqueued the request, with the
#   ticket; the failed requests stay failed and are not sent; no backend
#   crashed.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $mock = TaptalkTest::Mock->start;
my $src = TaptalkTest::node('src', mock => $mock, extension => 0);

my (%role, %callback);

{
	my ($r, $c) = TaptalkTest::app_with_role_callbacks($src);
	%role = %$r;
	%callback = %$c;
}

# as role $k (a or b): enqueue dr-$k-$kind-1..$n with the role's callback;
# $invalid: without fullName
sub enqueue
{
	my ($node, $k, $kind, $n, $invalid) = @_;
	return TaptalkTest::enqueue_as($node, $role{$k}, $callback{$k}, "dr-$k-$kind", $n,
		$invalid, 1);
}

my $mark = $mock->log_mark;
for my $k ('a', 'b')
{
	enqueue($src, $k, 'q', 15);
	enqueue($src, $k, 'invalid', 1, 1);
}
ok( $src->poll_query_until('app',
		"SELECT state = 'waiting for extension' FROM taptalk_worker"),
	'src: the worker waits in database postgres');
is( $src->safe_psql('app', q{SELECT string_agg(format('%s %s', state, count), ', ' ORDER BY state)
		FROM (SELECT state, count(*) FROM taptalk_queue GROUP BY state) s}),
	'failed 2, queued 30', 'src: 30 requests queued, 2 failed');
is($mock->count($mark, 'request'), 0, 'src: nothing was sent');

# every column of every row, as text
my $rows_sql = 'SELECT string_agg(q::text, E\'\n\' ORDER BY id) FROM taptalk_queue q';
my $src_rows = $src->safe_psql('app', $rows_sql);
my $max_id = $src->safe_psql('app', 'SELECT max(id) FROM taptalk_queue');

# ------------------------------------------------------- dump, restore
my $dir = PostgreSQL::Test::Utils::tempdir('dump');
$src->command_ok(
	[ 'pg_dump', '--format=custom', '--file' => "$dir/app.dump", '--dbname' => 'app' ],
	'pg_dump -Fc of app');
$src->command_ok([ 'pg_dumpall', '--roles-only', '--file' => "$dir/roles.sql" ],
	'pg_dumpall --roles-only');
$src->stop;

my $dst = TaptalkTest::node('dst', mock => $mock, extension => 0);
my ($out, $err) = ('', '');
$dst->psql('postgres', undef, extra_params => [ '-f', "$dir/roles.sql" ],
	stdout => \$out, stderr => \$err, on_error_stop => 0);
my @errors = grep { /ERROR/ } split /\n/, $err;
ok( @errors == 1 && $errors[0] =~ /role "postgres" already exists/,
	'dst: the roles are created (only postgres existed)')
  or diag($err);
$dst->safe_psql('postgres', 'CREATE DATABASE app');
$dst->command_ok(
	[ 'pg_restore', '--exit-on-error', '--dbname' => 'app', "$dir/app.dump" ],
	'pg_restore into a new cluster');

is($dst->safe_psql('app', $rows_sql), $src_rows,
	'dst: the queue\'s rows came along, identical');

# ------------------------------------------- the new cluster's worker
$mark = $mock->log_mark;
$dst->append_conf('postgresql.conf', "taptalk.database = 'app'");
$dst->restart;
my $log_offset = TaptalkTest::log_offset($dst);
TaptalkTest::queue_drained($dst, 'dst: the restored queue', 'app');

my %sent;
$mock->scan_log($mark,
	sub { $sent{$1}++ if $_[0] =~ /^\{"event":"request".*?(dr-[ab]-[a-z]+-\d+)/ });
is_deeply(
	\%sent,
	{ map { my $k = $_; map { ("dr-$k-q-$_" => 1) } 1 .. 15 } 'a', 'b' },
	'dst: each restored queued request was sent exactly once, the failed ones not at all');
is( $dst->safe_psql('app', q{SELECT string_agg(format('%s %s', state, count), ', ' ORDER BY state)
		FROM (SELECT state, count(*) FROM taptalk_queue
			  WHERE state = 'failed' OR (user_id = 'tt-' || (request->>'xcUserID')
			  AND attempts = 1 AND callback_error IS NULL) GROUP BY state) s}),
	'failed 2, succeeded 30',
	'dst: the 30 succeeded, their callbacks without error; the failed ones stay failed');
is( $dst->safe_psql('app', q{SELECT count(*) FROM (
		SELECT c.request_id FROM cb_calls c JOIN taptalk_queue q ON q.id = c.request_id
		WHERE c.xc LIKE 'dr-_-q-%' AND c.ticket_seen AND c.error_code IS NULL
		  AND c.who = q.enqueued_by::text
		  AND c.who = CASE WHEN c.xc LIKE 'dr-a-%' THEN 'taptalk_app' ELSE 'taptalk_caller' END
		GROUP BY c.request_id HAVING count(*) = 1) s}),
	30, 'dst: each callback ran once, as the role that enqueued its request, with the ticket');
is($dst->safe_psql('app', q{SELECT count(*) FROM cb_calls WHERE xc LIKE 'dr-_-q-%'}),
	30, 'dst: and no callback ran twice');

# the sequence came along: the next id follows the restored ones
my $new_id = enqueue($dst, 'a', 'after', 1);
is($new_id, $max_id + 1, 'dst: a request enqueued after the restore gets the next id');
TaptalkTest::queue_drained($dst, 'dst: the new request', 'app');
is( $dst->safe_psql('app', "SELECT format('%s %s', state, user_id) FROM taptalk_queue WHERE id = $new_id"),
	'succeeded tt-dr-a-after-1', 'dst: and is sent');
is( $dst->safe_psql('app', "SELECT who FROM cb_calls WHERE request_id = $new_id"),
	'taptalk_app', 'dst: its callback ran as its role');
TaptalkTest::no_crash($dst, $log_offset, 'dst');

$dst->stop;
done_testing();
