# t/030_protocols.pl: a base URL with another scheme in the places SQL
# cannot reach (sql/protocols.sql has SET, set_config, ALTER SYSTEM, ALTER
# DATABASE and ALTER ROLE).  In postgresql.conf on reload: refused, the old
# URL stays in force; at server start: refused, the setting stays empty and
# the functions raise before any I/O; in connection options: the connection
# is refused.  The mock receives nothing from any of it.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use Test::More;
use PostgreSQL::Test::Utils;
use Time::HiRes qw(usleep);

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node('protocols', mock => $mock, helpers => 1);
my $port = $mock->port;
my $good_url = $mock->base_url;

sub conf_url
{
	$node->adjust_conf('postgresql.conf', 'taptalk.base_url', "'$_[0]'");
	return;
}

sub call
{
	return TaptalkTest::psql_out_err($node, $_[0]);
}

# on reload
my $log_mark = TaptalkTest::log_offset($node);
conf_url('file:///etc/passwd');
$node->reload;
my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
usleep(100_000)
  until $node->log_contains('taptalk\.base_url', $log_mark)
  || time > $deadline;
ok( $node->log_contains(
		'invalid value for parameter "taptalk\.base_url": "file:///etc/passwd"',
		$log_mark),
	'a file:// URL in postgresql.conf is refused on reload');
is($node->safe_psql('postgres', 'SHOW taptalk.base_url'),
	$good_url, "file:// on reload: the URL in force is still the mock's");
is( $node->safe_psql(
		'postgres', "SELECT user_id FROM taptalk_auth_ticket(req('proto-reload'))"),
	'tt-proto-reload',
	'file:// on reload: calls still go to the mock');

# at server start
conf_url("gopher://127.0.0.1:$port/");
$node->restart;
my $mock_mark = $mock->log_mark;
is($node->safe_psql('postgres', 'SHOW taptalk.base_url'),
	'', 'a gopher:// URL in postgresql.conf at start leaves the setting empty');
my (undef, $err) = call("SELECT taptalk_auth_ticket(req('proto-start'))");
is( $err,
	'ERROR:  parameter "taptalk.base_url" is not set
HINT:  Set "taptalk.base_url" in postgresql.conf or with ALTER SYSTEM, for example to https://taptalk.io.',
	'gopher:// at start: the function raises');
(undef, $err) =
  call("SELECT count(*) FROM taptalk_auth_tickets(ARRAY[req('proto-start')])");
is( (split /\n/, $err)[0],
	'ERROR:  parameter "taptalk.base_url" is not set',
	'gopher:// at start: the batch function raises');

# in connection options (a superuser's, since others may not set it at all)
{
	local $ENV{PGOPTIONS} = "-c taptalk.base_url=ftp://127.0.0.1:$port/";
	(undef, $err) = call('SELECT 1');
	like(
		$err,
		qr/invalid value for parameter "taptalk\.base_url"/,
		'an ftp:// URL in the connection options refuses the connection');
}
is($mock->count($mock_mark, 'connection', $port),
	0, 'none of it reached the mock');

conf_url($good_url);
$node->restart;
is( $node->safe_psql(
		'postgres', "SELECT user_id FROM taptalk_auth_ticket(req('proto-back'))"),
	'tt-proto-back',
	'with the URL back, calls succeed');

$node->stop;
$mock->stop;
done_testing();
