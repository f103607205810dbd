/*-------------------------------------------------------------------------
 *
 * request.c
 *	  Validation of a taptalk_auth_ticket request and construction of the
 *	  JSON body sent to TapTalk.
 *
 * The fields, their codes (101..112) and which are required come from
 * TapTalk's "Request Auth Ticket" documentation.  A request that fails a
 * check is answered without any network I/O, with TapTalk's own code for a
 * failed parameter check and the field's code, in the server's message
 * style.  Exactly one failure is reported, deterministically: unrecognized
 * keys first, then the fields in the documented order.
 *
 * TapTalk speaks UTF-8: each string is converted from the database encoding
 * before it is checked, and one that cannot be (not UTF-8 in a SQL_ASCII
 * database, a byte with no Unicode character in some single-byte encodings)
 * fails its field's check.  Nothing here raises for what a request holds.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "taptalk.h"

/* longest xcUserID TapTalk accepts, in characters */
#define XC_USER_ID_MAX_CHARS 50

typedef enum FieldKind
{
	FIELD_STRING,				/* a JSON string */
	FIELD_USER_ID,				/* a JSON string or an integral number */
	FIELD_PLATFORM				/* one of android, ios, web */
} FieldKind;

typedef struct FieldSpec
{
	const char *name;
	const char *code;
	bool		required;
	FieldKind	kind;
} FieldSpec;

/* in the documented order, which is also the order of checks and of the body */
static const FieldSpec fields[] = {
	{"userIPAddress", "101", true, FIELD_STRING},
	{"userAgent", "102", true, FIELD_STRING},
	{"userPlatform", "103", true, FIELD_PLATFORM},
	{"userDeviceID", "104", true, FIELD_STRING},
	{"xcUserID", "105", true, FIELD_USER_ID},
	{"fullName", "106", true, FIELD_STRING},
	{"email", "107", false, FIELD_STRING},
	{"phone", "108", false, FIELD_STRING},
	{"username", "109", false, FIELD_STRING},
	{"photoThumbnailURL", "110", false, FIELD_STRING},
	{"photoFullsizeURL", "111", false, FIELD_STRING},
	{"userRoleCode", "112", false, FIELD_STRING},
};

#define NUM_FIELDS lengthof(fields)

static const char *const platforms[] = {"android", "ios", "web"};

/* Report a failed parameter check in TapTalk's style. */
static bool
param_failure(TaptalkResult *failure, const char *field, const char *message)
{
	taptalk_set_error(failure, TAPTALK_CODE_PARAM_FAILED, field, message);
	return false;
}

/* A field over TAPTALK_MAX_FIELD_BYTES. */
static bool
too_long(TaptalkResult *failure, const FieldSpec *spec)
{
	return param_failure(failure, spec->code,
						 psprintf("Param '%s' must be at most %d bytes of UTF-8",
								  spec->name, TAPTALK_MAX_FIELD_BYTES));
}

/* Index of the documented field with this key, or -1. */
static int
field_index(const char *key, int len)
{
	for (int i = 0; i < (int) NUM_FIELDS; i++)
	{
		if (strlen(fields[i].name) == (size_t) len &&
			memcmp(fields[i].name, key, len) == 0)
			return i;
	}
	return -1;
}

static bool
is_blank(const char *s, int len)
{
	for (int i = 0; i < len; i++)
	{
		if (s[i] != ' ' && s[i] != '\t' && s[i] != '\n' &&
			s[i] != '\r' && s[i] != '\f' && s[i] != '\v')
			return false;
	}
	return true;
}

/*
 * The text form of an integral jsonb number, or NULL when it has a
 * fractional part.  "6.0" counts as the integer 6 and is sent as "6".
 *
 * Read from numeric_out's text, which any numeric has: arithmetic such as
 * rounding can overflow for the largest numbers a jsonb may hold.
 */
static char *
integral_numeric_text(Numeric num)
{
	char	   *text = DatumGetCString(DirectFunctionCall1(numeric_out,
														   NumericGetDatum(num)));
	char	   *p = text;
	char	   *point;

	/* -?digits(.digits)? ; anything else (NaN, Infinity) is no integer */
	if (*p == '-')
		p++;
	if (*p < '0' || *p > '9')
		return NULL;
	while (*p >= '0' && *p <= '9')
		p++;
	if (*p == '\0')
		return text;
	if (*p != '.')
		return NULL;
	point = p++;
	while (*p == '0')
		p++;
	if (*p != '\0')
		return NULL;
	*point = '\0';
	return text;
}

/* The number of characters in len bytes of valid UTF-8 at s. */
static int
utf8_char_count(const char *s, int len)
{
	int			n = 0;

	for (int i = 0; i < len; i += pg_utf_mblen((const unsigned char *) s + i))
		n++;
	return n;
}

/*
 * Check one field's value.  On success, *text is the string to send, or NULL
 * when the field is to be left out.  On failure, fills *failure.
 */
static bool
check_field(const FieldSpec *spec, JsonbValue *v, char **text,
			TaptalkResult *failure)
{
	char	   *s;
	int			len;

	*text = NULL;

	if (v == NULL || v->type == jbvNull)
	{
		if (spec->required)
			return param_failure(failure, spec->code,
								 psprintf("Param '%s' is required", spec->name));
		return true;
	}

	if (v->type == jbvString)
	{
		/*
		 * No conversion makes text shorter in bytes: a string over the
		 * limit fails before it is converted, whatever its size.
		 */
		if (v->val.string.len > TAPTALK_MAX_FIELD_BYTES)
			return too_long(failure, spec);
		/* TapTalk gets UTF-8, so the checks are made on that */
		s = taptalk_convert_encoding(v->val.string.val, v->val.string.len,
									 GetDatabaseEncoding(), PG_UTF8, false);
		if (s == NULL)
			return param_failure(failure, spec->code,
								 psprintf(GetDatabaseEncoding() == PG_SQL_ASCII ?
										  "Param '%s' is not valid UTF-8" :
										  "Param '%s' cannot be converted to UTF-8",
										  spec->name));
		len = strlen(s);
		if (len > TAPTALK_MAX_FIELD_BYTES)
			return too_long(failure, spec);
	}
	else if (v->type == jbvNumeric && spec->kind == FIELD_USER_ID)
	{
		s = integral_numeric_text(v->val.numeric);
		if (s == NULL)
			return param_failure(failure, spec->code,
								 psprintf("Param '%s' must be a string or an integer",
										  spec->name));
		len = strlen(s);
	}
	else
	{
		return param_failure(failure, spec->code,
							 psprintf(spec->kind == FIELD_USER_ID ?
									  "Param '%s' must be a string or an integer" :
									  "Param '%s' must be a string",
									  spec->name));
	}

	if (spec->required && is_blank(s, len))
		return param_failure(failure, spec->code,
							 psprintf("Param '%s' is required", spec->name));

	if (spec->kind == FIELD_USER_ID &&
		utf8_char_count(s, len) > XC_USER_ID_MAX_CHARS)
		return param_failure(failure, spec->code,
							 psprintf("Param '%s' must be at most %d characters",
									  spec->name, XC_USER_ID_MAX_CHARS));

	if (spec->kind == FIELD_PLATFORM)
	{
		bool		known = false;

		for (int i = 0; i < (int) lengthof(platforms); i++)
		{
			if (strlen(platforms[i]) == (size_t) len &&
				memcmp(platforms[i], s, len) == 0)
				known = true;
		}
		if (!known)
			return param_failure(failure, spec->code,
								 psprintf("Param '%s' must be one of: android, ios, web",
										  spec->name));
	}

	*text = s;
	return true;
}

/*
 * Validate a request object and build the body to send.
 *
 * Returns true and fills body (UTF-8 JSON whatever the database encoding,
 * the given fields in the documented order, xcUserID as a string) when the
 * request passes every check; returns false and fills *failure otherwise.
 * The caller has checked that request is a JSON object.
 */
bool
taptalk_build_request(Jsonb *request, StringInfo body, TaptalkResult *failure)
{
	JsonbValue	found[NUM_FIELDS];
	bool		present[NUM_FIELDS] = {0};
	char	   *texts[NUM_FIELDS];
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	int			current = -1;
	bool		first = true;

	Assert(JB_ROOT_IS_OBJECT(request));

	/* collect the known keys; the first unrecognized key fails at once */
	it = JsonbIteratorInit(&request->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
		{
			current = field_index(v.val.string.val, v.val.string.len);
			if (current < 0)
				return param_failure(failure, "",
									 psprintf("Param '%s' is not recognized",
											  pnstrdup(v.val.string.val,
													   v.val.string.len)));
		}
		else if (tok == WJB_VALUE)
		{
			found[current] = v;
			present[current] = true;
		}
	}

	for (int i = 0; i < (int) NUM_FIELDS; i++)
	{
		if (!check_field(&fields[i], present[i] ? &found[i] : NULL, &texts[i],
						 failure))
			return false;
	}

	appendStringInfoChar(body, '{');
	for (int i = 0; i < (int) NUM_FIELDS; i++)
	{
		if (texts[i] == NULL)
			continue;
		if (!first)
			appendStringInfoChar(body, ',');
		first = false;
		escape_json(body, fields[i].name);
		appendStringInfoChar(body, ':');
		escape_json(body, texts[i]);
	}
	appendStringInfoChar(body, '}');

	if (body->len > TAPTALK_MAX_BODY_BYTES)
		return param_failure(failure, "",
							 psprintf("Request must be at most %d bytes of JSON",
									  TAPTALK_MAX_BODY_BYTES));
	return true;
}

/* What kind of JSON value a jsonb holds at its root, for error messages. */
const char *
taptalk_jsonb_root_kind(Jsonb *jb)
{
	JsonbIterator *it;
	JsonbValue	v;

	if (JB_ROOT_IS_OBJECT(jb))
		return "an object";
	if (!JB_ROOT_IS_SCALAR(jb))
		return "an array";

	/* a scalar is stored as a one-element raw-scalar array */
	it = JsonbIteratorInit(&jb->root);
	while (JsonbIteratorNext(&it, &v, true) != WJB_DONE)
	{
		switch (v.type)
		{
			case jbvString:
				return "a string";
			case jbvNumeric:
				return "a number";
			case jbvBool:
				return "a boolean";
			case jbvNull:
				return "null";
			default:
				break;
		}
	}
	return "a scalar";
}

/*
 * Raise 22023 unless the request is a JSON object: anything else is the
 * caller's programming error, for every function that takes a request.
 */
void
taptalk_require_object(Jsonb *request)
{
	if (!JB_ROOT_IS_OBJECT(request))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("taptalk request must be a JSON object, not %s",
						taptalk_jsonb_root_kind(request)),
				 errhint("Build the request with jsonb_build_object().")));
}
