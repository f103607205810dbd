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
 * write the table themselves: taptalk_enqueue inserts its row directly,
 * taptalk_requeue runs its UPDATE as the table's owner, with a safe
 * search_path.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_class.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "executor/executor.h"
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
#include "utils/timestamp.h"
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
	/* a STRICT callback is not called with a NULL request */
	if (flinfo.fn_strict && request == NULL)
		return;
	InitFunctionCallInfoData(*fcinfo, &flinfo, 3, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = Int64GetDatum(id);
	fcinfo->args[0].isnull = false;
	/* NULL: a request too large for the worker to read */
	fcinfo->args[1].value = request ? JsonbPGetDatum(request) : (Datum) 0;
	fcinfo->args[1].isnull = (request == NULL);
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

/* what taptalk_enqueue looks up once per call site (FmgrInfo.fn_extra) */
typedef struct EnqueueCache
{
	Oid			nsp;			/* the extension's schema */
	Oid			result_type;	/* taptalk_auth_ticket_result there */
} EnqueueCache;

/*
 * Run one statement on the queue table as its owner, with a safe
 * search_path and under SECURITY_RESTRICTED_OPERATION; `sql` has %s where
 * the schema-qualified table name goes.  Returns the number of rows
 * processed.
 */
static int64
run_as_owner(Oid nsp, const char *sql, int nargs, Oid *argtypes,
			 Datum *args, const char *argnulls)
{
	TaptalkRoleSwitch saved;
	int			rc;
	int64		processed;
	char	   *table;

	taptalk_become_role(queue_owner(nsp), &saved);

	SPI_connect();
	table = quote_qualified_identifier(get_namespace_name(nsp), QUEUE_TABLE_NAME);
	rc = SPI_execute_with_args(psprintf(sql, table), nargs, argtypes, args,
							   argnulls, false, 0);
	if (rc < 0)
		elog(ERROR, "SPI_execute failed: %s", SPI_result_code_string(rc));
	processed = (int64) SPI_processed;
	SPI_finish();

	taptalk_restore_role(&saved);
	return processed;
}

/*
 * The columns of the queue table taptalk_enqueue sets, with their types;
 * any other column is left null.
 */
typedef enum QueueColumn
{
	QC_ID,
	QC_ENQUEUED_AT,
	QC_ENQUEUED_BY,
	QC_REQUEST,
	QC_CALLBACK,
	QC_STATE,
	QC_ATTEMPTS,
	QC_INTERRUPTIONS,
	QC_NEXT_ATTEMPT_AT,
	QC_FINISHED_AT,
	QC_ERROR_CODE,
	QC_ERROR_FIELD,
	QC_ERROR_MESSAGE,
	QC_COUNT
} QueueColumn;

static const struct
{
	const char *name;
	Oid			type;
}			queue_column_spec[QC_COUNT] = {
	[QC_ID] = {"id", INT8OID},
	[QC_ENQUEUED_AT] = {"enqueued_at", TIMESTAMPTZOID},
	[QC_ENQUEUED_BY] = {"enqueued_by", REGROLEOID},
	[QC_REQUEST] = {"request", JSONBOID},
	[QC_CALLBACK] = {"callback", TEXTOID},
	[QC_STATE] = {"state", TEXTOID},
	[QC_ATTEMPTS] = {"attempts", INT4OID},
	[QC_INTERRUPTIONS] = {"interruptions", INT4OID},
	[QC_NEXT_ATTEMPT_AT] = {"next_attempt_at", TIMESTAMPTZOID},
	[QC_FINISHED_AT] = {"finished_at", TIMESTAMPTZOID},
	[QC_ERROR_CODE] = {"error_code", TEXTOID},
	[QC_ERROR_FIELD] = {"error_field", TEXTOID},
	[QC_ERROR_MESSAGE] = {"error_message", TEXTOID},
};

/*
 * Where those columns were in the queue table taptalk_enqueue last wrote,
 * and the sequence of its ids, looked up by name; checked again at every
 * call (the table may have been altered since, or be another).
 */
static Oid	queue_relid = InvalidOid;
static Oid	queue_id_seq = InvalidOid;
static AttrNumber queue_attnum[QC_COUNT];

/* Whether column `c` is where it was found, by name and type. */
static bool
queue_column_ok(TupleDesc desc, QueueColumn c)
{
	AttrNumber	attnum = queue_attnum[c];
	Form_pg_attribute att;

	if (attnum < 1 || attnum > desc->natts)
		return false;
	att = TupleDescAttr(desc, attnum - 1);
	return !att->attisdropped &&
		att->atttypid == queue_column_spec[c].type &&
		strcmp(NameStr(att->attname), queue_column_spec[c].name) == 0;
}

static void
find_queue_columns(Relation rel, Oid nsp)
{
	TupleDesc	desc = RelationGetDescr(rel);

	queue_relid = InvalidOid;
	queue_id_seq = get_relname_relid(QUEUE_TABLE_NAME "_id_seq", nsp);
	if (!OidIsValid(queue_id_seq))
		elog(ERROR, "sequence of the taptalk queue table not found");
	for (int c = 0; c < QC_COUNT; c++)
	{
		const char *name = queue_column_spec[c].name;

		queue_attnum[c] = get_attnum(RelationGetRelid(rel), name);
		if (queue_attnum[c] == InvalidAttrNumber)
			elog(ERROR, "column \"%s\" of the taptalk queue table not found", name);
		if (!queue_column_ok(desc, (QueueColumn) c))
			elog(ERROR, "column \"%s\" of the taptalk queue table is not of type %s",
				 name, format_type_be(queue_column_spec[c].type));
	}
	queue_relid = RelationGetRelid(rel);
}

/*
 * Check that taptalk_enqueue may write the queue table `rel` of schema
 * `nsp` as it does: its columns where they are, of their types, and no
 * other column with a default it would not apply (NOT NULL and other
 * constraints are checked on the row).
 */
static void
check_queue_columns(Relation rel, Oid nsp)
{
	TupleDesc	desc = RelationGetDescr(rel);

	if (RelationGetRelid(rel) != queue_relid)
		find_queue_columns(rel, nsp);
	for (int c = 0; c < QC_COUNT; c++)
	{
		if (!queue_column_ok(desc, (QueueColumn) c))
		{
			find_queue_columns(rel, nsp);
			break;
		}
	}
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		bool		ours = false;

		if (att->attisdropped || !att->atthasdef)
			continue;
		for (int c = 0; c < QC_COUNT && !ours; c++)
			ours = (queue_attnum[c] == att->attnum);
		if (!ours)
			elog(ERROR, "column \"%s\" of the taptalk queue table has a default, which taptalk_enqueue does not apply",
				 NameStr(att->attname));
	}
}

/*
 * Insert a request into the queue table of schema `nsp` and return its id:
 * queued, or with `failure`, already failed.  The row is written directly,
 * with its index entries, as the executor would write it (the table has no
 * constraint to check beyond what is set here, and no trigger): an INSERT
 * statement would cost an enqueuing insert a fifth of its speed in planning
 * and starting the statement, for one row.
 */
static int64
insert_request(Oid nsp, Oid caller, Jsonb *request, Oid callback,
			   const TaptalkResult *failure)
{
	Oid			relid = get_relname_relid(QUEUE_TABLE_NAME, nsp);
	Relation	rel;
	TupleDesc	desc;
	EState	   *estate;
	ResultRelInfo *rri;
	TupleTableSlot *slot;
	TimestampTz now = GetCurrentTransactionStartTimestamp();
	int64		id;

	if (!OidIsValid(relid))
		elog(ERROR, "taptalk queue table not found");
	rel = table_open(relid, RowExclusiveLock);
	desc = RelationGetDescr(rel);
	check_queue_columns(rel, nsp);

	estate = CreateExecutorState();
	estate->es_output_cid = GetCurrentCommandId(true);
	rri = makeNode(ResultRelInfo);
	/* not in a range table: what an error message shows needs no entry */
	InitResultRelInfo(rri, rel, 0, NULL, 0);
	ExecOpenIndices(rri, false);
	slot = ExecInitExtraTupleSlot(estate, desc, &TTSOpsVirtual);
	ExecClearTuple(slot);
	memset(slot->tts_isnull, true, sizeof(bool) * desc->natts);

#define SET_COLUMN(c, value) \
	do { \
		slot->tts_values[queue_attnum[c] - 1] = (value); \
		slot->tts_isnull[queue_attnum[c] - 1] = false; \
	} while (0)

	id = nextval_internal(queue_id_seq, false);
	SET_COLUMN(QC_ID, Int64GetDatum(id));
	SET_COLUMN(QC_ENQUEUED_AT, TimestampTzGetDatum(now));
	SET_COLUMN(QC_ENQUEUED_BY, ObjectIdGetDatum(caller));
	SET_COLUMN(QC_REQUEST, JsonbPGetDatum(request));
	/* by name: a function's OID survives neither pg_upgrade nor a restore */
	if (OidIsValid(callback))
		SET_COLUMN(QC_CALLBACK,
				   CStringGetTextDatum(format_procedure_qualified(callback)));
	SET_COLUMN(QC_ATTEMPTS, Int32GetDatum(0));
	SET_COLUMN(QC_INTERRUPTIONS, Int32GetDatum(0));
	SET_COLUMN(QC_NEXT_ATTEMPT_AT, TimestampTzGetDatum(now));
	if (failure == NULL)
		SET_COLUMN(QC_STATE, CStringGetTextDatum("queued"));
	else
	{
		SET_COLUMN(QC_STATE, CStringGetTextDatum("failed"));
		SET_COLUMN(QC_FINISHED_AT, TimestampTzGetDatum(now));
		SET_COLUMN(QC_ERROR_CODE, CStringGetTextDatum(failure->error_code));
		if (failure->error_field)
			SET_COLUMN(QC_ERROR_FIELD, CStringGetTextDatum(failure->error_field));
		SET_COLUMN(QC_ERROR_MESSAGE,
				   CStringGetTextDatum(failure->error_message ? failure->error_message : ""));
	}
#undef SET_COLUMN
	ExecStoreVirtualTuple(slot);

	/* NOT NULL, and any constraint a superuser may have added */
	if (desc->constr)
		ExecConstraints(rri, slot, estate);
	simple_table_tuple_insert(rel, slot);
#if PG_VERSION_NUM >= 160000
	(void) ExecInsertIndexTuples(rri, slot, estate, false, false, NULL, NIL, false);
#else
	(void) ExecInsertIndexTuples(rri, slot, estate, false, false, NULL, NIL);
#endif

	ExecCloseIndices(rri);
	ExecResetTupleTable(estate->es_tupleTable, false);
	FreeExecutorState(estate);
	table_close(rel, NoLock);

	/* what the caller runs next sees the request */
	CommandCounterIncrement();
	return id;
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

	if (valid)
	{
		id = insert_request(cache->nsp, caller, request, callback, NULL);

		if (!xact_callback_registered)
		{
			RegisterXactCallback(queue_xact_callback, NULL);
			xact_callback_registered = true;
		}
		wake_at_commit = true;
	}
	else
	{
		id = insert_request(cache->nsp, caller, request, callback, &failure);

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
					 "UPDATE %s SET state = 'queued', attempts = 0, interruptions = 0,"
					 " next_attempt_at = pg_catalog.now(), lease_until = NULL,"
					 " finished_at = NULL, user_id = NULL, error_code = NULL,"
					 " error_field = NULL, error_message = NULL,"
					 " callback_error = NULL"
					 " WHERE id = ANY ($1) AND state = 'failed'"
					 " AND ($3 OR enqueued_by::pg_catalog.oid = $2)",
					 3, argtypes, args, NULL);

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
