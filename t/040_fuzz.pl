# t/040_fuzz.pl: hostile input.  test/fuzz_requests.py builds a seeded,
# reproducible set of would-be JSON request texts (deep nesting, 1 MiB
# strings, every JSON type in every field, invalid UTF-8, lone surrogate and
# \u0000 escapes, thousands of keys, malformed JSON...).  Each is cast to
# jsonb (a failure there happens before the function and is fine) and passed
# to taptalk_auth_ticket against the mock, then all of them again in batches
# to taptalk_auth_tickets.  The server never crashes, every call returns a
# row or the one clean ERROR (a request that is not an object), every row is
# a success or a 40002, a success's user_id is the xcUserID sent, the batch
# answers as the single calls do, and the mock never receives a body that is
# not valid JSON.
#   TAPTALK_FUZZ_COUNT (default 2000; scripts/soak: 10000), TAPTALK_FUZZ_SEED
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use Test::More;
use PostgreSQL::Test::Utils;
use Time::HiRes qw(time);

my $count = $ENV{TAPTALK_FUZZ_COUNT} || 2000;
my $seed = $ENV{TAPTALK_FUZZ_SEED} || 20240601;
my $started = time;

my $mock = TaptalkTest::Mock->start;
# log_statement = all would write each 1 MiB input to the server log
my $node = TaptalkTest::node('fuzz', mock => $mock, helpers => 1,
	conf => 'log_statement = none');

my $file = PostgreSQL::Test::Utils::tempdir('fuzz') . '/fuzz-inputs.tsv';
my ($kinds, $err) = ('', '');
IPC::Run::run(
	[
		$TaptalkTest::PYTHON, "$TaptalkTest::ROOT/test/fuzz_requests.py",
		'--seed', $seed, '--count', $count, '--out', $file, '--stats'
	],
	'>', \$kinds, '2>', \$err) or BAIL_OUT("fuzz_requests.py failed: $err");
chomp $kinds;
ok(-s $file, "generated $kinds");

my $log_mark = TaptalkTest::log_offset($node);
my $mock_mark = $mock->log_mark;

$node->safe_psql(
	'postgres', qq{
SET client_min_messages = warning;
CREATE TABLE fuzz_in (id int PRIMARY KEY, b64 text NOT NULL);
\\copy fuzz_in FROM '$file'
CREATE TABLE fuzz_parsed (id int PRIMARY KEY, j jsonb NOT NULL);
CREATE TABLE fuzz_out (
	id int PRIMARY KEY, stage text NOT NULL, sqlstate text, message text,
	user_id text, ticket text, error_code text, error_field text, error_message text);
SET taptalk.timeout = 20000;
DO \$\$
DECLARE
	rec record;
	j jsonb;
	r taptalk_auth_ticket_result;
BEGIN
	FOR rec IN SELECT id, b64 FROM fuzz_in ORDER BY id LOOP
		-- the cast: errors here happen before the function
		BEGIN
			j := convert_from(decode(rec.b64, 'base64'), 'UTF8')::jsonb;
		EXCEPTION WHEN others THEN
			INSERT INTO fuzz_out (id, stage, sqlstate, message)
			VALUES (rec.id, 'parse', SQLSTATE, left(SQLERRM, 200));
			CONTINUE;
		END;
		INSERT INTO fuzz_parsed VALUES (rec.id, j);
		BEGIN
			r := taptalk_auth_ticket(j);
			INSERT INTO fuzz_out VALUES (rec.id, 'row', NULL, NULL, r.user_id,
				r.ticket, r.error_code, r.error_field, r.error_message);
		EXCEPTION WHEN others THEN
			INSERT INTO fuzz_out (id, stage, sqlstate, message)
			VALUES (rec.id, 'error', SQLSTATE, left(SQLERRM, 200));
		END;
	END LOOP;
END \$\$;
-- the same inputs through the batch function, 100 at a time
CREATE TABLE fuzz_batch AS
SELECT g.ids[b.ord] AS id, b.user_id, b.ticket, b.error_code, b.error_field, b.error_message
FROM (SELECT id / 100 AS grp, array_agg(id ORDER BY id) AS ids, array_agg(j ORDER BY id) AS js
	  FROM fuzz_parsed GROUP BY 1) g,
	 LATERAL taptalk_auth_tickets(g.js) b;});

TaptalkTest::no_crash($node, $log_mark, 'fuzz');

sub q1 { return $node->safe_psql('postgres', $_[0]); }

is(q1('SELECT count(*) FROM fuzz_out'), $count,
	'every input has exactly one outcome');

# failures of the cast are the server's JSON parser and UTF-8 checks, none internal
my $parse = q1(
	"SELECT string_agg(sqlstate || '=' || n, ' ' ORDER BY sqlstate)
	FROM (SELECT sqlstate, count(*) AS n FROM fuzz_out WHERE stage = 'parse' GROUP BY 1) s"
);
is( q1(
		"SELECT count(*) FROM fuzz_out WHERE stage = 'parse' AND sqlstate !~ '^(22|54)'"
	),
	0,
	"inputs refused before the function: only data or limit errors ($parse)");

# the one ERROR the function may raise: a request that is not an object
is( q1(
		"SELECT count(*) FROM fuzz_out o JOIN fuzz_parsed p USING (id)
	WHERE o.stage = 'error' AND NOT (o.sqlstate = '22023'
		AND o.message LIKE 'taptalk request must be a JSON object, not %'
		AND jsonb_typeof(p.j) <> 'object')"),
	0,
	'the function raised only for non-objects'
  )
  or diag q1(
	"SELECT string_agg(id || ': ' || sqlstate || ' ' || message, E'\\n') FROM (SELECT * FROM fuzz_out WHERE stage = 'error' AND sqlstate <> '22023' LIMIT 5) s"
  );
is( q1(
		"SELECT count(*) FROM fuzz_out o JOIN fuzz_parsed p USING (id)
	WHERE o.stage = 'row' AND jsonb_typeof(p.j) <> 'object'"),
	0,
	'the function raised for every non-object and only for those');

# rows: a success (user_id and ticket) or a parameter failure, nothing else
my $rows = q1(
	"SELECT format('%s rows: %s successes, %s 40002, %s errors 22023',
	count(*) FILTER (WHERE stage = 'row'),
	count(*) FILTER (WHERE stage = 'row' AND error_code IS NULL),
	count(*) FILTER (WHERE error_code = '40002'),
	count(*) FILTER (WHERE stage = 'error')) FROM fuzz_out");
is( q1(
		"SELECT count(*) FROM fuzz_out WHERE stage = 'row' AND NOT (
	(error_code IS NULL AND user_id IS NOT NULL AND ticket IS NOT NULL)
	OR (error_code = '40002' AND user_id IS NULL AND ticket IS NULL AND error_message IS NOT NULL))"
	),
	0,
	"every call returned a success, a 40002 or the clean ERROR: $rows"
  )
  or diag q1(
	"SELECT string_agg(id || ': ' || coalesce(error_code, '-') || ' ' || left(coalesce(error_message, ''), 100), E'\\n')
	FROM (SELECT * FROM fuzz_out WHERE stage = 'row' AND error_code IS DISTINCT FROM '40002' AND user_id IS NULL LIMIT 5) s"
  );

# a success carries the xcUserID exactly as given (escaping and UTF-8 round trip)
is( q1(
		"SELECT count(*) FROM fuzz_out o JOIN fuzz_parsed p USING (id)
	WHERE o.stage = 'row' AND o.error_code IS NULL AND jsonb_typeof(p.j->'xcUserID') = 'string'
	  AND o.user_id IS DISTINCT FROM 'tt-' || (p.j->>'xcUserID')"),
	0,
	"each success's user_id is 'tt-' || the xcUserID string sent");

# the batch function answers as the single calls did
is( q1('SELECT count(*) FROM fuzz_batch'),
	q1('SELECT count(*) FROM fuzz_parsed'),
	'the batch function gave one row per parsed input');
is( q1(
		"SELECT count(*) FROM fuzz_batch b JOIN fuzz_out o USING (id)
	WHERE CASE WHEN o.stage = 'error'
		THEN NOT (b.error_code = '40002' AND b.error_message LIKE 'Request must be a JSON object, not %')
		ELSE (b.user_id, b.ticket, b.error_code, b.error_field, b.error_message) IS DISTINCT FROM
			 (o.user_id, o.ticket, o.error_code, o.error_field, o.error_message) END"
	),
	0,
	'taptalk_auth_tickets answered each input as taptalk_auth_ticket did');

# what the mock received: valid JSON, every time (read from the log's lines
# as written, since some bodies are a megabyte: body_is_json is the mock's
# own verdict; an xcUserID starting with "fault-" shows in the escaped body)
my ($n, $bad, $fault) = (0, 0, 0);
$mock->scan_log(
	$mock_mark,
	sub {
		my ($line) = @_;
		return unless $line =~ /^\{"event":"request",/;
		$n++;
		if ($line !~ /"body_is_json":true[,}]/)
		{
			$bad++;
			diag 'not JSON: ' . substr($line, 0, 300);
		}
		$fault++ if $line =~ /\\"xcUserID\\":\s*\\"fault-/;
	});
cmp_ok($n, '>', 0, 'the mock received requests');
is("$bad $fault", '0 0',
	"the mock received $n requests, every body valid JSON (non-JSON, fault- ids)");

# Requests the extension sent but the mock refused (its 40002): the mock
# strips Unicode white space, the extension only ASCII white space, so a
# field of, say, U+00A0 alone passes here and fails there.  A figure, not a
# failure: TapTalk's own rule is not documented.
my $ok = q1("SELECT count(*) FROM fuzz_out WHERE stage = 'row' AND error_code IS NULL");
note sprintf(
	'fuzz: %d inputs (seed %d) in %d s; %s; %d requests reached the mock (single + batch), %d per pass refused by the mock after passing the extension\'s checks',
	$count, $seed, time - $started, $rows, $n, $n / 2 - $ok);

$node->stop;
$mock->stop;
done_testing();
