# t/180_queue_standby.pl: the queue on a streaming standby.
#
# The primary's worker serves database postgres; the queue under test is in
# database app, which only the standby's worker is configured for.  While
# the standby is in recovery its worker does not run and nothing is sent,
# though the requests are there; taptalk_auth_ticket works on it (it writes
# nothing).  After promotion the worker starts and drains the queue.  The
# extension in app was created at 1.0 and updated to 1.1.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $mock    = TaptalkTest::Mock->start;
my $primary = TaptalkTest::node('primary', mock => $mock,
	conf => "wal_level = replica\nmax_wal_senders = 4");
$primary->safe_psql('postgres', 'CREATE DATABASE app');
# installed at 1.0 and updated: the queue of an updated database works
$primary->safe_psql('app',
	"CREATE EXTENSION taptalk VERSION '1.0'; ALTER EXTENSION taptalk UPDATE TO '1.1'");
TaptalkTest::create_helpers($primary, 'app');

$primary->backup('backup');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'backup', has_streaming => 1);
$standby->append_conf('postgresql.conf', "taptalk.database = 'app'");
$standby->start;

my $mark = $mock->log_mark;
$primary->safe_psql('app',
	q{SELECT taptalk_enqueue(req('s-' || i)) FROM generate_series(1, 3) i});
$primary->wait_for_catchup($standby);

is($standby->safe_psql('app', 'SELECT pg_is_in_recovery()'), 't', 'the standby is in recovery');
is($standby->safe_psql('app', "SELECT count(*) FROM taptalk_queue WHERE state = 'queued'"),
	3, 'the queued requests reached the standby');
is( $standby->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'taptalk worker'"),
	0, 'no worker runs on the standby');
is( $standby->safe_psql('app',
		'SELECT format(\'%s %s %s %s\', pid IS NULL, state, queued, in_flight) FROM taptalk_worker'),
	't not running 3 0', 'taptalk_worker on the standby: not running, three queued');
is($standby->safe_psql('app', "SELECT user_id FROM taptalk_auth_ticket(req('s-sync'))"),
	'tt-s-sync', 'taptalk_auth_ticket works on the standby');
# longer than the worker's poll
sleep 6;
is($mock->count($mark, 'request', undef, qr/s-\d/), 0, 'nothing was sent from the queue');

$standby->promote;
ok( $standby->poll_query_until('app',
		"SELECT count(*) = 3 FROM taptalk_queue WHERE state = 'succeeded'"),
	'after promotion the worker drains the queue');
ok( $standby->poll_query_until('app',
		"SELECT pid IS NOT NULL AND state = 'idle' AND succeeded = 3 FROM taptalk_worker"),
	'taptalk_worker after promotion: running, idle, three succeeded');
is($mock->count($mark, 'request', undef, qr/s-\d/), 3, 'each request sent once');

$standby->stop;
$primary->stop;
$mock->stop;
done_testing();
