/*-------------------------------------------------------------------------
 *
 * stats.c
 *	  Statistics for the taptalk extension: counters in shared memory, one
 *	  set per path (taptalk_auth_ticket, taptalk_auth_tickets, the queue's
 *	  worker), read by the views taptalk_stats, taptalk_stats_errors and
 *	  taptalk_stats_latency and zeroed by taptalk_stats_reset().
 *
 * The counters are 64-bit atomics: recording a request is a handful of
 * atomic additions, with no lock, so neither readers nor a reset ever make a
 * request wait, and a reader sees a request as soon as it has finished.  A
 * reader takes the counters one by one, so while requests are finishing a
 * row is not one instant's snapshot; once they have finished the counters
 * agree exactly.  taptalk.track_stats = off stops the recording.
 *
 * The shared memory exists only when the library is preloaded
 * (shared_preload_libraries); otherwise recording does nothing and the
 * functions refuse, as the request functions do.  Where the counters live
 * depends on the server:
 *
 * - PostgreSQL 15 to 17 (and 18 with taptalk.stats_kind_id = 0): a struct of
 *	 our own from ShmemInitStruct.  The counters start at zero whenever the
 *	 server starts, and again after a crash restart.
 * - PostgreSQL 18: the same struct, registered as a fixed-amount kind of
 *	 the server's cumulative statistics (pgstat_register_kind) under the ID
 *	 taptalk.stats_kind_id.  The server then allocates it, writes it to its
 *	 statistics file at a clean shutdown and reads it back at the next start,
 *	 and zeroes it after a crash, as it does its own statistics.  Recording
 *	 and reading still go straight to the atomics; nothing is pending in a
 *	 backend, so nothing needs flushing.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"
#if PG_VERSION_NUM >= 180000
#include "pgstat.h"
#include "utils/pgstat_internal.h"
#endif

#include "taptalk.h"

/* the names of the paths, as the views show them */
static const char *const path_names[TAPTALK_NUM_PATHS] = {
	[TAPTALK_PATH_SINGLE] = "single",
	[TAPTALK_PATH_BATCH] = "batch",
	[TAPTALK_PATH_QUEUE] = "queue",
};

/* error_code buckets, in the order taptalk_stats_errors shows them */
typedef enum StatsError
{
	ERR_40002,
	ERR_40001,
	ERR_40101,
	ERR_50000,
	ERR_OTHER,					/* any other code from TapTalk */
	ERR_TIMEOUT,
	ERR_CONNECTION_FAILED,
	ERR_HTTP_ERROR,
	ERR_INVALID_RESPONSE,
	NUM_ERRORS
} StatsError;

static const char *const error_names[NUM_ERRORS] = {
	[ERR_40002] = "40002",
	[ERR_40001] = "40001",
	[ERR_40101] = "40101",
	[ERR_50000] = "50000",
	[ERR_OTHER] = "OTHER",
	[ERR_TIMEOUT] = TAPTALK_CODE_TIMEOUT,
	[ERR_CONNECTION_FAILED] = TAPTALK_CODE_CONNECTION_FAILED,
	[ERR_HTTP_ERROR] = TAPTALK_CODE_HTTP_ERROR,
	[ERR_INVALID_RESPONSE] = TAPTALK_CODE_INVALID_RESPONSE,
};

/*
 * Upper bounds of the latency buckets in milliseconds (a request falls in
 * the first bucket whose bound it does not exceed); the last bucket, with no
 * bound, holds the rest.
 */
static const int latency_bounds_ms[] = {
	1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000
};

#define NUM_BUCKETS (lengthof(latency_bounds_ms) + 1)

typedef struct PathStats
{
	pg_atomic_uint64 requests;	/* finished requests that were sent */
	pg_atomic_uint64 rejected;	/* refused by our validation, never sent */
	pg_atomic_uint64 attempts;	/* finished attempts, retries included */
	pg_atomic_uint64 successes;
	pg_atomic_uint64 abandoned; /* in flight when the call was interrupted */
	pg_atomic_uint64 connections;	/* new connections opened */
	pg_atomic_uint64 bytes_sent;
	pg_atomic_uint64 bytes_received;
	pg_atomic_uint64 latency_sum_us;
	pg_atomic_uint64 errors[NUM_ERRORS];
	pg_atomic_uint64 latency[NUM_BUCKETS];
} PathStats;

typedef struct TaptalkStats
{
	pg_atomic_uint64 stats_reset;	/* a TimestampTz */
	PathStats	paths[TAPTALK_NUM_PATHS];
} TaptalkStats;

/*
 * The layout of TaptalkStats is also the format of its image in the
 * server's statistics file on PostgreSQL 18, which the server reads back
 * byte for byte by the size of the running library's struct: a struct of
 * another size misreads the whole file, and the server then discards all
 * of its cumulative statistics, its own included.  So TaptalkStats never
 * changes; counters added later go into RateStats, in shared memory of its
 * own, not kept across a restart.
 */
StaticAssertDecl(sizeof(TaptalkStats) == 776,
				 "TaptalkStats is the statistics file's format: never change it");

/* counters added in version 1.2: TapTalk's rate limit, and ours */
typedef struct RateStats
{
	pg_atomic_uint64 rate_limited[TAPTALK_NUM_PATHS];	/* 429 answers */
	pg_atomic_uint64 rate_wait_us[TAPTALK_NUM_PATHS];	/* time waited for a
														 * Retry-After or for
														 * taptalk.max_rate */
} RateStats;

/* the counters in shared memory; NULL when the library was not preloaded */
static TaptalkStats *stats = NULL;
static RateStats *rate_stats = NULL;

/* taptalk.track_stats: whether requests are counted */
static bool track_stats = true;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

PG_FUNCTION_INFO_V1(taptalk_stats);
PG_FUNCTION_INFO_V1(taptalk_stats_errors);
PG_FUNCTION_INFO_V1(taptalk_stats_latency);
PG_FUNCTION_INFO_V1(taptalk_stats_reset);

/* a PathStats is an array of counters, and so is a TaptalkStats */
#define COUNTERS_PER_PATH (sizeof(PathStats) / sizeof(pg_atomic_uint64))
StaticAssertDecl(sizeof(PathStats) % sizeof(pg_atomic_uint64) == 0,
				 "PathStats must hold counters only");
StaticAssertDecl(sizeof(TaptalkStats) % sizeof(pg_atomic_uint64) == 0,
				 "TaptalkStats must hold counters only");

/*
 * Set every counter of s to zero and stats_reset to ts.  init: s is new
 * memory, whose atomics are initialized rather than written.
 */
static void
stats_zero(TaptalkStats *s, bool init, TimestampTz ts)
{
	for (int p = 0; p < TAPTALK_NUM_PATHS; p++)
	{
		pg_atomic_uint64 *c = (pg_atomic_uint64 *) &s->paths[p];

		for (size_t i = 0; i < COUNTERS_PER_PATH; i++)
		{
			if (init)
				pg_atomic_init_u64(&c[i], 0);
			else
				pg_atomic_write_u64(&c[i], 0);
		}
	}
	if (init)
		pg_atomic_init_u64(&s->stats_reset, (uint64) ts);
	else
		pg_atomic_write_u64(&s->stats_reset, (uint64) ts);
}

/* The same for the counters of RateStats. */
static void
rate_stats_zero(RateStats *r, bool init)
{
	pg_atomic_uint64 *c = (pg_atomic_uint64 *) r;

	for (size_t i = 0; i < sizeof(RateStats) / sizeof(pg_atomic_uint64); i++)
	{
		if (init)
			pg_atomic_init_u64(&c[i], 0);
		else
			pg_atomic_write_u64(&c[i], 0);
	}
}

/* ---------------------------------------------------------------------------
 * PostgreSQL 18: the counters as a kind of the server's cumulative statistics
 *
 * stats_kind_register(), while the library is preloaded, defines
 * taptalk.stats_kind_id and registers the kind under that ID, and says
 * whether it did; stats_kind_data() returns the kind's shared memory once
 * the server has made it.  The server calls the callbacks: init when it
 * makes its shared memory, reset_all after a crash (and when its statistics
 * file is missing or unreadable), snapshot when it writes the file at a
 * clean shutdown.  The file holds the struct as it is in shared memory, and
 * the startup process reads it back into shared memory byte for byte before
 * anyone can use it.
 * ---------------------------------------------------------------------------
 */
#if PG_VERSION_NUM >= 180000

/* the default ID of the kind; the README says how to choose another */
#define STATS_KIND_ID_DEFAULT 29

/* taptalk.stats_kind_id: 0, or the ID the kind is registered under */
static int	stats_kind_id = STATS_KIND_ID_DEFAULT;

static void
stats_kind_init_cb(void *data)
{
	stats_zero((TaptalkStats *) data, true, GetCurrentTimestamp());
}

static void
stats_kind_reset_all_cb(TimestampTz ts)
{
	stats_zero((TaptalkStats *) pgstat_get_custom_shmem_data(stats_kind_id),
			   false, ts);
}

static void
stats_kind_snapshot_cb(void)
{
	pg_atomic_uint64 *from = pgstat_get_custom_shmem_data(stats_kind_id);
	pg_atomic_uint64 *to = pgstat_get_custom_snapshot_data(stats_kind_id);

	for (size_t i = 0; i < sizeof(TaptalkStats) / sizeof(pg_atomic_uint64); i++)
		pg_atomic_init_u64(&to[i], pg_atomic_read_u64(&from[i]));
}

static const PgStat_KindInfo stats_kind_info = {
	.name = "taptalk",
	.fixed_amount = true,
	.write_to_file = true,
	.shared_size = sizeof(TaptalkStats),
	.shared_data_off = 0,
	.shared_data_len = sizeof(TaptalkStats),
	.init_shmem_cb = stats_kind_init_cb,
	.reset_all_cb = stats_kind_reset_all_cb,
	.snapshot_cb = stats_kind_snapshot_cb,
};

static bool
check_stats_kind_id(int *newval, void **extra, GucSource source)
{
	if (*newval == 0 || pgstat_is_kind_custom((PgStat_Kind) *newval))
		return true;
	GUC_check_errdetail("\"taptalk.stats_kind_id\" must be 0 or between %d and %d.",
						PGSTAT_KIND_CUSTOM_MIN, PGSTAT_KIND_CUSTOM_MAX);
	return false;
}

static bool
stats_kind_register(void)
{
	/* a setting read at server start can only be defined then */
	if (!process_shared_preload_libraries_in_progress)
		return false;

	DefineCustomIntVariable("taptalk.stats_kind_id",
							"Sets the ID of taptalk's statistics among the server's cumulative statistics.",
							"Under this ID, which no other extension may use, "
							"the statistics are kept across a clean restart. "
							"0 keeps them in shared memory only, from "
							"server start to server stop.",
							&stats_kind_id,
							STATS_KIND_ID_DEFAULT, 0, PGSTAT_KIND_CUSTOM_MAX,
							PGC_POSTMASTER,
							0,
							check_stats_kind_id, NULL, NULL);

	if (stats_kind_id == 0)
		return false;
	pgstat_register_kind((PgStat_Kind) stats_kind_id, &stats_kind_info);
	return true;
}

static TaptalkStats *
stats_kind_data(void)
{
	return (TaptalkStats *) pgstat_get_custom_shmem_data(stats_kind_id);
}

#else							/* PG_VERSION_NUM < 180000 */

/* Before PostgreSQL 18 there is no such kind: the counters are our own. */
static bool
stats_kind_register(void)
{
	return false;
}

static TaptalkStats *
stats_kind_data(void)
{
	return NULL;
}

#endif							/* PG_VERSION_NUM >= 180000 */

/* ---------------------------------------------------------------------------
 * Setting up: the settings, and the shared memory
 * ---------------------------------------------------------------------------
 */

/* whether the counters are a kind of the server's statistics (PG 18) */
static bool stats_in_pgstat = false;

static void
stats_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	/* the server sizes a statistics kind's memory itself */
	if (!stats_in_pgstat)
		RequestAddinShmemSpace(MAXALIGN(sizeof(TaptalkStats)));
	RequestAddinShmemSpace(MAXALIGN(sizeof(RateStats)));
}

static void
stats_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	rate_stats = ShmemInitStruct("taptalk rate stats", sizeof(RateStats), &found);
	if (!found)
		rate_stats_zero(rate_stats, true);
	if (stats_in_pgstat)
	{
		/* made and initialized by the server with its own statistics */
		stats = stats_kind_data();
	}
	else
	{
		stats = ShmemInitStruct("taptalk stats", sizeof(TaptalkStats), &found);
		if (!found)
			stats_zero(stats, true, GetCurrentTimestamp());
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Called from _PG_init, before the "taptalk" prefix is reserved (so that
 * the settings' values in postgresql.conf are kept): define the settings,
 * and, when the library is being preloaded, ask for the shared memory or
 * register the statistics kind that holds it; without that there are no
 * statistics.
 */
void
taptalk_stats_init(void)
{
	DefineCustomBoolVariable("taptalk.track_stats",
							 "Collects statistics of the requests to TapTalk.",
							 "When off, no path counts anything; the "
							 "statistics views still show the counters.",
							 &track_stats,
							 true,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);

	stats_in_pgstat = stats_kind_register();

	if (!process_shared_preload_libraries_in_progress)
		return;
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = stats_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = stats_shmem_startup;
}

/* ---------------------------------------------------------------------------
 * Recording, by every path
 * ---------------------------------------------------------------------------
 */

/* the counters of a path, or NULL when nothing is to be recorded */
static inline PathStats *
recording(TaptalkPath path)
{
	if (stats == NULL || !track_stats)
		return NULL;
	return &stats->paths[path];
}

static inline void
add(pg_atomic_uint64 *counter, uint64 n)
{
	if (n != 0)
		pg_atomic_fetch_add_u64(counter, (int64) n);
}

void
taptalk_stats_rejected(TaptalkPath path)
{
	PathStats  *s = recording(path);

	if (s != NULL)
		add(&s->rejected, 1);
}

void
taptalk_stats_attempt(TaptalkPath path, uint64 connections,
					  uint64 bytes_sent, uint64 bytes_received)
{
	PathStats  *s = recording(path);

	if (s == NULL)
		return;
	add(&s->attempts, 1);
	add(&s->connections, connections);
	add(&s->bytes_sent, bytes_sent);
	add(&s->bytes_received, bytes_received);
}

/* The bucket of an error_code. */
static StatsError
error_bucket(const char *code)
{
	for (int i = 0; i < NUM_ERRORS; i++)
	{
		if (i != ERR_OTHER && strcmp(code, error_names[i]) == 0)
			return (StatsError) i;
	}
	return ERR_OTHER;
}

/*
 * The name taptalk_stats_errors gives an error_code: TapTalk's codes it
 * counts on their own, ours, or OTHER.
 */
const char *
taptalk_stats_error_name(const char *code)
{
	return error_names[error_bucket(code)];
}

void
taptalk_stats_finished(TaptalkPath path, const char *error_code,
					   int64 latency_us)
{
	PathStats  *s = recording(path);
	int			b = 0;

	if (s == NULL)
		return;
	if (latency_us < 0)
		latency_us = 0;
	while (b < (int) lengthof(latency_bounds_ms) &&
		   latency_us > (int64) latency_bounds_ms[b] * 1000)
		b++;
	add(&s->latency[b], 1);
	add(&s->latency_sum_us, (uint64) latency_us);
	if (error_code == NULL)
		add(&s->successes, 1);
	else
		add(&s->errors[error_bucket(error_code)], 1);
	add(&s->requests, 1);
}

void
taptalk_stats_abandoned(TaptalkPath path)
{
	PathStats  *s = recording(path);

	if (s != NULL)
		add(&s->abandoned, 1);
}

/* A 429 answer from TapTalk (or whatever stands at taptalk.base_url). */
void
taptalk_stats_rate_limited(TaptalkPath path)
{
	if (recording(path) != NULL && rate_stats != NULL)
		add(&rate_stats->rate_limited[path], 1);
}

/* Time a request waits before an attempt for a Retry-After or max_rate. */
void
taptalk_stats_rate_wait(TaptalkPath path, int64 wait_us)
{
	if (recording(path) != NULL && rate_stats != NULL && wait_us > 0)
		add(&rate_stats->rate_wait_us[path], (uint64) wait_us);
}

static void
check_stats_available(void)
{
	if (stats == NULL)
		taptalk_require_preload("The statistics live in shared memory, which the library can only ask for at server start.");
}

static inline Datum
counter_datum(pg_atomic_uint64 *counter)
{
	return Int64GetDatum((int64) pg_atomic_read_u64(counter));
}

/* columns of taptalk_stats() */
enum
{
	COL_PATH,
	COL_REQUESTS,
	COL_REJECTED,
	COL_ATTEMPTS,
	COL_SUCCESSES,
	COL_FAILURES,
	COL_ABANDONED,
	COL_CONNECTIONS,
	COL_BYTES_SENT,
	COL_BYTES_RECEIVED,
	COL_LATENCY_SUM_MS,
	COL_LATENCY_BUCKETS,
	COL_RATE_LIMITED,
	COL_RATE_LIMIT_WAIT_MS,
	COL_STATS_RESET,
	STATS_NATTS
};

/* version 1.1 of the extension has neither rate_limited nor rate_limit_wait_ms */
#define STATS_NATTS_1_1 (STATS_NATTS - 2)

/*
 * taptalk_stats() returns setof record: one row per path, the columns of the
 * view taptalk_stats.
 */
Datum
taptalk_stats(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	TimestampTz reset;
	bool		old_columns;

	check_stats_available();
	InitMaterializedSRF(fcinfo, 0);
	if (rsinfo->setDesc->natts != STATS_NATTS &&
		rsinfo->setDesc->natts != STATS_NATTS_1_1)
		elog(ERROR, "taptalk_stats: expected %d columns, found %d",
			 STATS_NATTS, rsinfo->setDesc->natts);
	old_columns = rsinfo->setDesc->natts == STATS_NATTS_1_1;
	reset = (TimestampTz) pg_atomic_read_u64(&stats->stats_reset);

	for (int p = 0; p < TAPTALK_NUM_PATHS; p++)
	{
		PathStats  *s = &stats->paths[p];
		Datum		values[STATS_NATTS];
		bool		nulls[STATS_NATTS] = {0};
		Datum		buckets[NUM_BUCKETS];
		uint64		failures = 0;

		for (int i = 0; i < NUM_ERRORS; i++)
			failures += pg_atomic_read_u64(&s->errors[i]);
		for (int i = 0; i < (int) NUM_BUCKETS; i++)
			buckets[i] = counter_datum(&s->latency[i]);

		values[COL_PATH] = CStringGetTextDatum(path_names[p]);
		values[COL_REQUESTS] = counter_datum(&s->requests);
		values[COL_REJECTED] = counter_datum(&s->rejected);
		values[COL_ATTEMPTS] = counter_datum(&s->attempts);
		values[COL_SUCCESSES] = counter_datum(&s->successes);
		values[COL_FAILURES] = Int64GetDatum((int64) failures);
		values[COL_ABANDONED] = counter_datum(&s->abandoned);
		values[COL_CONNECTIONS] = counter_datum(&s->connections);
		values[COL_BYTES_SENT] = counter_datum(&s->bytes_sent);
		values[COL_BYTES_RECEIVED] = counter_datum(&s->bytes_received);
		values[COL_LATENCY_SUM_MS] =
			Float8GetDatum((double) pg_atomic_read_u64(&s->latency_sum_us) / 1000.0);
		values[COL_LATENCY_BUCKETS] =
			PointerGetDatum(construct_array(buckets, NUM_BUCKETS, INT8OID,
											sizeof(int64), FLOAT8PASSBYVAL,
											TYPALIGN_DOUBLE));
		values[COL_RATE_LIMITED] = counter_datum(&rate_stats->rate_limited[p]);
		values[COL_RATE_LIMIT_WAIT_MS] =
			Float8GetDatum((double) pg_atomic_read_u64(&rate_stats->rate_wait_us[p]) / 1000.0);
		values[COL_STATS_RESET] = TimestampTzGetDatum(reset);
		if (old_columns)
		{
			/* 1.1's columns: stats_reset right after latency_buckets */
			values[COL_RATE_LIMITED] = values[COL_STATS_RESET];
		}
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/*
 * taptalk_stats_errors() returns setof record (path, error_code, count): one
 * row per path and error_code bucket, zeros included.
 */
Datum
taptalk_stats_errors(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	check_stats_available();
	InitMaterializedSRF(fcinfo, 0);
	for (int p = 0; p < TAPTALK_NUM_PATHS; p++)
	{
		for (int i = 0; i < NUM_ERRORS; i++)
		{
			Datum		values[3];
			bool		nulls[3] = {0};

			values[0] = CStringGetTextDatum(path_names[p]);
			values[1] = CStringGetTextDatum(error_names[i]);
			values[2] = counter_datum(&stats->paths[p].errors[i]);
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		}
	}
	return (Datum) 0;
}

/*
 * taptalk_stats_latency() returns setof record (path, le_ms, count): one row
 * per path and latency bucket; le_ms is the bucket's upper bound, NULL for
 * the last bucket.
 */
Datum
taptalk_stats_latency(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	check_stats_available();
	InitMaterializedSRF(fcinfo, 0);
	for (int p = 0; p < TAPTALK_NUM_PATHS; p++)
	{
		for (int i = 0; i < (int) NUM_BUCKETS; i++)
		{
			Datum		values[3];
			bool		nulls[3] = {0};

			values[0] = CStringGetTextDatum(path_names[p]);
			if (i < (int) lengthof(latency_bounds_ms))
				values[1] = Int32GetDatum(latency_bounds_ms[i]);
			else
				nulls[1] = true;
			values[2] = counter_datum(&stats->paths[p].latency[i]);
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		}
	}
	return (Datum) 0;
}

/* taptalk_stats_reset() returns timestamptz: zero every counter. */
Datum
taptalk_stats_reset(PG_FUNCTION_ARGS)
{
	check_stats_available();
	rate_stats_zero(rate_stats, false);
	stats_zero(stats, false, GetCurrentTimestamp());
	PG_RETURN_TIMESTAMPTZ((TimestampTz) pg_atomic_read_u64(&stats->stats_reset));
}
