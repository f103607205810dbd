# t/150_batch_memory.pl: what a batch holds in memory.  Rows are written in
# input order as they become final, so the memory of taptalk_auth_tickets
# does not grow with the array; a slow early element holds back only a
# bounded window of later results, and the order is kept.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node('batchmem', mock => $mock, helpers => 1);

sub peak_kb
{
	my ($pid) = @_;
	my ($kb) = slurp_file("/proc/$pid/status") =~ /^VmHWM:\s+(\d+) kB/m;
	return $kb;
}

# two million NULL elements: a row each, and no per-element memory
my $bg = $node->background_psql('postgres');
my $pid = $bg->query_safe('SELECT pg_backend_pid()');
$bg->query_safe("SELECT count(*) FROM taptalk_auth_tickets(ARRAY[req('warm-up')])");
my $before = peak_kb($pid);
is($bg->query_safe(
	"SELECT count(*) || ' ' || count(DISTINCT ord) || ' ' || count(user_id) || ' ' || max(ord) "
	  . "FROM taptalk_auth_tickets(array_fill(NULL::jsonb, ARRAY[2000000]))"),
	'2000000 2000000 0 2000000', 'two million NULL elements give two million rows of NULLs');
my $growth = peak_kb($pid) - $before;
cmp_ok($growth, '<', 32 * 1024,
	"... and the backend's peak memory grew by $growth kB (the input array itself is 0.25 MB)");
$bg->quit;

# a slow first element: the 6,000 after it finish first and wait their turn
my $out = $node->safe_psql('postgres', q{
SET taptalk.max_concurrency = 16;
SET taptalk.timeout = 10000;
SELECT count(*),
       count(*) FILTER (WHERE user_id = 'tt-' || CASE WHEN ord = 1 THEN 'fault-slow-1500' ELSE 'u' || ord END),
       bool_and(ord = n)
FROM (SELECT r.*, row_number() OVER () AS n
      FROM taptalk_auth_tickets(ARRAY(
          SELECT req(CASE WHEN g = 1 THEN 'fault-slow-1500' ELSE 'u' || g END)
          FROM generate_series(1, 6001) g ORDER BY g)) r) s});
is($out, '6001|6001|t',
	'a slow first element: every row succeeds, in input order, each with its own answer');

$node->stop;
$mock->stop;
done_testing();
