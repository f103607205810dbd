/*-------------------------------------------------------------------------
 *
 * callback.c
 *	  Running a queued request's callback for the background worker: as the
 *	  role that enqueued the request, within taptalk.callback_timeout, and
 *	  isolated from the worker and from every other role's callbacks.
 *
 * The worker runs each callback in a transaction of its own, the one that
 * records its request's outcome (worker.c), so what a callback leaves in
 * its transaction (cursors, SET CONSTRAINTS, transaction-level advisory
 * locks, SET LOCAL) ends with it.  Here, around the call:
 * - the session user and the current user are the enqueuing role, under
 *   SECURITY_RESTRICTED_OPERATION (no temporary objects, no WITH HOLD
 *   cursors, no LISTEN, no SET ROLE), with search_path pg_catalog, pg_temp;
 * - the settings it changes, even with SET, are undone afterwards;
 * - what outlives a transaction, prepared statements and session-level
 *   advisory locks, is dropped afterwards;
 * - the call is cancelled after taptalk.callback_timeout;
 * - its errors are caught in a subtransaction and returned as text.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "commands/prepare.h"
#include "miscadmin.h"
#include "storage/lock.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/timeout.h"

#include "taptalk.h"

int			taptalk_callback_timeout_ms = 5000;

void
taptalk_callback_init(void)
{
	DefineCustomIntVariable("taptalk.callback_timeout",
							"Sets the longest time a queued request's callback may run.",
							"A callback still running then is cancelled, and its error recorded "
							"in callback_error; 0 means no limit.",
							&taptalk_callback_timeout_ms,
							5000, 0, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);
}

/* The worker's own user and security context, outside any callback. */
typedef struct OuterUser
{
	Oid			userid;
	int			sec_context;
} OuterUser;

/*
 * Act as `role` for a callback: session user (set first: it may change
 * only outside a security-restricted operation) and current user, with the
 * restrictions of taptalk_become_role.
 */
static void
become_session_role(Oid role, TaptalkRoleSwitch *saved)
{
	SetSessionAuthorization(role, superuser_arg(role));
	taptalk_become_role(role, saved);
}

/*
 * Back to the worker's own user.  After an error the subtransaction's
 * abort has already restored the current user and the settings, but not
 * the session user.
 */
static void
restore_session_role(const OuterUser *outer, TaptalkRoleSwitch *saved,
					 bool after_error)
{
	if (!after_error)
		taptalk_restore_role(saved);
	SetUserIdAndSecContext(GetSessionUserId(), 0);
	SetSessionAuthorization(GetAuthenticatedUserId(), true);
	SetUserIdAndSecContext(outer->userid, outer->sec_context);
}

/*
 * The callback's time limit: PostgreSQL's statement timeout, which does
 * not otherwise run in a background worker; its cancel is an ERROR in the
 * callback, caught like any other.
 */
static void
start_timeout(void)
{
	if (taptalk_callback_timeout_ms > 0)
		enable_timeout_after(STATEMENT_TIMEOUT, taptalk_callback_timeout_ms);
}

/* Stop the timer. */
static void
stop_timeout(void)
{
	bool		fired = get_timeout_indicator(STATEMENT_TIMEOUT, true);

	disable_timeout(STATEMENT_TIMEOUT, false);
	/* a cancel the timer sent just after the callback returned is for nobody */
	if (fired)
		QueryCancelPending = false;
}

/*
 * The function a stored callback names: its qualified signature, as
 * taptalk_enqueue wrote it, looked up now (function OIDs do not survive
 * pg_upgrade or a dump and restore; a name does).  Raises when it names no
 * function (any more): the function or its schema was dropped or renamed.
 */
static Oid
resolve(const char *callback)
{
	LOCAL_FCINFO(fcinfo, 1);
	Datum		proc;

	InitFunctionCallInfoData(*fcinfo, NULL, 1, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = CStringGetTextDatum(callback);
	fcinfo->args[0].isnull = false;
	proc = to_regprocedure(fcinfo);
	if (fcinfo->isnull)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("callback function %s does not exist", callback),
				 errdetail("The function, or its schema, was dropped or renamed after the request was enqueued.")));
	return DatumGetObjectId(proc);
}

/*
 * Run the callback `callback` (its qualified signature) of request `id` with its outcome, as `role`,
 * in a subtransaction of the current transaction.  Returns NULL when it
 * succeeded, else its error message (with any ticket masked: the message
 * goes to the queue table).
 */
char *
taptalk_run_callback(const char *callback, Oid role, int64 id, Jsonb *request,
					 const TaptalkResult *result, Oid result_type)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	TaptalkRoleSwitch saved;
	OuterUser	outer;
	TimestampTz started = GetCurrentTimestamp();
	Oid			proc;
	volatile bool switched = false;
	char	   *volatile error = NULL;

	GetUserIdAndSecContext(&outer.userid, &outer.sec_context);
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		/* the role may be gone, or have lost the right since it enqueued */
		if (!SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(role)))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("role with OID %u does not exist", role)));
		proc = resolve(callback);
		taptalk_queue_check_callback(proc, role, result_type);

		switched = true;
		become_session_role(role, &saved);
		start_timeout();
		taptalk_queue_call_callback(proc, id, request, result, result_type);
		stop_timeout();
		restore_session_role(&outer, &saved, false);
		switched = false;

		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;
		bool		timed_out;

		stop_timeout();
		timed_out = taptalk_callback_timeout_ms > 0 &&
			TimestampDifferenceExceeds(started, GetCurrentTimestamp(),
									   taptalk_callback_timeout_ms);

		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		if (switched)
			restore_session_role(&outer, &saved, true);
		if (timed_out && edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
			error = psprintf("callback cancelled after taptalk.callback_timeout (%d ms)",
							 taptalk_callback_timeout_ms);
		else
			error = edata->message ? edata->message : pstrdup("callback failed");
	}
	PG_END_TRY();

	/* what would outlive the transaction, for the next role to find */
	DropAllPreparedStatements();
	LockReleaseSession(USER_LOCKMETHOD);

	return error ? taptalk_mask(error, result->ticket) : NULL;
}
