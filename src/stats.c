/*-------------------------------------------------------------------------
 *
 * stats.c
 *	  Statistics for the taptalk extension: counters in shared memory, one
 *	  set per path (taptalk_auth_ticket, taptalk_auth_tickets), read by the
 *	  views taptalk_stats, taptalk_stats_errors and taptalk_stats_latency and
 *	  zeroed by taptalk_stats_reset().
 *
 * The counters are 64-bit atomics: recording a request is a handful of
 * atomic additions, with no lock, so neither readers nor a reset ever make a
 * request wait.  A reader takes the counters one by one, so while requests
 * are finishing a row is not one instant's snapshot; once they have finished
 * the counters agree exactly.
 *
 * The shared memory exists only when the library is preloaded
 * (shared_preload_libraries); otherwise recording does nothing and the
 * functions refuse, as the request functions do.  The counters live as long
 * as the shared memory: they start at zero when the server starts, and again
 * after a crash restart.
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
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

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

static TaptalkStats *stats = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

PG_FUNCTION_INFO_V1(taptalk_stats);
PG_FUNCTION_INFO_V1(taptalk_stats_errors);
PG_FUNCTION_INFO_V1(taptalk_stats_latency);
PG_FUNCTION_INFO_V1(taptalk_stats_reset);

static void
stats_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(TaptalkStats)));
}

/* a PathStats is an array of counters */
#define COUNTERS_PER_PATH (sizeof(PathStats) / sizeof(pg_atomic_uint64))
StaticAssertDecl(sizeof(PathStats) % sizeof(pg_atomic_uint64) == 0,
				 "PathStats must hold counters only");

/* Set every counter to zero (init: for the first time) and note the time. */
static void
stats_zero(bool init)
{
	for (int p = 0; p < TAPTALK_NUM_PATHS; p++)
	{
		pg_atomic_uint64 *c = (pg_atomic_uint64 *) &stats->paths[p];

		for (size_t i = 0; i < COUNTERS_PER_PATH; i++)
		{
			if (init)
				pg_atomic_init_u64(&c[i], 0);
			else
				pg_atomic_write_u64(&c[i], 0);
		}
	}
	if (init)
		pg_atomic_init_u64(&stats->stats_reset, (uint64) GetCurrentTimestamp());
	else
		pg_atomic_write_u64(&stats->stats_reset, (uint64) GetCurrentTimestamp());
}

static void
stats_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	stats = ShmemInitStruct("taptalk stats", sizeof(TaptalkStats), &found);
	if (!found)
		stats_zero(true);
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Called from _PG_init: ask for the shared memory when the library is being
 * preloaded; without that there are no statistics.
 */
void
taptalk_stats_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		return;
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = stats_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = stats_shmem_startup;
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
	if (stats != NULL)
		add(&stats->paths[path].rejected, 1);
}

void
taptalk_stats_attempt(TaptalkPath path, uint64 connections,
					  uint64 bytes_sent, uint64 bytes_received)
{
	PathStats  *s;

	if (stats == NULL)
		return;
	s = &stats->paths[path];
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
	PathStats  *s;
	int			b = 0;

	if (stats == NULL)
		return;
	s = &stats->paths[path];
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
	if (stats != NULL)
		add(&stats->paths[path].abandoned, 1);
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
	COL_STATS_RESET,
	STATS_NATTS
};

/*
 * taptalk_stats() returns setof record: one row per path, the columns of the
 * view taptalk_stats.
 */
Datum
taptalk_stats(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	TimestampTz reset;

	check_stats_available();
	InitMaterializedSRF(fcinfo, 0);
	if (rsinfo->setDesc->natts != STATS_NATTS)
		elog(ERROR, "taptalk_stats: expected %d columns, found %d",
			 STATS_NATTS, rsinfo->setDesc->natts);
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
		values[COL_STATS_RESET] = TimestampTzGetDatum(reset);
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
	stats_zero(false);
	PG_RETURN_TIMESTAMPTZ((TimestampTz) pg_atomic_read_u64(&stats->stats_reset));
}
