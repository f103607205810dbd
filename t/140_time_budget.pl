# t/140_time_budget.pl: taptalk.timeout is a budget per request, from its
# first attempt to its answer, retries included; taptalk_auth_tickets gives
# each of its requests the whole budget, and statement_timeout bounds the
# statement as a whole.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use PostgreSQL::Test::Utils;
use Test::More;

# how late a timeout may take effect on a loaded machine
my $MARGIN_MS = 300;

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node('budget', mock => $mock, helpers => 1);

# "outcomes|elapsed ms" of a statement, measured inside the server
sub timed
{
	my ($setup, $query) = @_;
	my $out = $node->safe_psql('postgres', qq{
$setup;
CREATE TEMP TABLE t0 AS SELECT clock_timestamp() AS t;
CREATE TEMP TABLE outcome AS $query;
SELECT (SELECT string_agg(coalesce(error_code, 'OK'), ',' ORDER BY ord) FROM outcome)
       || '|' || round(extract(epoch FROM clock_timestamp() - t) * 1000) FROM t0});
	return split /\|/, $out;
}

# one request: TIMEOUT when its budget is spent
my ($codes, $ms) = timed('SET taptalk.timeout = 500',
	"SELECT 1 AS ord, * FROM taptalk_auth_ticket(req('fault-slow-800'))");
is($codes, 'TIMEOUT', 'a single request slower than its budget is TIMEOUT');
cmp_ok($ms, '>=', 450, "... not before its budget ($ms ms; budget 500 ms)");
cmp_ok($ms, '<', 500 + $MARGIN_MS, '... nor long after');

# a batch run one at a time: each request has its own budget
($codes, $ms) = timed('SET taptalk.timeout = 1000; SET taptalk.max_concurrency = 1',
	"SELECT * FROM taptalk_auth_tickets(ARRAY[req('fault-slow-800'), req('fault-slow-800'), "
	  . "req('fault-slow-800'), req('fault-slow-800')])");
is($codes, 'OK,OK,OK,OK',
	'four requests of 800 ms each, one at a time, each within a budget of 1 s');
cmp_ok($ms, '>=', 3200, "... the statement took their sum ($ms ms)");

($codes, $ms) = timed('SET taptalk.timeout = 500; SET taptalk.max_concurrency = 1',
	"SELECT * FROM taptalk_auth_tickets(ARRAY[req('fault-slow-800'), req('fault-slow-800'), "
	  . "req('fault-slow-800'), req('fault-slow-800')])");
is($codes, 'TIMEOUT,TIMEOUT,TIMEOUT,TIMEOUT',
	'with a budget of 500 ms, each of the four is TIMEOUT');
cmp_ok($ms, '>=', 1800, "... after its own budget ($ms ms for four)");
cmp_ok($ms, '<', 2000 + 4 * $MARGIN_MS, '... and no longer');

# statement_timeout bounds the whole statement
my ($ret, $stdout, $stderr) = $node->psql('postgres', qq{
SET statement_timeout = '1500ms';
SET taptalk.timeout = 1000; SET taptalk.max_concurrency = 1;
SELECT count(*) FROM taptalk_auth_tickets(ARRAY[req('fault-slow-800'), req('fault-slow-800'),
  req('fault-slow-800'), req('fault-slow-800')])});
like($stderr, qr/canceling statement due to statement timeout/,
	'statement_timeout ends a batch whose requests are each within their budget');

$node->stop;
$mock->stop;
done_testing();
