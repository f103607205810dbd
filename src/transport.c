/*-------------------------------------------------------------------------
 *
 * transport.c
 *	  HTTP transport for taptalk: libcurl inside a PostgreSQL backend.
 *
 * Every request, single or batched, goes through one libcurl multi handle
 * that lives as long as the backend, so its connection cache lets calls
 * reuse TCP and TLS connections.  Transfers are driven from our own loop:
 * between waits of at most POLL_INTERVAL_MS it checks for interrupts, so
 * query cancel and statement_timeout stop a request promptly with
 * PostgreSQL's own error, raised by CHECK_FOR_INTERRUPTS outside libcurl.
 * The libcurl callbacks never allocate with palloc, raise or jump: they copy
 * into bounded buffers and return an abort code when a bound is passed.
 * Whatever way the loop is left, a PG_FINALLY block detaches every transfer,
 * so handles stay reusable and nothing leaks.  Handles, the header list and
 * the buffers are kept for the next call; they are freed when a setting they
 * depend on changes and when the backend exits.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>

#include "common/base64.h"
#if PG_VERSION_NUM >= 150000
#include "common/pg_prng.h"
#endif
#include "miscadmin.h"
#include "storage/ipc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "taptalk.h"

/* longest wait inside libcurl before we look at interrupts again */
#define POLL_INTERVAL_MS 100

/* bound on the response headers, against a server that never stops */
#define MAX_HEADER_BYTES (64 * 1024)

/* buffers larger than this are released after use, not kept for reuse */
#define KEEP_BUFFER_BYTES (64 * 1024)

/* first retry waits about this long; each further one twice as long */
#define RETRY_BASE_DELAY_MS 100

#define USER_AGENT "taptalk/" TAPTALK_VERSION

/* One transfer slot: a reusable easy handle and its buffers. */
typedef struct Slot
{
	CURL	   *easy;
	bool		busy;			/* holds a request (running or awaiting retry) */
	bool		attached;		/* easy handle is in the multi handle */
	int			id;				/* the caller's id of the request */
	StringInfoData body;		/* request body (TopMemoryContext) */
	int			attempt;		/* 0 for the first try */
	TimestampTz deadline;		/* the whole request's timeout */
	TimestampTz retry_at;		/* when to try again; 0 when not waiting */

	/* filled by the libcurl callbacks; malloc'd, never palloc'd */
	char	   *resp;
	size_t		resp_len;
	size_t		resp_cap;
	bool		resp_overflow;
	bool		resp_nomem;
	size_t		header_bytes;
	bool		header_overflow;
	char		errbuf[CURL_ERROR_SIZE];
} Slot;

static bool curl_ready = false;
static CURLM *multi = NULL;

/* the settings the connection cache was built for, and the endpoint's URL */
static char *multi_base_url = NULL;
static char *multi_ca_file = NULL;
static char *multi_url = NULL;

/* results of finished attempts live here until handed to the caller */
static MemoryContext result_cxt = NULL;

static Slot **slots = NULL;		/* TopMemoryContext */
static int	nslots = 0;

/* the request headers, kept while the key they were built from is unchanged */
static struct curl_slist *cached_headers = NULL;
static char *cached_key_id = NULL;		/* malloc'd copies, wiped when freed */
static char *cached_key_secret = NULL;

/*
 * libcurl write callback: append to the slot's response, up to the bound.
 * Returning less than the given size makes libcurl abort the transfer.
 */
static size_t
collect_body(char *data, size_t size, size_t nmemb, void *userdata)
{
	Slot	   *slot = (Slot *) userdata;
	size_t		n = size * nmemb;

	if (n > TAPTALK_MAX_RESPONSE_BYTES - slot->resp_len)
	{
		slot->resp_overflow = true;
		return 0;
	}
	if (slot->resp_len + n > slot->resp_cap)
	{
		size_t		cap = slot->resp_cap ? slot->resp_cap : 4096;
		char	   *grown;

		while (cap < slot->resp_len + n)
			cap *= 2;
		if (cap > TAPTALK_MAX_RESPONSE_BYTES)
			cap = TAPTALK_MAX_RESPONSE_BYTES;
		grown = realloc(slot->resp, cap);
		if (grown == NULL)
		{
			slot->resp_nomem = true;
			return 0;
		}
		slot->resp = grown;
		slot->resp_cap = cap;
	}
	memcpy(slot->resp + slot->resp_len, data, n);
	slot->resp_len += n;
	return n;
}

/* libcurl header callback: only counts, to bound the headers' size. */
static size_t
count_headers(char *data, size_t size, size_t nmemb, void *userdata)
{
	Slot	   *slot = (Slot *) userdata;
	size_t		n = size * nmemb;

	slot->header_bytes += n;
	if (slot->header_bytes > MAX_HEADER_BYTES)
	{
		slot->header_overflow = true;
		return 0;
	}
	return n;
}

static void
free_slot_handles(void)
{
	for (int i = 0; i < nslots; i++)
	{
		Slot	   *slot = slots[i];

		if (slot->attached && multi != NULL)
			curl_multi_remove_handle(multi, slot->easy);
		slot->attached = false;
		slot->busy = false;
		if (slot->easy != NULL)
			curl_easy_cleanup(slot->easy);
		slot->easy = NULL;
		free(slot->resp);
		slot->resp = NULL;
		slot->resp_cap = 0;
		slot->resp_len = 0;
	}
}

static void
free_wiped(char *s)
{
	if (s != NULL)
	{
		explicit_bzero(s, strlen(s));
		free(s);
	}
}

static void
forget_headers(void)
{
	curl_slist_free_all(cached_headers);
	cached_headers = NULL;
	free_wiped(cached_key_id);
	free_wiped(cached_key_secret);
	cached_key_id = NULL;
	cached_key_secret = NULL;
}

/* Close every connection and free every libcurl handle. */
void
taptalk_transport_shutdown(void)
{
	free_slot_handles();
	forget_headers();
	if (multi != NULL)
		curl_multi_cleanup(multi);
	multi = NULL;
	free(multi_base_url);
	free(multi_ca_file);
	free(multi_url);
	multi_base_url = NULL;
	multi_ca_file = NULL;
	multi_url = NULL;
}

static void
transport_at_exit(int code, Datum arg)
{
	taptalk_transport_shutdown();
}

static bool
same_setting(const char *kept, const char *now)
{
	return strcmp(kept ? kept : "", now ? now : "") == 0;
}

/* The endpoint's URL, malloc'd: one slash between the base and the path. */
static char *
endpoint_url(const char *base)
{
	int			len = strlen(base);
	char	   *url;

	while (len > 0 && base[len - 1] == '/')
		len--;
	url = malloc(len + strlen(TAPTALK_AUTH_TICKET_PATH) + 1);
	if (url != NULL)
	{
		memcpy(url, base, len);
		strcpy(url + len, TAPTALK_AUTH_TICKET_PATH);
	}
	return url;
}

/*
 * Set the options that are the same for every request on a handle.  A
 * handle is replaced when the base URL or the CA file changes, so those are
 * set here too.
 */
static bool
setup_handle(Slot *slot)
{
	CURL	   *easy = slot->easy;
	CURLcode	rc = CURLE_OK;

#define SET(option, value) \
	do { if (rc == CURLE_OK) rc = curl_easy_setopt(easy, option, value); } while (0)

	SET(CURLOPT_URL, multi_url);
#if LIBCURL_VERSION_NUM >= 0x075500
	SET(CURLOPT_PROTOCOLS_STR, "http,https");
	SET(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
#else
	SET(CURLOPT_PROTOCOLS, (long) (CURLPROTO_HTTP | CURLPROTO_HTTPS));
	SET(CURLOPT_REDIR_PROTOCOLS, (long) (CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
	SET(CURLOPT_FOLLOWLOCATION, 0L);
	/* no proxy, not even one named by the server's environment */
	SET(CURLOPT_PROXY, "");
	SET(CURLOPT_NOSIGNAL, 1L);
	SET(CURLOPT_USERAGENT, USER_AGENT);
	SET(CURLOPT_POST, 1L);
	SET(CURLOPT_WRITEFUNCTION, collect_body);
	SET(CURLOPT_WRITEDATA, slot);
	SET(CURLOPT_HEADERFUNCTION, count_headers);
	SET(CURLOPT_HEADERDATA, slot);
	SET(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t) TAPTALK_MAX_RESPONSE_BYTES);
	SET(CURLOPT_SSL_VERIFYPEER, 1L);
	SET(CURLOPT_SSL_VERIFYHOST, 2L);
	if (multi_ca_file[0] != '\0')
		SET(CURLOPT_CAINFO, multi_ca_file);
	SET(CURLOPT_ERRORBUFFER, slot->errbuf);
	SET(CURLOPT_PRIVATE, slot);
#undef SET

	return rc == CURLE_OK;
}

/*
 * Make sure the multi handle and at least `concurrency` slots exist, and that
 * the connection cache was built for the current base URL and CA file: when
 * either changed, the old connections are closed rather than reused.
 */
static void
prepare_transport(int concurrency)
{
	if (!curl_ready)
	{
		if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("could not initialize libcurl")));
		on_proc_exit(transport_at_exit, (Datum) 0);
		curl_ready = true;
	}

	if (multi != NULL &&
		(!same_setting(multi_base_url, taptalk_base_url) ||
		 !same_setting(multi_ca_file, taptalk_ca_file)))
		taptalk_transport_shutdown();

	if (multi == NULL)
	{
		multi_base_url = strdup(taptalk_base_url ? taptalk_base_url : "");
		multi_ca_file = strdup(taptalk_ca_file ? taptalk_ca_file : "");
		multi_url = endpoint_url(multi_base_url ? multi_base_url : "");
		multi = curl_multi_init();
		if (multi == NULL || multi_base_url == NULL || multi_ca_file == NULL ||
			multi_url == NULL)
		{
			taptalk_transport_shutdown();
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory"),
					 errdetail("Could not create a libcurl multi handle.")));
		}
		/* keep idle connections for every slot that may run */
		curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, (long) TAPTALK_MAX_CONCURRENCY);
	}

	if (slots == NULL)
		slots = MemoryContextAllocZero(TopMemoryContext,
									   sizeof(Slot *) * TAPTALK_MAX_CONCURRENCY);
	if (result_cxt == NULL)
		result_cxt = AllocSetContextCreate(TopMemoryContext,
										   "taptalk results",
										   ALLOCSET_SMALL_SIZES);
	while (nslots < concurrency)
	{
		Slot	   *slot = MemoryContextAllocZero(TopMemoryContext, sizeof(Slot));
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		initStringInfo(&slot->body);
		MemoryContextSwitchTo(old);
		slots[nslots++] = slot;
	}
	for (int i = 0; i < concurrency; i++)
	{
		if (slots[i]->easy == NULL)
		{
			slots[i]->easy = curl_easy_init();
			if (slots[i]->easy == NULL)
				ereport(ERROR,
						(errcode(ERRCODE_OUT_OF_MEMORY),
						 errmsg("out of memory"),
						 errdetail("Could not create a libcurl handle.")));
			if (!setup_handle(slots[i]))
			{
				curl_easy_cleanup(slots[i]->easy);
				slots[i]->easy = NULL;
				ereport(ERROR,
						(errcode(ERRCODE_INTERNAL_ERROR),
						 errmsg("could not configure a libcurl handle")));
			}
		}
	}
}

/*
 * The request headers, Server-Key included.  Our copies of the key are
 * wiped; libcurl's copy lives in the list until the caller frees it.
 */
static pg_noinline struct curl_slist *
build_headers(void)
{
	struct curl_slist *list = NULL;
	struct curl_slist *next;
	const char *fixed[] = {
		"Content-Type: application/json",
		"Accept: application/json",
		"Expect:",				/* no 100-continue round trip */
	};
	char	   *pair;
	int			pair_len;
	char	   *header;
	int			enc_len;
	int			prefix = strlen("Server-Key: ");

	pair = psprintf("%s:%s", taptalk_server_key_id, taptalk_server_key_secret);
	pair_len = strlen(pair);
	header = palloc(prefix + pg_b64_enc_len(pair_len) + 1);
	memcpy(header, "Server-Key: ", prefix);
	enc_len = pg_b64_encode(TAPTALK_B64_SRC(pair), pair_len, header + prefix,
							pg_b64_enc_len(pair_len));
	explicit_bzero(pair, pair_len);
	pfree(pair);
	if (enc_len < 0)
	{
		pfree(header);
		elog(ERROR, "could not encode the server key");
	}
	header[prefix + enc_len] = '\0';

	list = curl_slist_append(NULL, header);
	explicit_bzero(header, prefix + enc_len);
	pfree(header);
	for (int i = 0; list != NULL && i < (int) lengthof(fixed); i++)
	{
		next = curl_slist_append(list, fixed[i]);
		if (next == NULL)
			curl_slist_free_all(list);
		list = next;
	}
	if (list == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory"),
				 errdetail("Could not build the request headers.")));
	return list;
}

/*
 * The headers for the current key: built again only when the key changed,
 * so a rotated key takes effect on the next call.
 */
static struct curl_slist *
current_headers(void)
{
	if (cached_headers != NULL &&
		strcmp(cached_key_id, taptalk_server_key_id) == 0 &&
		strcmp(cached_key_secret, taptalk_server_key_secret) == 0)
		return cached_headers;

	forget_headers();
	cached_headers = build_headers();
	cached_key_id = strdup(taptalk_server_key_id);
	cached_key_secret = strdup(taptalk_server_key_secret);
	if (cached_key_id == NULL || cached_key_secret == NULL)
	{
		forget_headers();
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	}
	return cached_headers;
}

static long
remaining_ms(TimestampTz deadline)
{
	TimestampTz now = GetCurrentTimestamp();

	if (now >= deadline)
		return 0;
	return (long) ((deadline - now) / 1000);
}

/*
 * Set up the slot's handle for an attempt and hand it to the multi handle.
 * Returns false, with the slot's error buffer set, when libcurl refuses.
 */
static bool
start_attempt(Slot *slot, struct curl_slist *headers)
{
	CURL	   *easy = slot->easy;
	long		budget = Max(remaining_ms(slot->deadline), 1);

	slot->resp_len = 0;
	slot->resp_overflow = false;
	slot->resp_nomem = false;
	slot->header_bytes = 0;
	slot->header_overflow = false;
	slot->errbuf[0] = '\0';
	slot->retry_at = 0;

	curl_easy_setopt(easy, CURLOPT_HTTPHEADER, headers);
	curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE, (long) slot->body.len);
	curl_easy_setopt(easy, CURLOPT_POSTFIELDS, slot->body.data);
	curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, budget);
	curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS,
					 Min((long) taptalk_connect_timeout_ms, budget));

	if (curl_multi_add_handle(multi, easy) != CURLM_OK)
	{
		strlcpy(slot->errbuf, "could not start the transfer", CURL_ERROR_SIZE);
		return false;
	}
	slot->attached = true;
	return true;
}

/* The libcurl error text of a finished transfer, never empty. */
static const char *
curl_message(Slot *slot, CURLcode rc)
{
	size_t		len = strlen(slot->errbuf);

	if (len == 0)
		return curl_easy_strerror(rc);
	while (len > 0 && slot->errbuf[len - 1] == '\n')
		slot->errbuf[--len] = '\0';
	return slot->errbuf;
}

/*
 * Whether a connection failure is one a new attempt may cure: the server
 * could not be reached, or went away.  A TLS verification failure is not.
 */
static bool
retryable_failure(CURLcode rc)
{
	switch (rc)
	{
		case CURLE_COULDNT_RESOLVE_HOST:
		case CURLE_COULDNT_CONNECT:
		case CURLE_SEND_ERROR:
		case CURLE_RECV_ERROR:
		case CURLE_GOT_NOTHING:
		case CURLE_PARTIAL_FILE:
			return true;
		default:
			return false;
	}
}

/*
 * Turn a finished attempt into a result.  Returns true when the attempt
 * failed in a way a retry may cure.
 */
static bool
map_attempt(Slot *slot, CURLcode rc, TaptalkResult *result)
{
	long		status = 0;

	if (slot->resp_nomem)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory"),
				 errdetail("Could not buffer the TapTalk response.")));

	if (rc == CURLE_OK)
	{
		curl_easy_getinfo(slot->easy, CURLINFO_RESPONSE_CODE, &status);
		taptalk_map_response(status, slot->resp ? slot->resp : "",
							 slot->resp_len, result);
		return (status == 502 || status == 503 || status == 504) &&
			result->error_code != NULL &&
			strcmp(result->error_code, TAPTALK_CODE_HTTP_ERROR) == 0;
	}

	if (slot->resp_overflow || rc == CURLE_FILESIZE_EXCEEDED)
	{
		taptalk_set_error(result, TAPTALK_CODE_INVALID_RESPONSE, NULL,
						  psprintf("response body exceeds %d bytes",
								   TAPTALK_MAX_RESPONSE_BYTES));
		return false;
	}
	if (slot->header_overflow)
	{
		taptalk_set_error(result, TAPTALK_CODE_INVALID_RESPONSE, NULL,
						  psprintf("response headers exceed %d bytes",
								   MAX_HEADER_BYTES));
		return false;
	}
	if (rc == CURLE_OPERATION_TIMEDOUT)
	{
		curl_off_t	pretransfer = 0;

		curl_easy_getinfo(slot->easy, CURLINFO_PRETRANSFER_TIME_T, &pretransfer);
		if (pretransfer == 0 && remaining_ms(slot->deadline) > 0)
		{
			/* the connect timeout passed, with time left for another try */
			taptalk_set_error(result, TAPTALK_CODE_CONNECTION_FAILED, NULL,
							  psprintf("could not connect to TapTalk within %d ms",
									   taptalk_connect_timeout_ms));
			return true;
		}
		taptalk_set_error(result, TAPTALK_CODE_TIMEOUT, NULL,
						  psprintf("no response from TapTalk within %d ms",
								   taptalk_timeout_ms));
		return false;
	}
	if (rc == CURLE_WEIRD_SERVER_REPLY || rc == CURLE_BAD_CONTENT_ENCODING)
	{
		taptalk_set_error(result, TAPTALK_CODE_INVALID_RESPONSE, NULL,
						  psprintf("malformed HTTP response: %s",
								   curl_message(slot, rc)));
		return false;
	}

	taptalk_set_error(result, TAPTALK_CODE_CONNECTION_FAILED, NULL,
					  curl_message(slot, rc));
	return retryable_failure(rc);
}

/*
 * When to try a failed attempt again, or 0 for no retry: exponential backoff
 * with jitter, only while the request's timeout leaves room for it.
 */
static TimestampTz
retry_time(Slot *slot)
{
	long		delay_ms;

	if (slot->attempt >= taptalk_max_retries)
		return 0;
	delay_ms = (long) RETRY_BASE_DELAY_MS << Min(slot->attempt, 10);
	/* jitter in [delay/2, delay), so that backends do not retry in step */
#if PG_VERSION_NUM >= 150000
	delay_ms = delay_ms / 2 +
		(long) pg_prng_uint64_range(&pg_global_prng_state, 0, delay_ms / 2 - 1);
#else
	delay_ms = delay_ms / 2 + random() % (delay_ms / 2);
#endif
	if (delay_ms + 10 >= remaining_ms(slot->deadline))
		return 0;
	return TimestampTzPlusMilliseconds(GetCurrentTimestamp(), delay_ms);
}

/* Detach a slot's handle and release an oversized buffer. */
static void
release_slot(Slot *slot)
{
	if (slot->attached)
		curl_multi_remove_handle(multi, slot->easy);
	slot->attached = false;
	slot->busy = false;
	slot->retry_at = 0;
	if (slot->resp_cap > KEEP_BUFFER_BYTES)
	{
		free(slot->resp);
		slot->resp = NULL;
		slot->resp_cap = 0;
	}
	slot->resp_len = 0;
	if (slot->body.maxlen > KEEP_BUFFER_BYTES)
	{
		pfree(slot->body.data);
		slot->body.data = MemoryContextAlloc(TopMemoryContext, 1024);
		slot->body.maxlen = 1024;
	}
	resetStringInfo(&slot->body);
}

/* Report a request that libcurl refused to start, and free its slot. */
static void
settle_start_failure(Slot *slot, taptalk_done_fn done, void *arg)
{
	TaptalkResult result;

	taptalk_set_error(&result, TAPTALK_CODE_CONNECTION_FAILED, NULL,
					  slot->errbuf);
	release_slot(slot);
	done(arg, slot->id, &result);
}

static Slot *
free_slot(int concurrency)
{
	for (int i = 0; i < concurrency; i++)
	{
		if (!slots[i]->busy)
			return slots[i];
	}
	return NULL;
}

/*
 * Send the requests that next() produces, at most `concurrency` at a time,
 * and hand each result to done().  Returns when every request has finished;
 * raises only for interrupts, configuration errors and out of memory, after
 * detaching every transfer.
 */
void
taptalk_transport_run(taptalk_next_fn next, taptalk_done_fn done, void *arg,
					  int concurrency)
{
	struct curl_slist *headers;

	Assert(concurrency >= 1 && concurrency <= TAPTALK_MAX_CONCURRENCY);

	prepare_transport(concurrency);
	headers = current_headers();

	PG_TRY();
	{
		bool		exhausted = false;
		int			busy = 0;

		for (;;)
		{
			CURLMsg    *msg;
			int			left;
			int			running;
			TimestampTz now;
			long		wait_ms = POLL_INTERVAL_MS;

			/* fill the free slots with new requests */
			while (!exhausted && busy < concurrency)
			{
				Slot	   *slot = free_slot(concurrency);

				resetStringInfo(&slot->body);
				if (!next(arg, &slot->id, &slot->body))
				{
					exhausted = true;
					break;
				}
				slot->busy = true;
				busy++;
				slot->attempt = 0;
				slot->deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
															 taptalk_timeout_ms);
				if (!start_attempt(slot, headers))
				{
					settle_start_failure(slot, done, arg);
					busy--;
				}
			}
			if (busy == 0)
				break;

			/* restart the retries that are due; note the next one */
			now = GetCurrentTimestamp();
			for (int i = 0; i < concurrency; i++)
			{
				Slot	   *slot = slots[i];

				if (!slot->busy || slot->retry_at == 0)
					continue;
				if (slot->retry_at <= now)
				{
					slot->attempt++;
					if (!start_attempt(slot, headers))
					{
						settle_start_failure(slot, done, arg);
						busy--;
					}
				}
				else
					wait_ms = Min(wait_ms,
								  (long) ((slot->retry_at - now) / 1000) + 1);
			}

			curl_multi_perform(multi, &running);

			while ((msg = curl_multi_info_read(multi, &left)) != NULL)
			{
				Slot	   *slot;
				TaptalkResult result;
				MemoryContext old;

				if (msg->msg != CURLMSG_DONE)
					continue;
				curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &slot);
				curl_multi_remove_handle(multi, slot->easy);
				slot->attached = false;

				old = MemoryContextSwitchTo(result_cxt);
				if (map_attempt(slot, msg->data.result, &result) &&
					(slot->retry_at = retry_time(slot)) != 0)
				{
					MemoryContextSwitchTo(old);
					MemoryContextReset(result_cxt);
					wait_ms = Min(wait_ms, RETRY_BASE_DELAY_MS / 2);
					continue;
				}
				MemoryContextSwitchTo(old);
				release_slot(slot);
				busy--;
				done(arg, slot->id, &result);
				MemoryContextReset(result_cxt);
			}

			CHECK_FOR_INTERRUPTS();

			if (busy > 0)
				curl_multi_poll(multi, NULL, 0, (int) Max(wait_ms, 1), NULL);

			CHECK_FOR_INTERRUPTS();
		}
	}
	PG_FINALLY();
	{
		for (int i = 0; i < nslots; i++)
		{
			if (slots[i]->busy || slots[i]->attached)
				release_slot(slots[i]);
		}
		MemoryContextReset(result_cxt);
	}
	PG_END_TRY();
}
