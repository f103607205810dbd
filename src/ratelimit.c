/*-------------------------------------------------------------------------
 *
 * ratelimit.c
 *	  The server's one budget of requests to TapTalk: taptalk.max_rate, in
 *	  shared memory, for every backend and the queue's worker together (a
 *	  quota belongs to the key, not to one session).
 *
 * taptalk.max_rate spaces the requests sent, retries included, at least
 * 1/max_rate seconds apart, server-wide, with no burst.  Each attempt
 * reserves its send time before it is sent: the first time that is at
 * least 1/max_rate after the last one reserved, and not before now.  So waiting requests go
 * out in the order they asked, whatever backend they are in, and no time
 * is lost to polling.  A reservation is made only when the send time fits
 * in the request's own time budget (taptalk.timeout): a request that
 * could not be sent in time is not sent at all, and takes no one's place.
 * Reserved times of requests then cancelled are not given back: the rate
 * can only come out lower than the setting, never higher.
 *
 * The caller waits for its send time itself, on its latch (transport.c),
 * so cancel, statement_timeout and terminate act at once.
 *
 * Without preloading there is no shared memory, and nothing to limit: the
 * functions that send refuse to run (taptalk.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/guc.h"
#include "utils/timestamp.h"

#include "taptalk.h"

/* the largest taptalk.max_rate: a request every 10 microseconds */
#define MAX_RATE 100000.0

double		taptalk_max_rate = 0;

typedef struct RateShared
{
	slock_t		mutex;
	TimestampTz next_free;		/* the earliest send time not reserved */
} RateShared;

static RateShared *rate = NULL;

/*
 * This process's own pace, on top of the server's rate: the queue's worker
 * sets it as it adapts to TapTalk's rate limit (pacing.c); 0 for none.
 */
static int64 pace_interval_us = 0;
static TimestampTz pace_next_free = 0;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static void
rate_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(RateShared)));
}

static void
rate_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	rate = ShmemInitStruct("taptalk rate limit", sizeof(RateShared), &found);
	if (!found)
	{
		SpinLockInit(&rate->mutex);
		rate->next_free = 0;
	}
	LWLockRelease(AddinShmemInitLock);
}

/* Set this process's own pace, in requests per second; 0 for none. */
void
taptalk_rate_set_pace(double rate)
{
	pace_interval_us = rate > 0 ? (int64) ceil(1000000.0 / rate) : 0;
}

/* Interval between two sends under taptalk.max_rate, in microseconds. */
static int64
send_interval_us(void)
{
	if (taptalk_max_rate <= 0)
		return 0;
	return (int64) ceil(1000000.0 / taptalk_max_rate);
}

/*
 * Called from _PG_init: the setting and, when the library is being
 * preloaded, the shared memory.
 */
void
taptalk_ratelimit_init(void)
{
	DefineCustomRealVariable("taptalk.max_rate",
							 "Sets the maximum rate of requests to TapTalk, in requests per second, for the whole server.",
							 "One budget for every session and the queue's "
							 "background worker, retries included; 0 sets no limit.",
							 &taptalk_max_rate,
							 0, 0, MAX_RATE,
							 PGC_SIGHUP,
							 0,
							 NULL, NULL, NULL);

	if (!process_shared_preload_libraries_in_progress)
		return;
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = rate_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = rate_shmem_startup;
}

/*
 * Reserve the send time of one attempt: the earliest time at or after now
 * that taptalk.max_rate and this process's pace allow.  Returns it, or 0
 * and nothing reserved when it is later than `latest`.
 */
TimestampTz
taptalk_rate_reserve(TimestampTz now, TimestampTz latest)
{
	int64		interval = rate != NULL ? send_interval_us() : 0;
	TimestampTz at = now;

	if (pace_interval_us > 0 && pace_next_free > at)
		at = pace_next_free;
	if (interval == 0)
	{
		if (at > latest)
			return 0;
	}
	else
	{
		SpinLockAcquire(&rate->mutex);
		if (rate->next_free > at)
			at = rate->next_free;
		if (at > latest)
		{
			SpinLockRelease(&rate->mutex);
			return 0;
		}
		rate->next_free = at + interval;
		SpinLockRelease(&rate->mutex);
	}
	if (pace_interval_us > 0)
		pace_next_free = at + pace_interval_us;
	return at;
}

/*
 * How many sends taptalk.max_rate and this process's pace leave free in
 * the next `horizon_ms` (INT_MAX without a limit), for a caller that
 * chooses how many requests to take up: the queue's worker.
 */
int
taptalk_rate_room(int horizon_ms)
{
	int64		interval = rate != NULL ? send_interval_us() : 0;
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz end = now + (int64) horizon_ms * 1000;
	int64		room = INT_MAX;

	if (interval > 0)
	{
		TimestampTz from;

		SpinLockAcquire(&rate->mutex);
		from = Max(rate->next_free, now);
		SpinLockRelease(&rate->mutex);
		room = Max((end - from) / interval, 0);
	}
	if (pace_interval_us > 0)
		room = Min(room, Max((end - Max(pace_next_free, now)) / pace_interval_us, 0));
	return (int) Min(room, (int64) INT_MAX);
}
