# t/022_reload_log.pl: what a reload writes to the server log about the
# settings.
#
# The secret set under other spellings of its name: mixed case in
# postgresql.conf, upper case (quoted) with ALTER SYSTEM.  The postmaster
# logs the settings a reload changed ("parameter ... changed to ..."),
# log_statement = all logs the ALTER SYSTEM statement, and every process logs
# at DEBUG2 what it does at a reload: the log never holds the value.  And a base URL with a query is refused at a reload, with the
# reason, the URL in use staying.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use Test::More;
use PostgreSQL::Test::Utils;
use Time::HiRes qw(usleep);

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node('reloadlog', mock => $mock, helpers => 1,
	conf => "log_min_messages = debug2\nlog_statement = all");

# wait_for_key(SECRET, XC): wait until a new session's request carries
# SECRET; returns whether one did
sub wait_for_key
{
	my ($want, $xc) = @_;
	for (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
	{
		my $mark = $mock->log_mark;
		$node->safe_psql('postgres',
			"SELECT error_code FROM taptalk_auth_ticket(req('$xc'))");
		return 1 if grep { $_ eq $want } $mock->server_key_secrets($mark);
		usleep(100_000);
	}
	return 0;
}

my $log = TaptalkTest::log_offset($node);
my @secrets;

# mixed case in postgresql.conf
my $mixed = sprintf('mixed-%d-%d', rand(1e9), rand(1e9));
push @secrets, $mixed;
my $conf = $node->data_dir . '/postgresql.conf';
my $text = slurp_file($conf);
$text =~ s/^taptalk\.server_key_secret\s*=.*\n//m
  or die 'no taptalk.server_key_secret in postgresql.conf';
open(my $fh, '>', $conf) or die "could not write $conf: $!";
print $fh $text, "TapTalk.Server_Key_Secret = '$mixed'\n";
close($fh) or die "could not write $conf: $!";
$node->reload;
ok(wait_for_key($mixed, 'log-mixed'),
	'TapTalk.Server_Key_Secret in postgresql.conf took effect');
ok( TaptalkTest::wait_log($node, $log,
		qr/LOG:  parameter "TapTalk\.Server_Key_Secret" changed to "\*\*\*\*\*\*\*\*"/
	),
	'the postmaster logged the change, masked');

# upper case, quoted, with ALTER SYSTEM
my $upper = sprintf('upper-%d-%d', rand(1e9), rand(1e9));
push @secrets, $upper;
$node->safe_psql('postgres',
	qq{ALTER SYSTEM SET "TAPTALK.SERVER_KEY_SECRET" = '$upper'; SELECT pg_reload_conf()});
ok(wait_for_key($upper, 'log-upper'),
	'ALTER SYSTEM SET "TAPTALK.SERVER_KEY_SECRET" took effect');
ok(TaptalkTest::wait_log($node, $log, qr/statement: \(a statement naming taptalk\.server_key_secret, not logged\)/),
	'log_statement logged that a statement named the setting, not the statement');

# a statement that fails while naming it: no STATEMENT line with its text
my $failed = sprintf('failed-%d-%d', rand(1e9), rand(1e9));
push @secrets, $failed;
my ($out, $err) = TaptalkTest::psql_out_err($node,
	"SELECT set_config('taptalk.server_key_secret', '$failed', false) FROM nowhere");
like($err, qr/relation "nowhere" does not exist/, 'a failing statement naming the setting');

my $server_log = slurp_file($node->logfile, $log);
for my $s (@secrets)
{
	is(index($server_log, $s), -1, "the server log does not hold \"$s\"");
}
unlike($server_log, qr/^STATEMENT:.*server_key_secret/mi,
	'no STATEMENT line shows a statement naming the setting');

# a base URL with a query: refused at a reload, the URL in use stays
$log = TaptalkTest::log_offset($node);
$node->append_conf('postgresql.conf',
	"taptalk.base_url = '" . $mock->base_url . "/?token=x'");
$node->reload;
ok( TaptalkTest::wait_log($node, $log,
		qr/invalid value for parameter "taptalk\.base_url": ".*\/\?token=x"\n.*DETAIL:  The URL contains a query/
	),
	'a base URL with a query is refused at a reload, with the reason');
is($node->safe_psql('postgres', 'SHOW taptalk.base_url'),
	$mock->base_url, 'the base URL in use stays');

$node->stop;
$mock->stop;
done_testing();
