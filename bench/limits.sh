# bench/limits.sh: the rate-limit phase of scripts/bench (sourced by it):
# how the queue's worker and taptalk_auth_tickets fare against a server that
# enforces a quota, and whether taptalk.max_rate holds every sender of the
# cluster to its budget.
#
# The limited server is nginx's own limit_req in front of the slow answer of
# the slot phase (bench/nginx.conf.in, locations /limit-text and
# /limit-json): one token bucket for every request, LIMIT_RATE requests a
# second with a burst of LIMIT_BURST admitted at once (burst=LIMIT_BURST
# nodelay: a quota of LIMIT_RATE a second that holds one second's worth of
# requests; without burst, nginx would refuse any two requests less than
# 1/LIMIT_RATE s apart, which no real quota does).  A request over the
# quota is answered at once with a 429 and "Retry-After: 1", its body plain
# text (variant "text", base URL .../limit-text) or TapTalk's error envelope,
# code 42900 (variant "envelope", .../limit-json); a request within it gets
# the success envelope after SLOT_DELAY_MS.  A refused request takes no
# token.  nginx logs each answer with its status (limits.log), so every
# measurement counts the requests nginx received, 200s and 429s.  Each
# limited measurement starts with a full bucket: the phase waits
# LIMIT_PAUSE_S (more than the second a bucket takes to refill) before it,
# with nothing sent meanwhile.
#
#   queue    LIMIT_QUEUE_REQUESTS requests enqueued in one transaction (no
#            callback), the worker pointed at the limited server (ALTER
#            SYSTEM, reload) with its default settings
#            (taptalk.worker_concurrency reset to 32); once with each
#            variant.  Timed from the commit of the enqueuing transaction
#            (track_commit_timestamp) to the commit of the worker's
#            transaction that recorded the last outcome.  The ideal: the
#            bucket starts full, so LIMIT_BURST requests go at once and each
#            other one waits for a token, one every 1/LIMIT_RATE s; the last
#            is answered SLOT_DELAY_MS after its token:
#                ideal = (requests - burst) / rate + delay
#            (19.05 s for 2,000 at 100/s with a burst of 100 and 50 ms), the
#            least any client can take.  Attempts: the requests nginx
#            received (200s and 429s), against the requests.  nginx's log
#            also gives the 429s and the 200s of each second of the drain,
#            which show the worker's pace.
#   batch    SELECT ... FROM taptalk_auth_tickets(<LIMIT_BATCH_REQUESTS
#            requests>) in one session with default settings, its
#            taptalk.base_url the limited server; the envelope variant, then
#            the text one.  Every row must succeed; attempts as above.
#   max_rate taptalk.max_rate = LIMIT_MAX_RATE (ALTER SYSTEM, reload), the
#            slow location WITHOUT a limit (/slow, bench/slots.sh's log):
#            four sessions at once, two calling taptalk_auth_tickets over
#            LIMIT_RATE_BATCH requests in a loop and two calling
#            taptalk_auth_ticket in a loop, and the worker draining
#            LIMIT_RATE_QUEUE enqueued requests, all from the same instant
#            for LIMIT_RATE_RAMP_S + LIMIT_RATE_SECONDS + 1 seconds.  The
#            rate: the requests that arrived at nginx in the
#            LIMIT_RATE_SECONDS that start LIMIT_RATE_RAMP_S after that
#            instant (the start and the end, where not every sender is busy,
#            left out), per second.  Skipped, and said so, when the server
#            has no taptalk.max_rate.  taptalk.max_rate is reset (0, no
#            limit) afterwards, so nothing else runs with it.
#
# Targets: every queued request succeeds; the queue's attempts <=
# LIMIT_QUEUE_ATTEMPTS times the requests and its drain <= LIMIT_QUEUE_DRAIN
# times the ideal, with each variant; every row of each batch succeeds, its
# attempts <= LIMIT_BATCH_ATTEMPTS times the requests; the rate under
# taptalk.max_rate within LIMIT_RATE_TOLERANCE percent of it, and every
# request of that measurement succeeds.  taptalk_stats' rate_limited and
# rate_limit_wait_ms and taptalk_worker's concurrency are shown when the
# extension has them ("-" otherwise).
#
# Needs, from scripts/bench: BENCH_DIR, URL, REQ, and pg, target; from
# bench/slots.sh: SLOT_LOG, SLOT_DELAY_MS.  scripts/bench substitutes
# LIMIT_RATE and LIMIT_BURST into nginx's configuration.  Settings
# (environment): BENCH_LIMIT_RATE (100), BENCH_LIMIT_BURST (100),
# BENCH_LIMIT_QUEUE_REQUESTS (2000), BENCH_LIMIT_BATCH_REQUESTS (300),
# BENCH_LIMIT_RATE_SECONDS (10).

LIMIT_RATE=${BENCH_LIMIT_RATE:-100}
LIMIT_BURST=${BENCH_LIMIT_BURST:-100}
LIMIT_QUEUE_REQUESTS=${BENCH_LIMIT_QUEUE_REQUESTS:-2000}
LIMIT_BATCH_REQUESTS=${BENCH_LIMIT_BATCH_REQUESTS:-300}
LIMIT_RATE_SECONDS=${BENCH_LIMIT_RATE_SECONDS:-10}
LIMIT_MAX_RATE=100
LIMIT_RATE_RAMP_S=2
LIMIT_RATE_BATCH=20
# more than the worker could send in the measurement even if it had the
# whole budget, so it never runs dry
LIMIT_RATE_QUEUE=$(( (LIMIT_RATE_RAMP_S + LIMIT_RATE_SECONDS + 1) * LIMIT_MAX_RATE * 3 / 2 ))
LIMIT_PAUSE_S=2
LIMIT_QUEUE_ATTEMPTS=1.10
LIMIT_QUEUE_DRAIN=1.15
LIMIT_BATCH_ATTEMPTS=1.25
LIMIT_RATE_TOLERANCE=5
# the longest a drain may take before the run is called broken
LIMIT_DRAIN_TIMEOUT_S=300

# nginx's log of the limited locations: "MSEC REQUEST_TIME STATUS URI"
LIMIT_LOG=$BENCH_DIR/limits.log

# limits_setup: the SQL functions, and the worker's settings to restore
limits_setup() {
	pg <<'SQL'
-- taptalk_stats, as jsonb per path, at named moments: the columns a version
-- lacks are simply absent
CREATE TABLE bench_limits_snap (tag text, path text, s jsonb, PRIMARY KEY (tag, path));
CREATE FUNCTION bench_limits_snap(text) RETURNS void LANGUAGE sql AS $$
	DELETE FROM bench_limits_snap WHERE tag = $1;
	INSERT INTO bench_limits_snap SELECT $1, s.path, to_jsonb(s) FROM taptalk_stats s;
$$;
-- what one path's counters gained from snapshot $1 to snapshot $2:
-- "REQUESTS ATTEMPTS SUCCESSES FAILURES RATE_LIMITED RATE_LIMIT_WAIT_MS",
-- "-" for a column taptalk_stats does not have
CREATE FUNCTION bench_limits_delta(text, text, text) RETURNS text LANGUAGE sql AS $$
	SELECT string_agg(coalesce(round((a.s->>u.c)::numeric - (b.s->>u.c)::numeric)::text, '-'),
		' ' ORDER BY u.o)
	FROM bench_limits_snap b
	JOIN bench_limits_snap a ON a.path = b.path AND a.tag = $2,
	unnest(ARRAY['requests', 'attempts', 'successes', 'failures',
		'rate_limited', 'rate_limit_wait_ms']) WITH ORDINALITY AS u(c, o)
	WHERE b.tag = $1 AND b.path = $3
$$;

-- one batch of n requests: seconds, rows that succeeded, the others'
-- error codes ("CODExCOUNT,...", or "-")
CREATE FUNCTION bench_limits_batch(n int, req jsonb,
	OUT seconds float8, OUT ok bigint, OUT errors text)
LANGUAGE plpgsql AS $$
DECLARE
	t timestamptz := clock_timestamp();
BEGIN
	WITH r AS MATERIALIZED (SELECT * FROM taptalk_auth_tickets(array_fill(req, ARRAY[n])))
	SELECT count(*) FILTER (WHERE r.error_code IS NULL AND r.user_id = 'tt-1'),
		coalesce((SELECT string_agg(e || 'x' || c, ',' ORDER BY e)
			FROM (SELECT coalesce(error_code, 'none') e, count(*) c FROM r
				WHERE error_code IS NOT NULL OR user_id IS DISTINCT FROM 'tt-1'
				GROUP BY 1) g), '-')
	INTO ok, errors FROM r;
	seconds := extract(epoch FROM clock_timestamp() - t);
END $$;

-- the max_rate measurement's sessions: from start until stop, batches of n
-- requests (n > 0) or single calls (n = 0) in a loop; requests sent and
-- how many succeeded
CREATE FUNCTION bench_limits_load(start timestamptz, stop timestamptz, n int, req jsonb,
	OUT requests bigint, OUT ok bigint)
LANGUAGE plpgsql AS $$
DECLARE
	r taptalk_auth_ticket_result;
	k bigint;
BEGIN
	requests := 0; ok := 0;
	PERFORM pg_sleep_until(start);
	WHILE clock_timestamp() < stop LOOP
		IF n > 0 THEN
			SELECT count(*) FILTER (WHERE error_code IS NULL AND user_id = 'tt-1') INTO k
			FROM taptalk_auth_tickets(array_fill(req, ARRAY[n]));
			requests := requests + n;
			ok := ok + k;
		ELSE
			r := taptalk_auth_ticket(req);
			requests := requests + 1;
			IF r.error_code IS NULL AND r.user_id = 'tt-1' THEN
				ok := ok + 1;
			END IF;
		END IF;
	END LOOP;
END $$;
SQL
	read -r limits_saved_url limits_saved_conc <<<"$(pg -c "SELECT current_setting('taptalk.base_url'), current_setting('taptalk.worker_concurrency')")"
	limits_have_max_rate=$(pg -c "SELECT count(*) FROM pg_settings WHERE name = 'taptalk.max_rate'")
}

# limits_reload: reload the configuration; the worker gets it through the
# postmaster, give it a moment
limits_reload() {
	pg -c "SELECT pg_reload_conf()" >/dev/null
	sleep 1
}

# limits_log_size: the size of limits.log now
limits_log_size() {
	if [ -f "$LIMIT_LOG" ]; then stat -c %s "$LIMIT_LOG"; else echo 0; fi
}

# limits_log_counts OFFSET PATH: "RECEIVED OK_200 LIMITED_429 OTHER" of the
# answers nginx logged after OFFSET for requests under PATH (a request
# under another path there would be a broken run)
limits_log_counts() {
	sleep 0.3	# nginx logs just after answering
	tail -c +"$(($1 + 1))" "$LIMIT_LOG" | awk -v p="$2/" '
		index($4, p) != 1 { stray++; next }
		{ n++; if ($3 == 200) ok++; else if ($3 == 429) lim++; else other++ }
		END {
			if (stray) { print stray " requests under another path" > "/dev/stderr"; exit 1 }
			printf "%d %d %d %d\n", n, ok, lim, other }'
}

# limits_log_429s OFFSET PATH: when nginx answered 429 under PATH after
# OFFSET, by second since the first request's arrival: "SECOND:COUNT,..."
# ("-" for none)
limits_log_429s() {
	tail -c +"$(($1 + 1))" "$LIMIT_LOG" | awk -v p="$2/" '
		index($4, p) != 1 { next }
		{ a = $1 - $2; if (!seen || a < first) first = a; seen = 1
		  if ($3 == 429) t[++n] = $1 }
		END {
			for (i = 1; i <= n; i++) { s = int(t[i] - first); if (!(s in c)) o[++k] = s; c[s]++ }
			if (k == 0) { print "-"; exit }
			for (i = 1; i <= k; i++) printf "%s%d:%d", (i > 1 ? "," : ""), o[i], c[o[i]]
			print "" }'
}

# limits_log_pace OFFSET PATH: the requests under PATH that nginx admitted
# (200s) in each second since the first request's arrival: "N,N,..."
limits_log_pace() {
	tail -c +"$(($1 + 1))" "$LIMIT_LOG" | awk -v p="$2/" '
		index($4, p) != 1 { next }
		{ a = $1 - $2; if (!seen || a < first) first = a; seen = 1
		  if ($3 == 200) t[++n] = a }
		END {
			if (n == 0) { print "-"; exit }
			for (i = 1; i <= n; i++) { s = int(t[i] - first); c[s]++; if (s > last) last = s }
			for (s = 0; s <= last; s++) printf "%s%d", (s > 0 ? "," : ""), c[s]
			print "" }'
}

# limits_wait_idle FIRST LAST: until no request from FIRST to LAST is queued
# or sending, sampling taptalk_worker meanwhile into $BENCH_DIR/limits_samples
# ("STATE IN_FLIGHT CONCURRENCY", "-" when the view has no concurrency)
limits_wait_idle() {
	local first=$1 last=$2 started out left
	started=$(date +%s)
	: >"$BENCH_DIR/limits_samples"
	for (( ; ; )); do
		out=$(pg -v first="$first" -v last="$last" <<'SQL'
SELECT (SELECT count(*) FROM taptalk_queue
		WHERE id BETWEEN :first AND :last AND state IN ('queued', 'sending')),
	replace(w.state, ' ', '_'), w.in_flight, coalesce(to_jsonb(w)->>'concurrency', '-')
FROM taptalk_worker w;
SQL
)
		read -r left out <<<"$out"
		echo "$out" >>"$BENCH_DIR/limits_samples"
		[ "$left" = 0 ] && return 0
		if [ $(($(date +%s) - started)) -ge "$LIMIT_DRAIN_TIMEOUT_S" ]; then
			echo "the queue still holds $left requests after ${LIMIT_DRAIN_TIMEOUT_S}s" >&2
			exit 1
		fi
		sleep 0.2
	done
}

# limits_samples_summary: "SAMPLES RATE_LIMITED CONC_MIN CONC_MEDIAN CONC_MAX"
# of the samples limits_wait_idle took (the concurrency over samples where
# the worker was sending)
limits_samples_summary() {
	awk '{ n++; if ($1 == "rate_limited") rl++
		if ($3 != "-" && $1 == "sending") print "c", $3
		else if ($3 == "-") nc = 1 }
		END { print "n", n + 0, rl + 0, nc + 0 }' "$BENCH_DIR/limits_samples" |
		awk '$1 == "c" { v[++k] = $2 } $1 == "n" { n = $2; rl = $3 }
		END {
			if (k == 0) { printf "%d %d - - -\n", n, rl; exit }
			# sort the concurrency samples
			for (i = 2; i <= k; i++) { x = v[i]; for (j = i - 1; j >= 1 && v[j] > x; j--) v[j + 1] = v[j]; v[j + 1] = x }
			printf "%d %d %d %d %d\n", n, rl, v[1], v[int((k + 1) / 2)], v[k] }'
}

# limits_enqueue N TAG: N requests enqueued in one transaction; "FIRST LAST
# COMMIT_EPOCH"
limits_enqueue() {
	pg -v n="$1" -v tag="$2" -v req="$REQ" <<'SQL'
BEGIN;
SELECT pg_current_xact_id()::text AS xid, min(id) AS first, max(id) AS last
FROM (SELECT taptalk_enqueue(jsonb_set(:'req'::jsonb, '{xcUserID}',
		to_jsonb('limits-' || :'tag' || '-' || i))) AS id
	FROM generate_series(1, :n) i) e \gset
COMMIT;
SELECT :first, :last, extract(epoch FROM pg_xact_commit_timestamp(:'xid'::xid));
SQL
}

# limits_queue VARIANT PATH: one drain against the limited location PATH,
# appended to $BENCH_DIR/limits_queue
limits_queue() {
	local variant=$1 path=$2 offset first last start end states nginx stats samples ideal profile pace
	pg -v url="$URL$path" <<'SQL'
ALTER SYSTEM SET taptalk.base_url = :'url';
ALTER SYSTEM RESET taptalk.worker_concurrency;
SQL
	limits_reload
	sleep "$LIMIT_PAUSE_S"	# a full bucket
	pg -c "SELECT bench_limits_snap('before')" >/dev/null
	offset=$(limits_log_size)
	read -r first last start <<<"$(limits_enqueue "$LIMIT_QUEUE_REQUESTS" "queue-$variant")"
	limits_wait_idle "$first" "$last"
	samples=$(limits_samples_summary)
	pg -c "SELECT bench_limits_snap('after')" >/dev/null
	read -r end states <<<"$(pg -v first="$first" -v last="$last" <<'SQL'
SELECT extract(epoch FROM max(pg_xact_commit_timestamp(xmin))),
	count(*) FILTER (WHERE state = 'succeeded'), count(*) FILTER (WHERE state = 'failed'),
	sum(attempts), max(attempts),
	coalesce(string_agg(DISTINCT error_code, ',') FILTER (WHERE state = 'failed'), '-')
FROM taptalk_queue WHERE id BETWEEN :first AND :last;
SQL
)"
	nginx=$(limits_log_counts "$offset" "$path")
	stats=$(pg -c "SELECT bench_limits_delta('before', 'after', 'queue')")
	profile=$(limits_log_429s "$offset" "$path")
	pace=$(limits_log_pace "$offset" "$path")
	ideal=$(awk -v n="$LIMIT_QUEUE_REQUESTS" -v r="$LIMIT_RATE" -v b="$LIMIT_BURST" -v d="$SLOT_DELAY_MS" \
		'BEGIN { x = n > b ? (n - b) / r : 0; printf "%.3f", x + d / 1000 }')
	# VARIANT SECONDS IDEAL | SUCCEEDED FAILED SUM_ATT MAX_ATT ERRORS |
	# RECEIVED 200 429 OTHER | STATS(6) | SAMPLES(5) | 429S | 200S
	echo "$variant $(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f", e - s }') $ideal" \
		"$states $nginx $stats $samples $profile $pace" >>"$BENCH_DIR/limits_queue"
}

# limits_batch VARIANT PATH: one batch against the limited location PATH,
# appended to $BENCH_DIR/limits_batch
limits_batch() {
	local variant=$1 path=$2 offset out nginx stats
	sleep "$LIMIT_PAUSE_S"	# a full bucket
	pg -c "SELECT bench_limits_snap('before')" >/dev/null
	offset=$(limits_log_size)
	out=$(pg -v url="$URL$path" -v n="$LIMIT_BATCH_REQUESTS" -v req="$REQ" <<'SQL'
SET taptalk.base_url = :'url';
RESET taptalk.max_concurrency;
SELECT seconds, ok, errors FROM bench_limits_batch(:n, :'req');
SQL
)
	pg -c "SELECT bench_limits_snap('after')" >/dev/null
	nginx=$(limits_log_counts "$offset" "$path")
	stats=$(pg -c "SELECT bench_limits_delta('before', 'after', 'batch')")
	# VARIANT SECONDS OK ERRORS | RECEIVED 200 429 OTHER | STATS(6)
	echo "$variant $out $nginx $stats" >>"$BENCH_DIR/limits_batch"
}

# limits_max_rate: the max_rate measurement, into $BENCH_DIR/limits_rate
limits_max_rate() {
	local offset t0 start stop from to pids=() i n out first last qok sess_req=0 sess_ok=0 \
		single batch queue counts
	if [ "$limits_have_max_rate" = 0 ]; then
		echo "skipped" >"$BENCH_DIR/limits_rate"
		return
	fi
	pg -v url="$URL/slow" -v rate="$LIMIT_MAX_RATE" <<'SQL'
ALTER SYSTEM SET taptalk.base_url = :'url';
ALTER SYSTEM RESET taptalk.worker_concurrency;
ALTER SYSTEM SET taptalk.max_rate = :rate;
SQL
	limits_reload
	# every sender starts at t0, the sessions stop at t0 + the ramp + the
	# window + 1 s; the window is what nginx received in between
	t0=$(awk -v now="$(date +%s.%N)" 'BEGIN { printf "%.3f", now + 2 }')
	stop=$(awk -v t="$t0" -v r="$LIMIT_RATE_RAMP_S" -v w="$LIMIT_RATE_SECONDS" 'BEGIN { printf "%.3f", t + r + w + 1 }')
	from=$(awk -v t="$t0" -v r="$LIMIT_RATE_RAMP_S" 'BEGIN { printf "%.3f", t + r }')
	to=$(awk -v t="$from" -v w="$LIMIT_RATE_SECONDS" 'BEGIN { printf "%.3f", t + w }')
	pg -c "SELECT bench_limits_snap('before')" >/dev/null
	offset=$(slot_log_size)
	for i in 1 2 3 4; do
		n=$(( i <= 2 ? LIMIT_RATE_BATCH : 0 ))
		pg -v start="$t0" -v stop="$stop" -v n="$n" -v req="$REQ" >"$BENCH_DIR/limits_load_$i" <<'SQL' &
SELECT requests, ok FROM bench_limits_load(to_timestamp(:start), to_timestamp(:stop), :n, :'req');
SQL
		pids+=($!)
	done
	pg -v start="$t0" >/dev/null <<'SQL'
SELECT pg_sleep_until(to_timestamp(:start));
SQL
	read -r first last _ <<<"$(limits_enqueue "$LIMIT_RATE_QUEUE" rate)"
	for i in "${!pids[@]}"; do
		wait "${pids[$i]}" || { echo "max_rate: session $((i + 1)) failed" >&2; exit 1; }
	done
	pg -c "SELECT bench_limits_snap('after')" >/dev/null
	for i in 1 2 3 4; do
		read -r n out <"$BENCH_DIR/limits_load_$i"
		sess_req=$((sess_req + n))
		sess_ok=$((sess_ok + out))
	done
	# what each path sent while the sessions ran
	single=$(pg -c "SELECT bench_limits_delta('before', 'after', 'single')")
	batch=$(pg -c "SELECT bench_limits_delta('before', 'after', 'batch')")
	queue=$(pg -c "SELECT bench_limits_delta('before', 'after', 'queue')")
	# the rest of the queue at full speed
	pg -c "ALTER SYSTEM RESET taptalk.max_rate" >/dev/null
	limits_reload
	limits_wait_idle "$first" "$last"
	qok=$(pg -v first="$first" -v last="$last" <<'SQL'
SELECT count(*) FILTER (WHERE state = 'succeeded') FROM taptalk_queue WHERE id BETWEEN :first AND :last;
SQL
)
	sleep 0.3	# nginx logs just after answering
	# arrivals (end minus duration) in the window: count, and the fewest
	# and most in one of its seconds
	counts=$(tail -c +"$((offset + 1))" "$SLOT_LOG" | awk -v f="$from" -v t="$to" -v w="$LIMIT_RATE_SECONDS" '
		{ a = $1 - $2; if (a >= f && a < t) { n++; s[int(a - f)]++ } }
		END { min = -1; max = 0
			for (i = 0; i < w; i++) { c = s[i] + 0; if (min < 0 || c < min) min = c; if (c > max) max = c }
			printf "%d %.1f %d %d\n", n, n / w, min, max }')
	# WINDOW_COUNT RATE PER_S_MIN PER_S_MAX | SESSION_REQUESTS SESSION_OK
	# QUEUE_REQUESTS QUEUE_OK | STATS(6) of single, batch, queue
	echo "$counts $sess_req $sess_ok $LIMIT_RATE_QUEUE $qok | $single | $batch | $queue" >"$BENCH_DIR/limits_rate"
}

# limits_phase: everything, then the settings as they were
limits_phase() {
	limits_setup
	: >"$BENCH_DIR/limits_queue"
	: >"$BENCH_DIR/limits_batch"
	echo "== limits: queue drain of $LIMIT_QUEUE_REQUESTS requests against nginx's limit_req ($LIMIT_RATE/s, burst $LIMIT_BURST), 429 with a text body"
	limits_queue text /limit-text
	echo "== limits: the same, 429 with TapTalk's envelope"
	limits_queue envelope /limit-json
	echo "== limits: taptalk_auth_tickets over $LIMIT_BATCH_REQUESTS requests, 429 with TapTalk's envelope, then with a text body"
	limits_batch envelope /limit-json
	limits_batch text /limit-text
	if [ "$limits_have_max_rate" != 0 ]; then
		echo "== limits: taptalk.max_rate = $LIMIT_MAX_RATE, 4 sessions and the worker for $((LIMIT_RATE_RAMP_S + LIMIT_RATE_SECONDS + 1))s against the slow location without limit"
	fi
	limits_max_rate
	pg -v url="$limits_saved_url" -v conc="$limits_saved_conc" <<'SQL'
ALTER SYSTEM SET taptalk.base_url = :'url';
ALTER SYSTEM SET taptalk.worker_concurrency = :conc;
SQL
	limits_reload
}

limits_report() {
	echo "== rate limits (nginx's limit_req: $LIMIT_RATE requests/s, burst $LIMIT_BURST nodelay, each answer after"
	echo "   ${SLOT_DELAY_MS} ms; over the quota a 429 at once with Retry-After: 1, its body text or TapTalk's envelope)"
	printf "%-8s | %-8s | %8s | %8s | %8s | %6s | %11s | %9s | %8s | %9s | %s\n" \
		what "429 body" requests succeeded seconds "/ideal" "nginx 200/429" "attempts" "stats att" "rate_lim" "wait ms"
	printf -- '---------+----------+----------+-----------+----------+--------+---------------+-----------+-----------+-----------+--------\n'
	while read -r v s ideal succ fail sum_att max_att errs recv ok lim other \
		st_req st_att st_succ st_fail st_rl st_wait _; do
		awk -v v="$v" -v n="$LIMIT_QUEUE_REQUESTS" -v s="$s" -v i="$ideal" -v succ="$succ" \
			-v recv="$recv" -v ok="$ok" -v lim="$lim" -v st_att="$st_att" -v st_rl="$st_rl" -v st_wait="$st_wait" 'BEGIN {
			printf "%-8s | %-8s | %8d | %9d | %8.3f | %6.3f | %13s | %9.3f | %9s | %9s | %s\n",
				"queue", v, n, succ, s, s / i, ok "/" lim, recv / n, st_att, st_rl, st_wait }'
	done <"$BENCH_DIR/limits_queue"
	while read -r v s okrows errs recv ok lim other st_req st_att st_succ st_fail st_rl st_wait; do
		awk -v v="$v" -v n="$LIMIT_BATCH_REQUESTS" -v s="$s" -v succ="$okrows" -v i="$(awk -v n="$LIMIT_BATCH_REQUESTS" -v r="$LIMIT_RATE" -v b="$LIMIT_BURST" -v d="$SLOT_DELAY_MS" 'BEGIN { x = n > b ? (n - b) / r : 0; printf "%.3f", x + d / 1000 }')" \
			-v recv="$recv" -v ok="$ok" -v lim="$lim" -v st_att="$st_att" -v st_rl="$st_rl" -v st_wait="$st_wait" 'BEGIN {
			printf "%-8s | %-8s | %8d | %9d | %8.3f | %6.3f | %13s | %9.3f | %9s | %9s | %s\n",
				"batch", v, n, succ, s, s / i, ok "/" lim, recv / n, st_att, st_rl, st_wait }'
	done <"$BENCH_DIR/limits_batch"
	echo "(seconds: the queue's from the enqueuing commit to the commit of the last outcome, the batch's"
	echo " in the backend; /ideal: over (requests - burst) / rate + ${SLOT_DELAY_MS} ms, the least any client takes;"
	echo " attempts: the requests nginx received per request; stats att, rate_lim, wait ms: what"
	echo " taptalk_stats' attempts, rate_limited and rate_limit_wait_ms gained, \"-\" when it lacks the column)"
	while read -r v s ideal succ fail sum_att max_att errs recv ok lim other \
		st_req st_att st_succ st_fail st_rl st_wait samples rl_samples cmin cmed cmax profile pace; do
		echo "queue, $v: $succ succeeded, $fail failed (errors: $errs); taptalk_queue.attempts sum $sum_att, max $max_att"
		echo "   taptalk_worker.concurrency while sending min/median/max $cmin/$cmed/$cmax;" \
			"'rate limited' in $rl_samples of $samples samples"
		echo "   429s by second from the first arrival (SECOND:COUNT): $profile"
		echo "   200s in each second from the first arrival: $pace"
	done <"$BENCH_DIR/limits_queue"
	while read -r v s okrows errs _; do
		echo "batch, $v: errors of the rows that failed: $errs"
	done <"$BENCH_DIR/limits_batch"
	echo
	if [ "$(cat "$BENCH_DIR/limits_rate")" = skipped ]; then
		echo "== taptalk.max_rate: skipped: taptalk.max_rate not available"
		return
	fi
	local counts rest single batch queue
	IFS='|' read -r counts single batch queue <"$BENCH_DIR/limits_rate"
	read -r limits_rate_n limits_rate_rps limits_rate_min limits_rate_max \
		limits_rate_sreq limits_rate_sok limits_rate_qreq limits_rate_qok <<<"$counts"
	echo "== taptalk.max_rate = $LIMIT_MAX_RATE (2 sessions of taptalk_auth_tickets($LIMIT_RATE_BATCH) in a loop, 2 of"
	echo "   taptalk_auth_ticket in a loop, the worker draining $LIMIT_RATE_QUEUE enqueued requests, all at once, against"
	echo "   nginx answering after ${SLOT_DELAY_MS} ms without limit; the window: ${LIMIT_RATE_SECONDS}s from ${LIMIT_RATE_RAMP_S}s after the start)"
	echo "requests nginx received in the window: $limits_rate_n, $limits_rate_rps/s (per second: $limits_rate_min to $limits_rate_max)"
	echo "sessions: $limits_rate_sok of $limits_rate_sreq requests succeeded; queue: $limits_rate_qok of $limits_rate_qreq succeeded"
	printf "%-7s | %8s | %8s | %9s | %8s | %9s | %s\n" path requests attempts successes failures rate_lim "wait ms"
	for p in single batch queue; do
		read -r a b c d e f <<<"${!p}"
		printf "%-7s | %8s | %8s | %9s | %8s | %9s | %s\n" "$p" "$a" "$b" "$c" "$d" "$e" "$f"
	done
	echo "(what taptalk_stats gained from just before the start to the sessions' end)"
}

limits_targets() {
	local v s ideal succ recv
	while read -r v s ideal succ _ _ _ _ recv _; do
		target "limits: queue ($v 429) every request succeeded ($succ of $LIMIT_QUEUE_REQUESTS)" \
			"$succ == $LIMIT_QUEUE_REQUESTS"
		target "limits: queue ($v 429) attempts <= $LIMIT_QUEUE_ATTEMPTS x requests (nginx received $recv for $LIMIT_QUEUE_REQUESTS, $(awk -v r="$recv" -v n="$LIMIT_QUEUE_REQUESTS" 'BEGIN { printf "%.3f", r / n }'))" \
			"$recv <= $LIMIT_QUEUE_ATTEMPTS * $LIMIT_QUEUE_REQUESTS"
		target "limits: queue ($v 429) drain <= $LIMIT_QUEUE_DRAIN x ideal (${s}s, ideal ${ideal}s, $(awk -v s="$s" -v i="$ideal" 'BEGIN { printf "%.3f", s / i }'))" \
			"$s <= $LIMIT_QUEUE_DRAIN * $ideal"
	done <"$BENCH_DIR/limits_queue"
	while read -r v s succ _ recv _; do
		target "limits: batch ($v 429) every row succeeded ($succ of $LIMIT_BATCH_REQUESTS)" \
			"$succ == $LIMIT_BATCH_REQUESTS"
		target "limits: batch ($v 429) attempts <= $LIMIT_BATCH_ATTEMPTS x requests (nginx received $recv for $LIMIT_BATCH_REQUESTS, $(awk -v r="$recv" -v n="$LIMIT_BATCH_REQUESTS" 'BEGIN { printf "%.3f", r / n }'))" \
			"$recv <= $LIMIT_BATCH_ATTEMPTS * $LIMIT_BATCH_REQUESTS"
	done <"$BENCH_DIR/limits_batch"
	if [ "$(cat "$BENCH_DIR/limits_rate")" = skipped ]; then
		echo "SKIP  limits: taptalk.max_rate: skipped: taptalk.max_rate not available"
		return
	fi
	target "limits: taptalk.max_rate = $LIMIT_MAX_RATE holds within $LIMIT_RATE_TOLERANCE% (is $limits_rate_rps requests/s)" \
		"$limits_rate_rps >= $LIMIT_MAX_RATE * (100 - $LIMIT_RATE_TOLERANCE) / 100 && $limits_rate_rps <= $LIMIT_MAX_RATE * (100 + $LIMIT_RATE_TOLERANCE) / 100"
	target "limits: taptalk.max_rate: every request succeeded (sessions $limits_rate_sok of $limits_rate_sreq, queue $limits_rate_qok of $limits_rate_qreq)" \
		"$limits_rate_sok == $limits_rate_sreq && $limits_rate_qok == $limits_rate_qreq"
}
