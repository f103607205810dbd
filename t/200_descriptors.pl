# t/200_descriptors.pl: libcurl's sockets are counted against the backend's
# file descriptors exactly, whatever libcurl calls back.  libcurl 7.88.0 to
# 8.1.2 (Debian 12 has 7.88.1) close a socket whose connect has not completed
# without calling the close-socket callback; counting on that callback alone
# leaked one descriptor slot per abandoned connect, until the backend could
# open no connection at all (and dblink no longer could either).
#
# TapTalk is out of reach here through a listening socket whose accept queue
# is full: the kernel drops the connecting side's SYNs, so connects hang
# until taptalk.connect_timeout (or a cancel) ends them.
#
# - One session: 400 calls whose connect times out (one at a time), a batch
#   of 400 more at concurrency 64, 200 calls cancelled by statement_timeout
#   while connecting; then 50 calls to the mock all succeed, dblink can
#   still connect, and the backend holds as many descriptors as before.
# - The worker, at taptalk.worker_concurrency 256: three rounds of 256
#   queued requests whose connects time out; then, pointed at the mock by a
#   reload, 512 requests all succeed, and it holds as many descriptors as
#   before.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use PostgreSQL::Test::Utils;
use Fcntl qw(F_GETFL F_SETFL O_NONBLOCK);
use Socket qw(:all);
use Test::More;
use Time::HiRes qw(usleep);

# A listening socket on 127.0.0.1 with an accept queue of one, filled by
# connections nobody accepts: further connects are never answered.
socket(my $full, PF_INET, SOCK_STREAM, 0) or die "socket: $!";
bind($full, pack_sockaddr_in(0, inet_aton('127.0.0.1'))) or die "bind: $!";
listen($full, 0) or die "listen: $!";
my ($full_port) = unpack_sockaddr_in(getsockname($full));
my @fillers;
for (1 .. 3)
{
	socket(my $c, PF_INET, SOCK_STREAM, 0) or die "socket: $!";
	my $flags = fcntl($c, F_GETFL, 0);
	fcntl($c, F_SETFL, $flags | O_NONBLOCK);
	connect($c, pack_sockaddr_in($full_port, inet_aton('127.0.0.1')));
	push @fillers, $c;
}
usleep(100_000);
my $DEAD = "http://127.0.0.1:$full_port";

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node(
	'descriptors',
	mock    => $mock,
	helpers => 1,
	conf    => "taptalk.worker_concurrency = 256\n"
	  . "taptalk.max_attempts = 1");

sub q1 { return $node->safe_psql('postgres', $_[0]); }

# What a process's descriptors are, by kind: sockets, the database's files
# (kept open by fd.c's cache of relation files, which limits itself), and
# the others (epoll, pipes, signalfd, logs, ...).
sub descriptors
{
	my ($pid) = @_;
	my $pgdata = $node->data_dir;
	my %kinds = (sockets => 0, files => 0, others => 0);
	opendir(my $dh, "/proc/$pid/fd") or die "/proc/$pid/fd: $!";
	for my $fd (grep { /^\d+$/ } readdir $dh)
	{
		my $to = readlink("/proc/$pid/fd/$fd") // next;
		$kinds{ $to =~ /^socket:/ ? 'sockets'
			  : index($to, $pgdata) == 0 ? 'files'
			  : 'others' }++;
	}
	closedir $dh;
	return \%kinds;
}

sub describe
{
	my ($k) = @_;
	return join(', ', map { "$k->{$_} $_" } qw(sockets files others));
}

q1('CREATE EXTENSION dblink');

# ---------------------------------------------------------------- a backend
my $s = $node->background_psql('postgres', on_error_stop => 0);
my $pid = $s->query_safe('SELECT pg_backend_pid()');
$s->query_safe("SET taptalk.max_retries = 0");

# the baseline: what a backend holds once it has called TapTalk once (the
# epoll descriptor and one cached connection)
is($s->query_safe("SELECT error_code IS NULL FROM taptalk_auth_ticket(req('first'))"),
	't', 'a first call succeeds');
my $before = descriptors($pid);
note("backend $pid: " . describe($before));

$s->query_safe("SET taptalk.base_url = '$DEAD'");
$s->query_safe("SET taptalk.connect_timeout = '10ms'");
is( $s->query_safe(q{
SELECT error_code, count(*) FROM generate_series(1, 400) i,
	LATERAL taptalk_auth_ticket(req('t' || i))
GROUP BY 1}),
	'CONNECTION_FAILED|400',
	'400 calls whose connect times out fail as CONNECTION_FAILED');
is( $s->query_safe(q{
SET taptalk.max_concurrency = 64;
SELECT error_code, error_message LIKE '%no file descriptor%', count(*)
FROM taptalk_auth_tickets(array(SELECT req('b' || i) FROM generate_series(1, 400) i))
GROUP BY 1, 2;
RESET taptalk.max_concurrency}),
	'CONNECTION_FAILED|f|400',
	'a batch of 400 whose connects time out fails as CONNECTION_FAILED, never for want of descriptors');

# cancelled while connecting: each statement is cancelled by its own
# statement_timeout
$s->query_safe("SET taptalk.connect_timeout = '10s'");
$s->query_safe("SET statement_timeout = '20ms'");
$s->{stderr} = '';
$s->query(join("\n",
	map { "SELECT * FROM taptalk_auth_ticket(req('c$_'));" } 1 .. 200));
my $cancelled = () = $s->{stderr} =~ /canceling statement due to statement timeout/g;
is($cancelled, 200, '200 calls are cancelled while connecting');
$s->{stderr} = '';
$s->query_safe("RESET statement_timeout");

$s->query_safe("RESET taptalk.connect_timeout");
$s->query_safe("RESET taptalk.base_url");
is( $s->query_safe(q{
SELECT coalesce(error_code || ': ' || error_message, 'OK'), count(*)
FROM generate_series(1, 50) i, LATERAL taptalk_auth_ticket(req('after' || i))
GROUP BY 1}),
	'OK|50', 'then 50 calls to TapTalk all succeed');
my $dsn = 'host=' . $node->host . ' port=' . $node->port . ' dbname=postgres';
is($s->query("SELECT dblink_connect('other', '$dsn')"),
	'OK', 'dblink can still open a connection in the backend');
$s->{stderr} = '';
$s->query("SELECT dblink_disconnect('other')");
$s->{stderr} = '';
my $after = descriptors($pid);
note("backend $pid: " . describe($after));
is($after->{sockets}, $before->{sockets}, 'the backend holds as many sockets as before');
is($after->{others}, $before->{others},
	'... and as many other descriptors, the database\'s files aside');
$s->quit;

# ---------------------------------------------------------------- the worker
sub reload { q1('SELECT pg_reload_conf()'); usleep(500_000); }

my $batch = 0;

# enqueue $n requests in one transaction and wait until all are final;
# returns "state|error_code|count" lines
sub queue_round
{
	my ($n) = @_;
	$batch++;
	q1("SELECT count(taptalk_enqueue(req('w$batch-' || i))) FROM generate_series(1, $n) i");
	$node->poll_query_until('postgres', qq{
SELECT count(*) = 0 FROM taptalk_queue
WHERE request->>'xcUserID' LIKE 'w$batch-%' AND state IN ('queued', 'sending')})
	  or die "round $batch did not finish";
	return q1(qq{
SELECT state, coalesce(error_code, ''), count(*) FROM taptalk_queue
WHERE request->>'xcUserID' LIKE 'w$batch-%' GROUP BY 1, 2 ORDER BY 1, 2});
}

# one request at a time until one ends in $state (the worker applies a
# reload between runs)
sub probe
{
	my ($state) = @_;
	for (1 .. 9)
	{
		return 1 if queue_round(1) =~ /^\Q$state\E\|/;
		usleep(200_000);
	}
	return 0;
}

q1("ALTER SYSTEM SET taptalk.base_url = '$DEAD'");
q1("ALTER SYSTEM SET taptalk.connect_timeout = '10ms'");
reload();
ok(probe('failed'), 'the worker is pointed at the unreachable server');
my $wpid = TaptalkTest::worker_pid($node);
$before = descriptors($wpid);
note("worker $wpid: " . describe($before));

for my $round (1 .. 3)
{
	is(queue_round(256), 'failed|CONNECTION_FAILED|256',
		"worker round $round: 256 requests whose connect times out fail");
	reload();	# ends the pause that ten failures in a row start
}

q1('ALTER SYSTEM RESET taptalk.base_url');
q1('ALTER SYSTEM RESET taptalk.connect_timeout');
reload();
ok(probe('succeeded'), 'the worker reaches TapTalk after the reload');
is(queue_round(256), 'succeeded||256', 'then 256 queued requests all succeed');
is(queue_round(256), 'succeeded||256', '... and 256 more');

# back to the unreachable server, which closes the connections to the mock
q1("ALTER SYSTEM SET taptalk.base_url = '$DEAD'");
q1("ALTER SYSTEM SET taptalk.connect_timeout = '10ms'");
reload();
ok(probe('failed'), 'the worker is pointed at the unreachable server again');
is(TaptalkTest::worker_pid($node), $wpid, 'the same worker ran throughout');
$after = descriptors($wpid);
note("worker $wpid: " . describe($after));
is($after->{sockets}, $before->{sockets}, 'the worker holds as many sockets as before');
is($after->{others}, $before->{others},
	'... and as many other descriptors, the database\'s files aside');

$node->stop;
done_testing();
