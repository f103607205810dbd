# t/021_key_file.pl: monitoring roles never read the server key, and the key
# file (taptalk.server_key_file) is checked, read at start and at reload, and
# used by every path.
#
# First with the secret in postgresql.conf (taptalk.server_key_secret), then
# as the README recommends (the secret in a key file): a member of
# pg_monitor (which includes pg_read_all_settings) and a member of
# pg_read_all_stats read taptalk_stats and taptalk_worker, and no route
# (SHOW, current_setting, set_config, pg_settings, SHOW ALL, pg_file_settings)
# gives either of them the secret.  Then the key file: a file with the wrong
# mode (or owner, where the machine has a file of another user to try) is
# refused by ALTER SYSTEM, at a reload (the key in use stays) and at start
# (the server does not start); a reload picks up a new key, and functions and
# the queue's worker send it (the mock logs each request's Server-Key).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use Test::More;
use File::Find ();
use PostgreSQL::Test::Utils;
use Time::HiRes qw(usleep);

my $secret = $TaptalkTest::KEY_SECRET;
my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node('keyfile', mock => $mock, helpers => 1);
my $dir = PostgreSQL::Test::Utils::tempdir;
my $key_file = "$dir/taptalk.key";

$node->safe_psql(
	'postgres', q{
CREATE ROLE agent_monitor LOGIN IN ROLE pg_monitor;
CREATE ROLE agent_stats LOGIN IN ROLE pg_read_all_stats;});

# as_role(ROLE, SQL): SQL's standard output and error, run as ROLE
sub as_role
{
	my ($role, $sql) = @_;
	return TaptalkTest::psql_out_err($node, $sql,
		extra_params => [ '-U', $role ]);
}

# every route to the secret a monitoring role might try
my $routes = q{
SHOW taptalk.server_key_secret;
SELECT current_setting('taptalk.server_key_secret');
SELECT current_setting('taptalk.server_key_secret', true);
SELECT set_config('taptalk.server_key_secret', 'x', true);
SELECT name, setting, reset_val, boot_val FROM pg_settings WHERE name LIKE 'taptalk.%';
SHOW ALL;
SELECT * FROM pg_file_settings;
};

# monitoring(WHAT, MONITOR_SHOWS): both monitoring roles read the views and
# get the secret by no route; the pg_monitor member's SHOW gives
# MONITOR_SHOWS
sub monitoring
{
	my ($what, $monitor_shows) = @_;
	for my $role ('agent_monitor', 'agent_stats')
	{
		my ($out, $err) = as_role($role,
			'SELECT count(*) FROM taptalk_stats; SELECT count(*) FROM taptalk_worker');
		is("$out|$err", "3\n1|", "$what: $role reads taptalk_stats and taptalk_worker");
		($out, $err) = as_role($role, $routes);
		is(index("$out\n$err", $secret), -1,
			"$what: $role gets the secret by no route");
	}
	my ($out, $err) = as_role('agent_monitor',
		"SHOW taptalk.server_key_secret; SELECT current_setting('taptalk.server_key_secret')");
	is("$out|$err", "$monitor_shows\n$monitor_shows|",
		"$what: the pg_monitor member sees \"$monitor_shows\"");
	(undef, $err) = as_role('agent_stats', 'SHOW taptalk.server_key_secret');
	like($err, qr/to examine "taptalk\.server_key_secret"/,
		"$what: the pg_read_all_stats member may not look at the setting");
	return;
}

# request(XC): the user_id (or the error code) of a request for XC, and the
# secrets of the Server-Key headers the mock received for it
sub request
{
	my ($xc) = @_;
	my $mark = $mock->log_mark;
	my $got = $node->safe_psql('postgres',
		"SELECT coalesce(user_id, error_code) FROM taptalk_auth_ticket(req('$xc'))");
	return ($got, join(',', $mock->server_key_secrets($mark)));
}

# wait_for_key(SECRET, XC): reload, then wait until a new session's request
# carries SECRET; returns whether one did
sub wait_for_key
{
	my ($want, $xc) = @_;
	$node->reload;
	for (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
	{
		my (undef, $sent) = request($xc);
		return 1 if $sent eq $want;
		usleep(100_000);
	}
	return 0;
}

# set_conf(NAME, VALUE): NAME = VALUE in postgresql.conf, every other line
# for NAME removed; VALUE undef: removed
sub set_conf
{
	my ($name, $value) = @_;
	my $conf = $node->data_dir . '/postgresql.conf';
	my $text = slurp_file($conf);
	$text =~ s/^\Q$name\E\s*=.*\n//mg;
	$text .= "$name = '$value'\n" if defined $value;
	open(my $fh, '>', $conf) or die "could not write $conf: $!";
	print $fh $text;
	close($fh) or die "could not write $conf: $!";
	return;
}

# 1. the secret in postgresql.conf: shown masked, even to pg_monitor
monitoring('secret in postgresql.conf', '********');
is_deeply([ request('kf-setting') ], [ 'tt-kf-setting', $secret ],
	'secret in postgresql.conf: the request carries it');

# 2. the key file instead, read at start
TaptalkTest::write_key_file($key_file);
set_conf('taptalk.server_key_secret', undef);
set_conf('taptalk.server_key_file', $key_file);
$node->restart;
is_deeply([ request('kf-start') ], [ 'tt-kf-start', $secret ],
	'key file: read at start, the request carries its secret');
is( $node->safe_psql(
		'postgres',
		"SET taptalk.server_key_secret = 'not-the-secret'; SELECT user_id FROM taptalk_auth_ticket(req('kf-both'))"
	),
	'tt-kf-both',
	'key file: it wins over taptalk.server_key_secret');
monitoring('key file', '');
my ($out, $err) = as_role('agent_monitor', 'SHOW taptalk.server_key_file');
is("$out|$err", "$key_file|", 'key file: the pg_monitor member sees its path');

# 3. a file that cannot be used is refused by ALTER SYSTEM, with the reason
my %bad = (
	'0640' => 'has group or world access',
	'0604' => 'has group or world access',
	'0660' => 'has group or world access',
	'0200' => 'Could not open file',
);
for my $mode (sort keys %bad)
{
	my $path = "$dir/mode-$mode.key";
	TaptalkTest::write_key_file($path, 'mode-secret', oct($mode));
	(undef, $err) = TaptalkTest::psql_out_err($node,
		"ALTER SYSTEM SET taptalk.server_key_file = '$path'");
	like($err,
		qr/^ERROR:  invalid value for parameter "taptalk\.server_key_file": "\Q$path\E"\nDETAIL:  .*\Q$bad{$mode}\E/,
		"ALTER SYSTEM refuses a key file of mode $mode");
}
# owned by root: 0644 is too open (0640 would do, if the server could read it)
(undef, $err) = TaptalkTest::psql_out_err($node,
	"ALTER SYSTEM SET taptalk.server_key_file = '/etc/passwd'");
like($err, qr/DETAIL:  File "\/etc\/passwd" has group or world access\./,
	'ALTER SYSTEM refuses a root-owned key file readable by all');

# owned by another user: only where the machine has such a file to read
my $foreign;
File::Find::find(
	{
		wanted => sub {
			return if $foreign;
			my @st = lstat($_);
			$foreign = $File::Find::name
			  if -f _ && -r _ && $st[4] != $> && $st[4] != 0;
		},
		preprocess => sub {
			return () if $foreign;
			# only the directories this user may list
			return grep {
				my $p = "$File::Find::dir/$_";
				!-d $p || (-r _ && -x _)
			} @_;
		},
		no_chdir => 1,
	},
	grep { -d } '/var/cache', '/var/lib', '/var/log', '/var/spool', '/etc');
SKIP:
{
	skip 'no readable file of another user on this machine', 1
	  unless $foreign;
	(undef, $err) = TaptalkTest::psql_out_err($node,
		"ALTER SYSTEM SET taptalk.server_key_file = '$foreign'");
	like($err,
		qr/DETAIL:  File "\Q$foreign\E" must be owned by the database user or root\./,
		'ALTER SYSTEM refuses a key file owned by another user');
}

# contents: the secret on one line, nothing else
for my $case (
	[ 'empty', '', 'is empty' ],
	[ 'two lines', "a\nb", 'must hold the secret on one line' ],
	[ 'too large', 'x' x 1025, 'is larger than 1024 bytes' ])
{
	my ($name, $content, $why) = @$case;
	my $path = "$dir/content.key";
	TaptalkTest::write_key_file($path, $content);
	(undef, $err) = TaptalkTest::psql_out_err($node,
		"ALTER SYSTEM SET taptalk.server_key_file = '$path'");
	like($err, qr/DETAIL:  .*\Q$why\E/,
		"ALTER SYSTEM refuses a key file that is $name");
}
for my $path ('/dev/null', $dir, "$dir/no-such.key")
{
	(undef, $err) = TaptalkTest::psql_out_err($node,
		"ALTER SYSTEM SET taptalk.server_key_file = '$path'");
	like($err, qr/DETAIL:  (File ".*" is not a regular file|Could not open file)/,
		"ALTER SYSTEM refuses \"$path\"");
}
is( $node->safe_psql(
		'postgres',
		"SELECT count(*) FROM pg_file_settings WHERE sourcefile LIKE '%auto.conf'"),
	'0',
	'nothing refused was written to postgresql.auto.conf');

# 4. at a reload: the file's mode gone wrong, with a new secret in it; the
# reload is refused, and the key in use stays
my $log = TaptalkTest::log_offset($node);
TaptalkTest::write_key_file($key_file, 'wrong-mode-secret', 0640);
$node->reload;
ok(TaptalkTest::wait_log($node, $log, qr/has group or world access/),
	'reload: the key file of mode 0640 is refused, in the log');
is_deeply([ request('kf-kept') ], [ 'tt-kf-kept', $secret ],
	'reload: the key in use stays');

# 5. at start: the server does not start
$node->stop;
$log = TaptalkTest::log_offset($node);
ok(!$node->start(fail_ok => 1), 'start: refused with a key file of mode 0640');
like(
	slurp_file($node->logfile, $log),
	qr/FATAL:  could not load the server key from "\Q$key_file\E"\n.*DETAIL:  File "\Q$key_file\E" has group or world access\./,
	'start: the log says why');
TaptalkTest::write_key_file($key_file);
$node->start;

# 6. a reload picks up a new key: functions and the worker send it
my $rotated = sprintf('rotated-%d-%d', rand(1e9), rand(1e9));
TaptalkTest::write_key_file($key_file, $rotated);
ok(wait_for_key($rotated, 'kf-rotated'), 'a reload picks up the new key');
is_deeply([ request('kf-rotated') ], [ '40101', $rotated ],
	'the function sends the new key (the mock knows only the old one: 40101)');
my $mark = $mock->log_mark;
$node->safe_psql('postgres', "SELECT taptalk_enqueue(req('kf-queue'))");
ok( $node->poll_query_until(
		'postgres',
		"SELECT state FROM taptalk_requests WHERE request->>'xcUserID' = 'kf-queue'",
		'failed'),
	'the worker sent the queued request');
is(join(',', $mock->server_key_secrets($mark)),
	$rotated, 'the worker sent the new key too');
TaptalkTest::write_key_file($key_file);
ok(wait_for_key($secret, 'kf-back'), 'a reload brings the key back');
is_deeply([ request('kf-back') ], [ 'tt-kf-back', $secret ],
	'the function works with it');

my $server_log = slurp_file($node->logfile);
is(index($server_log, $secret), -1, 'the secret is not in the server log');
is(index($server_log, $rotated), -1, 'nor the rotated one');

$node->stop;
$mock->stop;
done_testing();
