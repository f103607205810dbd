# t/002_timing.pl: how soon a cancel stops a request, and that a batch runs
# its requests concurrently, measured by the clock (sql/cancel.sql and
# sql/batch.sql check what happens; this checks when).  The margins allow
# for a loaded 2-core machine; each would still fail by a wide margin if the
# behaviour were wrong (a request that is not interrupted waits 5 or 30 s;
# a batch that is not concurrent takes 16 times as long).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use Test::More;
use Time::HiRes qw(time usleep);

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node('timing', mock => $mock, helpers => 1);

# ms since $t0 (from Time::HiRes::time)
sub ms_since { return int((time - $_[0]) * 1000); }

# statement_timeout stops a single request and a batch; the clock runs in
# the client, from the statement's start to its error
for my $case (
	[ 'a request', 300, "SELECT * FROM taptalk_auth_ticket(req('fault-slow-5000'))" ],
	[
		'a batch of 50', 400,
		"SELECT count(*) FROM taptalk_auth_tickets(ARRAY(SELECT req('fault-slow-5000') FROM generate_series(1, 50)))"
	])
{
	my ($what, $timeout, $sql) = @$case;
	my ($out, $err);
	my $t0 = time;
	$node->psql('postgres', "SET statement_timeout = $timeout; $sql",
		stdout => \$out, stderr => \$err);
	my $ms = ms_since($t0);
	like($err, qr/canceling statement due to statement timeout/,
		"statement_timeout = $timeout ms cancels $what");
	cmp_ok($ms, '<', $timeout + 1500,
		"statement_timeout = $timeout ms stops $what within 1.5 s of firing (took $ms ms; the server answers after 5 s)");
}

# pg_cancel_backend from another session while the request waits on the
# server (30 s)
my $victim = $node->background_psql('postgres', on_error_stop => 0);
my $pid = $victim->query_safe('SELECT pg_backend_pid()');
$victim->query_safe('SET taptalk.timeout = 60000');
$victim->query_until(qr/sent/,
	"\\echo sent\nSELECT * FROM taptalk_auth_ticket(req('fault-slow-30000'));\n");
ok( $node->poll_query_until(
		'postgres', qq{
SELECT EXISTS (SELECT 1 FROM pg_stat_activity
			   WHERE pid = $pid AND state = 'active' AND query LIKE '%fault-slow-30000%')}),
	'the request is in flight');
usleep(200_000);
my $t0 = time;
is($node->safe_psql('postgres', "SELECT pg_cancel_backend($pid)"),
	't', 'pg_cancel_backend');
my ($out, $failed) = $victim->query(q{SELECT 'usable'});
my $ms = ms_since($t0);
ok($failed, 'the cancelled request raised an error');
like($victim->{stderr}, qr/canceling statement due to user request/,
	'the cancelled request ends with "canceling statement due to user request"');
cmp_ok($ms, '<', 1500,
	"pg_cancel_backend stops the request within 1.5 s (took $ms ms; the server answers after 30 s)");
is($out, 'usable', 'the cancelled session is still usable');
$victim->quit;

# concurrency pays: 1,000 requests to a server that takes 50 ms each, at the
# default max_concurrency of 16, against the sequential path in the same run.
# Sequential calls need 1,000 x 50 ms; at 16 at a time the ideal is 6.25% of
# that; the batch must take under 15% (7.5 s of 50 s).
my $url = $mock->base_url . '/delay/50';
my $timing = $node->safe_psql(
	'postgres', qq{
SET taptalk.base_url = '$url';
CREATE TEMP TABLE timing (what text, ms float8, n int, ok int);
DO \$\$
DECLARE
	t timestamptz;
	r record;
	ok int := 0;
BEGIN
	t := clock_timestamp();
	FOR i IN 1..20 LOOP
		r := taptalk_auth_ticket(req('seq-' || i));
		IF r.user_id IS NOT NULL THEN ok := ok + 1; END IF;
	END LOOP;
	INSERT INTO timing VALUES ('sequential', extract(epoch FROM clock_timestamp() - t) * 1000, 20, ok);
	t := clock_timestamp();
	SELECT count(user_id) INTO ok
	FROM taptalk_auth_tickets(ARRAY(SELECT req('par-' || i) FROM generate_series(1, 1000) i));
	INSERT INTO timing VALUES ('batch', extract(epoch FROM clock_timestamp() - t) * 1000, 1000, ok);
END \$\$;
SELECT string_agg(concat_ws(' ', what, round(ms), n, ok), ',' ORDER BY what DESC) FROM timing;});
my %t = map { my @f = split / /; $f[0] => { ms => $f[1], n => $f[2], ok => $f[3] } }
  split /,/, $timing;
is("$t{sequential}{ok} $t{batch}{ok}", '20 1000',
	'every call succeeded (20 sequential, 1,000 in the batch)');
my $per_call = $t{sequential}{ms} / $t{sequential}{n};
cmp_ok($per_call, '>=', 50,
	sprintf('a sequential call waits for the server (%.1f ms each)', $per_call));
cmp_ok($t{batch}{ms}, '<', 0.15 * 1000 * $per_call,
	sprintf('1,000 requests in a batch take under 15%% of 1,000 sequential calls (%d ms, %.1f%%)',
		$t{batch}{ms}, 100 * $t{batch}{ms} / (1000 * $per_call)));

$node->stop;
$mock->stop;
done_testing();
