/*-------------------------------------------------------------------------
 *
 * taptalk.h
 *	  Declarations shared by the taptalk extension's source files: the
 *	  settings, the result of one auth ticket request, and the entry points
 *	  of request building, transport and response mapping.
 *
 *-------------------------------------------------------------------------
 */
#ifndef TAPTALK_H
#define TAPTALK_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "lib/stringinfo.h"
#include "utils/jsonb.h"

#if PG_VERSION_NUM < 150000
#error "taptalk requires PostgreSQL 15 or later"
#endif

#define TAPTALK_VERSION "1.2"

/* pg_b64_encode's source is const uint8 * from PostgreSQL 18 on */
#if PG_VERSION_NUM >= 180000
#define TAPTALK_B64_SRC(p) ((const uint8 *) (p))
#else
#define TAPTALK_B64_SRC(p) (p)
#endif

/* path of the Request Auth Ticket endpoint, appended to taptalk.base_url */
#define TAPTALK_AUTH_TICKET_PATH "/v1/server/auth_ticket/request"

/* a response body larger than this is cut off while reading */
#define TAPTALK_MAX_RESPONSE_BYTES (1024 * 1024)

/*
 * The largest request sent: each field at most TAPTALK_MAX_FIELD_BYTES of
 * UTF-8, the whole JSON body at most TAPTALK_MAX_BODY_BYTES.  A larger one
 * fails its check (40002) in every path.  The queue's worker does not even
 * read a stored request larger than TAPTALK_MAX_STORED_REQUEST_BYTES (only
 * a row written by hand can be), so its memory is bounded whatever the
 * queue holds.
 */
#define TAPTALK_MAX_FIELD_BYTES 4096
#define TAPTALK_MAX_BODY_BYTES 16384
#define TAPTALK_MAX_STORED_REQUEST_BYTES 65536

/* upper bound of taptalk.max_concurrency */
#define TAPTALK_MAX_CONCURRENCY 256

/* TapTalk's own code for a failed parameter check */
#define TAPTALK_CODE_PARAM_FAILED "40002"

/* codes of our own, for what happened on the way */
#define TAPTALK_CODE_TIMEOUT "TIMEOUT"
#define TAPTALK_CODE_CONNECTION_FAILED "CONNECTION_FAILED"
#define TAPTALK_CODE_HTTP_ERROR "HTTP_ERROR"
#define TAPTALK_CODE_INVALID_RESPONSE "INVALID_RESPONSE"
/* the queue's worker stopped while sending a request, too often */
#define TAPTALK_CODE_WORKER_STOPPED "WORKER_STOPPED"

/*
 * The outcome of one request, as returned to SQL.  A NULL pointer is a SQL
 * NULL.  Either user_id and ticket are set, or error_code is.
 */
typedef struct TaptalkResult
{
	char	   *user_id;
	char	   *ticket;
	char	   *error_code;
	char	   *error_field;
	char	   *error_message;
	long		http_status;	/* status of TapTalk's answer; 0 when none
								 * was read (not returned to SQL) */
	int64		retry_after_ms; /* the wait a 429's or 503's Retry-After
								 * asks for; 0 when none, or unusable (not
								 * returned to SQL) */
	TimestampTz sent_at;		/* when the attempt answered was sent; 0 when
								 * none was (not returned to SQL) */
	bool		not_sent;		/* taptalk.max_rate (ratelimit.c) left no
								 * send time within the request's timeout:
								 * this attempt was not sent (not returned) */
} TaptalkResult;

/* ratelimit.c: taptalk.max_rate, one budget for the whole server */
extern double taptalk_max_rate;
extern void taptalk_ratelimit_init(void);
/* a send time reserved, and what it replaced, to give it back */
typedef struct TaptalkRateTicket
{
	TimestampTz at;				/* 0: none */
	bool		shared;			/* taptalk.max_rate reserved it */
	bool		paced;			/* this process's pace reserved it */
	TimestampTz prev_shared;
	TimestampTz prev_pace;
} TaptalkRateTicket;

extern TimestampTz taptalk_rate_reserve(TimestampTz now, TimestampTz latest,
										TaptalkRateTicket *ticket);
extern void taptalk_rate_release(const TaptalkRateTicket *ticket);
extern void taptalk_rate_hold(TimestampTz until);
extern TimestampTz taptalk_rate_held(TimestampTz now);
extern int	taptalk_rate_room(int horizon_ms);
extern TimestampTz taptalk_rate_room_at(int horizon_ms);
extern void taptalk_rate_set_pace(double rate);

/* settings (taptalk.c) */
extern char *taptalk_base_url;
extern char *taptalk_server_key_id;
extern char *taptalk_server_key_secret;
extern char *taptalk_ca_file;
extern int	taptalk_timeout_ms;
extern int	taptalk_connect_timeout_ms;
extern int	taptalk_max_concurrency;
extern int	taptalk_max_retries;

/* taptalk.c */
extern void taptalk_require_preload(const char *detail);

/* what a masked secret or ticket is shown as */
#define TAPTALK_MASK "********"

/*
 * secret.c: the key file, the masked settings and the log mask.
 * taptalk_server_key_secret (above) is the secret in effect: the key file's
 * when taptalk.server_key_file is set, else taptalk.server_key_secret's.
 */
extern void taptalk_secret_init(void);
extern char *taptalk_mask(char *text, const char *secret);
extern char *taptalk_replace(char *text, const char *find, const char *with);

extern void taptalk_hide_setting(const char *word1, const char *word2,
								 const char *hidden_statement,
								 char **value1, char **value2);

/* proxy.c: taptalk.proxy, parsed by its check hook */
typedef enum TaptalkProxyType
{
	TAPTALK_PROXY_HTTP,
	TAPTALK_PROXY_HTTPS,
	TAPTALK_PROXY_SOCKS5H
} TaptalkProxyType;

typedef struct TaptalkProxy
{
	TaptalkProxyType type;
	char	   *url;			/* scheme://host:port, without credentials */
	char	   *name;			/* host:port, for messages */
	char	   *user;			/* decoded; NULL when none */
	char	   *password;		/* decoded; NULL when none */
	char	   *password_written;	/* as written in the setting */
	char	   *shown;			/* the setting with its password masked */
} TaptalkProxy;

extern char *taptalk_proxy_setting;
extern void taptalk_proxy_init(void);
extern const TaptalkProxy *taptalk_proxy(void);

/* acting as another role, with a safe search_path (queue.c) */
typedef struct TaptalkRoleSwitch
{
	Oid			userid;
	int			sec_context;
	int			nestlevel;
} TaptalkRoleSwitch;

extern void taptalk_become_role(Oid role, TaptalkRoleSwitch *saved);
extern void taptalk_restore_role(TaptalkRoleSwitch *saved);

/* request.c */
extern bool taptalk_build_request(Jsonb *request, StringInfo body,
								  TaptalkResult *failure);
extern const char *taptalk_jsonb_root_kind(Jsonb *jb);
extern void taptalk_require_object(Jsonb *request);

/* response.c */
extern void taptalk_map_response(long http_status, const char *body,
								 size_t len, TaptalkResult *result);
extern void taptalk_set_error(TaptalkResult *result, const char *code,
							  const char *field, const char *message);

/* encoding.c */
extern void taptalk_encoding_prepare(void);
extern char *taptalk_convert_encoding(const char *text, int len, int src,
									  int dest, bool replace);

/*
 * The paths a request can take, each with its own statistics (stats.c):
 * taptalk_auth_ticket, taptalk_auth_tickets and the queue's background
 * worker.  A new path is one more
 * entry here and its name in stats.c.
 */
typedef enum TaptalkPath
{
	TAPTALK_PATH_SINGLE,
	TAPTALK_PATH_BATCH,
	TAPTALK_PATH_QUEUE,
	TAPTALK_NUM_PATHS
} TaptalkPath;

/* stats.c */
extern void taptalk_stats_init(void);
extern void taptalk_stats_rejected(TaptalkPath path);
extern void taptalk_stats_attempt(TaptalkPath path, uint64 connections,
								  uint64 bytes_sent, uint64 bytes_received);
extern void taptalk_stats_finished(TaptalkPath path, const char *error_code,
								   int64 latency_us);
extern void taptalk_stats_abandoned(TaptalkPath path);
extern void taptalk_stats_rate_limited(TaptalkPath path);
extern void taptalk_stats_rate_wait(TaptalkPath path, int64 wait_us);
extern const char *taptalk_stats_error_name(const char *code);

/* transport.c */

/*
 * A source of requests for taptalk_transport_run.  next() fills body with the
 * next request to send, sets *id and returns TAPTALK_NEXT_REQUEST; it returns
 * TAPTALK_NEXT_LATER when it has nothing to send until a request in flight
 * finishes, and TAPTALK_NEXT_NONE when there are no more.  It may also settle
 * requests itself (validation failures) by calling the done callback.  done()
 * receives each finished request's result, whose strings live only until
 * done() returns.  Both run outside libcurl, so they may allocate and raise.
 */
typedef enum TaptalkNext
{
	TAPTALK_NEXT_NONE,
	TAPTALK_NEXT_REQUEST,
	TAPTALK_NEXT_LATER
} TaptalkNext;

typedef TaptalkNext (*taptalk_next_fn) (void *arg, int64 *id, StringInfo body);
typedef void (*taptalk_done_fn) (void *arg, int64 id, TaptalkResult *result);

extern void taptalk_transport_run(TaptalkPath path, taptalk_next_fn next,
								  taptalk_done_fn done, void *arg,
								  int concurrency, int max_retries);
extern void taptalk_transport_shutdown(void);

/* queue.c */
extern void taptalk_queue_check_callback(Oid callback, Oid roleid,
										 Oid result_type);
extern void taptalk_queue_call_callback(Oid callback, int64 id,
										Jsonb *request,
										const TaptalkResult *result,
										Oid result_type);

/* callback.c */
extern int	taptalk_callback_timeout_ms;
extern void taptalk_callback_init(void);
extern void taptalk_callback_new_transaction(void);
extern char *taptalk_run_callback(const char *callback, Oid role, int64 id,
								  Jsonb *request, const TaptalkResult *result,
								  Oid result_type);

/* claim.c: the worker's claims start from the index's start this often */
#define TAPTALK_FULL_CLAIM_MS 5000
extern char *taptalk_claim_sql(const char *table);
extern char *taptalk_claim_suspect_sql(const char *table);
extern void taptalk_claim_types(Oid *types);
extern void taptalk_claim_args(int want, int lease_ms, Datum *args);
extern void taptalk_claim_taken(int want, int n, const Oid *roles,
								const TimestampTz *ats, const int64 *ids);

/* pacing.c: how much the queue's worker sends, as TapTalk answers */
/*
 * the queue waits a Retry-After (a 429's: all sending; a 503's: its
 * request) at most this long
 */
#define TAPTALK_QUEUE_RETRY_AFTER_MAX_MS (10 * 60 * 1000)
extern bool taptalk_retryable(const TaptalkResult *result);
extern bool taptalk_rate_limited(const TaptalkResult *result);
extern double taptalk_backoff_ms(int attempts, int max_ms);
extern void taptalk_pacing_note(const TaptalkResult *result);
extern void taptalk_pacing_reload(void);
extern int	taptalk_pacing_allowance(int want, int in_flight, int claimed);
extern int	taptalk_pacing_concurrency(void);
extern bool taptalk_pacing_in_outage(void);
extern TimestampTz taptalk_pacing_outage_end(void);
extern long taptalk_pacing_outage_left(void);
extern TimestampTz taptalk_pacing_rate_end(void);
extern long taptalk_pacing_rate_left(void);

/* worker.c */
extern int	taptalk_worker_concurrency;
extern int	taptalk_max_attempts;
extern void taptalk_worker_init(void);
extern void taptalk_worker_wake(void);

#endif							/* TAPTALK_H */
