/*-------------------------------------------------------------------------
 *
 * pacing.c
 *	  How much the queue's background worker sends, as TapTalk's answers
 *	  show it: its pace under TapTalk's rate limit, the pauses a 429 asks
 *	  for, and the pauses while TapTalk is out of reach.  worker.c asks before each claim how many requests it may take
 *	  (taptalk_pacing_allowance) and tells of each outcome
 *	  (taptalk_pacing_note).
 *
 * TapTalk's rate limit belongs to the key, not to one request.  A 429 with
 * a Retry-After pauses all sending until it has passed.  And with or
 * without one, the worker adapts its pace so that it settles just below
 * the rate TapTalk accepts instead of swinging around it:
 *
 * - a 429 sets the worker's rate to 90% of the rate TapTalk accepted in
 *	 the last second (answers that were not 429s), or to half the rate
 *	 before when it accepted none.  The rate is cut at most once a second,
 *	 and only by a 429 for a request sent after the last cut: a quota stays
 *	 used up until its period ends, and answers 429 to everything
 *	 meanwhile;
 * - requests are then sent evenly spaced at that rate (ratelimit.c's
 *	 local pace), and each accepted answer raises it by 1/20 of a request a
 *	 second (5% a second, whatever the rate) up to the rate TapTalk
 *	 accepted before the cut, in about two seconds, and from there by
 *	 1/100 (1% a second): the rate that drew the 429 is passed only
 *	 slowly, so that a limiter's reserve (a token bucket that filled while
 *	 the worker sent less) is spent over several seconds instead of
 *	 carrying the rate far above the limit at once, and a 429 then cuts it
 *	 again;
 * - the rate is forgotten once it would let more than
 *	 taptalk.worker_concurrency requests be in flight at TapTalk's round
 *	 trip time (it is then no longer the limit), and after a minute
 *	 without a 429 (the queue was idle, or the limit has moved: the next
 *	 429 shows the limit of the day).
 *
 * The worker's concurrency, as taptalk_worker shows it, is that rate times
 * the round trip of the latest accepted answer: the requests it keeps in
 * flight (taptalk.worker_concurrency when it is not adapting, 1 while it
 * probes an outage).  A 429 without a usable Retry-After when TapTalk has
 * accepted nothing since the pace was last cut (a quota used up until its
 * period ends, which no pace can help) also pauses sending: about 250 ms,
 * doubling with each such pause in a row, at most
 * RATELIMIT_GUESS_MAX_MS.  taptalk.max_rate (ratelimit.c) further bounds
 * what the worker takes up: no more than its pace and the server's rate
 * allow in the next RATE_HORIZON_MS.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "common/pg_prng.h"
#include "utils/timestamp.h"

#include "taptalk.h"

/* first retry after about this long, doubling */
#define BACKOFF_BASE_MS 1000
/*
 * TapTalk out of reach: after this many retryable failures in a row the
 * worker pauses, then sends one request at a time (a probe) between pauses
 * that double, up to OUTAGE_MAX_MS, until TapTalk answers one
 */
#define OUTAGE_AFTER 10
#define OUTAGE_MAX_MS (60 * 1000)
/*
 * TapTalk's rate limit (a 429): sending pauses for the answer's
 * Retry-After, at most TAPTALK_QUEUE_RETRY_AFTER_MAX_MS, or without one
 * (when TapTalk accepted nothing since the pace was last cut) for about
 * RATELIMIT_BASE_MS, doubling with each pause in a row, at most
 * RATELIMIT_GUESS_MAX_MS
 */
#define RATELIMIT_BASE_MS 250
#define RATELIMIT_GUESS_MAX_MS (60 * 1000)
/* a rate limit pause is logged at most this often */
#define RATELIMIT_LOG_MS (60 * 1000)
/* after a 429 the rate is this share of what TapTalk accepted */
#define RATE_CUT 0.9
/* each accepted answer raises the rate by this much (requests/s) */
#define RATE_GROWTH 0.05
/* the lowest rate the worker adapts to (requests/s) */
#define RATE_MIN 0.1
/* the pace is cut at most this often */
#define CUT_EVERY_MS 1000
/* above the rate of the last 429, each accepted answer raises it by this much */
#define RATE_PROBE 0.01
/* a pace without a 429 for this long is forgotten */
#define PACE_FORGET_MS (60 * 1000)
/* accepted answers remembered, to measure the rate TapTalk accepts */
#define ACCEPTED_RING 4096
/* the worker takes up what taptalk.max_rate allows in this long */
#define RATE_HORIZON_MS 1000

/*
 * Whether a failure may be cured by a later attempt: no answer in time, no
 * connection, HTTP 429 or 5xx.  The status decides, whatever the body: with
 * TapTalk's envelope too.
 */
bool
taptalk_retryable(const TaptalkResult *result)
{
	if (result->error_code == NULL)
		return false;
	if (strcmp(result->error_code, TAPTALK_CODE_TIMEOUT) == 0 ||
		strcmp(result->error_code, TAPTALK_CODE_CONNECTION_FAILED) == 0)
		return true;
	return result->http_status == 429 || result->http_status >= 500;
}

/* Whether TapTalk answered a request with its rate limit (HTTP 429). */
bool
taptalk_rate_limited(const TaptalkResult *result)
{
	return result->error_code != NULL && result->http_status == 429;
}

/*
 * Exponential backoff with jitter, in [d/2, d) for d = base * 2^(n-1), at
 * most max_ms.
 */
double
taptalk_backoff_ms(int attempts, int max_ms)
{
	uint64		d = (uint64) BACKOFF_BASE_MS << Min(Max(attempts - 1, 0), 20);

	d = Min(d, (uint64) max_ms);
	return (double) (d / 2 + pg_prng_uint64_range(&pg_global_prng_state, 0, d / 2 - 1));
}

/* Milliseconds from now until `until`, rounded up; 0 when it has passed. */
static long
ms_left(TimestampTz until)
{
	TimestampTz now = GetCurrentTimestamp();

	if (until <= now)
		return 0;
	return (long) ((until - now + 999) / 1000);
}

/*
 * TapTalk's reachability, as the worker's requests find it: the retryable
 * failures in a row (no answer in time, no connection, HTTP 5xx), and once
 * there are OUTAGE_AFTER of them, the pauses so far and the end of the
 * current one.  During a pause nothing is claimed; after it, one request at
 * a time.  A backlog would otherwise be tried request after request while
 * TapTalk is down, each with its own backoff: the worker busy all the time,
 * for nothing.
 */
static int	outage_failures = 0;
static int	outage_pauses = 0;
static TimestampTz outage_until = 0;

static void
outage_reset(void)
{
	outage_failures = 0;
	outage_pauses = 0;
	outage_until = 0;
}

bool
taptalk_pacing_in_outage(void)
{
	return outage_failures >= OUTAGE_AFTER;
}

/* The end of the current outage pause; 0 when there is none. */
TimestampTz
taptalk_pacing_outage_end(void)
{
	if (!taptalk_pacing_in_outage() || outage_until <= GetCurrentTimestamp())
		return 0;
	return outage_until;
}

long
taptalk_pacing_outage_left(void)
{
	return ms_left(taptalk_pacing_outage_end());
}

/*
 * A sent request's outcome: what it says about TapTalk's reachability.  A
 * 429 is an answer: TapTalk is there, and asks to wait.
 */
static void
outage_note(const TaptalkResult *result)
{
	if (!taptalk_retryable(result) || taptalk_rate_limited(result))
	{
		/* TapTalk answered */
		if (taptalk_pacing_in_outage())
			ereport(LOG,
					(errmsg("taptalk worker: TapTalk answers again; sending resumes")));
		outage_reset();
		return;
	}
	if (++outage_failures < OUTAGE_AFTER || taptalk_pacing_outage_left() > 0)
		return;
	/* the first pause, or the probe after a pause failed: pause (again) */
	if (outage_pauses == 0)
		ereport(LOG,
				(errmsg("taptalk worker: %d requests in a row failed (the last: %s); pausing",
						outage_failures, taptalk_stats_error_name(result->error_code)),
				 errdetail("One request at a time is sent after each pause until TapTalk answers.")));
	outage_until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
											   (int64) taptalk_backoff_ms(outage_pauses + 1,
																		  OUTAGE_MAX_MS));
	outage_pauses++;
}

/*
 * TapTalk's rate limit: the pause (nothing is sent until ratelimit_until)
 * and the pace (see the file's header).
 */
static TimestampTz ratelimit_until = 0;
static int	ratelimit_guesses = 0;	/* pauses in a row without Retry-After */
static TimestampTz ratelimit_logged = 0;
static double pace = 0;			/* requests/s at most; 0: not adapting */
static TimestampTz cut_at = 0;	/* when the pace was last cut */
static double round_trip_s = 0; /* of the latest accepted answer */
static double rate_429 = 0;		/* what TapTalk accepted in the second
								 * before the last cut */
static int	accepted_since_cut = 0;

/* when the latest accepted answers came, a ring */
static TimestampTz accepted[ACCEPTED_RING];
static int	accepted_next = 0;
static int	accepted_count = 0;

/* Answers TapTalk accepted in the second before `now`. */
static int
accepted_last_second(TimestampTz now)
{
	int			n = 0;

	while (n < accepted_count)
	{
		int			i = (accepted_next - 1 - n + ACCEPTED_RING) % ACCEPTED_RING;

		if (accepted[i] <= now - USECS_PER_SEC)
			break;
		n++;
	}
	return n;
}

static void
set_pace(double rate)
{
	pace = rate;
	taptalk_rate_set_pace(rate);
}

/*
 * The worker's concurrency now: the requests it keeps in flight (see the
 * file's header).
 */
int
taptalk_pacing_concurrency(void)
{
	double		w;

	if (taptalk_pacing_in_outage())
		return 1;
	if (pace == 0)
		return taptalk_worker_concurrency;
	w = ceil(pace * round_trip_s);
	return (int) Max(Min(w, (double) taptalk_worker_concurrency), 1.0);
}

/*
 * When sending may go on: the end of the current rate limit pause, or the
 * time the pace and taptalk.max_rate leave room to take up a request again;
 * 0 when that is now.
 */
TimestampTz
taptalk_pacing_rate_end(void)
{
	TimestampTz until = Max(ratelimit_until,
							taptalk_rate_room_at(RATE_HORIZON_MS));

	return until > GetCurrentTimestamp() ? until : 0;
}

long
taptalk_pacing_rate_left(void)
{
	return ms_left(taptalk_pacing_rate_end());
}

/* An answer that is not a 429, to a request sent at `sent_at`. */
static void
answer_accepted(TimestampTz sent_at)
{
	TimestampTz now = GetCurrentTimestamp();

	ratelimit_guesses = 0;
	accepted_since_cut++;
	accepted[accepted_next] = now;
	accepted_next = (accepted_next + 1) % ACCEPTED_RING;
	accepted_count = Min(accepted_count + 1, ACCEPTED_RING);
	if (sent_at > 0 && now > sent_at)
		round_trip_s = (double) (now - sent_at) / USECS_PER_SEC;
	if (pace == 0)
		return;
	/* no longer the limit: forget it */
	if ((pace + RATE_GROWTH) * round_trip_s > taptalk_worker_concurrency)
		set_pace(0);
	else
		set_pace(pace + (pace < rate_429 ? RATE_GROWTH : RATE_PROBE));
}

/*
 * A 429 for a request sent at `sent_at`: cut the pace, unless it was sent
 * before the last cut, and pause for its Retry-After.
 */
static void
answer_rate_limited(const TaptalkResult *result, TimestampTz sent_at)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz until;
	int64		wait_ms = 0;
	int			took = accepted_last_second(now);

	/*
	 * A quota stays used up until its period (a second, mostly) ends, and
	 * answers 429 to everything meanwhile: once cut, the pace is not cut
	 * again for a second, whatever those 429s say.
	 */
	bool		news = sent_at >= cut_at &&
		TimestampDifferenceExceeds(cut_at, now, CUT_EVERY_MS);

	if (news)
	{
		double		rate = RATE_CUT * took;

		if (took == 0)
			rate = pace / 2;
		if (rate > 0 || pace > 0)
			set_pace(Max(rate, RATE_MIN));
		rate_429 = took;
		cut_at = now;
		accepted_since_cut = 0;
	}
	if (result->retry_after_ms > 0)
		wait_ms = Min(result->retry_after_ms,
					  (int64) TAPTALK_QUEUE_RETRY_AFTER_MAX_MS);
	else if (sent_at >= cut_at && accepted_since_cut == 0 &&
			 (took == 0 || !news) && ratelimit_until <= now &&
			 sent_at >= ratelimit_until)
	{
		/*
		 * TapTalk took nothing since the cut (or lately), and this request
		 * was sent after it: the quota is used up for now; wait, longer
		 * each time in a row, instead of sending into it.
		 */
		wait_ms = Min((int64) RATELIMIT_BASE_MS << Min(ratelimit_guesses, 10),
					  (int64) RATELIMIT_GUESS_MAX_MS);
		ratelimit_guesses++;
	}
	if (wait_ms == 0)
		return;
	until = TimestampTzPlusMilliseconds(now, wait_ms);
	if (until <= ratelimit_until)
		return;
	if (ratelimit_until <= now &&
		TimestampDifferenceExceeds(ratelimit_logged, now, RATELIMIT_LOG_MS))
	{
		ereport(LOG,
				(errmsg("taptalk worker: TapTalk's rate limit was reached; sending pauses for %lld ms",
						(long long) wait_ms),
				 errdetail("Sending resumes evenly spaced, at a rate below what TapTalk accepted."),
				 errhint("Further pauses in the next minute are not logged; the view \"taptalk_worker\" shows them.")));
		ratelimit_logged = now;
	}
	/* the queue's time waited for TapTalk: each pause once, not per request */
	taptalk_stats_rate_wait(TAPTALK_PATH_QUEUE, until - Max(now, ratelimit_until));
	ratelimit_until = until;
	/* requests already given a send time wait for the pause's end too */
	taptalk_rate_hold(until);
}

/*
 * A request's outcome: what it says about TapTalk's reachability and rate
 * limit.
 */
void
taptalk_pacing_note(const TaptalkResult *result)
{
	/* not sent (no time under the rate): says nothing of TapTalk */
	if (result->not_sent)
		return;
	outage_note(result);
	if (taptalk_rate_limited(result))
		answer_rate_limited(result, result->sent_at);
	else if (result->http_status != 0)
		answer_accepted(result->sent_at);
	/* no answer: says nothing about the rate */
}

/*
 * A reload of the configuration: TapTalk may be elsewhere now, or the key
 * another one with its own quota.  Pauses end at once, and the pace is
 * kept: a new key's quota shows with its first 429.
 */
void
taptalk_pacing_reload(void)
{
	outage_reset();
	ratelimit_until = 0;
	ratelimit_guesses = 0;
	taptalk_rate_hold(0);
}

/*
 * How many of `want` due requests the worker may claim now, with
 * `in_flight` sent and `claimed` claimed and not yet sent.
 */
int
taptalk_pacing_allowance(int want, int in_flight, int claimed)
{
	/* TapTalk out of reach: nothing during a pause, then one probe */
	if (taptalk_pacing_in_outage())
	{
		if (taptalk_pacing_outage_left() > 0 || in_flight > 0 || claimed > 0)
			return 0;
		want = Min(want, 1);
	}
	/* TapTalk's rate limit: nothing during a pause */
	if (ratelimit_until > GetCurrentTimestamp())
		return 0;
	if (pace > 0 &&
		TimestampDifferenceExceeds(cut_at, GetCurrentTimestamp(), PACE_FORGET_MS))
		set_pace(0);
	/* what the pace and taptalk.max_rate leave in the next moment */
	return Min(want, Max(taptalk_rate_room(RATE_HORIZON_MS) - claimed, 0));
}
