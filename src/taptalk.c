/*-------------------------------------------------------------------------
 *
 * taptalk.c
 *	  Module entry for the taptalk extension: its settings and the
 *	  SQL-callable functions taptalk_auth_ticket and taptalk_auth_tickets.
 *
 * The server key lives in settings that only a superuser can set, and the
 * secret is hidden from everyone else once this library has defined it.  A
 * value read from postgresql.conf before that is a placeholder any role can
 * read, so the functions refuse to run unless the library was loaded through
 * shared_preload_libraries.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/tuplestore.h"

#include "taptalk.h"

#if PG_VERSION_NUM >= 180000
PG_MODULE_MAGIC_EXT(
					.name = "taptalk",
					.version = TAPTALK_VERSION
);
#else
PG_MODULE_MAGIC;
#endif

void		_PG_init(void);

char	   *taptalk_base_url = NULL;
char	   *taptalk_server_key_id = NULL;
char	   *taptalk_server_key_secret = NULL;
char	   *taptalk_ca_file = NULL;
int			taptalk_timeout_ms = 10000;
int			taptalk_connect_timeout_ms = 3000;
int			taptalk_max_concurrency = 16;
int			taptalk_max_retries = 2;

/* whether _PG_init ran while shared_preload_libraries was processed */
static bool loaded_at_preload = false;

static emit_log_hook_type prev_emit_log_hook = NULL;

#define SECRET_SETTING "taptalk.server_key_secret"
#define REDACTED "********"

/* columns of taptalk_auth_ticket_result */
enum
{
	RESULT_USER_ID,
	RESULT_TICKET,
	RESULT_ERROR_CODE,
	RESULT_ERROR_FIELD,
	RESULT_ERROR_MESSAGE,
	RESULT_NATTS
};

/* columns of taptalk_auth_tickets: ord, then the result's columns */
#define BATCH_NATTS (RESULT_NATTS + 1)

PG_FUNCTION_INFO_V1(taptalk_auth_ticket);
PG_FUNCTION_INFO_V1(taptalk_auth_tickets);

/*
 * taptalk.base_url must be an http:// or https:// URL with a host; libcurl is
 * limited to those two protocols as well.
 */
static bool
check_base_url(char **newval, void **extra, GucSource source)
{
	const char *url = *newval;
	const char *rest = NULL;
	const char *problem = NULL;

	if (url == NULL || url[0] == '\0')
		return true;			/* not set; the functions will say so */

	if (pg_strncasecmp(url, "https://", 8) == 0)
		rest = url + 8;
	else if (pg_strncasecmp(url, "http://", 7) == 0)
		rest = url + 7;
	else
		problem = "The URL must start with http:// or https://.";

	if (problem == NULL && (rest[0] == '\0' || rest[0] == '/'))
		problem = "The URL has no host.";

	for (const char *p = url; problem == NULL && *p; p++)
	{
		if ((unsigned char) *p <= ' ' || *p == 0x7f)
			problem = "The URL contains a space or a control character.";
	}

	if (problem != NULL)
	{
		GUC_check_errdetail("%s", problem);
		GUC_check_errhint("Set taptalk.base_url to the address of the TapTalk server API, for example https://taptalk.io.");
		return false;
	}
	return true;
}

/*
 * Keep the secret out of the server log.  A configuration reload logs every
 * changed setting with its new value ("parameter ... changed to ..."), the
 * secret included; this hook masks the secret's value in any message that
 * names the setting.  Runs in the postmaster and, inherited, in every backend.
 */
static void
redact_secret_hook(ErrorData *edata)
{
	const char *secret = taptalk_server_key_secret;

	if (edata->message != NULL && secret != NULL && secret[0] != '\0' &&
		strstr(edata->message, SECRET_SETTING) != NULL &&
		strstr(edata->message, secret) != NULL)
	{
		StringInfoData buf;
		const char *p = edata->message;
		const char *hit;
		size_t		len = strlen(secret);

		initStringInfo(&buf);
		while ((hit = strstr(p, secret)) != NULL)
		{
			appendBinaryStringInfo(&buf, p, hit - p);
			appendStringInfoString(&buf, REDACTED);
			p = hit + len;
		}
		appendStringInfoString(&buf, p);
		edata->message = buf.data;
	}

	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

void
_PG_init(void)
{
	loaded_at_preload = process_shared_preload_libraries_in_progress;

	DefineCustomStringVariable("taptalk.base_url",
							   "Base URL of the TapTalk server API.",
							   "The request goes to this URL followed by "
							   TAPTALK_AUTH_TICKET_PATH ". It must start with "
							   "http:// or https://.",
							   &taptalk_base_url,
							   "",
							   PGC_SUSET,
							   0,
							   check_base_url, NULL, NULL);

	DefineCustomStringVariable("taptalk.server_key_id",
							   "Server Key ID used to authenticate with TapTalk.",
							   NULL,
							   &taptalk_server_key_id,
							   "",
							   PGC_SUSET,
							   0,
							   NULL, NULL, NULL);

	DefineCustomStringVariable(SECRET_SETTING,
							   "Server Key Secret used to authenticate with TapTalk.",
							   "Only superusers can read or set it.",
							   &taptalk_server_key_secret,
							   "",
							   PGC_SUSET,
							   GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("taptalk.ca_file",
							   "CA bundle used to verify TapTalk's TLS certificate.",
							   "Empty means the system's CA bundle. Peer and host "
							   "name verification are always on.",
							   &taptalk_ca_file,
							   "",
							   PGC_SUSET,
							   0,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("taptalk.timeout_ms",
							"Time limit for a whole request, retries included.",
							"Between 1 ms and 10 minutes.",
							&taptalk_timeout_ms,
							10000, 1, 600000,
							PGC_USERSET,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("taptalk.connect_timeout_ms",
							"Time limit for connecting to TapTalk.",
							"Between 1 ms and 10 minutes.",
							&taptalk_connect_timeout_ms,
							3000, 1, 600000,
							PGC_USERSET,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("taptalk.max_concurrency",
							"Most requests taptalk_auth_tickets has in flight at once.",
							"Between 1 and 256.",
							&taptalk_max_concurrency,
							16, 1, TAPTALK_MAX_CONCURRENCY,
							PGC_USERSET,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("taptalk.max_retries",
							"Retries of a request that failed to reach TapTalk.",
							"Only connection failures a retry can cure and HTTP "
							"502, 503 and 504 are retried, within taptalk.timeout_ms. "
							"Between 0 and 10.",
							&taptalk_max_retries,
							2, 0, 10,
							PGC_USERSET,
							0,
							NULL, NULL, NULL);

	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = redact_secret_hook;

#if PG_VERSION_NUM >= 150000
	MarkGUCPrefixReserved("taptalk");
#else
	EmitWarningsOnPlaceholders("taptalk");
#endif
}

/*
 * Refuse to run when the library was not preloaded or a required setting is
 * missing.  These are configuration mistakes, so they raise.
 */
static void
check_configuration(void)
{
	if (!loaded_at_preload)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("taptalk must be loaded via shared_preload_libraries"),
				 errdetail("The server key settings are protected only when the library is loaded at server start."),
				 errhint("Add taptalk to shared_preload_libraries in postgresql.conf and restart the server.")));

	if (taptalk_base_url == NULL || taptalk_base_url[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("parameter \"taptalk.base_url\" is not set"),
				 errhint("Set taptalk.base_url in postgresql.conf or with ALTER SYSTEM, for example to https://taptalk.io.")));

	if (taptalk_server_key_id == NULL || taptalk_server_key_id[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("parameter \"taptalk.server_key_id\" is not set"),
				 errhint("Set taptalk.server_key_id in postgresql.conf or with ALTER SYSTEM.")));

	if (taptalk_server_key_secret == NULL || taptalk_server_key_secret[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("parameter \"taptalk.server_key_secret\" is not set"),
				 errhint("Set taptalk.server_key_secret in postgresql.conf or with ALTER SYSTEM.")));
}

/*
 * The declared result type's descriptor, blessed; looked up once per call
 * site and kept in fn_extra, since trigger and batch callers call us per row.
 */
static TupleDesc
result_tupdesc(FunctionCallInfo fcinfo)
{
	TupleDesc	tupdesc = (TupleDesc) fcinfo->flinfo->fn_extra;

	if (tupdesc == NULL)
	{
		MemoryContext old;

		if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
			elog(ERROR, "return type must be a row type");
		old = MemoryContextSwitchTo(fcinfo->flinfo->fn_mcxt);
		tupdesc = BlessTupleDesc(CreateTupleDescCopy(tupdesc));
		MemoryContextSwitchTo(old);
		fcinfo->flinfo->fn_extra = tupdesc;
	}
	return tupdesc;
}

/* Fill values/nulls from a result, starting at column `first`. */
static void
result_to_columns(const TaptalkResult *result, Datum *values, bool *nulls,
				  int first)
{
	const char *cols[RESULT_NATTS];

	cols[RESULT_USER_ID] = result->user_id;
	cols[RESULT_TICKET] = result->ticket;
	cols[RESULT_ERROR_CODE] = result->error_code;
	cols[RESULT_ERROR_FIELD] = result->error_field;
	cols[RESULT_ERROR_MESSAGE] = result->error_message;

	for (int i = 0; i < RESULT_NATTS; i++)
	{
		nulls[first + i] = (cols[i] == NULL);
		values[first + i] = cols[i] ? CStringGetTextDatum(cols[i]) : (Datum) 0;
	}
}

/* Copy a result's strings into the current memory context. */
static void
copy_result(TaptalkResult *dst, const TaptalkResult *src)
{
	dst->user_id = src->user_id ? pstrdup(src->user_id) : NULL;
	dst->ticket = src->ticket ? pstrdup(src->ticket) : NULL;
	dst->error_code = src->error_code ? pstrdup(src->error_code) : NULL;
	dst->error_field = src->error_field ? pstrdup(src->error_field) : NULL;
	dst->error_message = src->error_message ? pstrdup(src->error_message) : NULL;
}

/* The one request of a taptalk_auth_ticket call. */
typedef struct SingleRequest
{
	StringInfoData body;
	bool		sent;
	TaptalkResult result;
} SingleRequest;

static bool
single_next(void *arg, int *id, StringInfo body)
{
	SingleRequest *req = (SingleRequest *) arg;

	if (req->sent)
		return false;
	req->sent = true;
	*id = 0;
	appendBinaryStringInfo(body, req->body.data, req->body.len);
	return true;
}

static void
single_done(void *arg, int id, TaptalkResult *result)
{
	copy_result(&((SingleRequest *) arg)->result, result);
}

/*
 * taptalk_auth_ticket(request jsonb) returns taptalk_auth_ticket_result
 *
 * Validates the request, asks TapTalk for an auth ticket, and returns what
 * happened as a row.  Raises only for a non-object request, configuration
 * mistakes and interrupts.
 */
Datum
taptalk_auth_ticket(PG_FUNCTION_ARGS)
{
	Jsonb	   *request = PG_GETARG_JSONB_P(0);
	TupleDesc	tupdesc;
	SingleRequest req;
	Datum		values[RESULT_NATTS];
	bool		nulls[RESULT_NATTS];

	tupdesc = result_tupdesc(fcinfo);

	check_configuration();

	if (!JB_ROOT_IS_OBJECT(request))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("taptalk request must be a JSON object, not %s",
						taptalk_jsonb_root_kind(request)),
				 errhint("Build the request with jsonb_build_object().")));

	memset(&req, 0, sizeof(req));
	initStringInfo(&req.body);
	if (taptalk_build_request(request, &req.body, &req.result))
		taptalk_transport_run(single_next, single_done, &req, 1);

	result_to_columns(&req.result, values, nulls, 0);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* The requests of a taptalk_auth_tickets call. */
typedef struct BatchRequests
{
	Datum	   *elems;
	bool	   *elem_nulls;
	int			count;
	int			next;			/* index of the next element to look at */
	TaptalkResult *results;		/* one per element, in results_cxt */
	MemoryContext results_cxt;
	MemoryContext scratch_cxt;	/* reset for each element */
} BatchRequests;

static void
batch_done(void *arg, int id, TaptalkResult *result)
{
	BatchRequests *batch = (BatchRequests *) arg;
	MemoryContext old = MemoryContextSwitchTo(batch->results_cxt);

	copy_result(&batch->results[id], result);
	MemoryContextSwitchTo(old);
}

/*
 * Produce the next element that passes validation; the others, and NULL
 * elements, are settled here without a request.
 */
static bool
batch_next(void *arg, int *id, StringInfo body)
{
	BatchRequests *batch = (BatchRequests *) arg;

	while (batch->next < batch->count)
	{
		int			i = batch->next++;
		MemoryContext old;
		Jsonb	   *jb;
		TaptalkResult failure;
		bool		valid;

		/* a long run of invalid elements sends nothing: stay cancellable */
		CHECK_FOR_INTERRUPTS();

		if (batch->elem_nulls[i])
			continue;			/* a row of NULLs */

		MemoryContextReset(batch->scratch_cxt);
		old = MemoryContextSwitchTo(batch->scratch_cxt);
		jb = DatumGetJsonbP(batch->elems[i]);
		if (!JB_ROOT_IS_OBJECT(jb))
		{
			taptalk_set_error(&failure, TAPTALK_CODE_PARAM_FAILED, "",
							  psprintf("Request must be a JSON object, not %s",
									   taptalk_jsonb_root_kind(jb)));
			valid = false;
		}
		else
			valid = taptalk_build_request(jb, body, &failure);
		MemoryContextSwitchTo(old);

		if (valid)
		{
			*id = i;
			return true;
		}
		batch_done(batch, i, &failure);
	}
	return false;
}

/*
 * taptalk_auth_tickets(requests jsonb[])
 *	  returns table (ord int, user_id text, ticket text, error_code text,
 *					 error_field text, error_message text)
 *
 * One row per element, in order, with the same validation and mapping as
 * taptalk_auth_ticket; the requests run concurrently, at most
 * taptalk.max_concurrency at a time.
 */
Datum
taptalk_auth_tickets(PG_FUNCTION_ARGS)
{
	ArrayType  *array = PG_GETARG_ARRAYTYPE_P(0);
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	TupleDesc	tupdesc;
	Tuplestorestate *store;
	MemoryContext per_query;
	MemoryContext old;
	BatchRequests batch;

	if (rsinfo == NULL || !IsA(rsinfo, ReturnSetInfo) ||
		(rsinfo->allowedModes & SFRM_Materialize) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("set-valued function called in context that cannot accept a set")));
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	check_configuration();

	memset(&batch, 0, sizeof(batch));
	deconstruct_array(array, JSONBOID, -1, false, TYPALIGN_INT,
					  &batch.elems, &batch.elem_nulls, &batch.count);
	batch.results_cxt = AllocSetContextCreate(CurrentMemoryContext,
											  "taptalk batch results",
											  ALLOCSET_DEFAULT_SIZES);
	batch.scratch_cxt = AllocSetContextCreate(CurrentMemoryContext,
											  "taptalk batch scratch",
											  ALLOCSET_DEFAULT_SIZES);
	batch.results = MemoryContextAllocZero(batch.results_cxt,
										   sizeof(TaptalkResult) * Max(batch.count, 1));

	if (batch.count > 0)
		taptalk_transport_run(batch_next, batch_done, &batch,
							  Min(taptalk_max_concurrency, batch.count));

	per_query = rsinfo->econtext->ecxt_per_query_memory;
	old = MemoryContextSwitchTo(per_query);
	tupdesc = CreateTupleDescCopy(tupdesc);
	store = tuplestore_begin_heap(true, false, work_mem);
	MemoryContextSwitchTo(old);

	for (int i = 0; i < batch.count; i++)
	{
		Datum		values[BATCH_NATTS];
		bool		nulls[BATCH_NATTS];

		values[0] = Int32GetDatum(i + 1);
		nulls[0] = false;
		result_to_columns(&batch.results[i], values, nulls, 1);
		tuplestore_putvalues(store, tupdesc, values, nulls);
	}

	MemoryContextDelete(batch.scratch_cxt);
	MemoryContextDelete(batch.results_cxt);

	rsinfo->returnMode = SFRM_Materialize;
	rsinfo->setResult = store;
	rsinfo->setDesc = tupdesc;
	return (Datum) 0;
}
