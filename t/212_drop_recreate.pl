# t/212_drop_recreate.pl: DROP EXTENSION taptalk with requests queued and
# the worker sending, then CREATE EXTENSION taptalk again.
#
# - The requests in flight at the DROP are not recorded (their queue is
#   gone; the worker says so in the log); the queued ones are never sent.
# - The worker finds the new queue by itself and sends what is enqueued
#   there, with fresh ids.
# - The server log holds no ERROR from the worker, and no crash.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node('recreate', mock => $mock, helpers => 1,
	conf => 'taptalk.worker_concurrency = 4');
my $offset = TaptalkTest::log_offset($node);

sub q1 { return $node->safe_psql('postgres', $_[0]); }

my $mark = $mock->log_mark;
# four in flight for 3 s each, 96 waiting behind them
q1("SELECT taptalk_enqueue(req('fault-slow-3000') || jsonb_build_object('email', 'old-' || i || '\@example.com'))"
	  . " FROM generate_series(1, 100) i");
ok( $node->poll_query_until('postgres',
		"SELECT in_flight = 4 FROM taptalk_worker"),
	'the worker is sending the old queue');
q1('DROP EXTENSION taptalk');
my $dropped_mark = $mock->log_mark;
q1('CREATE EXTENSION taptalk');
ok( $node->poll_query_until('postgres',
		"SELECT state IN ('idle', 'sending') AND pid IS NOT NULL FROM taptalk_worker"),
	'the worker runs on after the new CREATE EXTENSION');
q1("SELECT taptalk_enqueue(req('new-' || i)) FROM generate_series(1, 10) i");
TaptalkTest::queue_drained($node, 'the new queue');
is( q1(q{SELECT string_agg(DISTINCT state, ',') || ' ' || min(id) || ' ' || count(*)
		FROM taptalk_queue}),
	'succeeded 1 10', 'the new queue\'s requests were sent, with fresh ids');
my $old_after = 0;
$mock->scan_log($dropped_mark, sub { $old_after++ if $_[0] =~ /"event":"request".*old-/ });
is($old_after, 0, 'no request of the old queue was sent after the DROP');
cmp_ok($mock->count($mark, 'request', undef, qr/old-/), '<=', 4,
	'only those in flight at the DROP ever were');
my $log = slurp_file($node->logfile, $offset);
unlike($log, qr/ERROR|terminated by signal|exited with exit code/,
	'no error and no crash in the server log');
like($log, qr/the outcomes of \d+ requests are not recorded: the queue table is gone|taptalk worker: extension "taptalk" is not installed/,
	'the worker said what became of the old queue');

done_testing();
