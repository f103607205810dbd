# t/230_proxy.pl: requests through taptalk.proxy, against real proxies from
# Debian's packages on 127.0.0.1 only: tinyproxy (HTTP proxy, CONNECT,
# BasicAuth) and microsocks (SOCKS5 with a password).  Plain HTTP is
# forwarded (tinyproxy adds a Via header the mock logs); HTTPS goes through
# CONNECT with TapTalk's certificate verified end to end (a wrong CA still
# fails; the proxy adds nothing); proxy authentication works with a
# percent-encoded password, which appears masked in SHOW, nowhere in
# pg_settings and nowhere in the server log; a refusing proxy (407) and a
# proxy that is down are CONNECTION_FAILED naming the proxy, the latter
# retried per taptalk.max_retries; changing the setting never reuses a
# connection made through the old proxy; the queue's worker uses the
# setting of postgresql.conf after a reload; with the setting empty the
# server's proxy environment variables are ignored, and with it set NO_PROXY
# does not bypass it.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw(usleep);

for my $prog (qw(tinyproxy microsocks))
{
	# not skipped: a machine without it must not pass for one that tested
	BAIL_OUT("$prog is not installed (scripts/test installs it: scripts/lib.sh install_proxies)")
	  unless grep { -x "$_/$prog" } split /:/, "$ENV{PATH}:/usr/sbin:/usr/bin";
}

my $PROXY_USER = 'tt-user';
my $PROXY_PASSWORD = 'pw-Secr3t.x_9';
# the same password, percent-encoded in part, as a URL may write it
my $PROXY_PASSWORD_URL = 'pw%2DSecr3t%2Ex_9';

my @daemons;

# start_daemon(NAME, PORT, COMMAND...): a proxy in the foreground, its
# output in NAME.out; returns once PORT accepts connections.
sub start_daemon
{
	my ($name, $port, @cmd) = @_;
	my $dir = $PostgreSQL::Test::Utils::tmp_check;
	my $out = "$dir/$name.out";
	my $pid = fork;
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		open(STDIN, '<', '/dev/null') or POSIX::_exit(127);
		open(STDOUT, '>', $out) or POSIX::_exit(127);
		open(STDERR, '>&', \*STDOUT) or POSIX::_exit(127);
		exec(@cmd) or POSIX::_exit(127);
	}
	push @daemons, $pid;
	for (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
	{
		my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port");
		if ($s)
		{
			close $s;
			note "$name (pid $pid) listens on 127.0.0.1:$port";
			return $pid;
		}
		die "$name exited at start:\n" . slurp_file($out)
		  if waitpid($pid, POSIX::WNOHANG()) == $pid;
		usleep(100_000);
	}
	die "$name did not start:\n" . slurp_file($out);
}

sub stop_daemons
{
	for my $pid (@daemons)
	{
		kill 'TERM', $pid;
		waitpid($pid, 0);
	}
	@daemons = ();
}

END { local $?; stop_daemons(); }

# tinyproxy(NAME, CONNECT_PORT [, auth => 1]): a tinyproxy on a free port
# that allows 127.0.0.1 and CONNECT to CONNECT_PORT only, with the test
# credentials when auth is set.  Returns (port, log file).
sub tinyproxy
{
	my ($name, $connect_port, %opts) = @_;
	my $dir  = $PostgreSQL::Test::Utils::tmp_check;
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	my $log  = "$dir/$name.log";
	append_to_file("$dir/$name.conf", join("\n",
		"Port $port",
		'Listen 127.0.0.1',
		'Timeout 30',
		"LogFile \"$log\"",
		'LogLevel Connect',
		"PidFile \"$dir/$name.pid\"",
		'MaxClients 50',
		'Allow 127.0.0.1',
		"ConnectPort $connect_port",
		$opts{auth} ? "BasicAuth $PROXY_USER $PROXY_PASSWORD" : (),
		''));
	start_daemon($name, $port, 'tinyproxy', '-d', '-c', "$dir/$name.conf");
	return ($port, $log);
}

sub log_size { return -s $_[0] // 0; }
sub log_since { my ($f, $o) = @_; return -e $f ? slurp_file($f, $o) : ''; }

my $mock = TaptalkTest::Mock->start(tls => 1);
my $ca = $mock->tls_dir . '/ca.pem';
my $tls_port = $mock->tls_port;
my ($open_port, $open_log) = tinyproxy('tinyproxy-open', $tls_port);
my ($auth_port, $auth_log) = tinyproxy('tinyproxy-auth', $tls_port, auth => 1);
my $socks_port = PostgreSQL::Test::Cluster::get_free_port();
start_daemon('microsocks', $socks_port, 'microsocks', '-i', '127.0.0.1',
	'-p', $socks_port, '-u', $PROXY_USER, '-P', $PROXY_PASSWORD);
my $down_port = PostgreSQL::Test::Cluster::get_free_port();

my $open_url = "http://127.0.0.1:$open_port";
my $auth_url = "http://$PROXY_USER:$PROXY_PASSWORD_URL\@127.0.0.1:$auth_port";

my $node = TaptalkTest::node('proxy', mock => $mock, helpers => 1,
	conf => "log_statement = 'all'\nlog_min_messages = debug2");

# call(XC, SQL before...): "user_id|error_code|error_message" of one call in
# a fresh session
sub call
{
	my ($xc, @before) = @_;
	return $node->safe_psql(
		'postgres', join("\n",
			'SET taptalk.timeout = 5000;',
			@before,
			"SELECT concat_ws('|', coalesce(user_id, ''), coalesce(error_code, ''), coalesce(error_message, ''))",
			"FROM taptalk_auth_ticket(req('$xc'));"));
}

# the Via header of the mock's request for XC after MARK ('' when none,
# undef when there was no such request)
sub via_of
{
	my ($mark, $xc) = @_;
	my $via;
	for my $e ($mock->log_entries($mark))
	{
		next unless $e->{event} eq 'request' && $e->{body} =~ /"\Q$xc\E"/;
		$via = '';
		for my $h (@{ $e->{headers} })
		{
			$via = $h->[1] if lc($h->[0]) eq 'via';
		}
	}
	return $via;
}

my $log_start = TaptalkTest::log_offset($node);

# --- the setting: accepted and refused values, superuser only
for my $ok ($open_url, "$open_url/", "https://proxy.example:8443",
	"socks5h://$PROXY_USER:$PROXY_PASSWORD_URL\@127.0.0.1:1080",
	'HTTP://[::1]:3128', 'http://proxy.example')
{
	my ($out, $err) = TaptalkTest::psql_out_err($node,
		"SET taptalk.proxy = '$ok'; SHOW taptalk.proxy;");
	is($err, '', "taptalk.proxy = '$ok' is accepted");
}
my ($out, $err) = TaptalkTest::psql_out_err($node,
	"SET taptalk.proxy = 'socks5://127.0.0.1:1080'");
like($err, qr/invalid value for parameter "taptalk.proxy".*\nDETAIL:  Only socks5h:\/\/ SOCKS proxies are supported: with socks5:\/\/ and socks4:\/\/ TapTalk's host name would be resolved by the database server/s,
	'socks5:// is refused: the database server would resolve the name');
for my $bad ('ftp://127.0.0.1:21', 'http://127.0.0.1:0', 'http://127.0.0.1:65536',
	'http://127.0.0.1:3128/path', 'http://127.0.0.1:3128?x', 'http://:3128',
	'http://u:p@ss@127.0.0.1', 'http://u:p%zz@127.0.0.1', 'http://u:p%00@127.0.0.1',
	'http://:pw@127.0.0.1', 'http://127.0.0.1 :3128', '127.0.0.1:3128')
{
	($out, $err) = TaptalkTest::psql_out_err($node, "SET taptalk.proxy = '$bad'");
	like($err, qr/^ERROR:  invalid value for parameter "taptalk.proxy"/,
		"taptalk.proxy = '$bad' is refused");
}
# a refused value's password is masked in the error, too
($out, $err) = TaptalkTest::psql_out_err($node,
	"SET taptalk.proxy = 'ftp://u:$PROXY_PASSWORD\@127.0.0.1'");
like($err, qr/"ftp:\/\/u:\*{8}\@127\.0\.0\.1"/,
	'a refused value is quoted with its password masked');
($out, $err) = TaptalkTest::psql_out_err($node, q{
SET ROLE taptalk_app;
SET taptalk.proxy = 'http://127.0.0.1:1';
SHOW taptalk.proxy;});
# PostgreSQL 15 words the second refusal "must be superuser or have
# privileges of pg_read_all_settings to examine", 16 and later "permission
# denied to examine"
like($err, qr/permission denied to set parameter "taptalk.proxy".*(?:permission denied|must be superuser or have privileges of pg_read_all_settings) to examine "taptalk.proxy"/s,
	'a role that is not superuser can neither set nor read taptalk.proxy');

# --- plain HTTP through the proxy: forwarded, tinyproxy's Via header
my $mark = $mock->log_mark;
my $plog = log_size($open_log);
is(call('via-none'), 'tt-via-none||', 'without taptalk.proxy: success');
is(via_of($mark, 'via-none'), '', 'without taptalk.proxy: no Via header');
is(call('via-http', "SET taptalk.proxy = '$open_url';"),
	'tt-via-http||', 'through an HTTP proxy to http://: success');
like(via_of($mark, 'via-http'), qr/tinyproxy/,
	'through an HTTP proxy to http://: the request came through tinyproxy (Via header)');
like(log_since($open_log, $plog), qr/Request .*POST http:\/\/127\.0\.0\.1:\d+\/v1\/server\/auth_ticket\/request/,
	"through an HTTP proxy to http://: tinyproxy's log shows the request");

# --- HTTPS through CONNECT, verified end to end
$mark = $mock->log_mark;
$plog = log_size($open_log);
is(call('via-https', "SET taptalk.base_url = '" . $mock->tls_url . "';",
		"SET taptalk.ca_file = '$ca';", "SET taptalk.proxy = '$open_url';"),
	'tt-via-https||', 'through an HTTP proxy to https://: success');
is(via_of($mark, 'via-https'), '',
	'through CONNECT the proxy adds nothing: the TLS session is end to end');
like(log_since($open_log, $plog), qr/Request .*CONNECT 127\.0\.0\.1:$tls_port /,
	"through an HTTP proxy to https://: tinyproxy's log shows CONNECT to the TLS port");
$mark = $mock->log_mark;
my $got = call('via-https-wrong-ca', "SET taptalk.base_url = '" . $mock->tls_url . "';",
	"SET taptalk.ca_file = '" . $mock->tls_dir . "/other-ca.pem';",
	"SET taptalk.proxy = '$open_url';");
like($got, qr/^\|CONNECTION_FAILED\|.*\(through proxy "127\.0\.0\.1:$open_port"\)$/,
	'through CONNECT with a CA that did not sign the certificate: CONNECTION_FAILED')
  and note $got;
is($mock->count($mark, 'request', $tls_port), 0,
	'through CONNECT with the wrong CA: the server received no request');
is($mock->count($mark, 'connection', $tls_port), 1,
	'through CONNECT with the wrong CA: not retried');

# --- proxy authentication
$mark = $mock->log_mark;
$plog = log_size($auth_log);
is(call('auth-http', "SET taptalk.proxy = '$auth_url';"),
	'tt-auth-http||', 'through a proxy with BasicAuth, the right credentials: success');
like(via_of($mark, 'auth-http'), qr/tinyproxy/,
	'through the authenticating proxy: Via header');
like(log_since($auth_log, $plog), qr/POST http:/,
	"the authenticating proxy's log shows the request");
is(call('auth-https', "SET taptalk.base_url = '" . $mock->tls_url . "';",
		"SET taptalk.ca_file = '$ca';", "SET taptalk.proxy = '$auth_url';"),
	'tt-auth-https||',
	'through the authenticating proxy to https:// (CONNECT): success');
for my $case (
	[ 'wrong password', "http://$PROXY_USER:wrong-pw\@127.0.0.1:$auth_port" ],
	[ 'no credentials', "http://127.0.0.1:$auth_port" ])
{
	my ($what, $url) = @$case;
	for my $tls (0, 1)
	{
		$mark = $mock->log_mark;
		my @before = ("SET taptalk.proxy = '$url';");
		unshift @before, "SET taptalk.base_url = '" . $mock->tls_url . "';",
		  "SET taptalk.ca_file = '$ca';"
		  if $tls;
		$got = call("auth-bad-$tls", @before);
		# tinyproxy answers a wrong password with 401, none with 407; to a
		# POST it answers before reading the body, and closes: the client
		# may see the reset before the answer
		like($got,
			$tls
			? qr/^\|CONNECTION_FAILED\|proxy "127\.0\.0\.1:$auth_port" refused the request with HTTP status (407 \(Proxy Authentication Required\)|401 \(Unauthorized\))$/
			: qr/^\|CONNECTION_FAILED\|(proxy "127\.0\.0\.1:$auth_port" refused the request with HTTP status (407|401) .*|.* \(through proxy "127\.0\.0\.1:$auth_port"\))$/,
			"$what, " . ($tls ? 'https:// (CONNECT)' : 'http://') . ': CONNECTION_FAILED naming the proxy')
		  and note $got;
		unlike($got, qr/wrong-pw/, "$what: the message does not show the password");
		is($mock->count($mark, 'request'), 0, "$what: no request reached TapTalk");
	}
}

# the password is masked in SHOW, absent from pg_settings, and a reload of
# postgresql.conf logs it masked
is($node->safe_psql('postgres', "SET taptalk.proxy = '$auth_url'; SHOW taptalk.proxy;"),
	"http://$PROXY_USER:********\@127.0.0.1:$auth_port",
	'SHOW taptalk.proxy masks the password');
is($node->safe_psql('postgres', "SET taptalk.proxy = '$auth_url'; SELECT current_setting('taptalk.proxy')"),
	"http://$PROXY_USER:********\@127.0.0.1:$auth_port",
	'current_setting masks the password');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_settings WHERE name = 'taptalk.proxy'"),
	'0', 'pg_settings does not list taptalk.proxy (its reset_val would show the password)');

# --- a proxy that is down: CONNECTION_FAILED naming it, retried
$node->safe_psql('postgres', 'SELECT taptalk_stats_reset()');
$got = call('down', "SET taptalk.proxy = 'http://127.0.0.1:$down_port';",
	'SET taptalk.max_retries = 2;');
like($got, qr/^\|CONNECTION_FAILED\|could not connect to TapTalk through proxy "127\.0\.0\.1:$down_port": /,
	'a proxy that is down: CONNECTION_FAILED naming the proxy') and note $got;
is($node->safe_psql('postgres', "SELECT attempts FROM taptalk_stats WHERE path = 'single'"),
	'3', 'a proxy that is down: retried per taptalk.max_retries (3 attempts)');
$got = call('down-socks', "SET taptalk.proxy = 'socks5h://127.0.0.1:$down_port';",
	'SET taptalk.max_retries = 0;');
like($got, qr/^\|CONNECTION_FAILED\|could not connect to TapTalk through proxy "127\.0\.0\.1:$down_port": /,
	'a SOCKS proxy that is down: CONNECTION_FAILED naming the proxy');

# --- SOCKS5 with a password, the name resolved by the proxy
$mark = $mock->log_mark;
my $port = $mock->port;
is(call('socks', "SET taptalk.base_url = 'http://localhost:$port';",
		"SET taptalk.proxy = 'socks5h://$PROXY_USER:$PROXY_PASSWORD_URL\@127.0.0.1:$socks_port';"),
	'tt-socks||', 'through a SOCKS5 proxy (socks5h://) with a password: success');
is(via_of($mark, 'socks'), '', 'through SOCKS: no Via header (the bytes are relayed)');
$got = call('socks-bad', "SET taptalk.base_url = 'http://localhost:$port';",
	"SET taptalk.proxy = 'socks5h://$PROXY_USER:wrong-pw\@127.0.0.1:$socks_port';");
like($got, qr/^\|CONNECTION_FAILED\|could not connect to TapTalk through proxy "127\.0\.0\.1:$socks_port": /,
	'through SOCKS with a wrong password: CONNECTION_FAILED naming the proxy') and note $got;

# --- changing the setting closes the connections made through the old proxy
$mark = $mock->log_mark;
$got = $node->safe_psql('postgres', qq{
SET taptalk.proxy = '$open_url';
SELECT user_id FROM taptalk_auth_ticket(req('reuse-1'));
SELECT user_id FROM taptalk_auth_ticket(req('reuse-2'));
SET taptalk.proxy = '';
SELECT user_id FROM taptalk_auth_ticket(req('reuse-3'));
SET taptalk.proxy = '$auth_url';
SELECT user_id FROM taptalk_auth_ticket(req('reuse-4'));});
is(join(' ', split /\n/, $got), 'tt-reuse-1 tt-reuse-2 tt-reuse-3 tt-reuse-4',
	'one session, the setting changed twice: every call succeeds');
like(via_of($mark, 'reuse-2'), qr/tinyproxy/, 'reuse-2 went through the proxy');
is(via_of($mark, 'reuse-3'), '',
	'after SET taptalk.proxy = \'\' the connection through the proxy is not reused');
like(via_of($mark, 'reuse-4'), qr/tinyproxy/, 'reuse-4 went through the other proxy');

# --- the queue's worker, with the setting in postgresql.conf and a reload
my $reload_log = TaptalkTest::log_offset($node);
$node->append_conf('postgresql.conf', "taptalk.proxy = '$auth_url'");
$node->reload;
ok(TaptalkTest::wait_log($node, $reload_log,
		qr/parameter "taptalk.proxy" changed to "http:\/\/$PROXY_USER:\*{8}\@127\.0\.0\.1:$auth_port"/),
	'the reload logs the new value with its password masked');
$mark = $mock->log_mark;
$plog = log_size($auth_log);
$node->safe_psql('postgres', "SELECT taptalk_enqueue(req('queue-proxy'))");
TaptalkTest::queue_drained($node, 'through the proxy');
is($node->safe_psql('postgres', "SELECT state || ' ' || user_id FROM taptalk_queue WHERE request->>'xcUserID' = 'queue-proxy'"),
	'succeeded tt-queue-proxy', "the queue's request succeeded");
like(via_of($mark, 'queue-proxy'), qr/tinyproxy/,
	"the queue's worker went through the proxy set in postgresql.conf");
like(log_since($auth_log, $plog), qr/POST http:/,
	"the authenticating proxy's log shows the worker's request");
# ALTER SYSTEM, with log_statement = 'all', is not logged with the password
$node->safe_psql('postgres', "ALTER SYSTEM SET taptalk.proxy = '$auth_url'");
$node->safe_psql('postgres', "ALTER SYSTEM RESET taptalk.proxy");

# the password (as written and decoded) never reached the server log
my $server_log = slurp_file($node->logfile, $log_start);
unlike($server_log, qr/\Q$PROXY_PASSWORD\E/, 'the server log never shows the password');
unlike($server_log, qr/\Q$PROXY_PASSWORD_URL\E/,
	'the server log never shows the password as percent-encoded');
like($server_log, qr/statement: \(a statement naming taptalk\.proxy, not logged\)/,
	'statements naming taptalk.proxy are not logged');
$node->stop;

# --- the server's proxy environment variables are ignored
my $env_node;
{
	local $ENV{http_proxy}  = $open_url;
	local $ENV{HTTP_PROXY}  = $open_url;
	local $ENV{https_proxy} = $open_url;
	local $ENV{HTTPS_PROXY} = $open_url;
	local $ENV{ALL_PROXY}   = $open_url;
	local $ENV{all_proxy}   = $open_url;
	local $ENV{NO_PROXY}    = '127.0.0.1,localhost';
	local $ENV{no_proxy}    = '127.0.0.1,localhost';
	$env_node = TaptalkTest::node('proxy_env', mock => $mock, helpers => 1);
}
$node = $env_node;
$mark = $mock->log_mark;
$plog = log_size($open_log);
is(call('env-http'), 'tt-env-http||', 'with proxy variables in the environment: success');
is(call('env-https', "SET taptalk.base_url = '" . $mock->tls_url . "';",
		"SET taptalk.ca_file = '$ca';"),
	'tt-env-https||', 'with proxy variables in the environment: https:// succeeds');
is(via_of($mark, 'env-http'), '', 'http_proxy/HTTP_PROXY/ALL_PROXY are ignored (no Via)');
is(log_since($open_log, $plog), '', 'the proxy named by the environment saw nothing');
is(call('env-noproxy', "SET taptalk.proxy = '$auth_url';"),
	'tt-env-noproxy||', 'taptalk.proxy set, NO_PROXY naming TapTalk: success');
like(via_of($mark, 'env-noproxy'), qr/tinyproxy/,
	'NO_PROXY in the environment does not bypass taptalk.proxy');
$node->stop;

stop_daemons();
$mock->stop;
done_testing();
