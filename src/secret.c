/*-------------------------------------------------------------------------
 *
 * secret.c
 *	  The Server Key Secret: where it comes from, and keeping it out of
 *	  sight.
 *
 * The secret comes from the file named by taptalk.server_key_file when that
 * is set (the file's owner and mode are checked as PostgreSQL checks
 * ssl_key_file's), otherwise from the setting taptalk.server_key_secret.
 * Either way taptalk_server_key_secret points at the secret in effect, which
 * is what the transport and the worker read.  The file is read wherever the
 * setting is applied: at server start in the postmaster, and at each reload
 * in every process that processes the configuration file again (backends,
 * the queue's worker), so a reload picks up a new key.  A file that cannot
 * be used stops the server from starting, and at a reload is refused and
 * the key in use is kept.
 *
 * Nothing shows the secret: SHOW, current_setting() and set_config() show
 * the setting as a mask, to every role, and pg_settings does not list it.
 * An emit_log_hook masks the secret's value (from the setting and from the
 * file) in every field of every message the server logs, and keeps out of
 * the log the text of any statement that names the setting.  It is
 * installed in the postmaster and inherited by every process it starts.
 *
 * Other settings that hold a secret (taptalk.proxy's password, proxy.c)
 * register with taptalk_hide_setting: their secret values are masked the
 * same way, statements naming them are kept out of the log, and in a
 * message naming them the password of any URL is masked as well (a value
 * refused at a reload is never applied, so its password is known only from
 * the message itself).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "miscadmin.h"
#include "storage/fd.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"

#include "taptalk.h"

#define SECRET_SETTING "taptalk.server_key_secret"
#define FILE_SETTING "taptalk.server_key_file"

/* what a statement naming the setting is logged as */
#define HIDDEN_STATEMENT "(a statement naming " SECRET_SETTING ", not logged)"

/* a key file larger than this is refused */
#define MAX_KEY_FILE_BYTES 1024

/* the secret in effect: the key file's when it is set, else the setting's */
char	   *taptalk_server_key_secret = "";

/* taptalk.server_key_secret and taptalk.server_key_file */
static char *server_key_secret_setting = NULL;
static char *server_key_file = NULL;

/* the key file's secret: the setting's extra (from its check hook) */
static char *key_file_secret = NULL;

static emit_log_hook_type prev_emit_log_hook = NULL;

/*
 * Settings registered by taptalk_hide_setting: the words that name one in
 * a statement (all of them, in any letter case), what such a statement is
 * logged as, and where its secret values are.
 */
#define MAX_HIDDEN_SETTINGS 4
#define MAX_HIDDEN_VALUES 2
#define MIN_MASKED_VALUE 4
typedef struct HiddenSetting
{
	const char *words[2];
	const char *hidden_statement;
	char	  **values[MAX_HIDDEN_VALUES];
} HiddenSetting;

static HiddenSetting hidden_settings[MAX_HIDDEN_SETTINGS];
static int	n_hidden_settings = 0;

/*
 * A setting's extra is freed by the GUC machinery: with free() up to
 * PostgreSQL 15, in its own memory context (guc_malloc) from 16 on.
 */
#if PG_VERSION_NUM >= 160000
#define extra_malloc(size) guc_malloc(LOG, (size))
#define extra_free(ptr) guc_free(ptr)
#else
#define extra_malloc(size) malloc(size)
#define extra_free(ptr) free(ptr)
#endif

/* why read_key_file failed: a full sentence, for an error's detail */
static char key_file_problem[512];

/* Point taptalk_server_key_secret at the secret in effect. */
static void
update_secret_in_effect(const char *setting)
{
	if (key_file_secret != NULL)
		taptalk_server_key_secret = key_file_secret;
	else
		taptalk_server_key_secret = unconstify(char *, setting ? setting : "");
}

/*
 * Read the secret from the key file at path, as the server's OS user.  The
 * file must be a regular file owned by that user with mode 0600 or less, or
 * owned by root with mode 0640 or less (PostgreSQL's rule for
 * ssl_key_file), of at most MAX_KEY_FILE_BYTES, holding the secret on one
 * line; a final line break is not part of it.  Returns the secret
 * allocated for a setting's extra, or NULL with key_file_problem set.
 * Never raises.
 */
static char *
read_key_file(const char *path)
{
	int			fd;
	struct stat st;
	char		buf[MAX_KEY_FILE_BYTES + 1];
	ssize_t		len = 0;
	char	   *secret = NULL;

	key_file_problem[0] = '\0';
	fd = BasicOpenFile(path, O_RDONLY | PG_BINARY);
	if (fd < 0)
	{
		snprintf(key_file_problem, sizeof(key_file_problem),
				 "Could not open file \"%s\": %s.", path, strerror(errno));
		return NULL;
	}

	/* checked on the file opened, so it cannot change in between */
	if (fstat(fd, &st) != 0)
		snprintf(key_file_problem, sizeof(key_file_problem),
				 "Could not stat file \"%s\": %s.", path, strerror(errno));
	else if (!S_ISREG(st.st_mode))
		snprintf(key_file_problem, sizeof(key_file_problem),
				 "File \"%s\" is not a regular file.", path);
#if !defined(WIN32) && !defined(__CYGWIN__)
	else if (st.st_uid != geteuid() && st.st_uid != 0)
		snprintf(key_file_problem, sizeof(key_file_problem),
				 "File \"%s\" must be owned by the database user or root.",
				 path);
	else if ((st.st_uid == geteuid() && (st.st_mode & (S_IRWXG | S_IRWXO))) ||
			 (st.st_uid == 0 && (st.st_mode & (S_IWGRP | S_IXGRP | S_IRWXO))))
		snprintf(key_file_problem, sizeof(key_file_problem),
				 "File \"%s\" has group or world access. It must have permissions u=rw (0600) or less if owned by the database user, or permissions u=rw,g=r (0640) or less if owned by root.",
				 path);
#endif
	else
	{
		/* read until end of file or one byte past the limit */
		while (len <= MAX_KEY_FILE_BYTES)
		{
			ssize_t		n = read(fd, buf + len, MAX_KEY_FILE_BYTES + 1 - len);

			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0)
			{
				snprintf(key_file_problem, sizeof(key_file_problem),
						 "Could not read file \"%s\": %s.", path,
						 strerror(errno));
				break;
			}
			if (n == 0)
				break;
			len += n;
		}
	}
	close(fd);

	if (key_file_problem[0] == '\0')
	{
		if (len > MAX_KEY_FILE_BYTES)
			snprintf(key_file_problem, sizeof(key_file_problem),
					 "File \"%s\" is larger than %d bytes.", path,
					 MAX_KEY_FILE_BYTES);
		else
		{
			/* a final line break, LF or CRLF, is not part of the secret */
			if (len > 0 && buf[len - 1] == '\n')
				len--;
			if (len > 0 && buf[len - 1] == '\r')
				len--;
			for (ssize_t i = 0; i < len; i++)
			{
				unsigned char c = (unsigned char) buf[i];

				if (c < 0x20 || c == 0x7f)
				{
					snprintf(key_file_problem, sizeof(key_file_problem),
							 "File \"%s\" must hold the secret on one line, without control characters.",
							 path);
					break;
				}
			}
			if (key_file_problem[0] == '\0' && len == 0)
				snprintf(key_file_problem, sizeof(key_file_problem),
						 "File \"%s\" is empty.", path);
		}
	}

	if (key_file_problem[0] == '\0')
	{
		secret = extra_malloc(len + 1);
		if (secret == NULL)
			snprintf(key_file_problem, sizeof(key_file_problem),
					 "Out of memory while reading file \"%s\".", path);
		else
		{
			memcpy(secret, buf, len);
			secret[len] = '\0';
		}
	}
	explicit_bzero(buf, sizeof(buf));
	return secret;
}

/*
 * taptalk.server_key_file: read the file here, so that a file that cannot be
 * used is refused like any invalid value (at a reload the key in use stays),
 * and hand its secret to the assign hook as the setting's extra.
 */
static bool
check_server_key_file(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || (*newval)[0] == '\0')
		return true;			/* no file: the secret comes from the setting */

	*extra = read_key_file(*newval);
	if (*extra == NULL)
	{
		GUC_check_errcode(ERRCODE_CONFIG_FILE_ERROR);
		GUC_check_errdetail("%s", key_file_problem);
		return false;
	}
	return true;
}

static void
assign_server_key_file(const char *newval, void *extra)
{
	key_file_secret = (char *) extra;
	update_secret_in_effect(server_key_secret_setting);
}

static void
assign_server_key_secret(const char *newval, void *extra)
{
	update_secret_in_effect(newval);
}

/* SHOW, current_setting(): a mask when the secret is set, for every role */
static const char *
show_server_key_secret(void)
{
	if (server_key_secret_setting != NULL && server_key_secret_setting[0] != '\0')
		return TAPTALK_MASK;
	return "";
}

/* Whether text holds word, in any letter case. */
static bool
holds_word(const char *text, const char *word)
{
	size_t		len = strlen(word);

	for (const char *p = text; *p; p++)
	{
		if (pg_strncasecmp(p, word, len) == 0)
			return true;
	}
	return false;
}

/* Whether text names the setting, in any letter case. */
static bool
names_secret_setting(const char *text)
{
	return holds_word(text, "server_key_secret");
}

/* Whether text names a registered setting: all of its words, in any case. */
static bool
names_hidden_setting(const char *text, const HiddenSetting *hs)
{
	for (int i = 0; i < (int) lengthof(hs->words); i++)
	{
		if (hs->words[i] != NULL && !holds_word(text, hs->words[i]))
			return false;
	}
	return true;
}

/*
 * `text` with the password of every URL in it ("scheme://user:password@")
 * replaced by asterisks: a new palloc'd string, or `text` itself when there
 * is none.  The userinfo ends at the last "@" before the next "/", space or
 * quote, as a URL written with an unencoded "@" in its password would be
 * read by a person.
 */
static char *
mask_url_passwords(char *text)
{
	StringInfoData buf;
	const char *p = text;
	const char *scheme_end;
	bool		masked = false;

	initStringInfo(&buf);
	while ((scheme_end = strstr(p, "://")) != NULL)
	{
		const char *start = scheme_end + 3;
		size_t		span = strcspn(start, "/?# \t\n\"'");
		const char *at = NULL;
		const char *colon;

		for (const char *q = start; q < start + span; q++)
		{
			if (*q == '@')
				at = q;
		}
		colon = at ? memchr(start, ':', at - start) : NULL;
		if (colon == NULL || colon + 1 == at)
		{
			appendBinaryStringInfo(&buf, p, start - p);
			p = start;
			continue;
		}
		appendBinaryStringInfo(&buf, p, colon + 1 - p);
		appendStringInfoString(&buf, TAPTALK_MASK);
		p = at;
		masked = true;
	}
	if (!masked)
	{
		pfree(buf.data);
		return text;
	}
	appendStringInfoString(&buf, p);
	return buf.data;
}

/*
 * Drop *field when it lists a statement's bind parameters, as the server
 * logs them ("Parameters: $1 = ...", "... portal ... with parameters: ...").
 */
static void
drop_parameters(char **field)
{
	if (*field != NULL && holds_word(*field, "parameters: "))
		*field = NULL;
}

/* Mask the secret in effect, and the setting's value, in *field. */
static void
mask_field(char **field)
{
	if (*field == NULL)
		return;
	*field = taptalk_mask(*field, server_key_secret_setting);
	*field = taptalk_mask(*field, key_file_secret);
	for (int i = 0; i < n_hidden_settings; i++)
	{
		HiddenSetting *hs = &hidden_settings[i];

		for (int j = 0; j < MAX_HIDDEN_VALUES; j++)
		{
			/* a value of a few characters would mask half the message */
			if (hs->values[j] != NULL && *hs->values[j] != NULL &&
				strlen(*hs->values[j]) >= MIN_MASKED_VALUE)
				*field = taptalk_mask(*field, *hs->values[j]);
		}
		if (names_hidden_setting(*field, hs))
			*field = mask_url_passwords(*field);
	}
}

/*
 * Hide statements that name the setting the same way: the text of a
 * statement naming it is kept out of the log and replaced in a message by
 * hidden_statement, with its bind parameters.
 */
static void
hide_statement(ErrorData *edata, const char *hidden_statement)
{
	edata->hide_stmt = true;
	if (edata->message != NULL && debug_query_string[0] != '\0')
		edata->message = taptalk_replace(edata->message,
										 debug_query_string,
										 hidden_statement);
	/* its parameters may be the secret too */
	drop_parameters(&edata->detail);
	drop_parameters(&edata->detail_log);
	drop_parameters(&edata->context);
}

/*
 * Keep the secret out of the server log.  A configuration reload logs every
 * changed setting with its new value ("parameter ... changed to ...", in
 * the postmaster at LOG and in the other processes at DEBUG2), however the
 * setting's name is spelled in the file; the value is masked wherever it
 * appears, in any message.  The text of a statement that names the setting
 * (ALTER SYSTEM SET taptalk.server_key_secret = '...' carries a secret this
 * process does not know yet) is logged neither as the statement log line
 * nor as a message's STATEMENT, and its bind parameters are not logged.
 * What goes to the client is masked the same way.
 */
static void
mask_secret_hook(ErrorData *edata)
{
	mask_field(&edata->message);
	mask_field(&edata->detail);
	mask_field(&edata->detail_log);
	mask_field(&edata->hint);
	mask_field(&edata->context);
	mask_field(&edata->internalquery);

	if (debug_query_string != NULL && names_secret_setting(debug_query_string))
		hide_statement(edata, HIDDEN_STATEMENT);
	if (edata->internalquery != NULL && names_secret_setting(edata->internalquery))
		edata->internalquery = pstrdup(HIDDEN_STATEMENT);
	for (int i = 0; i < n_hidden_settings; i++)
	{
		HiddenSetting *hs = &hidden_settings[i];

		if (debug_query_string != NULL &&
			names_hidden_setting(debug_query_string, hs))
			hide_statement(edata, hs->hidden_statement);
		if (edata->internalquery != NULL &&
			names_hidden_setting(edata->internalquery, hs))
			edata->internalquery = pstrdup(hs->hidden_statement);
	}

	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

/*
 * `text` with every occurrence of `find` replaced by `with`: a new palloc'd
 * string, or `text` itself when `find` is not in it.
 */
char *
taptalk_replace(char *text, const char *find, const char *with)
{
	StringInfoData buf;
	const char *p = text;
	const char *hit;
	size_t		findlen;

	if (find == NULL || find[0] == '\0' || strstr(text, find) == NULL)
		return text;
	findlen = strlen(find);
	initStringInfo(&buf);
	while ((hit = strstr(p, find)) != NULL)
	{
		appendBinaryStringInfo(&buf, p, hit - p);
		appendStringInfoString(&buf, with);
		p = hit + findlen;
	}
	appendStringInfoString(&buf, p);
	return buf.data;
}

/*
 * `text` with every occurrence of `secret` replaced by asterisks: a new
 * palloc'd string, or `text` itself when there is nothing to mask.
 */
char *
taptalk_mask(char *text, const char *secret)
{
	return taptalk_replace(text, secret, TAPTALK_MASK);
}

/*
 * Keep another setting's secrets out of the log as the server key's are:
 * the strings that *value1 and *value2 point to whenever a message is
 * logged (either may be NULL) are masked in every message; a statement
 * whose text holds word1 and word2 (word2 may be NULL), in any letter case,
 * is logged as hidden_statement; and in a message holding both words, the
 * password of any URL is masked.  Call it from _PG_init, so that the
 * postmaster's hook knows it before any process starts.
 */
void
taptalk_hide_setting(const char *word1, const char *word2,
					 const char *hidden_statement,
					 char **value1, char **value2)
{
	HiddenSetting *hs;

	if (n_hidden_settings >= MAX_HIDDEN_SETTINGS)
		elog(ERROR, "too many hidden settings");
	hs = &hidden_settings[n_hidden_settings++];
	hs->words[0] = word1;
	hs->words[1] = word2;
	hs->hidden_statement = hidden_statement;
	hs->values[0] = value1;
	hs->values[1] = value2;
}

/*
 * Define the two settings and install the log hook.  In the postmaster at
 * server start, a key file that cannot be used stops the server, as an
 * unusable ssl_key_file does.
 */
void
taptalk_secret_init(void)
{
	const char *pending;

	/*
	 * The value postgresql.conf gives the file, if any, is a placeholder
	 * until the setting is defined; defining it only warns when the value
	 * is refused, so check it here first.
	 */
	pending = GetConfigOption(FILE_SETTING, true, false);
	if (process_shared_preload_libraries_in_progress && !IsUnderPostmaster &&
		pending != NULL && pending[0] != '\0')
	{
		char	   *path = pstrdup(pending);
		char	   *secret = read_key_file(path);

		if (secret == NULL)
			ereport(FATAL,
					(errcode(ERRCODE_CONFIG_FILE_ERROR),
					 errmsg("could not load the server key from \"%s\"", path),
					 errdetail_internal("%s", key_file_problem),
					 errhint("Correct \"%s\" or the file, or remove the setting.",
							 FILE_SETTING)));
		explicit_bzero(secret, strlen(secret));
		extra_free(secret);
		pfree(path);
	}

	DefineCustomStringVariable(SECRET_SETTING,
							   "Sets the Server Key Secret that authenticates requests to TapTalk.",
							   "Only superusers can set it; it is shown masked. "
							   "Ignored when \"" FILE_SETTING "\" is set.",
							   &server_key_secret_setting,
							   "",
							   PGC_SUSET,
							   GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE,
							   NULL, assign_server_key_secret,
							   show_server_key_secret);

	DefineCustomStringVariable(FILE_SETTING,
							   "Sets the file that holds the Server Key Secret.",
							   "The file must be owned by the database user with "
							   "permissions 0600 or less, or by root with 0640 or "
							   "less. When set, it is used instead of \""
							   SECRET_SETTING "\". It is read again at each reload.",
							   &server_key_file,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   check_server_key_file, assign_server_key_file,
							   NULL);

	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = mask_secret_hook;
}
