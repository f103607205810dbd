# bench/queue.sh: the queue phase of scripts/bench (sourced by it): how fast
# the background worker drains the queue, what enqueuing costs an insert,
# and how soon an enqueued request leaves after COMMIT.
#
# The worker is pointed (ALTER SYSTEM, reload) at the slow location of
# bench/nginx.conf.in, which answers TapTalk's success envelope after
# exactly SLOT_DELAY_MS (bench/slots.sh) and logs, per request, when it
# answered and how long it took, so when it arrived.  A worker with C
# requests always in flight reaches C / delay requests per second: the
# limit.  Three measurements:
#
#   drain    QUEUE_REQUESTS users inserted in one transaction into a table
#            whose AFTER INSERT trigger calls taptalk_enqueue with a
#            callback that writes the result's user_id into the user's row
#            (README.md, "Provisioning through the queue"); timed from the
#            first request's arrival at nginx to the commit of the worker's
#            last recording transaction (track_commit_timestamp), at each
#            taptalk.worker_concurrency of QUEUE_CONCURRENCY, after a
#            warm-up of C requests that opens the connections.  Every
#            request must end succeeded after one attempt, with its
#            callback run exactly once, and nginx must have answered
#            exactly QUEUE_REQUESTS requests.
#   enqueue  pgbench, PGBENCH_CLIENTS clients, QUEUE_SECONDS each, inserting
#            users (a) into a table without trigger, (b) into the table of
#            the drain, whose trigger enqueues (the worker drains meanwhile,
#            at the default concurrency), (c) into a table whose BEFORE
#            INSERT trigger calls taptalk_auth_ticket (the 50 ms server):
#            QUEUE_ROUNDS rounds of a, b, c; after b, the backlog (the
#            enqueued requests not yet sent) is drained, at concurrency 128
#            to save time, before the next run.  The figures are the median round of
#            each, b/a and c/a the medians of the rounds' own ratios.  Many
#            short rounds rather than a few long ones: a and b of a round run
#            back to back, two seconds each, so that what else the machine
#            does slows both alike, and an outlier round (an autovacuum of the queue
#            table, a checkpoint, a neighbour) moves the median little.
#   wake     QUEUE_WAKES times, on an idle queue: enqueue one request and
#            commit (bench/queue_wake), from the moment the client sends
#            COMMIT (its clock) to the request's arrival at nginx (nginx's
#            log; the same machine's clock, to the millisecond); the next
#            enqueue waits until the request is recorded and the worker is
#            idle again.
#
# Targets: the drain at the default concurrency 32 reaches QUEUE_TARGET
# percent of the limit, the one at 128 QUEUE_TARGET_128 requests/s; b/a >=
# 0.5; the wake latency's p99 < QUEUE_WAKE_P99_MS.
#
# Needs, from scripts/bench: BENCH_DIR, URL, REQ, PGBENCH_CLIENTS,
# PGBENCH_THREADS, the queue_wake binary in BENCH_DIR, and pg, check_count,
# nginx_counters, nginx_since and target; from bench/slots.sh: SLOT_LOG,
# SLOT_DELAY_MS, slot_log_size.  Settings (environment):
# BENCH_QUEUE_REQUESTS (10000), BENCH_QUEUE_CONCURRENCY ("32 128"),
# BENCH_QUEUE_SECONDS (2), BENCH_QUEUE_ROUNDS (9), BENCH_QUEUE_WAKES (200).

QUEUE_REQUESTS=${BENCH_QUEUE_REQUESTS:-10000}
QUEUE_CONCURRENCY=${BENCH_QUEUE_CONCURRENCY:-"32 128"}
QUEUE_SECONDS=${BENCH_QUEUE_SECONDS:-2}
QUEUE_ROUNDS=${BENCH_QUEUE_ROUNDS:-9}
QUEUE_WAKES=${BENCH_QUEUE_WAKES:-200}
QUEUE_BACKLOG_CONCURRENCY=128
QUEUE_TARGET=90
QUEUE_TARGET_128=1500
QUEUE_ENQUEUE_TARGET=0.5
QUEUE_WAKE_P99_MS=50
# the longest a drain may take before the run is called broken
QUEUE_DRAIN_TIMEOUT_S=600

# queue_setup: the tables, triggers and callbacks, and the worker pointed at
# the slow location at its default concurrency
queue_setup() {
	pg -v url="$URL/slow" <<'SQL'
CREATE SEQUENCE bench_user_id;

-- (a) no trigger
CREATE TABLE bench_users_plain (
	id bigint PRIMARY KEY,
	full_name text NOT NULL,
	taptalk_user_id text,
	taptalk_error text
);

-- (b) and the drain: provisioned through the queue; callbacks counts the
-- callback's runs for the row
CREATE TABLE bench_users_queued (
	id bigint PRIMARY KEY,
	full_name text NOT NULL,
	taptalk_user_id text,
	taptalk_error text,
	callbacks int NOT NULL DEFAULT 0
);

CREATE FUNCTION bench_provisioned(request_id bigint, request jsonb,
	result taptalk_auth_ticket_result)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	UPDATE public.bench_users_queued
	SET taptalk_user_id = result.user_id, taptalk_error = result.error_code,
		callbacks = callbacks + 1
	WHERE id = (request->>'xcUserID')::bigint;
END $$;

CREATE FUNCTION bench_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	PERFORM taptalk_enqueue(jsonb_build_object(
		'userIPAddress', '10.0.0.1',
		'userAgent', 'taptalk-bench/1.0',
		'userPlatform', 'web',
		'userDeviceID', 'server',
		'xcUserID', NEW.id,
		'fullName', NEW.full_name),
	  'bench_provisioned(bigint, jsonb, taptalk_auth_ticket_result)');
	RETURN NEW;
END $$;

CREATE TRIGGER bench_enqueue AFTER INSERT ON bench_users_queued
	FOR EACH ROW EXECUTE FUNCTION bench_enqueue();

-- (c) provisioned in the inserting transaction
CREATE TABLE bench_users_sync (
	id bigint PRIMARY KEY,
	full_name text NOT NULL,
	taptalk_user_id text,
	taptalk_error text
);

CREATE FUNCTION bench_provision() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
	r taptalk_auth_ticket_result;
BEGIN
	r := taptalk_auth_ticket(jsonb_build_object(
		'userIPAddress', '10.0.0.1',
		'userAgent', 'taptalk-bench/1.0',
		'userPlatform', 'web',
		'userDeviceID', 'server',
		'xcUserID', NEW.id,
		'fullName', NEW.full_name));
	NEW.taptalk_user_id := r.user_id;
	NEW.taptalk_error := r.error_code;
	RETURN NEW;
END $$;

CREATE TRIGGER bench_provision BEFORE INSERT ON bench_users_sync
	FOR EACH ROW EXECUTE FUNCTION bench_provision();

-- the wake measurement's callback: tells the client its request is recorded
CREATE FUNCTION bench_woken(request_id bigint, request jsonb,
	result taptalk_auth_ticket_result)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	PERFORM pg_catalog.pg_notify('bench_wake', request_id::text);
END $$;

-- every session from now on (pgbench's too) and the worker: the slow server
ALTER SYSTEM SET taptalk.base_url = :'url';
ALTER SYSTEM SET taptalk.worker_concurrency = 32;
SELECT pg_reload_conf() \g /dev/null
SQL
	local t
	for t in plain queued sync; do
		echo "INSERT INTO bench_users_$t (id, full_name) VALUES (nextval('bench_user_id'), 'Bench User');" \
			>"$BENCH_DIR/insert_$t.sql"
	done
	chmod 644 "$BENCH_DIR"/insert_*.sql
}

# queue_set_concurrency C: the worker's taptalk.worker_concurrency (the
# reload reaches the worker through the postmaster: give it a moment)
queue_set_concurrency() {
	pg -v c="$1" <<'SQL'
ALTER SYSTEM SET taptalk.worker_concurrency = :c;
SELECT pg_reload_conf() \g /dev/null
SQL
	sleep 1
}

# queue_wait_idle [TIMEOUT_S]: until no request is queued or sending
queue_wait_idle() {
	local timeout=${1:-$QUEUE_DRAIN_TIMEOUT_S} started left
	started=$(date +%s)
	for (( ; ; )); do
		left=$(pg -c "SELECT count(*) FROM taptalk_queue WHERE state IN ('queued', 'sending')")
		[ "$left" = 0 ] && return 0
		if [ $(($(date +%s) - started)) -ge "$timeout" ]; then
			echo "the queue still holds $left requests after ${timeout}s" >&2
			exit 1
		fi
		sleep 0.25
	done
}

# queue_insert N: insert N users provisioned through the queue in one
# transaction; prints the first and last request id
queue_insert() {
	pg -v n="$1" <<'SQL'
BEGIN;
SELECT coalesce(max(id), 0) AS before FROM taptalk_queue \gset
INSERT INTO bench_users_queued (id, full_name)
	SELECT nextval('bench_user_id'), 'Bench User' FROM generate_series(1, :n);
SELECT :before + 1, max(id) FROM taptalk_queue;
COMMIT;
SQL
}

# queue_check_requests FIRST LAST WHAT: every request from FIRST to LAST
# succeeded after one attempt, its user's row has the user_id and the
# callback ran once for it
queue_check_requests() {
	local first=$1 last=$2 what=$3 out
	out=$(pg -v first="$first" -v last="$last" <<'SQL'
SELECT count(*) FILTER (WHERE q.state = 'succeeded' AND q.attempts = 1
	AND q.callback_error IS NULL AND u.taptalk_user_id = 'tt-1' AND u.callbacks = 1)
FROM taptalk_queue q
LEFT JOIN bench_users_queued u ON u.id = (q.request->>'xcUserID')::bigint
WHERE q.id BETWEEN :first AND :last;
SQL
)
	check_count "$what (succeeded after one attempt, callback run once)" \
		"$((last - first + 1))" "$out"
}

# queue_drain C: "SECONDS CONNECTIONS" of a drain of QUEUE_REQUESTS at
# taptalk.worker_concurrency C
queue_drain() {
	local c=$1 mark offset out first last start end conns reqs
	queue_set_concurrency "$c"
	# the warm-up: C requests, which open C connections
	read -r first last <<<"$(queue_insert "$c")"
	queue_wait_idle 60
	queue_check_requests "$first" "$last" "warm-up at concurrency $c"

	mark=$(nginx_counters)
	offset=$(slot_log_size)
	read -r first last <<<"$(queue_insert "$QUEUE_REQUESTS")"
	queue_wait_idle
	# from the first request's arrival ...
	start=$(tail -c +"$((offset + 1))" "$SLOT_LOG" |
		awk '{ a = $1 - $2; if (NR == 1 || a < s) s = a } END { printf "%.3f\n", s }')
	# ... to the commit that recorded the last outcome
	end=$(pg -v first="$first" -v last="$last" <<'SQL'
SELECT extract(epoch FROM max(pg_xact_commit_timestamp(xmin)))
FROM taptalk_queue WHERE id BETWEEN :first AND :last;
SQL
)
	queue_check_requests "$first" "$last" "drain at concurrency $c"
	read -r conns reqs <<<"$(nginx_since "$mark")"
	check_count "drain at concurrency $c (requests nginx answered)" "$QUEUE_REQUESTS" "$reqs"
	awk -v s="$start" -v e="$end" -v c="$conns" 'BEGIN { printf "%.3f %d\n", e - s, c }'
}

# queue_pgbench TABLE: the TPS of QUEUE_SECONDS of inserts into
# bench_users_TABLE, and the first and last user id inserted
queue_pgbench() {
	local t=$1 first last tps rc=0
	first=$(pg -c "SELECT nextval('bench_user_id') + 1")
	(cd "$BENCH_DIR" && "$PGBIN/pgbench" -n -M prepared -c "$PGBENCH_CLIENTS" -j "$PGBENCH_THREADS" \
		-T "$QUEUE_SECONDS" -f "insert_$t.sql") >"$BENCH_DIR/pgbench_$t.out" 2>&1 || rc=$?
	tps=$(awk '/^tps = / { print $3 }' "$BENCH_DIR/pgbench_$t.out")
	if [ "$rc" != 0 ] || [ -z "$tps" ] ||
		! grep -q '^number of failed transactions: 0 ' "$BENCH_DIR/pgbench_$t.out"; then
		echo "pgbench into bench_users_$t failed (exit status $rc):" >&2
		cat "$BENCH_DIR/pgbench_$t.out" >&2
		exit 1
	fi
	last=$(pg -c "SELECT last_value FROM bench_user_id")
	echo "$tps $first $last"
}

# queue_enqueue_round: "A_TPS B_TPS C_TPS B_BACKLOG B_DRAIN_S" of one
# round: B_BACKLOG requests were left when (b) ended, drained in B_DRAIN_S
# at concurrency QUEUE_BACKLOG_CONCURRENCY (to keep the run short)
queue_enqueue_round() {
	local a b c first last rows backlog drain_start drain_s q_first q_last
	read -r a _ <<<"$(queue_pgbench plain)"
	q_first=$(pg -c "SELECT coalesce(max(id), 0) + 1 FROM taptalk_queue")
	read -r b first last <<<"$(queue_pgbench queued)"
	backlog=$(pg -c "SELECT count(*) FROM taptalk_queue WHERE state IN ('queued', 'sending')")
	queue_set_concurrency "$QUEUE_BACKLOG_CONCURRENCY"
	drain_start=$(date +%s.%N)
	queue_wait_idle
	drain_s=$(awk -v s="$drain_start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
	queue_set_concurrency 32
	q_last=$(pg -c "SELECT max(id) FROM taptalk_queue")
	rows=$(pg -v first="$first" -v last="$last" <<'SQL'
SELECT count(*) FROM bench_users_queued WHERE id BETWEEN :first AND :last;
SQL
)
	check_count "enqueue (b): one request per row" "$rows" "$((q_last - q_first + 1))"
	queue_check_requests "$q_first" "$q_last" "enqueue (b)"
	read -r c first last <<<"$(queue_pgbench sync)"
	rows=$(pg -v first="$first" -v last="$last" <<'SQL'
SELECT count(*) FILTER (WHERE taptalk_user_id = 'tt-1') || ' ' || count(*)
FROM bench_users_sync WHERE id BETWEEN :first AND :last;
SQL
)
	check_count "enqueue (c): rows provisioned" "${rows#* }" "${rows% *}"
	echo "$a $b $c $backlog $drain_s"
}

# queue_wake: one line "ID COMMIT_SENT ARRIVAL" per wake-up in
# $BENCH_DIR/wakes
queue_wake() {
	local offset out lines
	queue_set_concurrency 32
	queue_wait_idle
	offset=$(slot_log_size)
	"$BENCH_DIR/queue_wake" "$QUEUE_WAKES" "$REQ" \
		'bench_woken(bigint, jsonb, taptalk_auth_ticket_result)' bench_wake \
		>"$BENCH_DIR/wake_sent" || exit 1
	# nginx logs just after answering; the last line may lag a little
	for _ in $(seq 50); do
		lines=$(tail -c +"$((offset + 1))" "$SLOT_LOG" | wc -l)
		[ "$lines" -ge "$QUEUE_WAKES" ] && break
		sleep 0.1
	done
	check_count "wake (requests nginx logged)" "$QUEUE_WAKES" "$lines"
	out=$(pg -v first="$(head -n 1 "$BENCH_DIR/wake_sent" | cut -d' ' -f1)" \
		-v last="$(tail -n 1 "$BENCH_DIR/wake_sent" | cut -d' ' -f1)" <<'SQL'
SELECT count(*) FILTER (WHERE state = 'succeeded' AND attempts = 1)
FROM taptalk_queue WHERE id BETWEEN :first AND :last;
SQL
)
	check_count "wake (succeeded after one attempt)" "$QUEUE_WAKES" "$out"
	# one request at a time: the n-th arrival is the n-th request's
	tail -c +"$((offset + 1))" "$SLOT_LOG" | awk '{ printf "%.3f\n", $1 - $2 }' | sort -n |
		paste -d' ' "$BENCH_DIR/wake_sent" - >"$BENCH_DIR/wakes"
}

# queue_phase: everything, into $BENCH_DIR/queue_drains (C SECONDS
# CONNECTIONS), queue_rounds (ROUND A B C B_BACKLOG B_DRAIN_S) and wakes
queue_phase() {
	local c out round
	queue_setup
	: >"$BENCH_DIR/queue_drains"
	for c in $QUEUE_CONCURRENCY; do
		echo "== queue: drain of $QUEUE_REQUESTS requests at taptalk.worker_concurrency = $c, nginx answering after ${SLOT_DELAY_MS} ms"
		out=$(queue_drain "$c")
		echo "$c $out" >>"$BENCH_DIR/queue_drains"
		awk -v c="$c" -v n="$QUEUE_REQUESTS" -v d="$SLOT_DELAY_MS" -v s="${out% *}" 'BEGIN {
			printf "   %.0f requests/s, %.1f%% of the limit\n", n / s, 100 * n / s / (c * 1000 / d) }'
	done
	queue_set_concurrency 32
	: >"$BENCH_DIR/queue_rounds"
	for round in $(seq "$QUEUE_ROUNDS"); do
		echo "== queue: enqueue cost, round $round of $QUEUE_ROUNDS: pgbench -c $PGBENCH_CLIENTS, ${QUEUE_SECONDS}s each: (a) no trigger, (b) enqueuing trigger, (c) synchronous trigger"
		out=$(queue_enqueue_round)
		echo "$round $out" >>"$BENCH_DIR/queue_rounds"
	done
	echo "== queue: wake latency, $QUEUE_WAKES enqueues on an idle queue"
	queue_wake
}

# queue_median FILE COLUMN: the median of a column
queue_median() {
	awk -v c="$2" '{ print $c }' "$1" | sort -g |
		awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

queue_report() {
	echo "== queue drain ($QUEUE_REQUESTS requests enqueued in one transaction, each with a callback that writes"
	echo "   the user_id into the user's row; nginx answering each after ${SLOT_DELAY_MS} ms; from the first"
	echo "   request's arrival to the commit of the last outcome)"
	printf "%5s | %8s | %8s | %10s | %10s | %6s | %s\n" conc limit seconds requests/s "% of limit" max% conns
	printf -- '------+----------+----------+------------+------------+--------+------\n'
	while read -r c s conns; do
		awk -v c="$c" -v s="$s" -v n="$QUEUE_REQUESTS" -v d="$SLOT_DELAY_MS" -v conns="$conns" 'BEGIN {
			limit = c * 1000 / d
			printf "%5d | %8.0f | %8.3f | %10.0f | %9.1f%% | %5.1f%% | %s\n",
				c, limit, s, n / s, 100 * n / s / limit,
				100 * n / (int((n + c - 1) / c) * c), conns }'
	done <"$BENCH_DIR/queue_drains"
	echo "(max%: the most a client can reach, as the requests take at least ceil(requests / conc)"
	echo " rounds of ${SLOT_DELAY_MS} ms; conns: connections nginx accepted during the drain)"
	echo
	echo "== enqueue cost (pgbench -c $PGBENCH_CLIENTS -j $PGBENCH_THREADS -M prepared, ${QUEUE_SECONDS}s per run, inserting users:"
	echo "   (a) no trigger, (b) a trigger calling taptalk_enqueue, the worker draining at concurrency 32,"
	echo "   (c) a trigger calling taptalk_auth_ticket, ${SLOT_DELAY_MS} ms per request)"
	printf "%6s | %8s | %8s | %8s | %6s | %6s | %s\n" round "a tps" "b tps" "c tps" b/a c/a "b's backlog"
	while read -r round a b c backlog drain; do
		awk -v r="$round" -v a="$a" -v b="$b" -v c="$c" -v backlog="$backlog" -v drain="$drain" 'BEGIN {
			printf "%6d | %8.0f | %8.0f | %8.1f | %6.3f | %6.4f | %d requests, drained in %ss\n",
				r, a, b, c, b / a, c / a, backlog, drain }'
	done <"$BENCH_DIR/queue_rounds"
	awk '{ printf "%.3f %.4f\n", $3 / $2, $4 / $2 }' "$BENCH_DIR/queue_rounds" >"$BENCH_DIR/queue_ratios"
	queue_ratio_ba=$(queue_median "$BENCH_DIR/queue_ratios" 1)
	queue_ratio_ca=$(queue_median "$BENCH_DIR/queue_ratios" 2)
	printf "median | %8.0f | %8.0f | %8.1f | %6.3f | %6.4f |\n" \
		"$(queue_median "$BENCH_DIR/queue_rounds" 2)" "$(queue_median "$BENCH_DIR/queue_rounds" 3)" \
		"$(queue_median "$BENCH_DIR/queue_rounds" 4)" "$queue_ratio_ba" "$queue_ratio_ca"
	echo "(b/a and c/a on the median line: the medians of the rounds' own ratios; b's backlog: the"
	echo " requests left queued when b ended, drained before the next run at concurrency $QUEUE_BACKLOG_CONCURRENCY)"
	echo
	read -r queue_wake_p50 queue_wake_p99 queue_wake_max < <(
		awk '{ printf "%.1f\n", ($3 - $2) * 1000 }' "$BENCH_DIR/wakes" | sort -g |
			awk '{ v[NR] = $1 }
			function pct(p,  i) { i = int(p * NR + 0.999999); if (i < 1) i = 1; return v[i] }
			END { printf "%s %s %s\n", pct(0.50), pct(0.99), v[NR] }')
	echo "== wake latency ($QUEUE_WAKES enqueues on an idle queue; from the client sending COMMIT to the"
	echo "   request's arrival at nginx, in ms; nginx's clock has millisecond resolution)"
	echo "p50: $queue_wake_p50    p99: $queue_wake_p99    max: $queue_wake_max"
}

queue_targets() {
	local c s conns pct rps
	while read -r c s conns; do
		pct=$(awk -v c="$c" -v s="$s" -v n="$QUEUE_REQUESTS" -v d="$SLOT_DELAY_MS" \
			'BEGIN { printf "%.1f", 100 * n / s / (c * 1000 / d) }')
		rps=$(awk -v s="$s" -v n="$QUEUE_REQUESTS" 'BEGIN { printf "%.0f", n / s }')
		if [ "$c" = 32 ]; then
			target "queue drain at concurrency 32 >= $QUEUE_TARGET% of the limit (is $pct%, $rps requests/s)" \
				"$pct >= $QUEUE_TARGET"
		elif [ "$c" = 128 ]; then
			target "queue drain at concurrency 128 >= $QUEUE_TARGET_128 requests/s (is $rps, $pct% of the limit)" \
				"$rps >= $QUEUE_TARGET_128"
		fi
	done <"$BENCH_DIR/queue_drains"
	target "enqueuing insert >= $QUEUE_ENQUEUE_TARGET of a plain insert (b/a is $queue_ratio_ba; the synchronous trigger's c/a is $queue_ratio_ca)" \
		"$queue_ratio_ba >= $QUEUE_ENQUEUE_TARGET"
	target "wake latency p99 < $QUEUE_WAKE_P99_MS ms (is $queue_wake_p99 ms, p50 $queue_wake_p50 ms)" \
		"$queue_wake_p99 < $QUEUE_WAKE_P99_MS"
}
