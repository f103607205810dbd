/*-------------------------------------------------------------------------
 *
 * taptalk.c
 *	  Module entry for the taptalk extension: its settings and the
 *	  SQL-callable functions taptalk_auth_ticket and taptalk_auth_tickets.
 *
 * The server key lives in settings that only a superuser can set; the
 * secret (secret.c) is shown to nobody once this library has defined it.  A
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
char	   *taptalk_ca_file = NULL;
int			taptalk_timeout_ms = 10000;
int			taptalk_connect_timeout_ms = 3000;
int			taptalk_max_concurrency = 16;
int			taptalk_max_retries = 2;

/* whether _PG_init ran while shared_preload_libraries was processed */
static bool loaded_at_preload = false;

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
 * taptalk.base_url must be scheme://host[:port][/path] with an http or https
 * scheme (libcurl is limited to those two protocols as well): no query, no
 * fragment, no user name or password, no spaces or control characters.
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
		else if (*p == '?')
			problem = "The URL contains a query (\"?\"); the request path is appended to it.";
		else if (*p == '#')
			problem = "The URL contains a fragment (\"#\").";
	}

	/* userinfo: an "@" before the path */
	if (problem == NULL && memchr(rest, '@', strcspn(rest, "/")) != NULL)
		problem = "The URL contains a user name or password (\"@\"); the server key is the only credential sent.";

	if (problem != NULL)
	{
		GUC_check_errdetail("%s", problem);
		GUC_check_errhint("Set \"taptalk.base_url\" to the address of the TapTalk server API, for example https://taptalk.io.");
		return false;
	}
	return true;
}

void
_PG_init(void)
{
	loaded_at_preload = process_shared_preload_libraries_in_progress;

	DefineCustomStringVariable("taptalk.base_url",
							   "Sets the base URL of the TapTalk server API.",
							   "Requests go to this URL followed by "
							   TAPTALK_AUTH_TICKET_PATH ". It must start with "
							   "http:// or https://.",
							   &taptalk_base_url,
							   "",
							   PGC_SUSET,
							   0,
							   check_base_url, NULL, NULL);

	DefineCustomStringVariable("taptalk.server_key_id",
							   "Sets the Server Key ID that authenticates requests to TapTalk.",
							   NULL,
							   &taptalk_server_key_id,
							   "",
							   PGC_SUSET,
							   0,
							   NULL, NULL, NULL);

	taptalk_secret_init();

	DefineCustomStringVariable("taptalk.ca_file",
							   "Sets the CA bundle that verifies TapTalk's TLS certificate.",
							   "Empty means the system's CA bundle. Peer and host "
							   "name verification are always on.",
							   &taptalk_ca_file,
							   "",
							   PGC_SUSET,
							   0,
							   NULL, NULL, NULL);

	taptalk_proxy_init();

	DefineCustomIntVariable("taptalk.timeout",
							"Sets the time limit of each request to TapTalk, retries included.",
							"It starts when the request is first sent.",
							&taptalk_timeout_ms,
							10000, 1, 600000,
							PGC_USERSET,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("taptalk.connect_timeout",
							"Sets the time limit for connecting to TapTalk.",
							NULL,
							&taptalk_connect_timeout_ms,
							3000, 1, 600000,
							PGC_USERSET,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("taptalk.max_concurrency",
							"Sets the maximum number of requests taptalk_auth_tickets has in flight at once.",
							NULL,
							&taptalk_max_concurrency,
							16, 1, TAPTALK_MAX_CONCURRENCY,
							PGC_USERSET,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("taptalk.max_retries",
							"Sets the maximum number of retries of a request that failed to reach TapTalk.",
							"Only failures a retry may cure are retried, "
							"within \"taptalk.timeout\".",
							&taptalk_max_retries,
							2, 0, 10,
							PGC_USERSET,
							0,
							NULL, NULL, NULL);

	taptalk_worker_init();
	taptalk_callback_init();
	taptalk_stats_init();
	taptalk_ratelimit_init();

#if PG_VERSION_NUM >= 150000
	MarkGUCPrefixReserved("taptalk");
#else
	EmitWarningsOnPlaceholders("taptalk");
#endif
}

/*
 * Raise the error of a feature that needs the library preloaded; `detail`
 * says why.
 */
void
taptalk_require_preload(const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("taptalk must be loaded via \"shared_preload_libraries\""),
			 errdetail_internal("%s", detail),
			 errhint("Add taptalk to \"shared_preload_libraries\" in postgresql.conf and restart the server.")));
}

/*
 * Refuse to run when the library was not preloaded or a required setting is
 * missing.  These are configuration mistakes, so they raise.
 */
static void
check_configuration(void)
{
	if (!loaded_at_preload)
		taptalk_require_preload("The server key settings are protected only when the library is loaded at server start.");

	if (taptalk_base_url == NULL || taptalk_base_url[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("parameter \"taptalk.base_url\" is not set"),
				 errhint("Set \"taptalk.base_url\" in postgresql.conf or with ALTER SYSTEM, for example to https://taptalk.io.")));

	if (taptalk_server_key_id == NULL || taptalk_server_key_id[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("parameter \"taptalk.server_key_id\" is not set"),
				 errhint("Set \"taptalk.server_key_id\" in postgresql.conf or with ALTER SYSTEM.")));

	if (taptalk_server_key_secret == NULL || taptalk_server_key_secret[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("neither \"taptalk.server_key_file\" nor \"taptalk.server_key_secret\" is set"),
				 errhint("Put the Server Key Secret in a file only the database server's user can read, set \"taptalk.server_key_file\" to its path in postgresql.conf, and reload.")));
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

static TaptalkNext
single_next(void *arg, int64 *id, StringInfo body)
{
	SingleRequest *req = (SingleRequest *) arg;

	if (req->sent)
		return TAPTALK_NEXT_NONE;
	req->sent = true;
	*id = 0;
	appendBinaryStringInfo(body, req->body.data, req->body.len);
	return TAPTALK_NEXT_REQUEST;
}

static void
single_done(void *arg, int64 id, TaptalkResult *result)
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

	taptalk_require_object(request);

	memset(&req, 0, sizeof(req));
	initStringInfo(&req.body);
	if (taptalk_build_request(request, &req.body, &req.result))
		taptalk_transport_run(TAPTALK_PATH_SINGLE, single_next, single_done,
							  &req, 1, taptalk_max_retries);
	else
		taptalk_stats_rejected(TAPTALK_PATH_SINGLE);

	result_to_columns(&req.result, values, nulls, 0);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * A taptalk_auth_tickets call.  Rows go into the tuplestore in input order
 * as soon as every earlier element has finished, so memory does not grow
 * with the array: a result that finished ahead of an earlier element waits
 * in a ring of BATCH_WINDOW entries, and no element is taken up while the
 * ring is full or its results hold more than BATCH_PENDING_BYTES.
 */
#define BATCH_WINDOW 4096
#define BATCH_PENDING_BYTES (64 * 1024 * 1024)

typedef struct BatchEntry
{
	bool		ready;			/* finished, waiting for its turn */
	bool		null_element;	/* the element was NULL: a row of NULLs */
	TaptalkResult result;		/* strings in the batch's pending_cxt */
	Size		bytes;			/* their size */
} BatchEntry;

typedef struct Batch
{
	ArrayIterator elements;
	int			count;			/* elements in the array */
	int			taken;			/* elements taken up so far */
	int			emitted;		/* rows written so far */
	BatchEntry *ring;			/* entry of element i is ring[i % BATCH_WINDOW] */
	Size		pending_bytes;
	MemoryContext pending_cxt;
	MemoryContext scratch_cxt;	/* reset for each element */
	Tuplestorestate *store;
	TupleDesc	tupdesc;
} Batch;

static char *
pending_copy(const char *s, Size *bytes)
{
	if (s == NULL)
		return NULL;
	*bytes += strlen(s) + 1;
	return pstrdup(s);
}

static void
pending_free(char *s)
{
	if (s != NULL)
		pfree(s);
}

/* Write the rows whose turn has come: every finished entry at the head. */
static void
batch_emit_ready(Batch *batch)
{
	while (batch->emitted < batch->taken)
	{
		BatchEntry *e = &batch->ring[batch->emitted % BATCH_WINDOW];
		Datum		values[BATCH_NATTS];
		bool		nulls[BATCH_NATTS];

		if (!e->ready)
			break;
		values[0] = Int32GetDatum(batch->emitted + 1);
		nulls[0] = false;
		if (e->null_element)
		{
			for (int i = 1; i < BATCH_NATTS; i++)
			{
				values[i] = (Datum) 0;
				nulls[i] = true;
			}
		}
		else
			result_to_columns(&e->result, values, nulls, 1);
		tuplestore_putvalues(batch->store, batch->tupdesc, values, nulls);
		for (int i = 1; i < BATCH_NATTS; i++)
		{
			if (!nulls[i])
				pfree(DatumGetPointer(values[i]));
		}

		pending_free(e->result.user_id);
		pending_free(e->result.ticket);
		pending_free(e->result.error_code);
		pending_free(e->result.error_field);
		pending_free(e->result.error_message);
		batch->pending_bytes -= e->bytes;
		memset(e, 0, sizeof(*e));
		batch->emitted++;
	}
}

/* Keep element `id`'s outcome (NULL result: a NULL element) until its turn. */
static void
batch_settle(Batch *batch, int64 id, const TaptalkResult *result)
{
	BatchEntry *e = &batch->ring[id % BATCH_WINDOW];
	MemoryContext old = MemoryContextSwitchTo(batch->pending_cxt);

	Assert(id >= batch->emitted && id < batch->taken && !e->ready);
	if (result == NULL)
		e->null_element = true;
	else
	{
		e->result.user_id = pending_copy(result->user_id, &e->bytes);
		e->result.ticket = pending_copy(result->ticket, &e->bytes);
		e->result.error_code = pending_copy(result->error_code, &e->bytes);
		e->result.error_field = pending_copy(result->error_field, &e->bytes);
		e->result.error_message = pending_copy(result->error_message, &e->bytes);
	}
	MemoryContextSwitchTo(old);
	e->ready = true;
	batch->pending_bytes += e->bytes;
	batch_emit_ready(batch);
}

static void
batch_done(void *arg, int64 id, TaptalkResult *result)
{
	batch_settle((Batch *) arg, id, result);
}

/*
 * Produce the next element that passes validation; the others, and NULL
 * elements, are settled here without a request.  Waits (TAPTALK_NEXT_LATER)
 * while the results ahead of the oldest unfinished element fill the ring.
 */
static TaptalkNext
batch_next(void *arg, int64 *id, StringInfo body)
{
	Batch	   *batch = (Batch *) arg;

	while (batch->taken < batch->count)
	{
		int			i;
		Datum		elem;
		bool		isnull;
		MemoryContext old;
		Jsonb	   *jb;
		TaptalkResult failure;
		bool		valid;

		if (batch->taken - batch->emitted >= BATCH_WINDOW ||
			batch->pending_bytes >= BATCH_PENDING_BYTES)
			return TAPTALK_NEXT_LATER;

		/* a long run of invalid elements sends nothing: stay cancellable */
		CHECK_FOR_INTERRUPTS();

		if (!array_iterate(batch->elements, &elem, &isnull))
			elog(ERROR, "array has fewer elements than its dimensions say");
		i = batch->taken++;
		if (isnull)
		{
			batch_settle(batch, i, NULL);
			continue;
		}

		MemoryContextReset(batch->scratch_cxt);
		old = MemoryContextSwitchTo(batch->scratch_cxt);
		jb = DatumGetJsonbP(elem);
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
			return TAPTALK_NEXT_REQUEST;
		}
		taptalk_stats_rejected(TAPTALK_PATH_BATCH);
		batch_settle(batch, i, &failure);
	}
	return TAPTALK_NEXT_NONE;
}

/*
 * taptalk_auth_tickets(requests jsonb[])
 *	  returns table (ord int, user_id text, ticket text, error_code text,
 *					 error_field text, error_message text)
 *
 * One row per element, in order, with the same validation and mapping as
 * taptalk_auth_ticket; the requests run concurrently, at most
 * taptalk.max_concurrency at a time.  Rows are written to the result as they
 * become final, so the memory a call needs does not grow with the array.
 */
Datum
taptalk_auth_tickets(PG_FUNCTION_ARGS)
{
	ArrayType  *array = PG_GETARG_ARRAYTYPE_P(0);
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Batch		batch;

	check_configuration();

	InitMaterializedSRF(fcinfo, 0);

	memset(&batch, 0, sizeof(batch));
	batch.store = rsinfo->setResult;
	batch.tupdesc = rsinfo->setDesc;
	batch.count = ArrayGetNItems(ARR_NDIM(array), ARR_DIMS(array));
	if (batch.count == 0)
		return (Datum) 0;

	batch.elements = array_create_iterator(array, 0, NULL);
	batch.pending_cxt = AllocSetContextCreate(CurrentMemoryContext,
											  "taptalk batch results",
											  ALLOCSET_DEFAULT_SIZES);
	batch.scratch_cxt = AllocSetContextCreate(CurrentMemoryContext,
											  "taptalk batch scratch",
											  ALLOCSET_DEFAULT_SIZES);
	batch.ring = MemoryContextAllocZero(batch.pending_cxt,
										sizeof(BatchEntry) * Min(batch.count, BATCH_WINDOW));

	taptalk_transport_run(TAPTALK_PATH_BATCH, batch_next, batch_done, &batch,
						  Min(taptalk_max_concurrency, batch.count),
						  taptalk_max_retries);
	Assert(batch.emitted == batch.count);

	array_free_iterator(batch.elements);
	MemoryContextDelete(batch.scratch_cxt);
	MemoryContextDelete(batch.pending_cxt);
	return (Datum) 0;
}
