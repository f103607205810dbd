/*-------------------------------------------------------------------------
 *
 * response.c
 *	  Mapping of TapTalk's HTTP response to a taptalk_auth_ticket result.
 *
 * TapTalk answers with an envelope:
 *	  {"status": 200, "error": {"code", "message", "field"},
 *	   "data": {"userID", "ticket"}}
 * A non-empty error.code is TapTalk's verdict whatever the HTTP status; a 2xx
 * with data.userID and data.ticket is a success; anything else is described
 * by one of our own codes.  Nothing the server sends makes this raise an
 * error: the body is parsed with the server's JSON parser, which reports
 * malformed input as a return code, after checks that keep it within its
 * limits (valid UTF-8, bounded nesting).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"

#include "taptalk.h"

/*
 * The envelope is two levels deep; anything nested far deeper is not an
 * envelope, and the recursive parser must not be given it.
 */
#define MAX_RESPONSE_NESTING 64

#if PG_VERSION_NUM >= 160000
#define SEM_ACTION_RESULT JsonParseErrorType
#define SEM_ACTION_DONE return JSON_SUCCESS
#else
#define SEM_ACTION_RESULT void
#define SEM_ACTION_DONE return
#endif

/* the envelope members we look for */
typedef enum EnvelopeMember
{
	MEMBER_NONE = -1,
	MEMBER_ERROR_CODE,
	MEMBER_ERROR_MESSAGE,
	MEMBER_ERROR_FIELD,
	MEMBER_DATA_USER_ID,
	MEMBER_DATA_TICKET,
	NUM_MEMBERS
} EnvelopeMember;

typedef struct EnvelopeState
{
	int			depth;			/* 0 outside the root value */
	bool		root_is_object;
	bool		outer_object;	/* the level-1 value being read is an object */
	int			section;		/* 0 none, 1 "error", 2 "data" */
	EnvelopeMember member;		/* member whose value comes next */
	char	   *values[NUM_MEMBERS];
} EnvelopeState;

static SEM_ACTION_RESULT
env_object_start(void *state)
{
	EnvelopeState *st = (EnvelopeState *) state;

	if (st->depth == 0)
		st->root_is_object = true;
	else if (st->depth == 1)
		st->outer_object = true;
	st->depth++;
	st->member = MEMBER_NONE;
	SEM_ACTION_DONE;
}

static SEM_ACTION_RESULT
env_array_start(void *state)
{
	EnvelopeState *st = (EnvelopeState *) state;

	if (st->depth == 1)
		st->outer_object = false;
	st->depth++;
	st->member = MEMBER_NONE;
	SEM_ACTION_DONE;
}

static SEM_ACTION_RESULT
env_end(void *state)
{
	EnvelopeState *st = (EnvelopeState *) state;

	st->depth--;
	st->member = MEMBER_NONE;
	SEM_ACTION_DONE;
}

static SEM_ACTION_RESULT
env_field_start(void *state, char *fname, bool isnull)
{
	EnvelopeState *st = (EnvelopeState *) state;

	st->member = MEMBER_NONE;
	if (!st->root_is_object)
		SEM_ACTION_DONE;

	if (st->depth == 1)
	{
		/* a member of the root object: which section follows */
		if (strcmp(fname, "error") == 0)
			st->section = 1;
		else if (strcmp(fname, "data") == 0)
			st->section = 2;
		else
			st->section = 0;
		st->outer_object = false;
	}
	else if (st->depth == 2 && st->outer_object)
	{
		if (st->section == 1 && strcmp(fname, "code") == 0)
			st->member = MEMBER_ERROR_CODE;
		else if (st->section == 1 && strcmp(fname, "message") == 0)
			st->member = MEMBER_ERROR_MESSAGE;
		else if (st->section == 1 && strcmp(fname, "field") == 0)
			st->member = MEMBER_ERROR_FIELD;
		else if (st->section == 2 && strcmp(fname, "userID") == 0)
			st->member = MEMBER_DATA_USER_ID;
		else if (st->section == 2 && strcmp(fname, "ticket") == 0)
			st->member = MEMBER_DATA_TICKET;
	}
	SEM_ACTION_DONE;
}

static SEM_ACTION_RESULT
env_scalar(void *state, char *token, JsonTokenType tokentype)
{
	EnvelopeState *st = (EnvelopeState *) state;

	/* only strings and numbers count; a later duplicate key wins */
	if (st->member != MEMBER_NONE && st->depth == 2)
	{
		if (tokentype == JSON_TOKEN_STRING || tokentype == JSON_TOKEN_NUMBER)
			st->values[st->member] = token;
		else
			st->values[st->member] = NULL;
	}
	st->member = MEMBER_NONE;
	SEM_ACTION_DONE;
}

/*
 * Whether the body nests containers deeper than MAX_RESPONSE_NESTING.  A
 * lexical scan that only tracks strings; the parser checks everything else.
 */
static bool
nests_too_deep(const char *body, size_t len)
{
	int			depth = 0;
	bool		in_string = false;

	for (size_t i = 0; i < len; i++)
	{
		char		c = body[i];

		if (in_string)
		{
			if (c == '\\')
				i++;
			else if (c == '"')
				in_string = false;
		}
		else if (c == '"')
			in_string = true;
		else if (c == '{' || c == '[')
		{
			if (++depth > MAX_RESPONSE_NESTING)
				return true;
		}
		else if (c == '}' || c == ']')
			depth--;
	}
	return false;
}

/*
 * Parse body as a TapTalk envelope into st.  Returns false, with *why set,
 * when the body is not JSON the parser can take.
 */
static bool
parse_envelope(const char *body, size_t len, EnvelopeState *st,
			   const char **why)
{
	JsonLexContext *lex;
	JsonSemAction sem;
	JsonParseErrorType rc;
	char	   *copy;

	memset(st, 0, sizeof(*st));
	st->member = MEMBER_NONE;

	if (len == 0)
	{
		*why = "response body is empty";
		return false;
	}
	/* rejects NUL bytes too */
	if (!pg_verify_mbstr(PG_UTF8, body, (int) len, true))
	{
		*why = "response body is not valid UTF-8";
		return false;
	}
	if (nests_too_deep(body, len))
	{
		*why = "response body nests too deeply";
		return false;
	}

	memset(&sem, 0, sizeof(sem));
	sem.semstate = st;
	sem.object_start = env_object_start;
	sem.object_end = env_end;
	sem.array_start = env_array_start;
	sem.array_end = env_end;
	sem.object_field_start = env_field_start;
	sem.scalar = env_scalar;

	/*
	 * Strings come out in the database encoding.  In a database that is not
	 * UTF-8, a character it cannot represent raises the conversion's error.
	 */
	copy = pg_any_to_server(body, (int) len, PG_UTF8);
	if (copy == body)
		copy = pnstrdup(body, len);
	len = strlen(copy);
#if PG_VERSION_NUM >= 170000
	lex = makeJsonLexContextCstringLen(NULL, copy, len, GetDatabaseEncoding(),
									   true);
#else
	lex = makeJsonLexContextCstringLen(copy, (int) len, GetDatabaseEncoding(),
									   true);
#endif
	rc = pg_parse_json(lex, &sem);
#if PG_VERSION_NUM >= 170000
	freeJsonLexContext(lex);
#endif
	if (rc != JSON_SUCCESS)
	{
		*why = "response body is not valid JSON";
		return false;
	}
	return true;
}

/* Set the error columns of a result (the others NULL). */
void
taptalk_set_error(TaptalkResult *result, const char *code, const char *field,
				  const char *message)
{
	result->user_id = NULL;
	result->ticket = NULL;
	result->error_code = code ? pstrdup(code) : NULL;
	result->error_field = field ? pstrdup(field) : NULL;
	result->error_message = message ? pstrdup(message) : NULL;
}

/*
 * Map a complete HTTP response (status and body, the body already bounded by
 * the transport) to a result.
 */
void
taptalk_map_response(long http_status, const char *body, size_t len,
					 TaptalkResult *result)
{
	EnvelopeState st;
	const char *why = NULL;
	bool		parsed;
	bool		ok_status = (http_status >= 200 && http_status < 300);
	char	   *code;

	parsed = parse_envelope(body, len, &st, &why);
	if (parsed && !st.root_is_object)
	{
		parsed = false;
		why = "response body is not a JSON object";
	}

	code = parsed ? st.values[MEMBER_ERROR_CODE] : NULL;
	if (code != NULL && code[0] != '\0')
	{
		char	   *field = st.values[MEMBER_ERROR_FIELD];

		taptalk_set_error(result, code,
						  (field != NULL && field[0] != '\0') ? field : NULL,
						  st.values[MEMBER_ERROR_MESSAGE]);
		return;
	}

	if (!ok_status)
	{
		taptalk_set_error(result, TAPTALK_CODE_HTTP_ERROR, NULL,
						  psprintf("TapTalk answered HTTP status %ld without an error envelope",
								   http_status));
		return;
	}

	if (!parsed)
	{
		taptalk_set_error(result, TAPTALK_CODE_INVALID_RESPONSE, NULL, why);
		return;
	}

	if (st.values[MEMBER_DATA_TICKET] == NULL ||
		st.values[MEMBER_DATA_TICKET][0] == '\0')
	{
		taptalk_set_error(result, TAPTALK_CODE_INVALID_RESPONSE, NULL,
						  "response has no data.ticket");
		return;
	}
	if (st.values[MEMBER_DATA_USER_ID] == NULL ||
		st.values[MEMBER_DATA_USER_ID][0] == '\0')
	{
		taptalk_set_error(result, TAPTALK_CODE_INVALID_RESPONSE, NULL,
						  "response has no data.userID");
		return;
	}

	result->user_id = st.values[MEMBER_DATA_USER_ID];
	result->ticket = st.values[MEMBER_DATA_TICKET];
	result->error_code = NULL;
	result->error_field = NULL;
	result->error_message = NULL;
}
