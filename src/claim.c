/*-------------------------------------------------------------------------
 *
 * claim.c
 *	  Which queued requests the background worker claims next: round robin
 *	  between the roles that enqueued them, each role's in the order they
 *	  fell due, and where each role's scan of the index may start.
 *
 * Fairness.  One role's backlog (a backfill) must not hold up another
 * role's requests (live sign-ups): a claim of n requests takes the first
 * due request of every role, then the second of every role, and so on,
 * until it has n; within a round, the roles after the one that got the
 * last request of the previous claim come first.  A role with one due
 * request is served at the next claim however long another role's backlog
 * is.  The roles are found by a skip scan of the index of due requests
 * (enqueued_by, next_attempt_at, id): one index descent per role that has
 * queued requests.
 *
 * Requests the worker stopped while sending (interruptions > 0) are not
 * claimed here: the worker sends them one at a time (suspect_sql), so that
 * a request that stops the worker every time takes no other with it.
 *
 * Where a role's scan starts.  The entries of the requests already claimed
 * stay in the index, dead, until VACUUM removes them; a backlog drains
 * without reading them again and again because each role's scan starts
 * after the last key (next_attempt_at, id) the previous claims took from
 * it.  A request that fell due before that key unseen (committed late by a
 * long or prepared transaction, skipped while locked, written by hand) is
 * found by the next claim from the index's start: after a claim that took
 * less than it asked for, and at least every TAPTALK_FULL_CLAIM_MS.  Keys
 * are kept for at most MAX_BOUNDS roles; the others start from the start.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "utils/array.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

#include "taptalk.h"

#define MAX_BOUNDS 64

typedef struct RoleBound
{
	Oid			role;
	TimestampTz at;
	int64		id;
} RoleBound;

static RoleBound bounds[MAX_BOUNDS];
static int	nbounds = 0;
static TimestampTz last_full_claim = 0;

/* the role that got the last request of the previous claim */
static Oid	last_role = InvalidOid;

/*
 * The claim, for the queue table `table` (quoted and qualified): up to $1
 * due requests, each with a lease of $2 ms, round robin between roles; the
 * scan of role $3[i] starts after the key ($4[i], $5[i]); $6 is the role
 * after which a round starts.  The claimed rows are updated through the
 * primary key (an array of ids, not a join, whose plan would depend on how
 * many rows the planner expects).
 */
char *
taptalk_claim_sql(const char *table)
{
	return psprintf("WITH RECURSIVE roles(role) AS ("
					"  (SELECT enqueued_by::pg_catalog.oid FROM %s"
					"   WHERE state = 'queued' ORDER BY enqueued_by::pg_catalog.oid LIMIT 1)"
					" UNION ALL"
					"  SELECT (SELECT enqueued_by::pg_catalog.oid FROM %s"
					"   WHERE state = 'queued' AND enqueued_by::pg_catalog.oid > r.role"
					"   ORDER BY enqueued_by::pg_catalog.oid LIMIT 1)"
					"  FROM roles r WHERE r.role IS NOT NULL),"
					" due AS ("
					"  SELECT c.id, r.role, pg_catalog.row_number() OVER"
					"   (PARTITION BY r.role ORDER BY c.next_attempt_at, c.id) AS round"
					"  FROM roles r"
					"  LEFT JOIN ROWS FROM (pg_catalog.unnest($3::pg_catalog.oid[]),"
					"   pg_catalog.unnest($4::pg_catalog.timestamptz[]),"
					"   pg_catalog.unnest($5::pg_catalog.int8[])) AS b(role, at, id)"
					"   ON b.role = r.role,"
					"  LATERAL (SELECT q.id, q.next_attempt_at FROM %s q"
					"   WHERE q.state = 'queued' AND q.enqueued_by::pg_catalog.oid = r.role"
					"    AND q.next_attempt_at <= pg_catalog.now() AND q.interruptions = 0"
					"    AND (q.next_attempt_at, q.id) >"
					"     (COALESCE(b.at, '-infinity'), COALESCE(b.id, 0))"
					"   ORDER BY q.next_attempt_at, q.id LIMIT $1 FOR UPDATE SKIP LOCKED) c"
					"  WHERE r.role IS NOT NULL)"
					" UPDATE %s SET state = 'sending',"
					" lease_until = pg_catalog.now() + $2 * interval '1 millisecond',"
					" attempts = attempts + 1"
					" WHERE id = ANY (ARRAY(SELECT id FROM due"
					"  ORDER BY round, role <= $6, role LIMIT $1))"
					" RETURNING id, request, callback,"
					"  enqueued_by::pg_catalog.oid, attempts, next_attempt_at",
					table, table, table, table);
}

/*
 * The claim of one request the worker stopped while sending, the first to
 * fall due, with a lease of $1 ms.
 */
char *
taptalk_claim_suspect_sql(const char *table)
{
	return psprintf("UPDATE %s SET state = 'sending',"
					" lease_until = pg_catalog.now() + $1 * interval '1 millisecond',"
					" attempts = attempts + 1"
					" WHERE id = ANY (ARRAY(SELECT id FROM %s"
					"  WHERE state = 'queued' AND interruptions > 0"
					"   AND next_attempt_at <= pg_catalog.now()"
					"  ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED))"
					" RETURNING id, request, callback,"
					"  enqueued_by::pg_catalog.oid, attempts, next_attempt_at",
					table, table);
}

/* The claim's parameter types, for SPI_prepare. */
void
taptalk_claim_types(Oid *types)
{
	types[0] = INT4OID;
	types[1] = INT4OID;
	types[2] = OIDARRAYOID;
	types[3] = TIMESTAMPTZARRAYOID;
	types[4] = INT8ARRAYOID;
	types[5] = OIDOID;
}

static Datum
array_of(Datum *values, int n, Oid type)
{
	int16		len;
	bool		byval;
	char		align;

	get_typlenbyvalalign(type, &len, &byval, &align);
	return PointerGetDatum(construct_array(values, n, type, len, byval, align));
}

/*
 * The claim's parameters for `want` requests with a lease of `lease_ms`
 * (args: six Datums), in the current memory context.
 */
void
taptalk_claim_args(int want, int lease_ms, Datum *args)
{
	TimestampTz now = GetCurrentTimestamp();
	Datum		roles[MAX_BOUNDS];
	Datum		ats[MAX_BOUNDS];
	Datum		ids[MAX_BOUNDS];

	/* from the index's start for every role, now and then */
	if (TimestampDifferenceExceeds(last_full_claim, now, TAPTALK_FULL_CLAIM_MS))
	{
		nbounds = 0;
		last_full_claim = now;
	}
	for (int i = 0; i < nbounds; i++)
	{
		roles[i] = ObjectIdGetDatum(bounds[i].role);
		ats[i] = TimestampTzGetDatum(bounds[i].at);
		ids[i] = Int64GetDatum(bounds[i].id);
	}
	args[0] = Int32GetDatum(want);
	args[1] = Int32GetDatum(lease_ms);
	args[2] = array_of(roles, nbounds, OIDOID);
	args[3] = array_of(ats, nbounds, TIMESTAMPTZOID);
	args[4] = array_of(ids, nbounds, INT8OID);
	args[5] = ObjectIdGetDatum(last_role);
}

/* Whether role a comes before role b in a round after last_role. */
static bool
before_in_round(Oid a, Oid b)
{
	bool		a_wraps = (a <= last_role);
	bool		b_wraps = (b <= last_role);

	if (a_wraps != b_wraps)
		return !a_wraps;
	return a < b;
}

/*
 * What a claim of `want` took: n requests, the i-th of role roles[i] with
 * key (ats[i], ids[i]).  Each role's requests are a prefix of its due
 * requests in key order, so the last key of each is where its next scan
 * may start; and a claim that took fewer than it asked for saw every due
 * request, so the next one starts from the index's start.
 */
void
taptalk_claim_taken(int want, int n, const Oid *roles, const TimestampTz *ats,
					const int64 *ids)
{
	int			last_round = 0;
	Oid			last = InvalidOid;

	if (n < want)
	{
		nbounds = 0;
		last_full_claim = 0;
	}
	for (int i = 0; i < n; i++)
	{
		int			b;
		int			round = 1;

		/* the request's round: its rank among the role's in key order */
		for (int j = 0; j < n; j++)
		{
			if (j != i && roles[j] == roles[i] &&
				(ats[j] < ats[i] || (ats[j] == ats[i] && ids[j] < ids[i])))
				round++;
		}
		if (round > last_round ||
			(round == last_round && before_in_round(last, roles[i])))
		{
			last_round = round;
			last = roles[i];
		}

		if (n < want)
			continue;
		for (b = 0; b < nbounds && bounds[b].role != roles[i]; b++)
			;
		if (b == nbounds)
		{
			if (nbounds == MAX_BOUNDS)
				continue;
			bounds[nbounds].role = roles[i];
			bounds[nbounds].at = ats[i];
			bounds[nbounds].id = ids[i];
			nbounds++;
		}
		else if (ats[i] > bounds[b].at ||
				 (ats[i] == bounds[b].at && ids[i] > bounds[b].id))
		{
			bounds[b].at = ats[i];
			bounds[b].id = ids[i];
		}
	}
	if (n > 0)
		last_role = last;
}
