# test/t/40_fuzz.sh: hostile input.  test/fuzz_requests.py builds a seeded,
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
source "$ROOT/test/script_helpers.sh"

fuzz_count=${TAPTALK_FUZZ_COUNT:-2000}
fuzz_seed=${TAPTALK_FUZZ_SEED:-20240601}
fuzz_file=$WORK/fuzz-inputs.tsv
fuzz_start=$(date +%s%N)

fuzz_kinds=$("$PYTHON" "$ROOT/test/fuzz_requests.py" --seed "$fuzz_seed" \
	--count "$fuzz_count" --out "$fuzz_file" --stats)
chmod 644 "$fuzz_file"
t_ok "generated $fuzz_kinds"

log_mark=$(t_log_mark)
mock_mark=$(t_mock_mark)

t_sql -q <<SQL
SET client_min_messages = warning;
DROP TABLE IF EXISTS fuzz_in, fuzz_parsed, fuzz_out, fuzz_batch;
CREATE TABLE fuzz_in (id int PRIMARY KEY, b64 text NOT NULL);
\\copy fuzz_in FROM '$fuzz_file'
CREATE TABLE fuzz_parsed (id int PRIMARY KEY, j jsonb NOT NULL);
CREATE TABLE fuzz_out (
	id int PRIMARY KEY, stage text NOT NULL, sqlstate text, message text,
	user_id text, ticket text, error_code text, error_field text, error_message text);
SET taptalk.timeout_ms = 20000;
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
	 LATERAL taptalk_auth_tickets(g.js) b;
SQL

t_no_crash "fuzz" "$log_mark"

# fuzz_q SQL: one number (or text) from the results
fuzz_q() {
	t_sql -c "$1"
}

got=$(fuzz_q "SELECT count(*) FROM fuzz_out")
t_check "every input has exactly one outcome" "$fuzz_count" "$got"

# failures of the cast are the server's JSON parser and UTF-8 checks, none internal
fuzz_parse=$(fuzz_q "SELECT string_agg(sqlstate || '=' || n, ' ' ORDER BY sqlstate)
	FROM (SELECT sqlstate, count(*) AS n FROM fuzz_out WHERE stage = 'parse' GROUP BY 1) s")
got=$(fuzz_q "SELECT count(*) FROM fuzz_out WHERE stage = 'parse' AND sqlstate !~ '^(22|54)'")
t_check "inputs refused before the function: only data or limit errors ($fuzz_parse)" 0 "$got"

# the one ERROR the function may raise: a request that is not an object
got=$(fuzz_q "SELECT count(*) FROM fuzz_out o JOIN fuzz_parsed p USING (id)
	WHERE o.stage = 'error' AND NOT (o.sqlstate = '22023'
		AND o.message LIKE 'taptalk request must be a JSON object, not %'
		AND jsonb_typeof(p.j) <> 'object')")
if [ "$got" != 0 ]; then
	t_fail "the function raised only for non-objects" \
		"$(fuzz_q "SELECT id || ': ' || sqlstate || ' ' || message FROM fuzz_out WHERE stage = 'error' AND sqlstate <> '22023' LIMIT 5")"
fi
got=$(fuzz_q "SELECT count(*) FROM fuzz_out o JOIN fuzz_parsed p USING (id)
	WHERE o.stage = 'row' AND jsonb_typeof(p.j) <> 'object'")
t_check "the function raised for every non-object and only for those" 0 "$got"

# rows: a success (user_id and ticket) or a parameter failure, nothing else
got=$(fuzz_q "SELECT count(*) FROM fuzz_out WHERE stage = 'row' AND NOT (
	(error_code IS NULL AND user_id IS NOT NULL AND ticket IS NOT NULL)
	OR (error_code = '40002' AND user_id IS NULL AND ticket IS NULL AND error_message IS NOT NULL))")
if [ "$got" != 0 ]; then
	t_fail "every row is a success or a 40002" \
		"$(fuzz_q "SELECT id || ': ' || coalesce(error_code, '-') || ' ' || left(coalesce(error_message, ''), 100) FROM fuzz_out WHERE stage = 'row' AND error_code IS DISTINCT FROM '40002' AND user_id IS NULL LIMIT 5")"
fi
fuzz_rows=$(fuzz_q "SELECT format('%s rows: %s successes, %s 40002, %s errors 22023',
	count(*) FILTER (WHERE stage = 'row'),
	count(*) FILTER (WHERE stage = 'row' AND error_code IS NULL),
	count(*) FILTER (WHERE error_code = '40002'),
	count(*) FILTER (WHERE stage = 'error')) FROM fuzz_out")
t_ok "every call returned a row or the clean ERROR: $fuzz_rows"

# a success carries the xcUserID exactly as given (escaping and UTF-8 round trip)
got=$(fuzz_q "SELECT count(*) FROM fuzz_out o JOIN fuzz_parsed p USING (id)
	WHERE o.stage = 'row' AND o.error_code IS NULL AND jsonb_typeof(p.j->'xcUserID') = 'string'
	  AND o.user_id IS DISTINCT FROM 'tt-' || (p.j->>'xcUserID')")
t_check "each success's user_id is 'tt-' || the xcUserID string sent" 0 "$got"

# the batch function answers as the single calls did
got=$(fuzz_q "SELECT count(*) FROM fuzz_batch")
t_check "the batch function gave one row per parsed input" \
	"$(fuzz_q "SELECT count(*) FROM fuzz_parsed")" "$got"
got=$(fuzz_q "SELECT count(*) FROM fuzz_batch b JOIN fuzz_out o USING (id)
	WHERE CASE WHEN o.stage = 'error'
		THEN NOT (b.error_code = '40002' AND b.error_message LIKE 'Request must be a JSON object, not %')
		ELSE (b.user_id, b.ticket, b.error_code, b.error_field, b.error_message) IS DISTINCT FROM
			 (o.user_id, o.ticket, o.error_code, o.error_field, o.error_message) END")
t_check "taptalk_auth_tickets answered each input as taptalk_auth_ticket did" 0 "$got"

# what the mock received: valid JSON, every time
fuzz_mock=$(tail -c +"$((mock_mark + 1))" "$MOCK_LOG" | "$PYTHON" -c '
import json, sys
n = bad = fault = 0
for line in sys.stdin:
    e = json.loads(line)
    if e.get("event") != "request":
        continue
    n += 1
    if not e["body_is_json"]:
        bad += 1
        print("not JSON: %r" % e["body"][:200], file=sys.stderr)
    elif str(json.loads(e["body"]).get("xcUserID", "")).startswith("fault-"):
        fault += 1
print(n, bad, fault)')
read -r fuzz_n fuzz_bad fuzz_fault <<<"$fuzz_mock"
[ "$fuzz_n" -gt 0 ] || t_fail "the mock received requests" "$fuzz_mock"
t_check "the mock received $fuzz_n requests, every body valid JSON (non-JSON, fault- ids)" "0 0" "$fuzz_bad $fuzz_fault"
# Requests the extension sent but the mock refused (its 40002): the mock
# strips Unicode white space, the extension only ASCII white space, so a
# field of, say, U+00A0 alone passes here and fails there.  A figure, not a
# failure: TapTalk's own rule is not documented.
fuzz_ok=$(fuzz_q "SELECT count(*) FROM fuzz_out WHERE stage = 'row' AND error_code IS NULL")
t_ok "fuzz: $fuzz_count inputs (seed $fuzz_seed) in $(($(t_elapsed_ms "$fuzz_start") / 1000)) s; $fuzz_rows; $fuzz_n requests reached the mock (single + batch), $((fuzz_n / 2 - fuzz_ok)) per pass refused by the mock after passing the extension's checks"
t_sql -q -c "DROP TABLE fuzz_in, fuzz_parsed, fuzz_out, fuzz_batch"
rm -f "$fuzz_file"
