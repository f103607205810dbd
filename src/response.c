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
 * limits (valid UTF-8, bounded nesting).  The body is UTF-8 whatever the
 * database encoding; only the values returned are converted, without
 * raising, to the database encoding.
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

/* their names in messages */
static const char *const member_names[NUM_MEMBERS] = {
	"error.code", "error.message", "error.field", "data.userID", "data.ticket"
};

typedef struct EnvelopeState
{
	bool		root_is_object;
	char	   *values[NUM_MEMBERS];	/* UTF-8 */
} EnvelopeState;

/* one open container while walking the tokens */
typedef struct OpenContainer
{
	bool		is_object;
	bool		expect_key;		/* in an object: the next string is a key */

	/*
	 * 0 none, 1 "error", 2 "data": in the root object, the section of the
	 * member being read; in a container directly inside it, its own.
	 */
	int			section;
} OpenContainer;

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

/* The value of the four hexadecimal digits at p, which the lexer checked. */
static pg_wchar
hex4(const char *p)
{
	pg_wchar	v = 0;

	for (int i = 0; i < 4; i++)
	{
		char		c = p[i];

		v <<= 4;
		if (c >= '0' && c <= '9')
			v |= c - '0';
		else if (c >= 'a' && c <= 'f')
			v |= c - 'a' + 10;
		else
			v |= c - 'A' + 10;
	}
	return v;
}

/*
 * Decode the JSON string token [start, end), quotes included, which the
 * server's lexer has accepted, into UTF-8 in out.  Returns false for an
 * escape that stands for no character text can hold: \u0000 or a lone
 * surrogate.
 *
 * The server's lexer de-escapes into the database encoding, and on
 * PostgreSQL 15 raises for a \u escape that encoding cannot represent, so
 * the body is lexed without de-escaping and the few strings we read are
 * decoded here, to UTF-8 like the rest of the body.
 */
static bool
decode_json_string(const char *start, const char *end, StringInfo out)
{
	const char *p = start + 1;
	const char *stop = end - 1;

	resetStringInfo(out);
	while (p < stop)
	{
		const char *run = p;
		pg_wchar	c;
		unsigned char utf8[8];

		while (p < stop && *p != '\\')
			p++;
		appendBinaryStringInfo(out, run, p - run);
		if (p >= stop)
			break;

		/* an escape: a backslash and at least one more character */
		p++;
		switch (*p++)
		{
			case 'b':
				appendStringInfoChar(out, '\b');
				continue;
			case 'f':
				appendStringInfoChar(out, '\f');
				continue;
			case 'n':
				appendStringInfoChar(out, '\n');
				continue;
			case 'r':
				appendStringInfoChar(out, '\r');
				continue;
			case 't':
				appendStringInfoChar(out, '\t');
				continue;
			case 'u':
				break;
			default:			/* '"', '\\' and '/' stand for themselves */
				appendStringInfoChar(out, p[-1]);
				continue;
		}

		c = hex4(p);
		p += 4;
		if (is_utf16_surrogate_first(c))
		{
			pg_wchar	low;

			if (stop - p < 6 || p[0] != '\\' || p[1] != 'u')
				return false;
			low = hex4(p + 2);
			if (!is_utf16_surrogate_second(low))
				return false;
			c = surrogate_pair_to_codepoint(c, low);
			p += 6;
		}
		else if (is_utf16_surrogate_second(c) || c == 0)
			return false;
		unicode_to_utf8(c, utf8);
		appendBinaryStringInfo(out, (char *) utf8, pg_utf_mblen(utf8));
	}
	return true;
}

/*
 * Parse body as a TapTalk envelope into st.  Returns false, with *why set,
 * when the body is not JSON the parser can take.
 *
 * The body is parsed as UTF-8 whatever the database encoding: first checked
 * whole by the server's parser, then walked token by token to pick out the
 * members we look for, which stay UTF-8.
 */
static bool
parse_envelope(const char *body, size_t len, EnvelopeState *st,
			   const char **why)
{
	JsonLexContext *lex;
	JsonSemAction sem;
	JsonParseErrorType rc;
	OpenContainer open[MAX_RESPONSE_NESTING + 1];
	int			depth = 0;
	EnvelopeMember member = MEMBER_NONE;	/* whose value comes next */
	bool		undecodable = false;
	StringInfoData str;

	memset(st, 0, sizeof(*st));

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

	/* the grammar, without de-escaping (see decode_json_string) */
	memset(&sem, 0, sizeof(sem));
#if PG_VERSION_NUM >= 170000
	lex = makeJsonLexContextCstringLen(NULL, body, len, PG_UTF8, false);
#else
	lex = makeJsonLexContextCstringLen(unconstify(char *, body), (int) len,
									   PG_UTF8, false);
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

	/*
	 * The members: error.code, .message, .field and data.userID, .ticket are
	 * the strings or numbers at depth 2 under the root object's "error" and
	 * "data" objects; a later duplicate key wins, at either level (a later
	 * "error" or "data" replaces the earlier whole, whatever its kind), and
	 * a value of another kind counts as none.
	 */
#if PG_VERSION_NUM >= 170000
	lex = makeJsonLexContextCstringLen(NULL, body, len, PG_UTF8, false);
#else
	lex = makeJsonLexContextCstringLen(unconstify(char *, body), (int) len,
									   PG_UTF8, false);
#endif
	initStringInfo(&str);
	for (;;)
	{
		const char *tok_start;
		const char *tok_end;
		OpenContainer *top = depth > 0 ? &open[depth - 1] : NULL;

		rc = json_lex(lex);
		if (rc != JSON_SUCCESS)
			break;				/* cannot happen: the parser accepted it */
		tok_start = lex->token_start;
		tok_end = lex->token_terminator;

		switch (lex->token_type)
		{
			case JSON_TOKEN_END:
				break;
			case JSON_TOKEN_OBJECT_START:
			case JSON_TOKEN_ARRAY_START:
				if (depth == 0 && lex->token_type == JSON_TOKEN_OBJECT_START)
					st->root_is_object = true;
				open[depth].is_object =
					(lex->token_type == JSON_TOKEN_OBJECT_START);
				open[depth].expect_key = true;
				open[depth].section = depth == 1 ? top->section : 0;
				depth++;
				member = MEMBER_NONE;
				continue;
			case JSON_TOKEN_OBJECT_END:
			case JSON_TOKEN_ARRAY_END:
				depth--;
				member = MEMBER_NONE;
				continue;
			case JSON_TOKEN_COMMA:
				top->expect_key = true;
				continue;
			case JSON_TOKEN_COLON:
				continue;
			case JSON_TOKEN_STRING:
				if (top != NULL && top->is_object && top->expect_key)
				{
					/* a key: only those of the root and its objects matter */
					top->expect_key = false;
					member = MEMBER_NONE;
					if (!st->root_is_object || depth > 2 ||
						(depth == 2 && open[1].section == 0))
						continue;
					if (!decode_json_string(tok_start, tok_end, &str))
					{
						undecodable = true;
						break;
					}
					if (depth == 1)
					{
						/* which section the value of this member is */
						top->section = strcmp(str.data, "error") == 0 ? 1 :
							strcmp(str.data, "data") == 0 ? 2 : 0;

						/*
						 * a later "error" or "data" replaces the earlier one
						 * whole, as in jsonb: forget what that one held
						 */
						for (int m = 0; m < NUM_MEMBERS; m++)
						{
							bool		in_error = (m == MEMBER_ERROR_CODE ||
													m == MEMBER_ERROR_MESSAGE ||
													m == MEMBER_ERROR_FIELD);

							if (top->section == (in_error ? 1 : 2))
								st->values[m] = NULL;
						}
					}
					else if (top->section == 1)
					{
						if (strcmp(str.data, "code") == 0)
							member = MEMBER_ERROR_CODE;
						else if (strcmp(str.data, "message") == 0)
							member = MEMBER_ERROR_MESSAGE;
						else if (strcmp(str.data, "field") == 0)
							member = MEMBER_ERROR_FIELD;
					}
					else if (strcmp(str.data, "userID") == 0)
						member = MEMBER_DATA_USER_ID;
					else if (strcmp(str.data, "ticket") == 0)
						member = MEMBER_DATA_TICKET;
					continue;
				}
				/* a string value */
				if (member != MEMBER_NONE)
				{
					if (!decode_json_string(tok_start, tok_end, &str))
					{
						undecodable = true;
						break;
					}
					st->values[member] = pstrdup(str.data);
				}
				member = MEMBER_NONE;
				continue;
			case JSON_TOKEN_NUMBER:
				if (member != MEMBER_NONE)
					st->values[member] = pnstrdup(tok_start,
												  tok_end - tok_start);
				member = MEMBER_NONE;
				continue;
			default:			/* true, false, null */
				if (member != MEMBER_NONE)
					st->values[member] = NULL;
				member = MEMBER_NONE;
				continue;
		}
		break;
	}
#if PG_VERSION_NUM >= 170000
	freeJsonLexContext(lex);
#endif
	pfree(str.data);
	if (undecodable)
	{
		*why = "response body is not valid JSON";
		return false;
	}
	return true;
}

/*
 * A returned value in the database encoding; false when it has a character
 * the database encoding cannot represent.
 */
static bool
to_database_encoding(char **value)
{
	char	   *converted;

	if (*value == NULL)
		return true;
	converted = taptalk_convert_encoding(*value, strlen(*value), PG_UTF8,
										 GetDatabaseEncoding(), false);
	if (converted == NULL)
		return false;
	*value = converted;
	return true;
}

/* The INVALID_RESPONSE for a member the database cannot represent. */
static void
set_unrepresentable(TaptalkResult *result, EnvelopeMember member)
{
	taptalk_set_error(result, TAPTALK_CODE_INVALID_RESPONSE, NULL,
					  psprintf("response %s has a character with no equivalent in encoding \"%s\"",
							   member_names[member],
							   GetDatabaseEncodingName()));
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
	result->http_status = 0;
	result->retry_after_ms = 0;
	result->not_sent = false;
	result->sent_at = 0;
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
		char	   *message = st.values[MEMBER_ERROR_MESSAGE];

		if (field != NULL && field[0] == '\0')
			field = NULL;

		/*
		 * The code and the field must be exact.  The message is for people:
		 * a character the database cannot represent becomes '?'.
		 */
		if (!to_database_encoding(&code))
		{
			set_unrepresentable(result, MEMBER_ERROR_CODE);
			return;
		}
		if (!to_database_encoding(&field))
		{
			set_unrepresentable(result, MEMBER_ERROR_FIELD);
			return;
		}
		if (message != NULL)
			message = taptalk_convert_encoding(message, strlen(message),
											   PG_UTF8, GetDatabaseEncoding(),
											   true);
		taptalk_set_error(result, code, field, message);
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

	if (!to_database_encoding(&st.values[MEMBER_DATA_USER_ID]))
	{
		set_unrepresentable(result, MEMBER_DATA_USER_ID);
		return;
	}
	if (!to_database_encoding(&st.values[MEMBER_DATA_TICKET]))
	{
		set_unrepresentable(result, MEMBER_DATA_TICKET);
		return;
	}

	result->user_id = st.values[MEMBER_DATA_USER_ID];
	result->ticket = st.values[MEMBER_DATA_TICKET];
	result->error_code = NULL;
	result->error_field = NULL;
	result->error_message = NULL;
}
