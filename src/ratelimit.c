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
 * A request cancelled while it waits gives its time back when no later one
 * was reserved after it; otherwise the time stays unused: the rate can only
 * come out lower than the setting, never higher.  The latest time reserved
 * is kept, not the next free one, so a new setting applies to the very next
 * request.
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
	TimestampTz last_at;		/* the latest send time reserved; 0: none */
} RateShared;

static RateShared *rate = NULL;

/*
 * This process's own pace, on top of the server's rate: the queue's worker
 * sets it as it adapts to TapTalk's rate limit (pacing.c); 0 for none.
 */
static int64 pace_interval_us = 0;
static TimestampTz pace_last_at = 0;

/*
 * Nothing of this process's is sent before this time (the worker's pause
 * for TapTalk's Retry-After); 0 for none
 */
static TimestampTz hold_until = 0;

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
		rate->last_at = 0;
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Microseconds between two sends at `per_second` requests a second: 0 for
 * no limit, at most a day.
 */
static int64
interval_us(double per_second)
{
	if (per_second <= 0)
		return 0;
	return (int64) Min(ceil(1000000.0 / per_second), (double) USECS_PER_DAY);
}

/*
 * Hold this process's sends until `until` (0: release): sends already
 * given a time wait too (taptalk_rate_held).
 */
void
taptalk_rate_hold(TimestampTz until)
{
	hold_until = until;
}

/* The end of this process's hold when it is still on, else 0. */
TimestampTz
taptalk_rate_held(TimestampTz now)
{
	return hold_until > now ? hold_until : 0;
}

/* Set this process's own pace, in requests per second; 0 for none. */
void
taptalk_rate_set_pace(double per_second)
{
	pace_interval_us = interval_us(per_second);
}

/*
 * The first send time free after a send at `last` (0: none) with `interval`
 * between sends, not before `now`.  Reserved times are kept as the time of
 * the send, not the next free one, so a new interval (a reload, a new pace)
 * applies at once, to the very next send.
 */
static TimestampTz
next_free(TimestampTz last, int64 interval, TimestampTz now)
{
	if (interval == 0 || last == 0)
		return now;
	return Max(last + interval, now);
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
taptalk_rate_reserve(TimestampTz now, TimestampTz latest,
					 TaptalkRateTicket *ticket)
{
	int64		interval = rate != NULL ? interval_us(taptalk_max_rate) : 0;
	TimestampTz at = Max(next_free(pace_last_at, pace_interval_us, now),
						 hold_until);

	ticket->at = 0;
	ticket->shared = false;
	ticket->paced = false;
	if (interval == 0)
	{
		if (at > latest)
			return 0;
	}
	else
	{
		SpinLockAcquire(&rate->mutex);
		at = Max(at, next_free(rate->last_at, interval, now));
		if (at > latest)
		{
			SpinLockRelease(&rate->mutex);
			return 0;
		}
		ticket->prev_shared = rate->last_at;
		ticket->shared = true;
		rate->last_at = at;
		SpinLockRelease(&rate->mutex);
	}
	if (pace_interval_us > 0)
	{
		ticket->prev_pace = pace_last_at;
		ticket->paced = true;
		pace_last_at = at;
	}
	ticket->at = at;
	return at;
}

/*
 * Give back a send time that will not be used (its request was abandoned
 * while it waited), when it is still the latest reserved: the next request
 * then need not wait for it.  Tickets are given back latest first, so that
 * a backend's run of them goes back whole.  Never raises.
 */
void
taptalk_rate_release(const TaptalkRateTicket *ticket)
{
	if (ticket->shared)
	{
		SpinLockAcquire(&rate->mutex);
		if (rate->last_at == ticket->at)
			rate->last_at = ticket->prev_shared;
		SpinLockRelease(&rate->mutex);
	}
	if (ticket->paced && pace_last_at == ticket->at)
		pace_last_at = ticket->prev_pace;
}

/*
 * The earliest send time free now, under taptalk.max_rate and this
 * process's pace.
 */
static TimestampTz
first_free(TimestampTz now)
{
	int64		interval = rate != NULL ? interval_us(taptalk_max_rate) : 0;
	TimestampTz at = next_free(pace_last_at, pace_interval_us, now);

	if (interval > 0)
	{
		TimestampTz last;

		SpinLockAcquire(&rate->mutex);
		last = rate->last_at;
		SpinLockRelease(&rate->mutex);
		at = Max(at, next_free(last, interval, now));
	}
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
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz end = now + (int64) horizon_ms * 1000;
	TimestampTz from = first_free(now);
	int64		interval = Max(rate != NULL ? interval_us(taptalk_max_rate) : 0,
							   pace_interval_us);

	if (interval == 0)
		return INT_MAX;
	if (from >= end)
		return 0;
	return (int) Min((end - from) / interval + 1, (int64) INT_MAX);
}

/*
 * When taptalk_rate_room(horizon_ms) will be at least 1 again: 0 when it is
 * now.
 */
TimestampTz
taptalk_rate_room_at(int horizon_ms)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz at = first_free(now) - (int64) horizon_ms * 1000;

	return at > now ? at : 0;
}
