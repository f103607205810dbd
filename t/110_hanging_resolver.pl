# t/110_hanging_resolver.pl: a name lookup that never answers holds up
# nothing.  An LD_PRELOAD shim (test/hang_resolver.c) makes getaddrinfo() for
# one host name sleep 5 s in the server; while such a lookup runs in a
# libcurl resolver thread, statement_timeout, taptalk.timeout, query cancel,
# pg_terminate_backend and a fast shutdown each take effect when due, and the
# resolver thread runs with the server's signals blocked.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $HANG_HOST = 'hang.taptalk.test';
my $HANG_SECONDS = 5;

# how late an interrupt or a timeout may take effect on a loaded machine; the
# promise is 100 ms, a lookup that held them up would take 5 s
my $MARGIN_MS = 250;

my $tmp = PostgreSQL::Test::Utils::tempdir;
chmod 0777, $tmp;
my $shim = "$tmp/hang_resolver.so";
system('cc', '-shared', '-fPIC', '-o', $shim,
	"$TaptalkTest::ROOT/test/hang_resolver.c", '-ldl') == 0
  or BAIL_OUT('could not build the resolver shim');
my $report = "$tmp/resolver_threads.txt";

my $node;
{
	local $ENV{LD_PRELOAD} = $shim;
	local $ENV{TAPTALK_HANG_HOST} = $HANG_HOST;
	local $ENV{TAPTALK_HANG_SECONDS} = $HANG_SECONDS;
	local $ENV{TAPTALK_HANG_REPORT} = $report;
	$node = TaptalkTest::silent_node('resolver', "http://$HANG_HOST:9");
}

my $REQUEST = q('{"userIPAddress": "10.0.0.1", "userAgent": "t", "userPlatform": "web",
  "userDeviceID": "d", "xcUserID": "1", "fullName": "F"}');

# One call, its outcome and when it started and ended, measured inside the
# server and kept in a table (a cancel is caught, so the row survives it).
$node->safe_psql('postgres', qq{
CREATE TABLE calls (outcome text, started double precision, ended double precision);
CREATE FUNCTION now_ms() RETURNS double precision LANGUAGE sql
    AS \$\$SELECT extract(epoch FROM clock_timestamp()) * 1000\$\$;
CREATE FUNCTION timed_call() RETURNS text LANGUAGE plpgsql AS \$\$
DECLARE
    t0 double precision := now_ms();
    r taptalk_auth_ticket_result;
    what text;
BEGIN
    BEGIN
        r := taptalk_auth_ticket($REQUEST);
        what := coalesce(r.error_code, 'OK');
    EXCEPTION WHEN query_canceled THEN
        what := 'canceled';
    END;
    INSERT INTO calls VALUES (what, t0, now_ms());
    RETURN what || ' ' || round(now_ms() - t0);
END \$\$;
CREATE FUNCTION cancel_at(p int) RETURNS double precision LANGUAGE plpgsql AS \$\$
DECLARE
    t double precision := now_ms();
BEGIN
    PERFORM pg_cancel_backend(p);
    RETURN t;
END \$\$});

sub outcome
{
	my ($sql) = @_;
	my $out = $node->safe_psql('postgres', $sql);
	my ($what, $ms) = $out =~ /(\S+) (\d+)$/ or die "unexpected output: $out";
	return ($what, $ms);
}

# statement_timeout
my ($what, $ms) = outcome("SET statement_timeout = '300ms'; SELECT timed_call()");
is($what, 'canceled', 'statement_timeout cancels a call whose lookup hangs');
cmp_ok($ms, '<', 300 + $MARGIN_MS, "... when due (after $ms ms; due at 300 ms)");

# taptalk.timeout
($what, $ms) = outcome("SET taptalk.timeout = 500; SELECT timed_call()");
is($what, 'TIMEOUT', 'taptalk.timeout ends a call whose lookup hangs with TIMEOUT');
cmp_ok($ms, '<', 500 + $MARGIN_MS, "... when due (after $ms ms; due at 500 ms)");

# a call in another session, caught while its lookup hangs
sub start_hanging_call
{
	my $bg = $node->background_psql('postgres', on_error_stop => 0);
	$bg->query_safe("SET taptalk.timeout = 60000");
	$bg->query_until(qr/started/, "\\echo started\nSELECT timed_call();\n");
	my $pid = TaptalkTest::active_pid($node, '%timed_call%');
	usleep(300_000);    # well inside the lookup
	return ($bg, $pid);
}

# query cancel: from the moment the cancel is sent to the end of the call
$node->safe_psql('postgres', 'TRUNCATE calls');
my ($bg, $pid) = start_hanging_call();
my $sent = $node->safe_psql('postgres', "SELECT cancel_at($pid)");
$node->poll_query_until('postgres', 'SELECT count(*) = 1 FROM calls')
  or die 'the cancelled call did not end';
my ($outcome, $ended) = split /\|/,
  $node->safe_psql('postgres', 'SELECT outcome, ended FROM calls');
is($outcome, 'canceled', 'query cancel ends a call whose lookup hangs');
my $cancel_ms = int($ended - $sent);
cmp_ok($cancel_ms, '<', 100 + $MARGIN_MS, "... at once ($cancel_ms ms after the cancel was sent)");
$bg->query_safe('SELECT 1');
$bg->quit;

# terminate: from just before pg_terminate_backend (sent from a session that
# is already connected) until the process is gone
my $ctl = $node->background_psql('postgres');
($bg, $pid) = start_hanging_call();
my $t0 = time;
$ctl->query_safe("SELECT pg_terminate_backend($pid)");
usleep(2_000) while kill(0, $pid) && time - $t0 < 30;
my $term_ms = int((time - $t0) * 1000);
ok(!kill(0, $pid), 'pg_terminate_backend ends a session whose lookup hangs');
cmp_ok($term_ms, '<', 100 + $MARGIN_MS, "... at once ($term_ms ms, the signal included)");
eval { $bg->quit };
$ctl->quit;

# the resolver threads ran with the server's signals blocked
ok(-s $report, 'the hanging lookups ran');
my @threads = split /\n/, slurp_file($report);
is_deeply([ grep { !/^SIGINT=blocked SIGTERM=blocked SIGUSR1=blocked SIGQUIT=blocked$/ } @threads ],
	[], 'every resolver thread had SIGINT, SIGTERM, SIGUSR1 and SIGQUIT blocked')
  or diag(join("\n", @threads));

# a fast shutdown is not held up by a lookup in progress
($bg, $pid) = start_hanging_call();
$t0 = time;
$node->stop('fast');
my $stop_ms = int((time - $t0) * 1000);
cmp_ok($stop_ms, '<', 2000, "a fast shutdown during a hanging lookup takes $stop_ms ms");
eval { $bg->quit };

done_testing();
