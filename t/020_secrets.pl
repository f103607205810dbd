# t/020_secrets.pl: the server key never shows up where it should not.
#
# For a part of the run the server logs everything it can (log_min_messages
# and client_min_messages = debug5, log_statement = all, verbose errors,
# connections); success, validation, API error, HTTP error, invalid response,
# timeout, cancel, connection and TLS failures run, as a superuser and as a
# non-superuser, and the non-superuser tries every route to read the secret.
# Then the server log, every result row and every error and notice text are
# scanned for the secret and for base64 forms of it: zero occurrences.  The
# secret itself is never written in SQL here: it comes from postgresql.conf.
# A positive control runs the same scan over the mock's log, which must find
# the Server-Key header there.  Last, the key is rotated as the README says
# (postgresql.conf, reload): the log gets neither the new secret nor the old.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use Test::More;
use MIME::Base64 qw(encode_base64);
use PostgreSQL::Test::Utils;
use Time::HiRes qw(usleep);

my $mock = TaptalkTest::Mock->start(tls => 1);
my $node = TaptalkTest::node('secrets', mock => $mock, helpers => 1);
my $secret = $TaptalkTest::KEY_SECRET;
my $tls_dir = $mock->tls_dir;
my $tls_port = $mock->tls_port;

# wait_setting(NAME, VALUE): wait until a new session sees NAME = VALUE
sub wait_setting
{
	my ($name, $value) = @_;
	ok($node->poll_query_until('postgres', "SHOW $name", $value),
		"the server took $name = $value");
	return;
}

# scan(TEXT...): how often the secret or a base64 form of it occurs
sub scan
{
	my %pats = ($secret => 1);
	for my $key_id ($TaptalkTest::KEY_ID, 'wrong-key-id')
	{
		$pats{ encode_base64("$key_id:$secret", '') } = 1;
	}
	# the secret's base64 at each of the three alignments, without the quads
	# that also hold bytes around it: found in any base64 text that has it
	for my $pad (0 .. 2)
	{
		my $enc = encode_base64(("\0" x $pad) . $secret . "\0\0\0", '');
		my $start = $pad ? 4 : 0;
		$pats{ substr($enc, $start, length($enc) - $start - 8) } = 1;
	}
	my $n = 0;
	for my $text (@_)
	{
		for my $p (keys %pats)
		{
			$n += () = $text =~ /\Q$p\E/g;
		}
	}
	return $n;
}

my $log_mark = TaptalkTest::log_offset($node);
my $mock_mark = $mock->log_mark;

# everything on, from the configuration (ALTER SYSTEM + reload)
$node->safe_psql(
	'postgres', q{
ALTER SYSTEM SET log_min_messages = debug5;
ALTER SYSTEM SET log_min_error_statement = debug5;
ALTER SYSTEM SET log_statement = 'all';
ALTER SYSTEM SET log_error_verbosity = verbose;
ALTER SYSTEM SET log_connections = on;
ALTER SYSTEM SET log_disconnections = on;
SELECT pg_reload_conf();});
wait_setting('log_min_messages', 'debug5');
wait_setting('log_statement', 'all');

# a superuser session: every kind of outcome, with every message shown
my ($out1, $err1) = TaptalkTest::psql_out_err(
	$node, qq{
\\set VERBOSITY verbose
\\set SHOW_CONTEXT always
SET client_min_messages = debug5;
SET taptalk.timeout = 1000;
SELECT * FROM taptalk_auth_ticket(req('sec-ok'));
SELECT * FROM taptalk_auth_tickets(ARRAY[req('sec-b1'), req('fault-status-503'), '[1]',
	req('fault-envelope-field'), req('sec-b5') - 'fullName']);
SELECT * FROM taptalk_auth_ticket(req('sec-v') - 'fullName');
SELECT * FROM taptalk_auth_ticket(req('sec-v') || '{"secret": "x"}');
SELECT * FROM taptalk_auth_ticket('[1]');
SELECT * FROM taptalk_auth_ticket(req('fault-envelope-field'));
SELECT * FROM taptalk_auth_ticket(req('fault-envelope500'));
SELECT * FROM taptalk_auth_ticket(req('fault-html500'));
SELECT * FROM taptalk_auth_ticket(req('fault-status-503'));
SELECT * FROM taptalk_auth_ticket(req('fault-badjson'));
SELECT * FROM taptalk_auth_ticket(req('fault-nul'));
SELECT * FROM taptalk_auth_ticket(req('fault-badutf8'));
SELECT * FROM taptalk_auth_ticket(req('fault-deep-10000'));
SELECT * FROM taptalk_auth_ticket(req('fault-huge-3'));
SELECT * FROM taptalk_auth_ticket(req('fault-endless-headers'));
SELECT * FROM taptalk_auth_ticket(req('fault-reset'));
SELECT * FROM taptalk_auth_ticket(req('fault-close'));
SELECT * FROM taptalk_auth_ticket(req('fault-slow-3000'));
SELECT * FROM taptalk_auth_ticket(req('fault-redirect-302'));
SET statement_timeout = 200;
SELECT * FROM taptalk_auth_ticket(req('fault-slow-3000'));
RESET statement_timeout;
-- a key id the server does not know: 40101, with a key built from the secret
SET taptalk.server_key_id = 'wrong-key-id';
SELECT * FROM taptalk_auth_ticket(req('sec-wrong-id'));
RESET taptalk.server_key_id;
SET taptalk.server_key_id = '';
SELECT * FROM taptalk_auth_ticket(req('sec-no-id'));
RESET taptalk.server_key_id;
SET taptalk.base_url = 'http://127.0.0.1:1';
SELECT * FROM taptalk_auth_ticket(req('sec-refused'));
SET taptalk.base_url = 'http://no-such-host.invalid';
SELECT * FROM taptalk_auth_ticket(req('sec-dns'));
SET taptalk.base_url = 'https://127.0.0.1:$tls_port';
SELECT * FROM taptalk_auth_ticket(req('sec-tls-unverified'));
SET taptalk.ca_file = '$tls_dir/ca.pem';
SELECT * FROM taptalk_auth_ticket(req('sec-tls-ok'));
SET taptalk.base_url = 'ftp://127.0.0.1/';
RESET ALL;
SELECT * FROM taptalk_auth_ticket(req('sec-after'));},
	extra_params => ['-a']);

# a non-superuser that may call the function: every route to the secret
my ($out2, $err2) = TaptalkTest::psql_out_err(
	$node, q{
\set VERBOSITY verbose
SET client_min_messages = debug5;
SELECT * FROM taptalk_auth_ticket(req('sec-caller'));
SELECT * FROM taptalk_auth_ticket(req('fault-envelope-field'));
SHOW taptalk.server_key_secret;
SELECT current_setting('taptalk.server_key_secret');
SELECT current_setting('taptalk.server_key_secret', true);
SHOW ALL;
SELECT name, setting, reset_val, boot_val FROM pg_settings WHERE name LIKE 'taptalk.%';
SELECT * FROM pg_file_settings;
SELECT * FROM pg_show_all_file_settings();
SELECT pg_read_file('postgresql.conf');
SELECT pg_read_file('postgresql.auto.conf');
SELECT * FROM pg_db_role_setting;
SELECT set_config('taptalk.server_key_secret', 'x', false);
RESET taptalk.server_key_secret;},
	extra_params => [ '-a', '-U', 'taptalk_caller' ]);
my $client = join("\n", $out1, $err1, $out2, $err2);

# back to the usual logging (PostgreSQL::Test::Cluster's: log_statement = all)
$node->safe_psql(
	'postgres', q{
ALTER SYSTEM RESET log_min_messages;
ALTER SYSTEM RESET log_min_error_statement;
ALTER SYSTEM RESET log_statement;
ALTER SYSTEM RESET log_error_verbosity;
ALTER SYSTEM RESET log_connections;
ALTER SYSTEM RESET log_disconnections;
SELECT pg_reload_conf();});
wait_setting('log_min_messages', 'warning');
# (PostgreSQL 18 shows log_connections reset as '', before that as 'off')
ok($node->poll_query_until('postgres',
		"SELECT current_setting('log_connections') IN ('off', '')"),
	'the server took log_connections reset');
my $server_log = slurp_file($node->logfile, $log_mark);

# the part ran as intended, so the scan means something
my $logged = () = $server_log =~ /statement: SELECT \* FROM taptalk_auth_ticket/g;
cmp_ok($logged, '>=', 29,
	'the statements were logged (log_statement = all)');
my $debug = () = $server_log =~ /DEBUG:/g;
cmp_ok($debug, '>=', 100,
	'debug messages were logged (log_min_messages = debug5)');
note 'verbose logging was in effect ('
  . (() = $server_log =~ /\n/g)
  . " server log lines, $debug at DEBUG)";
for my $want (
	'tt-sec-ok', '40101',
	'CONNECTION_FAILED', 'TIMEOUT',
	'INVALID_RESPONSE', 'HTTP_ERROR',
	'canceling statement due to statement timeout', 'tt-sec-tls-ok',
	'tt-sec-after', 'to examine "taptalk.server_key_secret"',
	'tt-sec-caller')
{
	ok(index($client, $want) >= 0, "the client output has \"$want\"");
}

# the non-superuser got the secret by no route (its rows are in the scan below)
my ($got) = TaptalkTest::psql_out_err($node,
	"SELECT count(*) FROM pg_settings WHERE name = 'taptalk.server_key_secret'",
	extra_params => [ '-U', 'taptalk_caller' ]);
is($got, '0', 'a non-superuser does not see the secret in pg_settings');

# positive control: the scan finds the key where it legitimately is
my $found = scan(slurp_file($mock->log_file, $mock_mark));
cmp_ok($found, '>', 0,
	"control: the scan finds the Server-Key in the mock's log ($found times)");

is(scan($server_log), 0,
	'the secret (plain or base64) is not in the server log');
is(scan($client), 0,
	'the secret (plain or base64) is not in any result row, error or notice');

# Rotating the key as the README says (edit postgresql.conf, reload): the
# server log must get neither the new secret nor the old one when it comes
# back.  PostgreSQL logs 'parameter "..." changed to "..."' for every changed
# setting; the extension's log hook masks the secret in those lines.
$log_mark = TaptalkTest::log_offset($node);
my $rotated = sprintf('rotated-%d-%d-secret', rand(1e9), rand(1e9));

# reload_secret(VALUE, XC): VALUE in postgresql.conf, reload, and wait until
# a new session's request (xcUserID XC) carries it in its Server-Key header
# (SHOW shows the secret masked, so the mock's log is where to look); returns
# whether one did
sub reload_secret
{
	my ($value, $xc) = @_;
	$node->adjust_conf('postgresql.conf', 'taptalk.server_key_secret',
		"'$value'");
	$node->reload;
	for (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
	{
		my $mark = $mock->log_mark;
		$node->safe_psql('postgres',
			"SELECT error_code FROM taptalk_auth_ticket(req('$xc'))");
		return 1 if grep { $_ eq $value } $mock->server_key_secrets($mark);
		usleep(100_000);
	}
	return 0;
}

ok(reload_secret($rotated, 'sec-rotated'),
	'after the rotation the server uses the new secret');
ok(reload_secret($secret, 'sec-restored'), 'the original secret is back');
is( $node->safe_psql(
		'postgres', "SELECT user_id FROM taptalk_auth_ticket(req('sec-restored'))"),
	'tt-sec-restored',
	'the original secret works');
my $rotation_log = slurp_file($node->logfile, $log_mark);
my $masked = () = $rotation_log =~
  /parameter "taptalk\.server_key_secret" changed to "\*\*\*\*\*\*\*\*"/g;
is($masked, 2, 'the reloads logged the change, masked');
my $leaked = () = $rotation_log =~ /\Q$rotated\E|\Q$secret\E/g;
is($leaked, 0, 'a key rotated by reload is not written to the server log');

$node->stop;
$mock->stop;
done_testing();
