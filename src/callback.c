/*-------------------------------------------------------------------------
 *
 * callback.c
 *	  Running a queued request's callback for the background worker: as the
 *	  role that enqueued the request, within taptalk.callback_timeout, and
 *	  isolated from the worker and from every other role's callbacks.
 *
 * The worker runs the callbacks of one role in a transaction of their own,
 * the one that records their requests' outcomes (worker.c), so what a
 * callback leaves in its transaction (cursors, SET CONSTRAINTS,
 * transaction-level advisory locks, SET LOCAL) never reaches another
 * role's.  Here, around each call:
 * - the session user and the current user are the enqueuing role, under
 *   SECURITY_RESTRICTED_OPERATION (no temporary objects, no WITH HOLD
 *   cursors, no LISTEN, no SET ROLE), with search_path pg_catalog, pg_temp;
 * - the settings it changes, even with SET, are undone afterwards;
 * - what outlives a transaction, prepared statements and session-level
 *   advisory locks, is dropped afterwards;
 * - the deferred constraints it left are checked, and the cursors it left
 *   open closed, when it returns;
 * - the call is cancelled after taptalk.callback_timeout;
 * - its errors are caught in a subtransaction and returned as text.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "commands/prepare.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/lock.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/portal.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/timeout.h"

#include "taptalk.h"

int			taptalk_callback_timeout_ms = 5000;

/* the callback last resolved in the current transaction */
static char *resolved_name = NULL;
static Oid	resolved_oid = InvalidOid;

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
 * The callbacks of one role share a transaction: the deferred constraints
 * a callback's writes left unchecked are checked now, as SET CONSTRAINTS
 * ALL IMMEDIATE would, so that a violation is this callback's error, not
 * the failed commit of all of them.  Deferrable constraints are then
 * checked immediately for the rest of the transaction.
 */
static void
check_deferred(void)
{
	ConstraintsSetStmt *stmt = makeNode(ConstraintsSetStmt);

	stmt->constraints = NIL;
	stmt->deferred = false;
	AfterTriggerSetState(stmt);
}

/*
 * Close the cursors a callback left open (the next callback of the same
 * role, in the same transaction, may open one of the same name).  They are
 * the only ones: the worker's own statements open none.
 */
static void
close_cursors(void)
{
	static SPIPlanPtr plan = NULL;
	uint64		n;
	char	  **names;

	if (plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare("SELECT name FROM pg_catalog.pg_cursors", 0, NULL);

		if (p == NULL || SPI_keepplan(p) != 0)
			elog(ERROR, "could not prepare the listing of open cursors");
		plan = p;
	}
	if (SPI_execute_plan(plan, NULL, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not list the open cursors");
	n = SPI_processed;
	if (n == 0)
		return;
	names = palloc(sizeof(char *) * n);
	for (uint64 i = 0; i < n; i++)
		names[i] = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
	for (uint64 i = 0; i < n; i++)
	{
		Portal		portal = GetPortalByName(names[i]);

		if (PortalIsValid(portal))
			PortalDrop(portal, false);
	}
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

	/* looked up once per transaction: parsing the signature is not cheap */
	if (resolved_name != NULL && strcmp(resolved_name, callback) == 0)
		return resolved_oid;

	InitFunctionCallInfoData(*fcinfo, NULL, 1, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = CStringGetTextDatum(callback);
	fcinfo->args[0].isnull = false;
	proc = to_regprocedure(fcinfo);
	if (fcinfo->isnull)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("callback function %s does not exist", callback),
				 errdetail("The function, or its schema, was dropped or renamed after the request was enqueued.")));
	if (resolved_name != NULL)
		pfree(resolved_name);
	resolved_name = MemoryContextStrdup(TopMemoryContext, callback);
	resolved_oid = DatumGetObjectId(proc);
	return resolved_oid;
}

/*
 * Forget the callback last looked up: called when a transaction that runs
 * callbacks starts (the function may have been dropped or renamed since).
 */
void
taptalk_callback_new_transaction(void)
{
	if (resolved_name != NULL)
		pfree(resolved_name);
	resolved_name = NULL;
	resolved_oid = InvalidOid;
}

/*
 * Run the callback `callback` (its qualified signature) of request `id`
 * with its outcome, as `role`, in a subtransaction of the current
 * transaction.  Returns NULL when it succeeded, else its error message
 * (with any ticket masked: the message goes to the queue table).
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
		check_deferred();
		close_cursors();
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
