/*-------------------------------------------------------------------------
 *
 * queue.c
 *	  The SQL side of the request queue: taptalk_enqueue and taptalk_requeue,
 *	  the checks on a request's callback, the call of a callback, and the
 *	  wake-up of the background worker (worker.c) when an enqueuing
 *	  transaction commits.
 *
 * The queue table belongs to the extension's owner and is granted to
 * nobody: these functions check the caller's right to what they do, then
 * write the table as its owner, with a safe search_path.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_class.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/regproc.h"
#include "utils/syscache.h"
#include "utils/typcache.h"

#include "taptalk.h"

PG_FUNCTION_INFO_V1(taptalk_enqueue);
PG_FUNCTION_INFO_V1(taptalk_requeue);

#define RESULT_TYPE_NAME "taptalk_auth_ticket_result"
#define QUEUE_TABLE_NAME "taptalk_queue"

/* whether this transaction enqueued a request: wake the worker at commit */
static bool wake_at_commit = false;
static bool xact_callback_registered = false;

static void
queue_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			/* the requests are durable now; this must not raise */
			if (wake_at_commit)
				taptalk_worker_wake();
			wake_at_commit = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			/* a prepared transaction's requests are found by the poll */
			wake_at_commit = false;
			break;
		default:
			break;
	}
}

/*
 * Raise unless `callback` is a function (request_id bigint, request jsonb,
 * result taptalk_auth_ticket_result) that `roleid` may execute.
 */
void
taptalk_queue_check_callback(Oid callback, Oid roleid, Oid result_type)
{
	HeapTuple	tup;
	Form_pg_proc proc;
	bool		ok;
	AclResult	acl;

	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(callback));
	if (!HeapTupleIsValid(tup))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("callback function with OID %u does not exist",
						callback)));
	proc = (Form_pg_proc) GETSTRUCT(tup);
	ok = proc->prokind == PROKIND_FUNCTION &&
		!proc->proretset &&
		proc->pronargs == 3 &&
		proc->proargtypes.values[0] == INT8OID &&
		proc->proargtypes.values[1] == JSONBOID &&
		proc->proargtypes.values[2] == result_type;
	ReleaseSysCache(tup);
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("callback %s does not have the signature of a taptalk callback",
						format_procedure(callback)),
				 errhint("A callback is a function (request_id bigint, request jsonb, result %s) that returns no set.",
						 RESULT_TYPE_NAME)));

#if PG_VERSION_NUM >= 160000
	acl = object_aclcheck(ProcedureRelationId, callback, roleid, ACL_EXECUTE);
#else
	acl = pg_proc_aclcheck(callback, roleid, ACL_EXECUTE);
#endif
	if (acl != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for callback %s",
						format_procedure(callback)),
				 errdetail("Role \"%s\" may not execute it.",
						   GetUserNameFromId(roleid, false))));
}

/*
 * Call a callback with a request's outcome, as the current user; what it
 * returns is ignored.  The result row is the only place a ticket goes.
 */
void
taptalk_queue_call_callback(Oid callback, int64 id, Jsonb *request,
							const TaptalkResult *result, Oid result_type)
{
	TupleDesc	tupdesc;
	Datum		values[5];
	bool		nulls[5];
	const char *cols[5];
	HeapTuple	tuple;
	FmgrInfo	flinfo;
	LOCAL_FCINFO(fcinfo, 3);

	cols[0] = result->user_id;
	cols[1] = result->ticket;
	cols[2] = result->error_code;
	cols[3] = result->error_field;
	cols[4] = result->error_message;
	for (int i = 0; i < 5; i++)
	{
		nulls[i] = (cols[i] == NULL);
		values[i] = cols[i] ? CStringGetTextDatum(cols[i]) : (Datum) 0;
	}
	tupdesc = lookup_rowtype_tupdesc(result_type, -1);
	tuple = heap_form_tuple(tupdesc, values, nulls);
	ReleaseTupleDesc(tupdesc);

	fmgr_info(callback, &flinfo);
	InitFunctionCallInfoData(*fcinfo, &flinfo, 3, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = Int64GetDatum(id);
	fcinfo->args[0].isnull = false;
	fcinfo->args[1].value = JsonbPGetDatum(request);
	fcinfo->args[1].isnull = false;
	fcinfo->args[2].value = HeapTupleGetDatum(tuple);
	fcinfo->args[2].isnull = false;
	(void) FunctionCallInvoke(fcinfo);
}

/* The extension's schema: the one this SQL function lives in. */
static Oid
own_namespace(FunctionCallInfo fcinfo)
{
	return get_func_namespace(fcinfo->flinfo->fn_oid);
}

/* The owner of the queue table in schema `nsp`. */
static Oid
queue_owner(Oid nsp)
{
	Oid			relid = get_relname_relid(QUEUE_TABLE_NAME, nsp);
	HeapTuple	tup;
	Oid			owner;

	if (!OidIsValid(relid))
		elog(ERROR, "taptalk queue table not found");
	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for relation %u", relid);
	owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	ReleaseSysCache(tup);
	return owner;
}

/*
 * A statement run_as_owner prepares once per backend and keeps, for the
 * queue table of the schema it was prepared in.
 */
typedef struct KeptPlan
{
	Oid			nsp;
	SPIPlanPtr	plan;
} KeptPlan;

/* taptalk_enqueue's INSERT of a valid request: the statement of almost all */
static KeptPlan enqueue_plan = {InvalidOid, NULL};

/* what taptalk_enqueue looks up once per call site (FmgrInfo.fn_extra) */
typedef struct EnqueueCache
{
	Oid			nsp;			/* the extension's schema */
	Oid			result_type;	/* taptalk_auth_ticket_result there */
} EnqueueCache;

/*
 * Run one statement on the queue table as its owner, with a safe
 * search_path and under SECURITY_RESTRICTED_OPERATION; `sql` has %s where
 * the schema-qualified table name goes.  With `kept`, the statement is
 * prepared once and kept (PostgreSQL plans it again when the table
 * changes).  Returns the first column of the first row (an int8), or 0 with
 * no row; with `count_rows`, the number of rows processed.
 */
static int64
run_as_owner(Oid nsp, const char *sql, int nargs, Oid *argtypes,
			 Datum *args, const char *argnulls, bool count_rows,
			 KeptPlan *kept)
{
	TaptalkRoleSwitch saved;
	int			rc;
	int64		out = 0;

	taptalk_become_role(queue_owner(nsp), &saved);

	SPI_connect();
	if (kept == NULL || kept->plan == NULL || kept->nsp != nsp)
	{
		char	   *table = quote_qualified_identifier(get_namespace_name(nsp),
													   QUEUE_TABLE_NAME);

		if (kept == NULL)
			rc = SPI_execute_with_args(psprintf(sql, table), nargs, argtypes,
									   args, argnulls, false, 0);
		else
		{
			SPIPlanPtr	plan = SPI_prepare(psprintf(sql, table), nargs,
										   argtypes);

			if (plan == NULL || SPI_keepplan(plan) != 0)
				elog(ERROR, "SPI_prepare failed: %s",
					 SPI_result_code_string(SPI_result));
			if (kept->plan != NULL)
				SPI_freeplan(kept->plan);
			kept->plan = plan;
			kept->nsp = nsp;
		}
	}
	if (kept != NULL)
		rc = SPI_execute_plan(kept->plan, args, argnulls, false, 0);
	if (rc < 0)
		elog(ERROR, "SPI_execute failed: %s", SPI_result_code_string(rc));
	if (count_rows)
		out = (int64) SPI_processed;
	else if (SPI_processed > 0)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0],
									  SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
			out = DatumGetInt64(d);
	}
	SPI_finish();

	taptalk_restore_role(&saved);
	return out;
}

/*
 * Act as `role` with SECURITY_RESTRICTED_OPERATION and search_path set to
 * pg_catalog, pg_temp, until taptalk_restore_role; an error in between is
 * undone by the (sub)transaction's abort, which restores both.
 */
void
taptalk_become_role(Oid role, TaptalkRoleSwitch *saved)
{
	GetUserIdAndSecContext(&saved->userid, &saved->sec_context);
	SetUserIdAndSecContext(role,
						   saved->sec_context | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	saved->nestlevel = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp",
							 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE,
							 true, 0, false);
}

void
taptalk_restore_role(TaptalkRoleSwitch *saved)
{
	AtEOXact_GUC(false, saved->nestlevel);
	SetUserIdAndSecContext(saved->userid, saved->sec_context);
}

/*
 * taptalk_enqueue(request jsonb, callback regprocedure DEFAULT NULL)
 *	  returns bigint
 *
 * Validates the request now, with taptalk_auth_ticket's rules, and stores
 * it for the background worker, which sends it after this transaction
 * commits.  A request that fails validation is stored already failed with
 * its 40002 result, and its callback runs at once, in this transaction; a
 * request that is not a JSON object raises, as taptalk_auth_ticket does.
 * The callback must exist, have the signature of a callback, and be
 * executable by the caller.  Returns the request's id.
 */
Datum
taptalk_enqueue(PG_FUNCTION_ARGS)
{
	Jsonb	   *request;
	Oid			callback = PG_ARGISNULL(1) ? InvalidOid : PG_GETARG_OID(1);
	EnqueueCache *cache = fcinfo->flinfo->fn_extra;
	Oid			caller = GetUserId();
	TaptalkResult failure;
	StringInfoData body;
	bool		valid;
	int64		id;
	Oid			argtypes[6] = {OIDOID, JSONBOID, OIDOID, TEXTOID, TEXTOID,
	TEXTOID};
	Datum		args[6];
	char		argnulls[6];

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("taptalk request must not be null")));
	request = PG_GETARG_JSONB_P(0);
	taptalk_require_object(request);

	/* the extension's schema and result type, once per call site */
	if (cache == NULL)
	{
		Oid			nsp = own_namespace(fcinfo);
		Oid			result_type;

		result_type = GetSysCacheOid2(TYPENAMENSP, Anum_pg_type_oid,
									  CStringGetDatum(RESULT_TYPE_NAME),
									  ObjectIdGetDatum(nsp));
		if (!OidIsValid(result_type))
			elog(ERROR, "type %s not found", RESULT_TYPE_NAME);
		cache = MemoryContextAlloc(fcinfo->flinfo->fn_mcxt, sizeof(EnqueueCache));
		cache->nsp = nsp;
		cache->result_type = result_type;
		fcinfo->flinfo->fn_extra = cache;
	}
	if (OidIsValid(callback))
		taptalk_queue_check_callback(callback, caller, cache->result_type);

	memset(&failure, 0, sizeof(failure));
	initStringInfo(&body);
	valid = taptalk_build_request(request, &body, &failure);

	memset(argnulls, ' ', sizeof(argnulls));
	args[0] = ObjectIdGetDatum(caller);
	args[1] = JsonbPGetDatum(request);
	args[2] = ObjectIdGetDatum(callback);
	if (!OidIsValid(callback))
		argnulls[2] = 'n';

	if (valid)
	{
		/* the common case, kept prepared: the other columns' defaults */
		id = run_as_owner(cache->nsp,
						  "INSERT INTO %s (enqueued_by, request, callback)"
						  " VALUES ($1::pg_catalog.regrole, $2, $3::pg_catalog.regprocedure)"
						  " RETURNING id",
						  3, argtypes, args, argnulls, false, &enqueue_plan);

		if (!xact_callback_registered)
		{
			RegisterXactCallback(queue_xact_callback, NULL);
			xact_callback_registered = true;
		}
		wake_at_commit = true;
	}
	else
	{
		args[3] = CStringGetTextDatum(failure.error_code);
		if (failure.error_field)
			args[4] = CStringGetTextDatum(failure.error_field);
		else
		{
			args[4] = (Datum) 0;
			argnulls[4] = 'n';
		}
		args[5] = CStringGetTextDatum(failure.error_message ? failure.error_message : "");
		id = run_as_owner(cache->nsp,
						  "INSERT INTO %s (enqueued_by, request, callback, state,"
						  " error_code, error_field, error_message, finished_at)"
						  " VALUES ($1::pg_catalog.regrole, $2, $3::pg_catalog.regprocedure,"
						  " 'failed', $4, $5, $6, pg_catalog.now())"
						  " RETURNING id",
						  6, argtypes, args, argnulls, false, NULL);

		taptalk_stats_rejected(TAPTALK_PATH_QUEUE);
		/* nothing will be sent: the outcome is known, hand it over now */
		if (OidIsValid(callback))
			taptalk_queue_call_callback(callback, id, request, &failure,
										cache->result_type);
	}

	PG_RETURN_INT64(id);
}

/*
 * taptalk_requeue(ids bigint[]) returns bigint
 *
 * Puts the failed requests among `ids` back in the queue with a fresh
 * attempt count: the caller's own, or any for a superuser.  Returns how
 * many were requeued; the others are left alone.
 */
Datum
taptalk_requeue(PG_FUNCTION_ARGS)
{
	ArrayType  *ids = PG_GETARG_ARRAYTYPE_P(0);
	Oid			nsp = own_namespace(fcinfo);
	Oid			caller = GetUserId();
	Oid			argtypes[3] = {INT8ARRAYOID, OIDOID, BOOLOID};
	Datum		args[3];
	int64		n;

	args[0] = PointerGetDatum(ids);
	args[1] = ObjectIdGetDatum(caller);
	args[2] = BoolGetDatum(superuser_arg(caller));

	n = run_as_owner(nsp,
					 "UPDATE %s SET state = 'queued', attempts = 0,"
					 " next_attempt_at = pg_catalog.now(), lease_until = NULL,"
					 " finished_at = NULL, user_id = NULL, error_code = NULL,"
					 " error_field = NULL, error_message = NULL,"
					 " callback_error = NULL"
					 " WHERE id = ANY ($1) AND state = 'failed'"
					 " AND ($3 OR enqueued_by::pg_catalog.oid = $2)",
					 3, argtypes, args, NULL, true, NULL);

	if (n > 0)
	{
		if (!xact_callback_registered)
		{
			RegisterXactCallback(queue_xact_callback, NULL);
			xact_callback_registered = true;
		}
		wake_at_commit = true;
	}
	PG_RETURN_INT64(n);
}
