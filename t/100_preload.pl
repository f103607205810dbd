# t/100_preload.pl: without shared_preload_libraries the secret is a
# placeholder anyone can read, so the functions must refuse to run; with it
# again, a non-superuser cannot read the secret and the function works.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use Test::More;

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node('preload', mock => $mock, helpers => 1);

$node->adjust_conf('postgresql.conf', 'shared_preload_libraries', "''");
$node->restart;

# before the library is loaded, the value is a placeholder: readable by anyone
my ($out, $err) = TaptalkTest::psql_out_err($node,
	"SELECT current_setting('taptalk.server_key_secret', true) IS NOT NULL",
	extra_params => [ '-U', 'taptalk_app' ]);
is($out, 't',
	'without preload, a placeholder secret is visible (why preload is required)');

# the functions refuse, with a hint saying what to do
($out, $err) =
  TaptalkTest::psql_out_err($node, "SELECT taptalk_auth_ticket(req('p'))");
is( $err,
	'ERROR:  taptalk must be loaded via "shared_preload_libraries"
DETAIL:  The server key settings are protected only when the library is loaded at server start.
HINT:  Add taptalk to "shared_preload_libraries" in postgresql.conf and restart the server.',
	'without preload, the function refuses');
($out, $err) = TaptalkTest::psql_out_err($node,
	"SELECT * FROM taptalk_auth_tickets(ARRAY[req('p')])");
is( (split /\n/, $err)[0],
	'ERROR:  taptalk must be loaded via "shared_preload_libraries"',
	'without preload, the batch function refuses');
($out, $err) = TaptalkTest::psql_out_err($node, 'SELECT * FROM taptalk_worker');
is( $err,
	'ERROR:  taptalk must be loaded via "shared_preload_libraries"
DETAIL:  The background worker runs only when the library is loaded at server start.
HINT:  Add taptalk to "shared_preload_libraries" in postgresql.conf and restart the server.',
	'without preload, taptalk_worker says why it has nothing to show');

$node->adjust_conf('postgresql.conf', 'shared_preload_libraries',
	"'taptalk'");
$node->restart;

# preloaded again: a fresh non-superuser session cannot read it
($out, $err) = TaptalkTest::psql_out_err($node,
	'SHOW taptalk.server_key_secret',
	extra_params => [ '-U', 'taptalk_app' ]);
# (PostgreSQL 18 words the message differently: match what both say)
like( $err,
	qr/^ERROR:  .* to examine "taptalk\.server_key_secret"/,
	'with preload, a fresh non-superuser session cannot read the secret');
is( $node->safe_psql(
		'postgres', "SELECT user_id FROM taptalk_auth_ticket(req('p'))"),
	'tt-p',
	'with preload, the function works');

$node->stop;
$mock->stop;
done_testing();
