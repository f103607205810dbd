# t/070_trigger_load.pl: provisioning triggers under load.  pgbench, 8
# clients, each inserting users one by one into a table whose BEFORE INSERT
# trigger calls taptalk_auth_ticket, while the mock fails every fifth request
# with a 503 (/failevery/5).  First without retries: every row is there,
# once, with either its TapTalk user_id or the error code, exactly one row in
# five has HTTP_ERROR, and the mock received each user exactly once.  Then
# with the default retries: still every row, and far fewer errors.
#   TAPTALK_TRIGGER_ROWS (default 1000; scripts/soak: 10000)
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use Test::More;
use JSON::PP;
use PostgreSQL::Test::Utils;
use Time::HiRes qw(time);

my $clients = 8;
my $per_client = int(($ENV{TAPTALK_TRIGGER_ROWS} || 1000) / $clients);
my $rows = $per_client * $clients;
my $started = time;

my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node('trigger', mock => $mock, helpers => 1,
	conf => 'log_statement = none');
my $url = $mock->base_url;
my $log_mark = TaptalkTest::log_offset($node);

$node->safe_psql(
	'postgres', q{
CREATE TABLE load_user (
	id bigserial PRIMARY KEY,
	run int NOT NULL,
	full_name text NOT NULL,
	taptalk_user_id text,
	taptalk_error text
);
CREATE FUNCTION load_user_provision() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
	r taptalk_auth_ticket_result;
BEGIN
	r := taptalk_auth_ticket(jsonb_build_object(
		'userIPAddress', '10.0.0.1', 'userAgent', 'load-test', 'userPlatform', 'web',
		'userDeviceID', 'server', 'xcUserID', 'load-' || NEW.id, 'fullName', NEW.full_name));
	NEW.taptalk_user_id := r.user_id;
	NEW.taptalk_error := r.error_code;
	RETURN NEW;
END $$;
CREATE TRIGGER load_user_provision BEFORE INSERT ON load_user
	FOR EACH ROW EXECUTE FUNCTION load_user_provision();});

my $script = PostgreSQL::Test::Utils::tempdir('trigger') . '/trigger.pgbench';
append_to_file($script,
	"INSERT INTO load_user (run, full_name) VALUES (:run, 'user of client ' || :client_id);\n"
);

# run(RUN, MAX_RETRIES): one pgbench run; returns the mock's mark before it
sub run
{
	my ($run, $retries) = @_;
	my $mark = $mock->log_mark;
	my ($out, $err) = ('', '');
	local $ENV{PGOPTIONS} =
	  "-c taptalk.base_url=$url/failevery/5 -c taptalk.max_retries=$retries";
	my $ok = IPC::Run::run(
		[
			'pgbench', '-n', '-h', $node->host, '-p', $node->port,
			'-c', $clients, '-j', 2, '-t', $per_client,
			'-D', "run=$run", '-f', $script, 'postgres'
		],
		'>', \$out, '2>', \$err);
	ok($ok && "$out$err" !~ /aborted|error/,
		"run $run: pgbench ran every insert without an error")
	  or diag "$out\n$err";
	my ($tx) = $out =~ /^number of transactions actually processed: (\d+)/m;
	my ($failed) = $out =~ /^number of failed transactions: (\d+)/m;
	is( ($tx // 'missing') . ' ' . ($failed // 'missing'),
		"$rows 0",
		"run $run (max_retries = $retries): pgbench committed $rows inserts, none failed"
	);
	return $mark;
}

sub q1 { return $node->safe_psql('postgres', $_[0]); }

# rows_ok(RUN): every row of the run is there once, provisioned or marked
sub rows_ok
{
	my ($run) = @_;
	is(q1("SELECT count(*) FROM load_user WHERE run = $run"),
		$rows, "run $run: every inserted row is in the table");
	is( q1(
			"SELECT count(*) FROM load_user WHERE run = $run AND NOT (
			(taptalk_user_id = 'tt-load-' || id AND taptalk_error IS NULL)
			OR (taptalk_user_id IS NULL AND taptalk_error = 'HTTP_ERROR'))"),
		0,
		"run $run: each row has its user_id or the error code, never both or neither"
	);
	return;
}

# run 1: no retries, so exactly the mock's failures show
my $mark = run(1, 0);
TaptalkTest::no_crash($node, $log_mark, 'trigger load, run 1');
rows_ok(1);
my $errors1 =
  q1('SELECT count(*) FROM load_user WHERE run = 1 AND taptalk_error IS NOT NULL');
is($errors1, $rows / 5,
	"run 1: one row in five has HTTP_ERROR (the mock's every fifth request)");
my @seen;
for my $e (grep { $_->{event} eq 'request' } $mock->log_entries($mark))
{
	push @seen, decode_json($e->{body})->{xcUserID}
	  if $e->{path} =~ m{^/failevery/5/};
}
my %seen;
$seen{$_}++ for @seen;
my %inserted = map { ("load-$_" => 1) } split /\n/,
  q1('SELECT id FROM load_user WHERE run = 1');
my $missing = grep { !$seen{$_} } keys %inserted;
my $extra = grep { !$inserted{$_} } keys %seen;
is( join(' ', scalar(@seen), scalar(keys %seen), $missing, $extra),
	"$rows $rows 0 0",
	'run 1: the mock received each user exactly once, and only those (requests, distinct, missing, extra)'
);

# run 2: the default retries cure most of the failures
$mark = run(2, 2);
TaptalkTest::no_crash($node, $log_mark, 'trigger load, run 2');
rows_ok(2);
my $errors2 =
  q1('SELECT count(*) FROM load_user WHERE run = 2 AND taptalk_error IS NOT NULL');
my $requests2 =
  $mock->count($mark, 'request', undef, qr/"path":"\/failevery\/5\//);
cmp_ok($errors2, '<', $rows / 20,
	"run 2: with retries fewer than 1 row in 20 has an error ($errors2 of $rows; $requests2 requests for $rows rows)"
);
note sprintf(
	'trigger load: %d clients, %d rows per run in %d s; no retries: %d HTTP_ERROR; 2 retries: %d HTTP_ERROR; nothing lost or duplicated',
	$clients, $rows, time - $started, $errors1, $errors2);

$node->stop;
$mock->stop;
done_testing();
