/*-------------------------------------------------------------------------
 *
 * encoding.c
 *	  Conversion between the database encoding and UTF-8, TapTalk's, that
 *	  never raises and, once prepared, never reads the catalog.
 *
 * PostgreSQL's own conversion calls (pg_do_encoding_conversion and
 * friends) look the conversion function up in the catalog at every call.
 * The queue's worker builds requests and maps answers between its
 * transactions, where a catalog lookup has no resource owner and crashes
 * the process.  So the two conversions a process can need (database
 * encoding to UTF-8 and back) are looked up once, inside a transaction, and
 * their functions kept for the process's lifetime; a conversion outside a
 * transaction before that lookup fails (returns NULL) instead of touching
 * the catalog.  The database encoding of a process never changes.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "utils/memutils.h"

#include "taptalk.h"

/* source bytes given to one call of a conversion function */
#define CONVERSION_CHUNK 8192

/* one direction's conversion function, once looked up */
typedef struct Conversion
{
	bool		looked_up;
	bool		exists;
	FmgrInfo	flinfo;
} Conversion;

static Conversion to_utf8;		/* database encoding to UTF-8 */
static Conversion from_utf8;	/* UTF-8 to the database encoding */

static void
look_up(Conversion *conv, int src, int dest)
{
	Oid			proc = FindDefaultConversionProc(src, dest);

	if (OidIsValid(proc))
	{
		fmgr_info_cxt(proc, &conv->flinfo, TopMemoryContext);
		conv->exists = true;
	}
	conv->looked_up = true;
}

/*
 * Look up both conversions of this database now.  Must run in a
 * transaction; cheap after the first call.  The worker calls it in its
 * first transaction, the backends' conversions call it themselves.
 */
void
taptalk_encoding_prepare(void)
{
	int			db = GetDatabaseEncoding();

	if (db == PG_UTF8 || db == PG_SQL_ASCII)
		return;
	if (!to_utf8.looked_up)
		look_up(&to_utf8, db, PG_UTF8);
	if (!from_utf8.looked_up)
		look_up(&from_utf8, PG_UTF8, db);
}

/* The conversion from src to dest (one of them UTF-8), or NULL. */
static FmgrInfo *
conversion(int src, int dest)
{
	Conversion *conv;

	if (src == PG_UTF8 && dest == GetDatabaseEncoding())
		conv = &from_utf8;
	else if (dest == PG_UTF8 && src == GetDatabaseEncoding())
		conv = &to_utf8;
	else
		return NULL;
	if (!conv->looked_up)
	{
		/* the catalog may be read only inside a transaction */
		if (!IsTransactionState())
			return NULL;
		taptalk_encoding_prepare();
	}
	return conv->exists ? &conv->flinfo : NULL;
}

/*
 * Convert len bytes of text from encoding src to encoding dest (the
 * database encoding and UTF-8, either way) without ever raising an error.
 * Returns the converted text, or NULL when a character has no equivalent in
 * dest (or src's bytes are not valid in src, or the conversion is not
 * available).  With replace, each character with no equivalent becomes '?'
 * instead (src's bytes must then be valid).
 *
 * The conversion functions of PostgreSQL 14 and later stop at such a
 * character when asked not to raise, and say how far they got.
 */
char *
taptalk_convert_encoding(const char *text, int len, int src, int dest,
						 bool replace)
{
	FmgrInfo   *proc;
	StringInfoData out;
	unsigned char *buf;
	int			buflen = CONVERSION_CHUNK * MAX_CONVERSION_GROWTH + 1;
	bool		ascii = true;

	if (src == dest)
		return pnstrdup(text, len);

	/* every server encoding extends ASCII */
	for (int i = 0; i < len; i++)
	{
		if (IS_HIGHBIT_SET(text[i]))
		{
			ascii = false;
			break;
		}
	}
	if (ascii)
		return pnstrdup(text, len);

	/* SQL_ASCII holds any bytes; only a UTF-8 destination needs a check */
	if (src == PG_SQL_ASCII || dest == PG_SQL_ASCII)
	{
		if (dest == PG_UTF8 && !pg_verify_mbstr(PG_UTF8, text, len, true))
			return NULL;
		return pnstrdup(text, len);
	}

	proc = conversion(src, dest);
	if (proc == NULL)
		return NULL;

	initStringInfo(&out);
	buf = palloc(buflen);
	while (len > 0)
	{
		int			chunk = len;
		int			done;

		if (chunk > CONVERSION_CHUNK)
			chunk = pg_encoding_mbcliplen(src, text, len, CONVERSION_CHUNK);
		/* as pg_do_encoding_conversion_buf calls it, with our FmgrInfo */
		done = DatumGetInt32(FunctionCall6(proc,
										   Int32GetDatum(src),
										   Int32GetDatum(dest),
										   CStringGetDatum(text),
										   CStringGetDatum((char *) buf),
										   Int32GetDatum(chunk),
										   BoolGetDatum(true)));
		appendStringInfoString(&out, (char *) buf);
		text += done;
		len -= done;
		if (done < chunk)
		{
			/* text is at a character with no equivalent, or invalid */
			int			skip;

			if (!replace)
			{
				pfree(buf);
				pfree(out.data);
				return NULL;
			}
			skip = pg_encoding_mblen(src, text);
			if (skip > len)
				skip = len;
			appendStringInfoChar(&out, '?');
			text += skip;
			len -= skip;
		}
	}
	pfree(buf);
	return out.data;
}
