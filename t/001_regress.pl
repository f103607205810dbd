# t/001_regress.pl: the pg_regress suite (sql/*.sql against expected/*.out)
# on a node preloaded with taptalk and pointed at the mock TapTalk server.
#
# Every sql/*.sql runs, init first (it creates the extension, the roles and
# the helpers the others use).  TAPTALK_REGRESS="validation batch" runs only
# those (after init):
#   make installcheck PROVE_TESTS=t/001_regress.pl TAPTALK_REGRESS=validation
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use Test::More;

my @tests;
if ($ENV{TAPTALK_REGRESS})
{
	@tests = grep { $_ ne 'init' } split ' ', $ENV{TAPTALK_REGRESS};
}
else
{
	@tests = sort grep { $_ ne 'init' }
	  map { m{([^/]+)\.sql$} } glob("$TaptalkTest::ROOT/sql/*.sql");
}

my $mock = TaptalkTest::Mock->start(tls => 1, second_port => 1);
my $node = TaptalkTest::node('regress', mock => $mock);
TaptalkTest::run_regress($node, 'init', @tests);

$node->stop;
$mock->stop;
done_testing();
