/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The background worker that drains the request queue (taptalk_queue,
 *	  filled by taptalk_enqueue in queue.c), its settings, and the bit of
 *	  shared memory through which enqueuing backends wake it.
 *
 * The worker keeps up to taptalk.worker_concurrency requests in flight on
 * the transport's multi handle and refills each slot as it frees.  Between
 * its waits on the network, and never across one, it runs short
 * transactions (steps): each records the outcomes that came in, running
 * the callbacks, each as the role that enqueued its request, and claims
 * due requests for the free slots (state 'sending', a lease, FOR UPDATE
 * SKIP LOCKED), then commits before any of them is sent.  A request left
 * 'sending' by a worker or server that died is queued again when the
 * worker starts, or when its lease expires: delivery is at least once, and
 * at most taptalk.worker_concurrency requests (those sent and not yet
 * recorded) are sent twice after a crash.  On a standby the worker does not
 * start until promotion.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/detoast.h"
#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_type.h"
#include "common/pg_prng.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "port/atomics.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "tcop/tcopprot.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/wait_event.h"

#include "taptalk.h"

PGDLLEXPORT void taptalk_worker_main(Datum main_arg);

PG_FUNCTION_INFO_V1(taptalk_worker_status);

char	   *taptalk_database = NULL;
int			taptalk_worker_concurrency = 32;
int			taptalk_max_attempts = 8;
int			taptalk_retention_s = 86400;

/* the idle worker looks at the queue at least this often */
#define POLL_MS 5000
/* and checks for the extension this often while it is missing */
#define MISSING_POLL_MS 10000
/* a queued request's retries wait at most this long (pacing.c's backoff) */
#define BACKOFF_MAX_MS (5 * 60 * 1000)
/* succeeded requests removed per statement, and how often at most */
#define RETENTION_BATCH 1000
#define RETENTION_EVERY_MS 60000
/*
 * A request the worker stopped while sending (a crash, a kill, a restart)
 * is sent again; the TAPTALK_MAX_INTERRUPTIONS-th time it fails instead
 * (WORKER_STOPPED), and its callback is not run: the request, or its
 * callback, may be what stops the worker.
 */
#define TAPTALK_MAX_INTERRUPTIONS 3
/* a claimed request's lease: taptalk.timeout plus this */
#define LEASE_MARGIN_MS 60000
/* after an error in a step, the worker waits this long before the next */
#define STEP_ERROR_WAIT_MS 1000
/* expired leases are looked for at most this often */
#define LEASE_CHECK_MS 1000

/*
 * What the worker is doing, as the view taptalk_worker shows it (the names
 * are in state_names).
 */
typedef enum WorkerState
{
	WORKER_NOT_RUNNING,
	WORKER_STARTING,
	WORKER_WAITING_SETTINGS,
	WORKER_WAITING_EXTENSION,
	WORKER_IDLE,
	WORKER_BACKING_OFF,
	WORKER_SENDING,
	WORKER_RATE_LIMITED,
} WorkerState;

static const char *const state_names[] = {
	[WORKER_NOT_RUNNING] = "not running",
	[WORKER_STARTING] = "starting",
	[WORKER_WAITING_SETTINGS] = "waiting for settings",
	[WORKER_WAITING_EXTENSION] = "waiting for extension",
	[WORKER_IDLE] = "idle",
	[WORKER_BACKING_OFF] = "backing off",
	[WORKER_SENDING] = "sending",
	[WORKER_RATE_LIMITED] = "rate limited",
};

/*
 * Shared state: the worker's latch, for the wake-up at commit, and what the
 * worker reports about itself.  Only the worker writes the report, under the
 * spinlock; taptalk_worker_status() reads it.  Each request's outcome is in
 * the queue table: the report keeps only the latest success and error.
 */
typedef struct WorkerShared
{
	Latch	   *latch;
	pg_atomic_uint32 wake_pending;	/* set at an enqueuing commit */
	slock_t		mutex;
	int			pid;			/* 0: not running */
	WorkerState state;
	TimestampTz state_since;
	TimestampTz paused_until;	/* end of a pause; 0: none */
	int			in_flight;
	int			concurrency;	/* requests kept in flight now (pacing.c) */
	TimestampTz last_success;	/* 0: none since the server started */
	TimestampTz last_error;
	char		last_error_code[32];	/* as taptalk_stats_errors names it */
} WorkerShared;

static WorkerShared *shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static uint32 wait_event_info = 0;

/* one claimed request and, once finished, its result */
typedef struct QueueItem
{
	MemoryContext cxt;			/* the request's and the result's memory */
	int64		id;
	Jsonb	   *request;
	char	   *callback;		/* its qualified signature, or NULL */
	Oid			role;
	int			attempts;
	bool		oversized;		/* request too large to read: not read */
	bool		stopped;		/* failed as WORKER_STOPPED: no callback */
	bool		finished;
	TimestampTz finished_at;
	TaptalkResult result;
} QueueItem;

/* the statements every step runs on the queue table, prepared once */
typedef struct QueuePlans
{
	Oid			table_oid;		/* the table they were prepared for */
	SPIPlanPtr	requeue;		/* stranded requests back to the queue */
	SPIPlanPtr	stranded;		/* stranded requests to fail */
	SPIPlanPtr	claim;			/* due requests, round robin (claim.c) */
	SPIPlanPtr	suspect;		/* one request the worker stopped while
								 * sending */
	SPIPlanPtr	record;			/* the outcomes of a step */
	SPIPlanPtr	callback_error;
} QueuePlans;

static QueuePlans plans;

/* whether the worker is sending (between steps it still is) */
static bool in_run = false;

/* the latest success and error the open step recorded, shown after COMMIT */
static TimestampTz step_success = 0;
static TimestampTz step_error = 0;
static char step_error_code[32];

static void
worker_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(WorkerShared)));
}

static void
worker_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	shared = ShmemInitStruct("taptalk worker", sizeof(WorkerShared), &found);
	if (!found)
	{
		memset(shared, 0, sizeof(WorkerShared));
		SpinLockInit(&shared->mutex);
		pg_atomic_init_u32(&shared->wake_pending, 0);
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Called from _PG_init: the worker's settings and, when the library is
 * being preloaded, its shared memory and registration.
 */
void
taptalk_worker_init(void)
{
	BackgroundWorker worker;

	DefineCustomIntVariable("taptalk.worker_concurrency",
							"Sets the maximum number of queued requests the background worker has in flight at once.",
							NULL,
							&taptalk_worker_concurrency,
							32, 1, TAPTALK_MAX_CONCURRENCY,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("taptalk.max_attempts",
							"Sets the maximum number of attempts at a queued request that failed in a way a retry may cure.",
							"After that many attempts the request is failed.",
							&taptalk_max_attempts,
							8, 1, 100,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("taptalk.retention",
							"Sets how long the queue keeps succeeded requests.",
							"The background worker removes them after that time; "
							"0 keeps them. Failed requests are kept.",
							&taptalk_retention_s,
							86400, 0, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	/*
	 * Without preloading there is no worker, and a PGC_POSTMASTER setting
	 * cannot be defined after the server started.
	 */
	if (!process_shared_preload_libraries_in_progress)
		return;

	DefineCustomStringVariable("taptalk.database",
							   "Sets the database whose request queue the background worker sends.",
							   "The extension must be installed there.",
							   &taptalk_database,
							   "postgres",
							   PGC_POSTMASTER,
							   0,
							   NULL, NULL, NULL);

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = worker_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = worker_shmem_startup;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS |
		BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 10;
	snprintf(worker.bgw_library_name, sizeof(worker.bgw_library_name),
			 "taptalk");
	snprintf(worker.bgw_function_name, sizeof(worker.bgw_function_name),
			 "taptalk_worker_main");
	snprintf(worker.bgw_name, sizeof(worker.bgw_name), "taptalk worker");
	snprintf(worker.bgw_type, sizeof(worker.bgw_type), "taptalk worker");

	/*
	 * Not while pg_upgrade runs the server (binary-upgrade mode): it starts
	 * the new cluster once more after moving the old one's data files in,
	 * and the worker would send the queued requests and run their callbacks
	 * there, in a cluster pg_upgrade is still working on, and be stopped
	 * while sending.  The worker starts with the upgraded cluster.
	 */
	if (!IsBinaryUpgrade)
		RegisterBackgroundWorker(&worker);
}

/*
 * Wake the worker: called at the commit of a transaction that enqueued.
 * Only the commit that raises wake_pending sets the worker's latch (a
 * signal to the worker when it sleeps): the worker lowers the flag before
 * each claim, whose snapshot then sees every commit that found the flag
 * raised.  Never raises.
 */
void
taptalk_worker_wake(void)
{
	Latch	   *latch;

	if (shared == NULL ||
		pg_atomic_read_u32(&shared->wake_pending) != 0 ||
		pg_atomic_exchange_u32(&shared->wake_pending, 1) != 0)
		return;
	latch = ((volatile WorkerShared *) shared)->latch;
	if (latch != NULL)
		SetLatch(latch);
}

static TimestampTz pause_end(WorkerState state);

/* Report a new state (and how many requests are in flight). */
static void
set_state(WorkerState state, int in_flight)
{
	TimestampTz until = pause_end(state);

	if (shared == NULL)
		return;
	SpinLockAcquire(&shared->mutex);
	if (shared->state != state)
		shared->state_since = GetCurrentTimestamp();
	shared->state = state;
	shared->paused_until = until;
	shared->in_flight = in_flight;
	shared->concurrency = taptalk_pacing_concurrency();
	SpinLockRelease(&shared->mutex);
}

/* Report the latest success and error of a round (0: none). */
static void
report_outcomes(TimestampTz success, TimestampTz error, const char *error_code)
{
	if (shared == NULL || (success == 0 && error == 0))
		return;
	SpinLockAcquire(&shared->mutex);
	if (success != 0)
		shared->last_success = success;
	if (error != 0)
	{
		shared->last_error = error;
		strlcpy(shared->last_error_code, error_code,
				sizeof(shared->last_error_code));
	}
	SpinLockRelease(&shared->mutex);
}

static void
worker_detach(int code, Datum arg)
{
	if (shared == NULL)
		return;
	shared->latch = NULL;
	SpinLockAcquire(&shared->mutex);
	shared->pid = 0;
	SpinLockRelease(&shared->mutex);
	set_state(WORKER_NOT_RUNNING, 0);
}

/*
 * taptalk_worker_status() returns one row: what the worker reports about
 * itself (the view taptalk_worker adds the queue's depth).
 */
Datum
taptalk_worker_status(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	WorkerShared copy;
	Datum		values[10];
	bool		nulls[10] = {0};

	if (shared == NULL)
		taptalk_require_preload("The background worker runs only when the library is loaded at server start.");
	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	/* version 1.1 of the extension has neither paused_until nor concurrency */
	if (desc->natts != lengthof(values) && desc->natts != lengthof(values) - 2)
		elog(ERROR, "taptalk_worker_status: expected %d columns, found %d",
			 (int) lengthof(values), desc->natts);

	SpinLockAcquire(&shared->mutex);
	copy = *shared;
	SpinLockRelease(&shared->mutex);

	if (copy.pid != 0)
		values[0] = Int32GetDatum(copy.pid);
	else
		nulls[0] = true;
	values[1] = CStringGetTextDatum(taptalk_database ? taptalk_database : "");
	values[2] = CStringGetTextDatum(state_names[copy.pid != 0 ? copy.state : WORKER_NOT_RUNNING]);
	values[3] = TimestampTzGetDatum(copy.state_since);
	nulls[3] = copy.state_since == 0;
	values[4] = Int32GetDatum(copy.pid != 0 ? copy.in_flight : 0);
	values[5] = TimestampTzGetDatum(copy.last_success);
	nulls[5] = copy.last_success == 0;
	values[6] = TimestampTzGetDatum(copy.last_error);
	nulls[6] = copy.last_error == 0;
	if (copy.last_error != 0)
		values[7] = CStringGetTextDatum(copy.last_error_code);
	else
		nulls[7] = true;
	values[8] = TimestampTzGetDatum(copy.paused_until);
	nulls[8] = copy.pid == 0 || copy.paused_until == 0;
	values[9] = Int32GetDatum(copy.concurrency);
	nulls[9] = copy.pid == 0;

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc),
													  values, nulls)));
}

/* When the pause a state waits out ends: 0 for none, or a state that is not one. */
static TimestampTz
pause_end(WorkerState state)
{
	if (state == WORKER_RATE_LIMITED)
		return taptalk_pacing_rate_end();
	if (state == WORKER_BACKING_OFF)
		return taptalk_pacing_outage_end();
	return 0;
}

/* The state of a run: sending, or rate limited while the last ones finish. */
static WorkerState
sending_state(void)
{
	return taptalk_pacing_rate_left() > 0 ? WORKER_RATE_LIMITED : WORKER_SENDING;
}

/* Apply a reload of the configuration file; TapTalk may be elsewhere now. */
static void
reload_config(void)
{
	ConfigReloadPending = false;
	ProcessConfigFile(PGC_SIGHUP);
	taptalk_pacing_reload();
}

/* Wait on the latch for at most `ms`; wakes on SIGTERM and SIGHUP too. */
static void
worker_wait(long ms)
{
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					 Max(ms, 1), wait_event_info);
	ResetLatch(MyLatch);
	CHECK_FOR_INTERRUPTS();
	if (ConfigReloadPending)
		reload_config();
}

/*
 * Wait until a pause ends, or a reload ends it.  Enqueuing commits do not
 * end it: they set the latch only when they raise wake_pending, which only
 * a claim lowers, so they wake the worker once per pause at most.
 */
static void
wait_out_pause(void)
{
	long		left;

	while ((left = Max(taptalk_pacing_outage_left(),
					   taptalk_pacing_rate_left())) > 0)
		worker_wait(left);
}

static void
begin_step(const char *activity)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
}

static void
end_step(bool wrote)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	if (wrote)
		pgstat_report_stat(true);
	if (in_run)
		pgstat_report_activity(STATE_RUNNING, "sending queued requests");
	else
		pgstat_report_activity(STATE_IDLE, NULL);
}

static void
spi_check(int rc, int expected)
{
	if (rc != expected)
		elog(ERROR, "SPI query failed: %s", SPI_result_code_string(rc));
}

/*
 * A statement prepared and kept for the worker's lifetime, with a generic
 * plan: planned once, not for each execution (the claim's plan, custom to
 * each key it starts after, was planned anew for every claim: a tenth of a
 * draining worker's time).
 */
static SPIPlanPtr
keep_plan(const char *sql, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare_cursor(sql, nargs, argtypes,
										  CURSOR_OPT_GENERIC_PLAN);

	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "SPI_keepplan failed");
	return plan;
}

/*
 * Where the extension is: the queue table's OID and quoted, qualified name,
 * and the result type.  Returns false when it is not installed.
 */
static bool
find_extension(Oid *table_oid, char **table, Oid *result_type)
{
	static SPIPlanPtr plan = NULL;
	bool		isnull;

	if (plan == NULL)
		plan = keep_plan("SELECT pg_catalog.quote_ident(n.nspname), t.oid, c.oid"
						 " FROM pg_catalog.pg_extension e"
						 " JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace"
						 " JOIN pg_catalog.pg_type t ON t.typnamespace = e.extnamespace"
						 "  AND t.typname = 'taptalk_auth_ticket_result'"
						 " JOIN pg_catalog.pg_class c ON c.relnamespace = e.extnamespace"
						 "  AND c.relname = 'taptalk_queue' AND c.relkind = 'r'"
						 " WHERE e.extname = 'taptalk'",
						 0, NULL);
	spi_check(SPI_execute_plan(plan, NULL, NULL, true, 1), SPI_OK_SELECT);
	if (SPI_processed == 0)
		return false;
	*table = psprintf("%s.taptalk_queue",
					  SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1));
	*result_type = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
												  SPI_tuptable->tupdesc, 2,
												  &isnull));
	*table_oid = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
												SPI_tuptable->tupdesc, 3,
												&isnull));
	return true;
}

/*
 * Run a claim or a record with the planner's other ways of finding rows
 * turned off: the claim reads the index of queued requests in order and
 * stops after $1 of them, the record finds each request by its id, which
 * costs the same however long the queue is.  A plan the planner picks from
 * statistics (a bitmap scan and a sort of every due request, when they say
 * few are due; a sequential scan or a hash join, for a generic plan) reads
 * the whole backlog each time: ~90 ms per claim for 128,000 queued requests,
 * seen when statistics lagged behind a backlog.  The claim's sorts of what
 * it took (a few rows) cannot be avoided, and the cost a disabled sort is
 * given would make PostgreSQL compile the statement with JIT at every
 * execution (~160 ms): JIT is off for them too.  The settings are the
 * worker's own for the statement (callbacks never see them), and in force
 * whenever PostgreSQL plans it again.
 */
static int
execute_indexed(SPIPlanPtr plan, Datum *args)
{
	static const char *const off[] = {"enable_seqscan", "enable_bitmapscan",
	"enable_sort", "enable_hashjoin", "enable_mergejoin", "jit"};
	int			nestlevel = NewGUCNestLevel();
	int			rc;

	for (size_t i = 0; i < lengthof(off); i++)
		(void) set_config_option(off[i], "off", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
	rc = SPI_execute_plan(plan, args, NULL, false, 0);
	AtEOXact_GUC(false, nestlevel);
	return rc;
}

/*
 * The statements of every step, prepared for the queue table `table` (the
 * relation `table_oid`) unless they already are.
 */
static void
prepare_plans(Oid table_oid, const char *table)
{
	Oid			claim_types[6];
	Oid			record_types[8] = {INT8ARRAYOID, TEXTARRAYOID, TEXTARRAYOID,
	TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID, FLOAT8ARRAYOID, INT4ARRAYOID};
	Oid			error_types[2] = {INT8OID, TEXTOID};
	Oid			stranded_types[4] = {BOOLOID, INT4OID, INT4OID, INT4OID};

	if (plans.table_oid == table_oid)
		return;
	if (plans.requeue)
		SPI_freeplan(plans.requeue);
	if (plans.stranded)
		SPI_freeplan(plans.stranded);
	if (plans.claim)
		SPI_freeplan(plans.claim);
	if (plans.suspect)
		SPI_freeplan(plans.suspect);
	if (plans.record)
		SPI_freeplan(plans.record);
	if (plans.callback_error)
		SPI_freeplan(plans.callback_error);
	memset(&plans, 0, sizeof(plans));

	/*
	 * Requests left 'sending' by a worker that stopped: all of them ($1) when
	 * the worker starts, else those whose lease expired.  Below the bound
	 * ($2) they are queued again; at it, up to $3 of them are taken (with a
	 * lease of $4 ms) to be failed.
	 */
	plans.requeue = keep_plan(psprintf("UPDATE %s SET state = 'queued', lease_until = NULL,"
									   " interruptions = interruptions + 1"
									   " WHERE state = 'sending'"
									   " AND ($1 OR lease_until < pg_catalog.now())"
									   " AND interruptions + 1 < $2",
									   table),
							  2, stranded_types);
	plans.stranded = keep_plan(psprintf("UPDATE %s SET interruptions = interruptions + 1,"
										" lease_until = pg_catalog.now() + $4 * interval '1 millisecond'"
										" WHERE id = ANY (ARRAY(SELECT id FROM %s"
										"  WHERE state = 'sending'"
										"  AND ($1 OR lease_until < pg_catalog.now())"
										"  AND interruptions + 1 >= $2"
										"  ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED))"
										" RETURNING id, callback,"
										"  enqueued_by::pg_catalog.oid, attempts, interruptions",
										table, table),
							   4, stranded_types);
	taptalk_claim_types(claim_types);
	plans.claim = keep_plan(taptalk_claim_sql(table), 6, claim_types);
	plans.suspect = keep_plan(taptalk_claim_suspect_sql(table), 1, &claim_types[1]);
	/*
	 * The outcomes of a step, as arrays: one statement for all.  refund
	 * gives back the attempt that the claim counted (a 429: rate limiting is
	 * not the request's doing).
	 */
	plans.record = keep_plan(psprintf("UPDATE %s q SET state = o.state, lease_until = NULL,"
									  " attempts = q.attempts - o.refund,"
									  " user_id = o.user_id, error_code = o.error_code,"
									  " error_field = o.error_field, error_message = o.error_message,"
									  " next_attempt_at = CASE WHEN o.state = 'queued'"
									  "  THEN pg_catalog.now() + o.backoff * interval '1 millisecond'"
									  "  ELSE q.next_attempt_at END,"
									  " finished_at = CASE WHEN o.state = 'queued' THEN NULL"
									  "  ELSE pg_catalog.clock_timestamp() END"
									  " FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2),"
									  "  pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5),"
									  "  pg_catalog.unnest($6), pg_catalog.unnest($7), pg_catalog.unnest($8))"
									  "  AS o(id, state, user_id, error_code, error_field, error_message, backoff, refund)"
									  " WHERE q.id = o.id AND q.state = 'sending'"
									  " RETURNING q.id",
									  table),
							 8, record_types);
	plans.callback_error = keep_plan(psprintf("UPDATE %s SET callback_error = $2 WHERE id = $1",
											  table),
									 2, error_types);
	plans.table_oid = table_oid;
}

/*
 * Remove succeeded requests older than taptalk.retention, a batch at a
 * time: at most every RETENTION_EVERY_MS (or taptalk.retention, when
 * shorter) while the queue is idle, at once again after a full batch.
 */
static uint64
remove_old(const char *table, TimestampTz *last)
{
	TimestampTz now = GetCurrentTimestamp();
	Oid			argtypes[2] = {INT4OID, INT4OID};
	Datum		args[2];

	if (taptalk_retention_s <= 0 ||
		!TimestampDifferenceExceeds(*last, now,
									(int) Min((int64) RETENTION_EVERY_MS,
											  (int64) taptalk_retention_s * 1000)))
		return 0;
	*last = now;
	args[0] = Int32GetDatum(taptalk_retention_s);
	args[1] = Int32GetDatum(RETENTION_BATCH);
	spi_check(SPI_execute_with_args(psprintf("DELETE FROM %s WHERE id IN (SELECT id FROM %s"
											 " WHERE state = 'succeeded'"
											 "  AND finished_at < pg_catalog.now() - $1 * interval '1 second'"
											 " LIMIT $2 FOR UPDATE SKIP LOCKED)",
											 table, table),
									2, argtypes, args, NULL, false, 0),
			  SPI_OK_DELETE);
	if (SPI_processed == RETENTION_BATCH)
		*last = 0;				/* more to do: again next round */
	return SPI_processed;
}

static void
copy_result_to(MemoryContext cxt, TaptalkResult *dst, const TaptalkResult *src)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);

	dst->user_id = src->user_id ? pstrdup(src->user_id) : NULL;
	dst->ticket = src->ticket ? pstrdup(src->ticket) : NULL;
	dst->error_code = src->error_code ? pstrdup(src->error_code) : NULL;
	dst->error_field = src->error_field ? pstrdup(src->error_field) : NULL;
	dst->error_message = src->error_message ? pstrdup(src->error_message) : NULL;
	dst->http_status = src->http_status;
	dst->retry_after_ms = src->retry_after_ms;
	dst->not_sent = src->not_sent;
	dst->sent_at = src->sent_at;
	MemoryContextSwitchTo(old);
}

/*
 * The requests of one run of the transport, in a pool of
 * taptalk.worker_concurrency items: each item is free, or holds a request
 * that is claimed and not yet started, in flight, or finished with its
 * outcome not yet recorded.  An item is freed only when its outcome is
 * recorded, so at most taptalk.worker_concurrency requests are ever sent
 * and not recorded: those a crash makes the worker send again.
 */
typedef struct Pipeline
{
	MemoryContext cxt;			/* the run's; reset when a run starts */
	MemoryContext scratch;		/* building one request's body */
	int			size;
	QueueItem  *items;
	int		   *free;			/* items not in use, a stack */
	int			nfree;
	int		   *claimed;		/* claimed by the last step, not started */
	int			nclaimed;
	int			next_claimed;
	int		   *finished;		/* finished, outcome not recorded */
	int			nfinished;
	int			in_flight;
	bool		drained;		/* the last claim found no more due request */
	bool		isolating;		/* a suspect is out: claim nothing else */
	bool		stop;			/* claim no more in this run */
	Oid			table_oid;		/* the queue table the run's requests are in */
	Oid			result_type;
	/* when the run's first step claimed nothing: how long to wait, and why */
	long		wait_ms;
	bool		waiting_retry;
} Pipeline;

/* whether the worker has queued again what a dead worker left 'sending' */
static bool rescued = false;
static TimestampTz last_cleanup = 0;
static TimestampTz last_lease_check = 0;

static void
pipeline_begin(Pipeline *p, int size)
{
	MemoryContextReset(p->cxt);
	p->scratch = AllocSetContextCreate(p->cxt, "taptalk request body",
									   ALLOCSET_SMALL_SIZES);
	p->size = size;
	p->items = MemoryContextAllocZero(p->cxt, sizeof(QueueItem) * size);
	p->free = MemoryContextAlloc(p->cxt, sizeof(int) * size);
	p->claimed = MemoryContextAlloc(p->cxt, sizeof(int) * size);
	p->finished = MemoryContextAlloc(p->cxt, sizeof(int) * size);
	for (int i = 0; i < size; i++)
		p->free[i] = size - 1 - i;
	p->nfree = size;
	p->nclaimed = p->next_claimed = 0;
	p->nfinished = 0;
	p->in_flight = 0;
	p->drained = false;
	p->isolating = false;
	p->stop = false;
	p->table_oid = InvalidOid;
	p->result_type = InvalidOid;
	p->wait_ms = POLL_MS;
	p->waiting_retry = false;
}

/* Take a free item; returns its index. */
static int
take_free(Pipeline *p)
{
	int			i = p->free[--p->nfree];
	QueueItem  *item = &p->items[i];

	if (item->cxt == NULL)
		item->cxt = AllocSetContextCreate(p->cxt, "taptalk queued request",
										  ALLOCSET_SMALL_SIZES);
	return i;
}

/* Take a free item for a claimed request. */
static QueueItem *
take_item(Pipeline *p)
{
	int			i = take_free(p);

	p->claimed[p->nclaimed++] = i;
	return &p->items[i];
}

/* Free an item whose outcome is recorded (or can no longer be). */
static void
release_item(Pipeline *p, int i)
{
	QueueItem  *item = &p->items[i];
	MemoryContext cxt = item->cxt;

	MemoryContextReset(cxt);
	memset(item, 0, sizeof(QueueItem));
	item->cxt = cxt;
	p->free[p->nfree++] = i;
}

/* A request's outcome, to be recorded by the next step. */
static void
finish_item(Pipeline *p, int i, const TaptalkResult *result)
{
	QueueItem  *item = &p->items[i];

	copy_result_to(item->cxt, &item->result, result);
	item->finished = true;
	item->finished_at = GetCurrentTimestamp();
	p->finished[p->nfinished++] = i;
}

/* A copy of a text Datum as a C string in `cxt`. */
static char *
text_in(MemoryContext cxt, Datum d)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	char	   *s = TextDatumGetCString(d);

	MemoryContextSwitchTo(old);
	return s;
}

/*
 * Take an item for each request a claim returned (id, request, callback,
 * role, attempts, next_attempt_at), and note each one's role and key in
 * roles, ats and ids unless they are NULL.
 */
static void
take_claimed(Pipeline *p, Oid *roles, TimestampTz *ats, int64 *ids)
{
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		QueueItem  *item = take_item(p);
		bool		isnull;
		Datum		d;

		item->id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		d = SPI_getbinval(tup, desc, 2, &isnull);

		/*
		 * A request larger than any taptalk_enqueue stores (written by
		 * hand) is not read: the worker's memory stays bounded.
		 */
		if (toast_raw_datum_size(d) > TAPTALK_MAX_STORED_REQUEST_BYTES)
			item->oversized = true;
		else
		{
			MemoryContext old = MemoryContextSwitchTo(item->cxt);

			item->request = DatumGetJsonbPCopy(d);
			MemoryContextSwitchTo(old);
		}
		d = SPI_getbinval(tup, desc, 3, &isnull);
		item->callback = isnull ? NULL : text_in(item->cxt, d);
		item->role = DatumGetObjectId(SPI_getbinval(tup, desc, 4, &isnull));
		item->attempts = DatumGetInt32(SPI_getbinval(tup, desc, 5, &isnull));
		if (roles != NULL)
		{
			roles[r] = item->role;
			ats[r] = DatumGetTimestampTz(SPI_getbinval(tup, desc, 6, &isnull));
			ids[r] = item->id;
		}
	}
}

/*
 * Claim up to as many due requests as there are free items, with a lease,
 * round robin between the roles that enqueued them (claim.c); whether they
 * are all that were due is noted in p->drained.
 */
static void
claim(Pipeline *p)
{
	int			want = p->nfree;
	Datum		args[6];
	uint64		n;
	Oid		   *roles;
	TimestampTz *ats;
	int64	   *ids;

	/*
	 * TapTalk out of reach, its rate limit, taptalk.max_rate: how many the
	 * worker may take up now (pacing.c)
	 */
	want = taptalk_pacing_allowance(want, p->in_flight, p->nclaimed);
	if (want == 0)
	{
		p->drained = true;
		return;
	}

	/*
	 * A request the worker stopped while sending goes alone: claimed only
	 * when nothing else is out, and nothing else is claimed until it and
	 * its callback are done.
	 */
	if (p->isolating)
	{
		if (p->in_flight > 0 || p->nclaimed > 0 || p->nfinished > 0)
		{
			p->drained = true;
			return;
		}
		p->isolating = false;
	}
	if (p->in_flight == 0 && p->nclaimed == 0 && p->nfinished == 0)
	{
		args[0] = Int32GetDatum(taptalk_timeout_ms + LEASE_MARGIN_MS);
		spi_check(execute_indexed(plans.suspect, args), SPI_OK_UPDATE_RETURNING);
		if (SPI_processed > 0)
		{
			take_claimed(p, NULL, NULL, NULL);
			p->isolating = true;
			p->drained = true;
			return;
		}
	}

	taptalk_claim_args(want, taptalk_timeout_ms + LEASE_MARGIN_MS, args);
	spi_check(execute_indexed(plans.claim, args), SPI_OK_UPDATE_RETURNING);
	n = SPI_processed;
	roles = palloc(sizeof(Oid) * (n + 1));
	ats = palloc(sizeof(TimestampTz) * (n + 1));
	ids = palloc(sizeof(int64) * (n + 1));
	take_claimed(p, roles, ats, ids);
	p->drained = n < (uint64) want;
	taptalk_claim_taken(want, (int) n, roles, ats, ids);
}

/*
 * When nothing was claimed at the start of a run: remove old succeeded
 * requests, and work out how long the worker may sleep (until the next
 * retry or lease expiry, at most POLL_MS) and whether it is backing off.
 */
static bool
plan_idle(Pipeline *p, const char *table)
{
	uint64		removed = remove_old(table, &last_cleanup);

	p->wait_ms = POLL_MS;
	p->waiting_retry = false;
	if (removed == RETENTION_BATCH)
		p->wait_ms = 10;		/* more to remove */
	spi_check(SPI_execute(psprintf("SELECT pg_catalog.ceil(1000 * extract(epoch FROM"
								   " LEAST(queued, leased) - pg_catalog.clock_timestamp()))::pg_catalog.float8,"
								   " queued IS NOT NULL"
								   " FROM (SELECT (SELECT min(next_attempt_at) FROM %s WHERE state = 'queued') AS queued,"
								   "  (SELECT min(lease_until) FROM %s WHERE state = 'sending') AS leased) m",
								   table, table),
						  true, 1), SPI_OK_SELECT);
	if (SPI_processed == 1)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0],
									  SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
			p->wait_ms = Min(p->wait_ms,
							 (long) Max(Min(DatumGetFloat8(d), (double) POLL_MS), 10.0));
		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2,
						  &isnull);
		p->waiting_retry = !isnull && DatumGetBool(d);
	}
	/* due requests wait for the end of a pause (wait_out_pause) */
	if (taptalk_pacing_outage_left() > 0)
		p->waiting_retry = true;
	return removed > 0;
}

/* Keep a step's latest success and error until it commits. */
static void
report_after_commit(TimestampTz success, TimestampTz error, const char *error_code)
{
	step_success = success;
	step_error = error;
	if (error != 0)
		strlcpy(step_error_code, taptalk_stats_error_name(error_code),
				sizeof(step_error_code));
}

/* Show them, now that the step has committed. */
static void
report_committed(void)
{
	report_outcomes(step_success, step_error, step_error_code);
	step_success = step_error = 0;
}

/* A one-dimensional array of n Datums of type `type` (NULL where null). */
static Datum
datum_array(Datum *values, bool *nulls, int n, Oid type)
{
	int16		len;
	bool		byval;
	char		align;
	int			dims[1] = {n};
	int			lbs[1] = {1};

	get_typlenbyvalalign(type, &len, &byval, &align);
	return PointerGetDatum(construct_md_array(values, nulls, 1, dims, lbs,
											  type, len, byval, align));
}

/* A text Datum of a string, or a null. */
static void
text_elem(const char *s, Datum *value, bool *null)
{
	*value = s ? CStringGetTextDatum(s) : (Datum) 0;
	*null = (s == NULL);
}

/*
 * Whether a finished request's attempt is given back: a 429 (being rate
 * limited is not the request's fault), or an attempt the rate limit did not
 * let out in time (not sent).
 */
static bool
attempt_refunded(const QueueItem *item)
{
	return taptalk_rate_limited(&item->result) || item->result.not_sent;
}

/* The state a finished request is recorded with. */
static const char *
final_state(const QueueItem *item)
{
	if (item->result.error_code == NULL)
		return "succeeded";
	/* not counted as an attempt (record_items gives it back) */
	if (attempt_refunded(item))
		return "queued";
	if (taptalk_retryable(&item->result) && item->attempts < taptalk_max_attempts)
		return "queued";
	return "failed";
}

/* Whether a finished request's callback is to run when it is recorded. */
static bool
runs_callback(const QueueItem *item)
{
	return item->callback != NULL && !item->stopped &&
		strcmp(final_state(item), "queued") != 0;
}

/*
 * How long a request waits before its next attempt: until TapTalk's rate
 * limit pause ends after a 429 or when not sent, at least the Retry-After
 * of a 503 (at most TAPTALK_QUEUE_RETRY_AFTER_MAX_MS), else the
 * exponential backoff of its attempts.
 */
static double
retry_delay_ms(const QueueItem *item)
{
	double		delay;

	if (attempt_refunded(item))
		return (double) taptalk_pacing_rate_left();
	delay = taptalk_backoff_ms(item->attempts, BACKOFF_MAX_MS);
	if (item->result.retry_after_ms > 0)
		delay = Max(delay, (double) Min(item->result.retry_after_ms,
										(int64) TAPTALK_QUEUE_RETRY_AFTER_MAX_MS));
	return delay;
}

/*
 * Record the outcomes of the n finished items `which`, in one statement.
 * Sets recorded[k] for those the statement updated (the others are no
 * longer the worker's: their lease expired and someone else has them).
 */
static void
record_items(Pipeline *p, const int *which, int n, bool *recorded)
{
	Datum	   *cols[8];
	bool	   *colnulls[8];
	Oid			types[8] = {INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID,
	FLOAT8OID, INT4OID};
	Datum		args[8];
	TimestampTz last_success = 0;
	TimestampTz last_error = 0;
	const char *last_error_code = NULL;

	for (int c = 0; c < 8; c++)
	{
		cols[c] = palloc(sizeof(Datum) * n);
		colnulls[c] = palloc0(sizeof(bool) * n);
	}
	for (int f = 0; f < n; f++)
	{
		QueueItem  *item = &p->items[which[f]];

		recorded[f] = false;
		if (item->result.error_code == NULL)
			last_success = Max(last_success, item->finished_at);
		else if (item->finished_at >= last_error)
		{
			last_error = item->finished_at;
			last_error_code = item->result.error_code;
		}

		cols[0][f] = Int64GetDatum(item->id);
		cols[1][f] = CStringGetTextDatum(final_state(item));
		text_elem(item->result.user_id, &cols[2][f], &colnulls[2][f]);
		text_elem(item->result.error_code, &cols[3][f], &colnulls[3][f]);
		text_elem(item->result.error_field, &cols[4][f], &colnulls[4][f]);
		text_elem(item->result.error_message, &cols[5][f], &colnulls[5][f]);
		cols[6][f] = Float8GetDatum(retry_delay_ms(item));
		cols[7][f] = Int32GetDatum(attempt_refunded(item) ? 1 : 0);
	}
	for (int c = 0; c < 8; c++)
		args[c] = datum_array(cols[c], colnulls[c], n, types[c]);

	spi_check(execute_indexed(plans.record, args), SPI_OK_UPDATE_RETURNING);

	for (uint64 r = 0; r < SPI_processed; r++)
	{
		bool		isnull;
		int64		id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[r],
													 SPI_tuptable->tupdesc, 1,
													 &isnull));

		for (int f = 0; f < n; f++)
		{
			if (p->items[which[f]].id == id)
			{
				recorded[f] = true;
				break;
			}
		}
	}
	/* shown once the transaction has committed */
	report_after_commit(last_success, last_error, last_error_code);
}

/* Set a request's callback_error. */
static void
set_callback_error(int64 id, const char *error)
{
	Datum		args[2];

	args[0] = Int64GetDatum(id);
	args[1] = CStringGetTextDatum(error);
	spi_check(SPI_execute_plan(plans.callback_error, args, NULL, false, 0),
			  SPI_OK_UPDATE);
}

/*
 * Record, in the open step, the outcomes of the finished requests whose
 * callback does not run; keep the others in p->finished, for a transaction
 * each (callback_step).
 */
static void
record_finished(Pipeline *p)
{
	int		   *plain = palloc(sizeof(int) * p->nfinished);
	bool	   *recorded = palloc(sizeof(bool) * p->nfinished);
	int			nplain = 0;
	int			nkept = 0;

	for (int f = 0; f < p->nfinished; f++)
	{
		int			i = p->finished[f];

		if (runs_callback(&p->items[i]))
			p->finished[nkept++] = i;
		else
			plain[nplain++] = i;
	}
	p->nfinished = nkept;
	if (nplain == 0)
		return;

	record_items(p, plain, nplain, recorded);
	for (int f = 0; f < nplain; f++)
	{
		QueueItem  *item = &p->items[plain[f]];

		if (recorded[f] && item->stopped && item->callback != NULL)
			set_callback_error(item->id,
							   "callback not run: the worker stopped while sending this request, or running its callback, too often");
		release_item(p, plain[f]);
	}
}

/* Forget the finished requests' outcomes (the queue table is gone). */
static void
drop_finished(Pipeline *p)
{
	if (p->nfinished > 0)
		ereport(LOG,
				(errmsg("taptalk worker: the outcomes of %d requests are not recorded: the queue table is gone",
						p->nfinished)));
	for (int f = 0; f < p->nfinished; f++)
		release_item(p, p->finished[f]);
	p->nfinished = 0;
}

/*
 * Requests left 'sending' by a worker that stopped (all of them when this
 * worker starts, later those whose lease expired): queued again, or, the
 * TAPTALK_MAX_INTERRUPTIONS-th time, failed as WORKER_STOPPED without
 * their callback (as many as there are free items; the rest at the next
 * lease check).  Returns whether it wrote.
 */
static bool
rescue(Pipeline *p, bool all)
{
	Datum		args[4];
	uint64		requeued;

	args[0] = BoolGetDatum(all);
	args[1] = Int32GetDatum(TAPTALK_MAX_INTERRUPTIONS);
	args[2] = Int32GetDatum(p->nfree);
	args[3] = Int32GetDatum(taptalk_timeout_ms + LEASE_MARGIN_MS);

	spi_check(execute_indexed(plans.requeue, args), SPI_OK_UPDATE);
	requeued = SPI_processed;
	if (requeued > 0)
		ereport(LOG,
				(errmsg("taptalk worker: %llu requests left in state \"sending\" are queued again",
						(unsigned long long) requeued),
				 errdetail(all ? "The worker stopped while sending them." :
						   "Their lease expired.")));
	if (p->nfree == 0)
		return requeued > 0;

	spi_check(execute_indexed(plans.stranded, args), SPI_OK_UPDATE_RETURNING);
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		int			i = take_free(p);
		QueueItem  *item = &p->items[i];
		TaptalkResult failure;
		bool		isnull;
		Datum		d;
		int			times;

		item->id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		d = SPI_getbinval(tup, desc, 2, &isnull);
		item->callback = isnull ? NULL : text_in(item->cxt, d);
		item->role = DatumGetObjectId(SPI_getbinval(tup, desc, 3, &isnull));
		item->attempts = DatumGetInt32(SPI_getbinval(tup, desc, 4, &isnull));
		times = DatumGetInt32(SPI_getbinval(tup, desc, 5, &isnull));
		item->stopped = true;
		memset(&failure, 0, sizeof(failure));
		taptalk_set_error(&failure, TAPTALK_CODE_WORKER_STOPPED, NULL,
						  psprintf("the worker stopped %d times while sending this request, or running its callback",
								   times));
		finish_item(p, i, &failure);
		ereport(LOG,
				(errmsg("taptalk worker: request %lld failed: the worker stopped %d times while sending it",
						(long long) item->id, times)));
	}
	return requeued > 0 || SPI_processed > 0;
}

/*
 * A step's error: logged, and its transaction rolled back.  The caller
 * forgets what the transaction did.
 */
static void
abort_step(void)
{
	HOLD_INTERRUPTS();
	EmitErrorReport();
	FlushErrorState();
	AbortOutOfAnyTransaction();
	RESUME_INTERRUPTS();
	step_success = step_error = 0;
	pgstat_report_activity(in_run ? STATE_RUNNING : STATE_IDLE,
						   in_run ? "sending queued requests" : NULL);
}

static int	take_role_group(Pipeline *p, int *group);
static void record_and_call(Pipeline *p, const int *which, int n);

/*
 * The body of a step (pipeline_step): record the outcomes whose callbacks
 * do not run, claim due requests for the free items, commit.  Returns false
 * when the extension is not installed, or no longer holds the run's queue
 * table.
 */
static bool
step(Pipeline *p, bool first, bool want_claim)
{
	Oid			table_oid;
	char	   *table;
	Oid			result_type;
	bool		wrote = false;

	begin_step(p->nfinished > 0 ? "recording request outcomes" : "claiming queued requests");
	if (!find_extension(&table_oid, &table, &result_type) ||
		(!first && table_oid != p->table_oid))
	{
		drop_finished(p);
		p->stop = true;
		end_step(false);
		return false;
	}
	p->table_oid = table_oid;
	p->result_type = result_type;
	prepare_plans(table_oid, table);
	/* what building requests and mapping answers needs, between steps */
	taptalk_encoding_prepare();

	/* requests a stopped worker left behind */
	if (!rescued ||
		TimestampDifferenceExceeds(last_lease_check, GetCurrentTimestamp(),
								   LEASE_CHECK_MS))
	{
		wrote = rescue(p, !rescued);
		rescued = true;
		last_lease_check = GetCurrentTimestamp();
	}

	if (p->nfinished > 0)
	{
		record_finished(p);
		wrote = true;
	}

	/*
	 * The callbacks of one role (the first to finish) run in this
	 * transaction, before the claim, so that their requests' items are free
	 * for it; other roles' in transactions of their own, after it.
	 */
	if (p->nfinished > 0)
	{
		int		   *group = palloc(sizeof(int) * p->nfinished);
		int			n = take_role_group(p, group);

		taptalk_callback_new_transaction();
		record_and_call(p, group, n);
		for (int f = 0; f < n; f++)
			release_item(p, group[f]);
	}
	if (want_claim && p->nfree > 0)
	{
		claim(p);
		wrote = wrote || p->nclaimed > 0;
		if (first && p->nclaimed == 0)
			wrote = plan_idle(p, table) || wrote;
	}
	end_step(wrote);
	report_committed();
	return true;
}

/*
 * The requests of p->finished whose role is that of the first: moved to
 * `group` (returns how many), in the order they finished.
 */
static int
take_role_group(Pipeline *p, int *group)
{
	Oid			role = p->items[p->finished[0]].role;
	int			n = 0;
	int			kept = 0;

	for (int f = 0; f < p->nfinished; f++)
	{
		int			i = p->finished[f];

		if (p->items[i].role == role)
			group[n++] = i;
		else
			p->finished[kept++] = i;
	}
	p->nfinished = kept;
	return n;
}

/*
 * Record the outcomes of n finished requests of one role (`which`) and run
 * their callbacks, in a transaction of their own: each callback's writes
 * and its request's outcome commit together, and nothing a callback leaves
 * in its transaction reaches another role's.  The commit does not wait for
 * its WAL to be flushed: after a crash that loses it, the requests are sent
 * again.
 */
static void
record_and_call(Pipeline *p, const int *which, int n)
{
	bool	   *recorded = palloc(sizeof(bool) * n);

	record_items(p, which, n, recorded);
	for (int f = 0; f < n; f++)
	{
		QueueItem  *item = &p->items[which[f]];
		char	   *error;

		if (!recorded[f])
			continue;
		error = taptalk_run_callback(item->callback, item->role, item->id,
									 item->request, &item->result,
									 p->result_type);
		if (error != NULL)
			set_callback_error(item->id, error);
	}
}

static void
callback_step(Pipeline *p, const int *which, int n)
{
	begin_step("running requests' callbacks");
	taptalk_callback_new_transaction();
	(void) set_config_option("synchronous_commit", "off", PGC_SUSET,
							 PGC_S_SESSION, GUC_ACTION_LOCAL, true, 0, false);
	record_and_call(p, which, n);
	/* the step that follows reports the writes to the statistics */
	end_step(false);
	report_committed();
}

/*
 * callback_step, whose errors are logged and rolled back; frees the
 * items.
 */
static void
guarded_callback_step(Pipeline *p, const int *which, int n)
{
	MemoryContext cxt = CurrentMemoryContext;

	PG_TRY();
	{
		callback_step(p, which, n);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		abort_step();
		ereport(LOG,
				(errmsg("taptalk worker: the outcomes of %d requests are not recorded; they are sent again when their lease expires",
						n)));
	}
	PG_END_TRY();
	for (int f = 0; f < n; f++)
		release_item(p, which[f]);
}

/*
 * Run the callbacks of the finished requests still in p->finished: a
 * transaction for each role's (callbacks of different roles never share
 * one), in the order the requests finished within each role.
 */
static void
run_callbacks(Pipeline *p)
{
	int		   *group = palloc(sizeof(int) * Max(p->nfinished, 1));

	while (p->nfinished > 0)
	{
		int			n = take_role_group(p, group);

		guarded_callback_step(p, group, n);
	}
	pfree(group);
}

/*
 * One step: a short transaction that records the finished requests'
 * outcomes and claims due requests for the free items, then a transaction
 * for each role whose callbacks are to run.  `first` is the step that starts a run.  An
 * error in the worker's own statements is logged and rolled back, and the
 * worker goes on: what the step claimed is not sent, outcomes it did not
 * record stay 'sending' until their lease expires (then they are sent
 * again), and the run ends.  Returns false, and claims nothing, when the
 * extension is not installed, or no longer holds the run's queue table.
 */
static bool
pipeline_step(Pipeline *p, bool first)
{
	MemoryContext cxt = CurrentMemoryContext;
	bool		want_claim = !p->stop;
	volatile bool found = true;

	/* a commit from now on may have enqueued what this claim cannot see */
	if (want_claim && shared != NULL)
		(void) pg_atomic_exchange_u32(&shared->wake_pending, 0);

	PG_TRY();
	{
		found = step(p, first, want_claim);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		abort_step();
		/* the claim, if any, was rolled back */
		for (int c = p->next_claimed; c < p->nclaimed; c++)
			release_item(p, p->claimed[c]);
		p->nclaimed = p->next_claimed = 0;
		if (p->nfinished > 0)
			ereport(LOG,
					(errmsg("taptalk worker: the outcomes of %d requests are not recorded; they are sent again when their lease expires",
							p->nfinished)));
		for (int f = 0; f < p->nfinished; f++)
			release_item(p, p->finished[f]);
		p->nfinished = 0;
		p->stop = true;
		p->wait_ms = STEP_ERROR_WAIT_MS;
	}
	PG_END_TRY();
	if (!found)
		return false;

	run_callbacks(p);
	return true;
}

/*
 * The transport's source of requests: the claimed requests, one per free
 * transfer slot.  When none is left, a step records what finished and
 * claims again, unless nothing finished and the last claim found the queue
 * drained (and no enqueuing commit woke the worker since).  The steps run
 * between the transport's waits: no transaction is open while the worker
 * waits for TapTalk.  The run ends when nothing is claimed or in flight.
 */
static TaptalkNext
pipeline_next(void *arg, int64 *id, StringInfo body)
{
	Pipeline   *p = (Pipeline *) arg;

	for (;;)
	{
		if (p->next_claimed < p->nclaimed)
		{
			int			i = p->claimed[p->next_claimed++];
			QueueItem  *item = &p->items[i];
			TaptalkResult failure;
			MemoryContext old;
			bool		built;

			if (p->next_claimed == p->nclaimed)
				p->nclaimed = p->next_claimed = 0;

			/*
			 * What building allocates besides the body (the body's buffer
			 * is the transport's) goes with the scratch context: a run
			 * lasts as long as the queue has work, and outside a step the
			 * current context is TopMemoryContext.
			 */
			MemoryContextReset(p->scratch);
			old = MemoryContextSwitchTo(p->scratch);
			memset(&failure, 0, sizeof(failure));
			resetStringInfo(body);
			/* checked at enqueue, but a row may have been written by hand */
			if (item->oversized)
			{
				taptalk_set_error(&failure, TAPTALK_CODE_PARAM_FAILED, "",
								  psprintf("Request must be at most %d bytes as stored",
										   TAPTALK_MAX_STORED_REQUEST_BYTES));
				built = false;
			}
			else if (!JB_ROOT_IS_OBJECT(item->request))
			{
				taptalk_set_error(&failure, TAPTALK_CODE_PARAM_FAILED, "",
								  psprintf("Request must be a JSON object, not %s",
										   taptalk_jsonb_root_kind(item->request)));
				built = false;
			}
			else
				built = taptalk_build_request(item->request, body, &failure);
			MemoryContextSwitchTo(old);
			if (built)
			{
				*id = i;
				p->in_flight++;
				set_state(sending_state(), p->in_flight);
				return TAPTALK_NEXT_REQUEST;
			}
			taptalk_stats_rejected(TAPTALK_PATH_QUEUE);
			finish_item(p, i, &failure);
			continue;
		}

		/* a reload is applied between runs: end this one */
		if (ConfigReloadPending)
			p->stop = true;
		/*
		 * an enqueuing commit: claim again, unless TapTalk is out of reach
		 * or its rate limit holds sending back
		 */
		if (p->drained && shared != NULL && !taptalk_pacing_in_outage() &&
			taptalk_pacing_rate_left() == 0 &&
			pg_atomic_read_u32(&shared->wake_pending) != 0)
			p->drained = false;
		if (p->nfinished > 0 || (!p->drained && !p->stop))
		{
			(void) pipeline_step(p, false);
			if (p->nclaimed > 0)
				continue;
		}
		return p->in_flight > 0 ? TAPTALK_NEXT_LATER : TAPTALK_NEXT_NONE;
	}
}

static void
pipeline_done(void *arg, int64 id, TaptalkResult *result)
{
	Pipeline   *p = (Pipeline *) arg;

	p->in_flight--;
	taptalk_pacing_note(result);
	set_state(sending_state(), p->in_flight);
	finish_item(p, (int) id, result);
}

/* Whether the settings needed to reach TapTalk are there. */
static bool
configured(void)
{
	return taptalk_base_url && taptalk_base_url[0] &&
		taptalk_server_key_id && taptalk_server_key_id[0] &&
		taptalk_server_key_secret && taptalk_server_key_secret[0];
}

void
taptalk_worker_main(Datum main_arg)
{
	Pipeline	pipeline;
	bool		said_missing = false;
	bool		said_unconfigured = false;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(taptalk_database, NULL, 0);

	/* the worker's own statements name everything with its schema */
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET,
					PGC_S_OVERRIDE);

#if PG_VERSION_NUM >= 170000
	wait_event_info = WaitEventExtensionNew("TaptalkQueueIdle");
#else
	wait_event_info = PG_WAIT_EXTENSION;
#endif

	if (shared != NULL)
	{
		shared->latch = MyLatch;
		SpinLockAcquire(&shared->mutex);
		shared->pid = MyProcPid;
		SpinLockRelease(&shared->mutex);
		set_state(WORKER_STARTING, 0);
		on_shmem_exit(worker_detach, (Datum) 0);
	}

	memset(&pipeline, 0, sizeof(pipeline));
	pipeline.cxt = AllocSetContextCreate(TopMemoryContext, "taptalk worker run",
										 ALLOCSET_DEFAULT_SIZES);

	ereport(LOG,
			(errmsg("taptalk worker started for database \"%s\"",
					taptalk_database)));

	for (;;)
	{
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
			reload_config();

		if (!configured())
		{
			if (!said_unconfigured)
				ereport(LOG,
						(errmsg("taptalk worker: the server key settings are not set; waiting")));
			said_unconfigured = true;
			set_state(WORKER_WAITING_SETTINGS, 0);
			worker_wait(POLL_MS);
			continue;
		}
		said_unconfigured = false;

		pipeline_begin(&pipeline, taptalk_worker_concurrency);
		if (!pipeline_step(&pipeline, true))
		{
			set_state(WORKER_WAITING_EXTENSION, 0);
			if (!said_missing)
				ereport(LOG,
						(errmsg("taptalk worker: extension \"taptalk\" is not installed in database \"%s\"; waiting",
								taptalk_database)));
			said_missing = true;
			worker_wait(MISSING_POLL_MS);
			continue;
		}
		if (said_missing)
			ereport(LOG,
					(errmsg("taptalk worker: extension \"taptalk\" found in database \"%s\"",
							taptalk_database)));
		said_missing = false;

		if (pipeline.nclaimed == 0)
		{
			if (taptalk_pacing_rate_left() > 0)
				set_state(WORKER_RATE_LIMITED, 0);
			else
				set_state(pipeline.waiting_retry ? WORKER_BACKING_OFF : WORKER_IDLE, 0);
			if (taptalk_pacing_outage_left() > 0 || taptalk_pacing_rate_left() > 0)
				wait_out_pause();
			else
				worker_wait(pipeline.wait_ms);
			continue;
		}

		/*
		 * Send until nothing is claimed or in flight, refilling each free
		 * transfer slot through pipeline_next; no retries within an attempt:
		 * the queue retries with its own backoff.
		 */
		in_run = true;
		pgstat_report_activity(STATE_RUNNING, "sending queued requests");
		taptalk_transport_run(TAPTALK_PATH_QUEUE, pipeline_next, pipeline_done,
							  &pipeline, pipeline.size, 0);
		in_run = false;
		pgstat_report_activity(STATE_IDLE, NULL);
	}
}
