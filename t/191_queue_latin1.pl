# t/191_queue_latin1.pl: the queue's worker in a LATIN1 database.
#
# The worker builds requests and maps answers between its transactions;
# converting between LATIN1 and UTF-8 there must not read the catalog
# (it crashed the worker, and with it the whole server, in a loop).
# - A request whose fullName is 'José' (LATIN1 é) is sent as UTF-8 and
#   succeeds; its callback runs.
# - Answers with non-ASCII text: a userID with é (representable: the
#   request succeeds with it), an error message with é, an error message
#   with a character LATIN1 lacks (a '?' in its place), and a userID with
#   such a character (INVALID_RESPONSE).
# - The synchronous functions in the same database give the same results.
# - No process of the server crashed or exited.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use TaptalkTest;
use PostgreSQL::Test::Utils;
use Test::More;

$ENV{PGCLIENTENCODING} = "LATIN1";
my $mock = TaptalkTest::Mock->start;
my $node = TaptalkTest::node('latin1', mock => $mock, extension => 0);

$node->safe_psql('postgres',
	"CREATE DATABASE lat ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0");
$node->append_conf('postgresql.conf', "taptalk.database = 'lat'\nrestart_after_crash = on");
$node->restart;
my $offset = TaptalkTest::log_offset($node);

sub q1 { return $node->safe_psql('lat', $_[0]); }

q1('CREATE EXTENSION taptalk');
TaptalkTest::create_helpers($node, 'lat');
q1(q{
CREATE TABLE outcomes (request_id bigint, user_id text, error_code text, message text);
CREATE FUNCTION record_outcome(request_id bigint, request jsonb,
							   result taptalk_auth_ticket_result)
RETURNS void LANGUAGE sql AS $$
	INSERT INTO public.outcomes
	VALUES (request_id, (result).user_id, (result).error_code, (result).error_message)
$$;
});

my $cb = 'public.record_outcome(bigint, jsonb, public.taptalk_auth_ticket_result)';
q1(qq{
SELECT taptalk_enqueue(req('lat-jose') || '{"fullName": "Jos\\u00e9"}', '$cb');
SELECT taptalk_enqueue(req('fault-unicode-userid-raw-e9'), '$cb');
SELECT taptalk_enqueue(req('fault-unicode-message-raw-e9'), '$cb');
SELECT taptalk_enqueue(req('fault-unicode-message-raw-263a'), '$cb');
SELECT taptalk_enqueue(req('fault-unicode-userid-raw-263a'), '$cb');
});
ok( $node->poll_query_until('lat',
		"SELECT count(*) = 0 FROM taptalk_queue WHERE state IN ('queued', 'sending')"),
	'the LATIN1 queue drains');

# the database's encoding, shown as UTF-8 by psql's client encoding
is( q1(q{SELECT string_agg(format('%s %s %s %s %s', request->>'xcUserID', state, attempts,
		coalesce(user_id, '-'), coalesce(error_code, '-')), E'\n' ORDER BY id)
		FROM taptalk_queue}),
	"lat-jose succeeded 1 tt-lat-jose -\n"
	  . "fault-unicode-userid-raw-e9 succeeded 1 tt-\x{e9} -\n"
	  . "fault-unicode-message-raw-e9 failed 1 - 40002\n"
	  . "fault-unicode-message-raw-263a failed 1 - 40002\n"
	  . "fault-unicode-userid-raw-263a failed 1 - INVALID_RESPONSE",
	'each request has its outcome, converted from UTF-8');
is( q1(q{SELECT string_agg(coalesce(message, '-'), E'\n' ORDER BY request_id) FROM outcomes}),
	"-\n-\nParam 'fullName' has \x{e9}\nParam 'fullName' has ?\n"
	  . 'response data.userID has a character with no equivalent in encoding "LATIN1"',
	'the callbacks got the messages in LATIN1');

use MIME::Base64 qw(decode_base64);
my $seen = grep {
	$_->{event} eq 'request'
	  && decode_base64($_->{body_b64} // '') =~ /"fullName":"Jos\xc3\xa9"/
} $mock->log_entries(0);
ok($seen >= 1, 'TapTalk got José in UTF-8');

# the synchronous paths in the same database
is( q1(q{SELECT format('%s %s', (r).user_id, (r).error_code)
		FROM (SELECT taptalk_auth_ticket(req('fault-unicode-userid-raw-e9')) AS r) s}),
	"tt-\x{e9} ", 'taptalk_auth_ticket: the same answer in LATIN1');
is( q1(q{SELECT string_agg(coalesce(user_id, error_code), ' ' ORDER BY ord)
		FROM taptalk_auth_tickets(ARRAY[req('lat-b1') || '{"fullName": "Jos\u00e9"}',
			req('fault-unicode-userid-raw-263a')])}),
	'tt-lat-b1 INVALID_RESPONSE', 'taptalk_auth_tickets: the same in LATIN1');

TaptalkTest::no_crash($node, $offset, 'LATIN1 queue');
is(TaptalkTest::worker_pid($node, 'lat') ne '', 1, 'the worker still runs');

done_testing();
