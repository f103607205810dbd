/*-------------------------------------------------------------------------
 *
 * transport.c
 *	  HTTP transport for taptalk: libcurl inside a PostgreSQL backend.
 *
 * Every request, single or batched, goes through one libcurl multi handle
 * that lives as long as the backend, so its connection cache lets calls
 * reuse TCP and TLS connections.
 *
 * We wait the way the server waits.  libcurl tells us, through its socket
 * and timer callbacks, which sockets it needs watched and when it next needs
 * to run; the sockets are kept in one epoll descriptor of our own, and that
 * single descriptor sits in a WaitEventSet beside the process latch and
 * postmaster death.  So a query cancel, statement_timeout or terminate wakes
 * the loop at once (the signal handlers set the latch), a dead postmaster
 * ends the backend, and pg_stat_activity shows a wait event while a request
 * is in flight.  A transfer slot freed by a finished request is refilled
 * before the next wait, so a batch keeps every slot busy.
 *
 * libcurl never sees an ERROR: its callbacks never allocate with palloc,
 * raise or jump; they copy into bounded buffers and return an abort code
 * when a bound is passed.  Interrupts are checked after libcurl returns, and
 * whatever way the loop is left, a PG_FINALLY block detaches every transfer
 * without allocating, so handles stay reusable and nothing leaks.  Name
 * lookups run in libcurl's resolver threads; CURLOPT_QUICK_EXIT lets a
 * transfer be abandoned without joining a thread stuck in getaddrinfo, and
 * signals are blocked while libcurl runs, so those threads never run the
 * server's signal handlers.  libcurl's sockets are counted with
 * AcquireExternalFD, so cached connections cannot exhaust the backend's
 * file descriptors; see "Counting libcurl's sockets" below for how the
 * count stays exact with libcurl versions that close some sockets without
 * telling us.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <curl/curl.h>

#include "common/base64.h"
#if PG_VERSION_NUM >= 150000
#include "common/pg_prng.h"
#endif
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/fd.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#if PG_VERSION_NUM >= 180000
#include "storage/waiteventset.h"
#endif
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "taptalk.h"

/* bound on the response headers, against a server that never stops */
#define MAX_HEADER_BYTES (64 * 1024)

/* buffers larger than this are released after use, not kept for reuse */
#define KEEP_BUFFER_BYTES (64 * 1024)

/* first retry waits about this long; each further one twice as long */
#define RETRY_BASE_DELAY_MS 100
/*
 * A Retry-After beyond this is absurd and ignored; one within it is waited
 * at most RETRY_AFTER_MAX_MS by this module's own retries (the worker has
 * its own bound)
 */
#define RETRY_AFTER_SANE_S (24 * 60 * 60)
#define RETRY_AFTER_MAX_MS (60 * 1000)

/* an attempt is sent only with at least this much of its timeout left */
#define SEND_MARGIN_MS 10

/*
 * Longest single wait.  libcurl's timer always covers a transfer in flight
 * (its timeout); this only bounds the damage should it ever not.
 */
#define MAX_WAIT_MS 1000

/* socket events taken from the epoll descriptor per pass */
#define MAX_SOCKET_EVENTS 64

#define USER_AGENT "taptalk/" TAPTALK_VERSION

/* One transfer slot: a reusable easy handle and its buffers. */
typedef struct Slot
{
	CURL	   *easy;
	bool		busy;			/* holds a request (running or awaiting retry) */
	bool		attached;		/* easy handle is in the multi handle */
	int64		id;				/* the caller's id of the request */
	StringInfoData body;		/* request body (TopMemoryContext) */
	int			attempt;		/* 0 for the first try */
	TimestampTz started;		/* when its first attempt started */
	TimestampTz deadline;		/* the request's timeout, retries included */
	TimestampTz retry_at;		/* when to try again; 0 when not waiting */
	bool		reserved;		/* retry_at is the send time the rate limit
								 * gave this attempt (ratelimit.c) */
	TimestampTz attempt_at;		/* when the current attempt was sent */
	TaptalkRateTicket ticket;	/* the send time reserved, while reserved */

	/* filled by the libcurl callbacks; malloc'd, never palloc'd */
	char	   *resp;
	size_t		resp_len;
	size_t		resp_cap;
	bool		resp_overflow;
	bool		resp_nomem;
	size_t		header_bytes;
	bool		header_overflow;
	int64		retry_after_ms; /* the final answer's Retry-After; 0: none */
	bool		no_fds;			/* no file descriptor was left for a socket */
	bool		socket_nomem;	/* no memory to note a socket as counted */
	bool		switching;		/* the server answered 101, not asked for */
	int			unconfirmed;	/* counted sockets this slot's transfer opened
								 * and that are not yet known to outlive it */
	bool		connect_capped; /* the budget, not connect_timeout, bounds
								 * connecting */
	char		errbuf[CURL_ERROR_SIZE];
} Slot;

static bool curl_ready = false;
static CURLM *multi = NULL;

/* the settings the connection cache was built for, and the endpoint's URL */
static char *multi_base_url = NULL;
static char *multi_ca_file = NULL;
static char *multi_proxy = NULL;		/* taptalk.proxy, wiped when freed */
static char *multi_proxy_name = NULL;	/* its host:port; NULL for none */
static char *multi_url = NULL;

/* results of finished attempts live here until handed to the caller */
static MemoryContext result_cxt = NULL;

static Slot **slots = NULL;		/* TopMemoryContext */

/* retries allowed per request in the current run */
static int	run_max_retries = 0;
static int	nslots = 0;

/* the request headers, kept while the key they were built from is unchanged */
static struct curl_slist *cached_headers = NULL;
static char *cached_key_id = NULL;		/* malloc'd copies, wiped when freed */
static char *cached_key_secret = NULL;

/*
 * What we wait on: libcurl's sockets in one epoll descriptor, which sits in
 * a WaitEventSet with the latch and postmaster death; libcurl's timer is a
 * point in time we wait until.  A failed epoll_ctl in the socket callback is
 * kept in socket_errno and reported after libcurl returns.
 */
static int	socket_set = -1;
static WaitEventSet *wait_set = NULL;
static uint32 wait_event_info = 0;
static bool timer_armed = false;
static TimestampTz timer_at = 0;
static int	socket_errno = 0;

/* every signal, blocked while libcurl runs (it may start resolver threads) */
static sigset_t all_signals;

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

/*
 * The status code of a status line ("HTTP/1.1 101 Switching Protocols"),
 * or 0 when the line is not one.  libcurl hands each response's status
 * line, interim ones included, to the header callback.
 */
static int
status_line_code(const char *line, size_t len)
{
	size_t		i = 5;

	if (len < 5 || memcmp(line, "HTTP/", 5) != 0)
		return 0;
	while (i < len && line[i] != ' ')
		i++;
	if (i + 4 > len || !isdigit((unsigned char) line[i + 1]) ||
		!isdigit((unsigned char) line[i + 2]) ||
		!isdigit((unsigned char) line[i + 3]))
		return 0;
	return (line[i + 1] - '0') * 100 + (line[i + 2] - '0') * 10 +
		(line[i + 3] - '0');
}

/*
 * The wait, in ms from now, that a Retry-After header's value asks for (RFC
 * 9110 section 10.2.3): delta-seconds, or an HTTP-date, which libcurl's
 * curl_getdate() reads.  0 when the value is neither, a date already past,
 * or absurd (beyond RETRY_AFTER_SANE_S).  Runs in the header callback:
 * raises nothing.
 */
static int64
parse_retry_after(const char *value, size_t len)
{
	char		buf[128];
	int64		secs = 0;

	while (len > 0 && (*value == ' ' || *value == '\t'))
		value++, len--;
	while (len > 0 && (value[len - 1] == '\r' || value[len - 1] == '\n' ||
					   value[len - 1] == ' ' || value[len - 1] == '\t'))
		len--;
	if (len == 0 || len >= sizeof(buf))
		return 0;
	if (isdigit((unsigned char) value[0]))
	{
		for (size_t i = 0; i < len; i++)
		{
			if (!isdigit((unsigned char) value[i]))
				return 0;
			secs = secs * 10 + (value[i] - '0');
			if (secs > RETRY_AFTER_SANE_S)
				return 0;
		}
	}
	else if (isalpha((unsigned char) value[0]))
	{
		time_t		when;

		memcpy(buf, value, len);
		buf[len] = '\0';
		when = curl_getdate(buf, NULL);
		if (when == -1)
			return 0;
		secs = (int64) when - (int64) time(NULL);
		if (secs <= 0 || secs > RETRY_AFTER_SANE_S)
			return 0;
	}
	return secs * 1000;
}

/*
 * libcurl header callback: bound the headers' size, note the final answer's
 * Retry-After, and stop at a
 * "101 Switching Protocols" that we never asked for (we send no Upgrade).
 * libcurl would take everything after it for a body without a length and
 * wait for the connection to close, up to taptalk.timeout.  Other interim
 * answers (100 Continue, 102, 103 Early Hints) are read past by libcurl, as
 * RFC 9110 section 15.2 asks of a client, and the final answer decides.
 */
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
	switch (status_line_code(data, n))
	{
		case 0:
			if (n > 12 && pg_strncasecmp(data, "Retry-After:", 12) == 0)
				slot->retry_after_ms = parse_retry_after(data + 12, n - 12);
			break;
		case 101:
			slot->switching = true;
			return 0;
		default:
			/* a new answer (after an interim one): its own headers count */
			slot->retry_after_ms = 0;
			break;
	}
	return n;
}

/*
 * Counting libcurl's sockets
 *
 * Every socket libcurl uses for a connection is opened by
 * open_counted_socket, which first takes a slot with AcquireExternalFD, so
 * that libcurl's sockets and the backend's own files (fd.c, libpq for
 * dblink and postgres_fdw) share max_files_per_process without running out.
 * The slot must be given back exactly once when the socket is closed.
 *
 * libcurl is supposed to close every such socket through
 * CURLOPT_CLOSESOCKETFUNCTION, but libcurl 7.88.0 to 8.1.2 do not for a
 * socket whose connect has not completed: cf_socket_close() in
 * lib/cf-socket.c calls sclose() directly for a socket it never made
 * "active" (a connect timeout, a transfer removed or a multi handle cleaned
 * up while connecting, the losing attempt of happy eyeballs).  libcurl 8.2.0
 * fixed it (commit a70d97c46c, "cf-socket: don't bypass fclosesocket
 * callback if cancelled before connect").  Debian 12 ships 7.88.1, so the
 * callback alone would leak one slot per abandoned connect; 7.87.0 and
 * earlier closed through the callback (Curl_closesocket), as 8.2.0 and later
 * do.  We checked the sources of 7.88.1, 8.0.0, 8.1.0, 8.1.2, 8.2.0, 8.5.0
 * and 8.10.0, and ran 7.88.1.
 *
 * So we never rely on the close callback alone.  Each counted socket is
 * noted, by descriptor number, with its identity: the device and inode
 * that fstat() reports for it when it is opened (a socket's inode number is
 * the kernel's, unique among the process's open files).  A slot is given
 * back when the first of these sees the socket gone:
 *
 *	- the close callback, for a socket still noted (the normal way);
 *	- open_counted_socket, when the number libcurl is handed is still noted:
 *	  the socket noted under it was closed behind our back;
 *	- reconcile_sockets, which checks the noted sockets with fstat(): a
 *	  number that is closed (EBADF) or now names another file (another
 *	  identity: someone else, fd.c or a resolver thread, opened a file that
 *	  got the number) is given back.  It runs when a transfer ends, for the
 *	  sockets that transfer opened; at the end of each run and after a
 *	  shutdown, for all; and when AcquireExternalFD refuses, before giving up.
 *
 * Whichever comes first forgets the note, so no slot is given back twice;
 * reconciliation only reads and never closes a descriptor, so a number that
 * now belongs to someone else is left alone.  A socket that libcurl loses
 * track of without closing stays open and stays counted, as it should.
 *
 * A socket still open when the transfer that opened it ends has connected
 * (libcurl closes the attempts that did not before a transfer ends), so
 * from then on the close callback sees it close; it is no longer checked
 * after each transfer, only at the end of a run.
 */
typedef struct CountedSocket
{
	bool		counted;		/* this number holds a slot of ours */
	dev_t		dev;			/* the socket's identity when opened */
	ino_t		ino;
	Slot	   *opener;			/* the slot whose transfer opened it, until
								 * it is seen open after that transfer */
} CountedSocket;

static CountedSocket *counted_sockets = NULL;	/* malloc'd, by number */
static int	counted_size = 0;

/* Give back the slot of a noted socket and forget it. */
static void
forget_socket(int fd)
{
	CountedSocket *cs = &counted_sockets[fd];

	Assert(cs->counted);
	if (cs->opener != NULL)
		cs->opener->unconfirmed--;
	cs->counted = false;
	cs->opener = NULL;
	ReleaseExternalFD();
}

static bool
socket_noted(int fd)
{
	return fd >= 0 && fd < counted_size && counted_sockets[fd].counted;
}

/*
 * Give back the slots of noted sockets that are gone: all of them, or only
 * those that the transfer of `opener` opened, which are then no longer
 * checked after each transfer if still open.  Returns how many were given
 * back.  Never allocates, raises or closes anything: it runs in libcurl's
 * callbacks and in cleanup.
 */
static int
reconcile_sockets(Slot *opener)
{
	int			released = 0;

	if (opener != NULL && opener->unconfirmed == 0)
		return 0;
	for (int fd = 0; fd < counted_size; fd++)
	{
		CountedSocket *cs = &counted_sockets[fd];
		struct stat st;

		if (!cs->counted || (opener != NULL && cs->opener != opener))
			continue;
		if (fstat(fd, &st) == 0 && st.st_dev == cs->dev && st.st_ino == cs->ino)
		{
			if (opener != NULL)
			{
				opener->unconfirmed--;
				cs->opener = NULL;
			}
			continue;
		}
		forget_socket(fd);
		released++;
	}
	return released;
}

/* Note a counted socket; false when there is no memory for the note. */
static bool
note_socket(int fd, Slot *opener)
{
	struct stat st;
	CountedSocket *cs;

	if (fd >= counted_size)
	{
		int			size = Max(counted_size, 64);
		CountedSocket *grown;

		while (size <= fd)
			size *= 2;
		grown = realloc(counted_sockets, sizeof(CountedSocket) * size);
		if (grown == NULL)
			return false;
		memset(grown + counted_size, 0,
			   sizeof(CountedSocket) * (size - counted_size));
		counted_sockets = grown;
		counted_size = size;
	}
	if (fstat(fd, &st) != 0)
		return false;

	/* the number is ours again: the socket noted under it was closed */
	if (counted_sockets[fd].counted)
		forget_socket(fd);

	cs = &counted_sockets[fd];
	cs->counted = true;
	cs->dev = st.st_dev;
	cs->ino = st.st_ino;
	cs->opener = opener;
	opener->unconfirmed++;
	return true;
}

/*
 * libcurl open-socket callback: open the socket ourselves, counted against
 * the backend's file descriptors, and refuse when none is left (the attempt
 * then fails as CONNECTION_FAILED instead of starving the backend).
 */
static curl_socket_t
open_counted_socket(void *clientp, curlsocktype purpose,
					struct curl_sockaddr *address)
{
	Slot	   *slot = (Slot *) clientp;
	int			fd;

	/* before refusing, give back what sockets closed silently still hold */
	if (!AcquireExternalFD() &&
		(reconcile_sockets(NULL) == 0 || !AcquireExternalFD()))
	{
		slot->no_fds = true;
		return CURL_SOCKET_BAD;
	}
	fd = socket(address->family, address->socktype | SOCK_CLOEXEC,
				address->protocol);
	if (fd < 0)
	{
		ReleaseExternalFD();
		return CURL_SOCKET_BAD;
	}
	if (!note_socket(fd, slot))
	{
		close(fd);
		ReleaseExternalFD();
		slot->socket_nomem = true;
		return CURL_SOCKET_BAD;
	}
	return fd;
}

/*
 * libcurl close-socket callback: the counterpart of open_counted_socket.
 * libcurl only closes sockets that it opened through open_counted_socket,
 * but the slot is given back only for a socket still noted: one that
 * reconciliation found gone already was given back then.
 */
static int
close_counted_socket(void *clientp, curl_socket_t fd)
{
	int			rc;

	if (socket_noted(fd))
		forget_socket(fd);
	rc = close(fd);
	return rc;
}

/*
 * libcurl socket callback: keep the epoll descriptor's interest in a socket
 * in step with what libcurl wants to know about it.
 */
static int
watch_socket(CURL *easy, curl_socket_t fd, int what, void *clientp,
			 void *socketp)
{
	struct epoll_event ev;

	if (what == CURL_POLL_REMOVE)
	{
		/* a socket closed already has left the set by itself */
		if (epoll_ctl(socket_set, EPOLL_CTL_DEL, fd, NULL) < 0 &&
			errno != ENOENT && errno != EBADF)
		{
			socket_errno = errno;
			return -1;
		}
		return 0;
	}

	memset(&ev, 0, sizeof(ev));
	ev.data.fd = fd;
	if (what & CURL_POLL_IN)
		ev.events |= EPOLLIN;
	if (what & CURL_POLL_OUT)
		ev.events |= EPOLLOUT;
	if (epoll_ctl(socket_set, EPOLL_CTL_MOD, fd, &ev) == 0)
		return 0;
	if (errno == ENOENT && epoll_ctl(socket_set, EPOLL_CTL_ADD, fd, &ev) == 0)
		return 0;
	socket_errno = errno;
	return -1;
}

/* libcurl timer callback: when libcurl next wants to run, or never (-1). */
static int
set_timer(CURLM *m, long timeout_ms, void *clientp)
{
	timer_armed = (timeout_ms >= 0);
	if (timer_armed)
		timer_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), timeout_ms);
	return 0;
}

/*
 * Let libcurl act on a socket (or on its timer, with CURL_SOCKET_TIMEOUT),
 * with every signal blocked so that a resolver thread it starts inherits a
 * mask that keeps the server's signal handlers out of it.  Signals that
 * arrive meanwhile are delivered when the mask is restored.
 */
static void
drive_curl(curl_socket_t fd, int mask)
{
	sigset_t	saved;
	CURLMcode	rc;
	int			running;

	pthread_sigmask(SIG_SETMASK, &all_signals, &saved);
	rc = curl_multi_socket_action(multi, fd, mask, &running);
	pthread_sigmask(SIG_SETMASK, &saved, NULL);

	/* a socket libcurl has just let go of is not an error */
	if (rc != CURLM_OK && rc != CURLM_BAD_SOCKET)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("libcurl failed to run a transfer: %s",
						curl_multi_strerror(rc))));
	if (socket_errno != 0)
	{
		errno = socket_errno;
		socket_errno = 0;
		ereport(ERROR,
				(errcode_for_socket_access(),
				 errmsg("could not watch a socket for libcurl: %m")));
	}
}

/*
 * Run libcurl on what is ready: each socket the epoll descriptor reports,
 * then its timer if that is due.  Never waits.
 */
static void
drive_ready(void)
{
	struct epoll_event events[MAX_SOCKET_EVENTS];
	int			n;

	do
	{
		n = epoll_wait(socket_set, events, MAX_SOCKET_EVENTS, 0);
		if (n < 0)
		{
			if (errno == EINTR)
				continue;
			ereport(ERROR,
					(errcode_for_socket_access(),
					 errmsg("could not poll libcurl's sockets: %m")));
		}
		for (int i = 0; i < n; i++)
		{
			int			mask = 0;

			if (events[i].events & EPOLLIN)
				mask |= CURL_CSELECT_IN;
			if (events[i].events & EPOLLOUT)
				mask |= CURL_CSELECT_OUT;
			if (events[i].events & (EPOLLERR | EPOLLHUP))
				mask |= CURL_CSELECT_ERR;
			drive_curl(events[i].data.fd, mask);
		}
	} while (n == MAX_SOCKET_EVENTS);

	if (timer_armed && timer_at <= GetCurrentTimestamp())
	{
		timer_armed = false;
		drive_curl(CURL_SOCKET_TIMEOUT, 0);
	}
}

static void
free_slot_handles(void)
{
	for (int i = 0; i < nslots; i++)
	{
		Slot	   *slot = slots[i];

		/* nothing to be done about a failure here; the handle goes anyway */
		if (slot->attached && multi != NULL)
			(void) curl_multi_remove_handle(multi, slot->easy);
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
	(void) reconcile_sockets(NULL);
	timer_armed = false;
	free(multi_base_url);
	free(multi_ca_file);
	free_wiped(multi_proxy);
	free(multi_proxy_name);
	free(multi_url);
	multi_base_url = NULL;
	multi_ca_file = NULL;
	multi_proxy = NULL;
	multi_proxy_name = NULL;
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
 * handle is replaced when the base URL, the CA file or the proxy changes,
 * so those are set here too.  On failure, *option names the option libcurl
 * refused.
 */
static CURLcode
setup_handle(Slot *slot, const char **option)
{
	CURL	   *easy = slot->easy;
	const TaptalkProxy *proxy = taptalk_proxy();
	CURLcode	rc;

#define SET(name, value) \
	do { \
		if ((rc = curl_easy_setopt(easy, name, value)) != CURLE_OK) \
		{ \
			*option = #name; \
			return rc; \
		} \
	} while (0)

	SET(CURLOPT_URL, multi_url);
#if LIBCURL_VERSION_NUM >= 0x075500
	SET(CURLOPT_PROTOCOLS_STR, "http,https");
	SET(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
#else
	SET(CURLOPT_PROTOCOLS, (long) (CURLPROTO_HTTP | CURLPROTO_HTTPS));
	SET(CURLOPT_REDIR_PROTOCOLS, (long) (CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
	SET(CURLOPT_FOLLOWLOCATION, 0L);

	/*
	 * The proxy of taptalk.proxy, or none: never one named by the server's
	 * environment (http_proxy, HTTPS_PROXY, ALL_PROXY, NO_PROXY).  An empty
	 * CURLOPT_NOPROXY keeps libcurl from reading NO_PROXY, which would
	 * bypass the proxy.  The credentials go separately, decoded, so the URL
	 * libcurl holds (and may quote in a message) has no password.  HTTPS
	 * to TapTalk goes through CONNECT, TLS end to end, verified as without
	 * a proxy; an https:// proxy's own certificate is verified against the
	 * same CA file.
	 */
	if (proxy == NULL)
		SET(CURLOPT_PROXY, "");
	else
	{
		SET(CURLOPT_PROXY, proxy->url);
		SET(CURLOPT_PROXYTYPE,
			proxy->type == TAPTALK_PROXY_HTTPS ? (long) CURLPROXY_HTTPS :
			proxy->type == TAPTALK_PROXY_SOCKS5H ? (long) CURLPROXY_SOCKS5_HOSTNAME :
			(long) CURLPROXY_HTTP);
		SET(CURLOPT_NOPROXY, "");
		if (proxy->user != NULL)
		{
			SET(CURLOPT_PROXYUSERNAME, proxy->user);
			SET(CURLOPT_PROXYPASSWORD, proxy->password ? proxy->password : "");
		}
		SET(CURLOPT_PROXY_SSL_VERIFYPEER, 1L);
		SET(CURLOPT_PROXY_SSL_VERIFYHOST, 2L);
		if (multi_ca_file[0] != '\0')
			SET(CURLOPT_PROXY_CAINFO, multi_ca_file);
	}
	SET(CURLOPT_NOSIGNAL, 1L);
#if LIBCURL_VERSION_NUM >= 0x075700
	/* never wait for a resolver thread stuck in getaddrinfo */
	SET(CURLOPT_QUICK_EXIT, 1L);
#endif
	SET(CURLOPT_USERAGENT, USER_AGENT);
	SET(CURLOPT_POST, 1L);
	SET(CURLOPT_WRITEFUNCTION, collect_body);
	SET(CURLOPT_WRITEDATA, slot);
	SET(CURLOPT_HEADERFUNCTION, count_headers);
	SET(CURLOPT_HEADERDATA, slot);
	SET(CURLOPT_OPENSOCKETFUNCTION, open_counted_socket);
	SET(CURLOPT_OPENSOCKETDATA, slot);
	SET(CURLOPT_CLOSESOCKETFUNCTION, close_counted_socket);
	SET(CURLOPT_CLOSESOCKETDATA, NULL);
	SET(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t) TAPTALK_MAX_RESPONSE_BYTES);
	SET(CURLOPT_SSL_VERIFYPEER, 1L);
	SET(CURLOPT_SSL_VERIFYHOST, 2L);
	if (multi_ca_file[0] != '\0')
		SET(CURLOPT_CAINFO, multi_ca_file);
	SET(CURLOPT_ERRORBUFFER, slot->errbuf);
	SET(CURLOPT_PRIVATE, slot);
#undef SET

	return CURLE_OK;
}

/* A slot's body buffer, made anew after release_slot dropped a large one. */
static void
ensure_body(Slot *slot)
{
	if (slot->body.data == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		initStringInfo(&slot->body);
		MemoryContextSwitchTo(old);
	}
}

/* Raise for a multi handle option libcurl refused. */
static void
set_multi_option(const char *name, CURLMcode rc)
{
	if (rc != CURLM_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not set libcurl option %s: %s",
						name, curl_multi_strerror(rc))));
}

#define SET_MULTI(name, value) \
	set_multi_option(#name, curl_multi_setopt(multi, name, value))

/*
 * The descriptor set we wait on, made once per backend: the latch,
 * postmaster death (which ends the backend) and the epoll descriptor that
 * holds libcurl's sockets.
 */
static void
prepare_waiting(void)
{
	if (socket_set < 0)
	{
		socket_set = epoll_create1(EPOLL_CLOEXEC);
		if (socket_set < 0)
			ereport(ERROR,
					(errcode_for_socket_access(),
					 errmsg("could not create an epoll descriptor: %m")));
		ReserveExternalFD();
	}
	if (wait_set == NULL)
	{
#if PG_VERSION_NUM >= 170000
		wait_set = CreateWaitEventSet(NULL, 3);
#else
		wait_set = CreateWaitEventSet(TopMemoryContext, 3);
#endif
		AddWaitEventToSet(wait_set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
		if (IsUnderPostmaster)	/* not in single-user mode */
			AddWaitEventToSet(wait_set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
		AddWaitEventToSet(wait_set, WL_SOCKET_READABLE, socket_set, NULL, NULL);
	}
	if (wait_event_info == 0)
	{
#if PG_VERSION_NUM >= 170000
		wait_event_info = WaitEventExtensionNew("TaptalkRequest");
#else
		wait_event_info = PG_WAIT_EXTENSION;
#endif
	}
}

/*
 * Make sure the multi handle and at least `concurrency` slots exist, and that
 * the connection cache was built for the current base URL, CA file and
 * proxy: when one changed, the old connections are closed rather than
 * reused.
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
		sigfillset(&all_signals);
		on_proc_exit(transport_at_exit, (Datum) 0);
		curl_ready = true;
	}

	prepare_waiting();

	if (multi != NULL &&
		(!same_setting(multi_base_url, taptalk_base_url) ||
		 !same_setting(multi_ca_file, taptalk_ca_file) ||
		 !same_setting(multi_proxy, taptalk_proxy_setting)))
		taptalk_transport_shutdown();

	if (multi == NULL)
	{
		const TaptalkProxy *proxy = taptalk_proxy();

		multi_base_url = strdup(taptalk_base_url ? taptalk_base_url : "");
		multi_ca_file = strdup(taptalk_ca_file ? taptalk_ca_file : "");
		multi_proxy = strdup(taptalk_proxy_setting ? taptalk_proxy_setting : "");
		multi_proxy_name = proxy ? strdup(proxy->name) : NULL;
		multi_url = endpoint_url(multi_base_url ? multi_base_url : "");
		multi = curl_multi_init();
		if (multi == NULL || multi_base_url == NULL || multi_ca_file == NULL ||
			multi_proxy == NULL || (proxy != NULL && multi_proxy_name == NULL) ||
			multi_url == NULL)
		{
			taptalk_transport_shutdown();
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory"),
					 errdetail("Could not create a libcurl multi handle.")));
		}
		PG_TRY();
		{
			/* keep idle connections for every slot that may run */
			SET_MULTI(CURLMOPT_MAXCONNECTS, (long) TAPTALK_MAX_CONCURRENCY);
			SET_MULTI(CURLMOPT_SOCKETFUNCTION, watch_socket);
			SET_MULTI(CURLMOPT_TIMERFUNCTION, set_timer);
		}
		PG_CATCH();
		{
			taptalk_transport_shutdown();
			PG_RE_THROW();
		}
		PG_END_TRY();
	}

	if (slots == NULL)
		slots = MemoryContextAllocZero(TopMemoryContext,
									   sizeof(Slot *) * TAPTALK_MAX_CONCURRENCY);
	if (result_cxt == NULL)
		result_cxt = AllocSetContextCreate(TopMemoryContext,
										   "taptalk results",
										   ALLOCSET_SMALL_SIZES);
	while (nslots < concurrency)
		slots[nslots++] = MemoryContextAllocZero(TopMemoryContext, sizeof(Slot));
	for (int i = 0; i < concurrency; i++)
	{
		Slot	   *slot = slots[i];

		ensure_body(slot);
		if (slot->easy == NULL)
		{
			const char *option = NULL;
			CURLcode	rc;

			slot->easy = curl_easy_init();
			if (slot->easy == NULL)
				ereport(ERROR,
						(errcode(ERRCODE_OUT_OF_MEMORY),
						 errmsg("out of memory"),
						 errdetail("Could not create a libcurl handle.")));
			if ((rc = setup_handle(slot, &option)) != CURLE_OK)
			{
				curl_easy_cleanup(slot->easy);
				slot->easy = NULL;
				ereport(ERROR,
						(errcode(ERRCODE_INTERNAL_ERROR),
						 errmsg("could not set libcurl option %s: %s",
								option, curl_easy_strerror(rc))));
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

/* Milliseconds from now until t, rounded up; 0 when t has passed. */
static long
ms_until(TimestampTz t, TimestampTz now)
{
	if (t <= now)
		return 0;
	return (long) ((t - now + 999) / 1000);
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
	const char *option = NULL;
	CURLcode	rc = CURLE_OK;
	CURLMcode	mrc;

	slot->resp_len = 0;
	slot->resp_overflow = false;
	slot->resp_nomem = false;
	slot->header_bytes = 0;
	slot->header_overflow = false;
	slot->retry_after_ms = 0;
	slot->no_fds = false;
	slot->socket_nomem = false;
	slot->switching = false;
	slot->errbuf[0] = '\0';
	slot->retry_at = 0;
	slot->attempt_at = GetCurrentTimestamp();

#define SET(name, value) \
	do { \
		if (rc == CURLE_OK && \
			(rc = curl_easy_setopt(easy, name, value)) != CURLE_OK) \
			option = #name; \
	} while (0)

	SET(CURLOPT_HTTPHEADER, headers);
	SET(CURLOPT_POSTFIELDSIZE, (long) slot->body.len);
	SET(CURLOPT_POSTFIELDS, slot->body.data);
	SET(CURLOPT_TIMEOUT_MS, budget);
	SET(CURLOPT_CONNECTTIMEOUT_MS, Min((long) taptalk_connect_timeout_ms, budget));
#undef SET
	slot->connect_capped = (taptalk_connect_timeout_ms >= budget);
	if (rc != CURLE_OK)
	{
		snprintf(slot->errbuf, CURL_ERROR_SIZE,
				 "could not set libcurl option %s: %s",
				 option, curl_easy_strerror(rc));
		return false;
	}

	if ((mrc = curl_multi_add_handle(multi, easy)) != CURLM_OK)
	{
		snprintf(slot->errbuf, CURL_ERROR_SIZE,
				 "could not start the transfer: %s", curl_multi_strerror(mrc));
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
 * could not be reached, or went away before its answer was complete.  A TLS
 * verification failure is not.
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
 * HTTP 429 (too many requests), and 502, 503 and 504 (a gateway's failure):
 * a retry may cure them, whatever their body says
 */
static bool
retryable_status(long status)
{
	return status == 429 || status == 502 || status == 503 || status == 504;
}

/*
 * A failure at taptalk.proxy, as CONNECTION_FAILED naming the proxy
 * (host:port, never its credentials): false when the attempt did not fail
 * at the proxy.  *retry says whether a retry may cure it: yes when the proxy
 * could not be reached or could not reach TapTalk (5xx to CONNECT), no when
 * it refused (407 Proxy Authentication Required, 403, another 4xx, a SOCKS
 * authentication failure).  With an http:// base URL the request itself
 * goes to the proxy, whose 407 then is the answer; its other answers cannot
 * be told from TapTalk's and are mapped as TapTalk's.
 */
static bool
map_proxy_failure(Slot *slot, CURLcode rc, long status, TaptalkResult *result,
				  bool *retry)
{
	long		connect_code = 0;
	long		refused = 0;

	if (multi_proxy_name == NULL)
		return false;
	if (rc == CURLE_OK)
		refused = (status == 407) ? 407 : 0;
	else if (curl_easy_getinfo(slot->easy, CURLINFO_HTTP_CONNECTCODE,
							   &connect_code) == CURLE_OK &&
			 connect_code >= 300)
		refused = connect_code;

	if (refused != 0)
	{
		taptalk_set_error(result, TAPTALK_CODE_CONNECTION_FAILED, NULL,
						  psprintf("proxy \"%s\" refused the request with HTTP status %ld%s",
								   multi_proxy_name, refused,
								   refused == 407 ? " (Proxy Authentication Required)" :
								   refused == 401 ? " (Unauthorized)" :
								   refused == 403 ? " (Forbidden)" : ""));
		*retry = (refused >= 500);
		return true;
	}
	if (rc == CURLE_COULDNT_CONNECT || rc == CURLE_COULDNT_RESOLVE_PROXY ||
		rc == CURLE_PROXY)
	{
		long		socks_error = 0;

		taptalk_set_error(result, TAPTALK_CODE_CONNECTION_FAILED, NULL,
						  psprintf("could not connect to TapTalk through proxy \"%s\": %s",
								   multi_proxy_name, curl_message(slot, rc)));
		*retry = true;
#if LIBCURL_VERSION_NUM >= 0x074900
		if (rc == CURLE_PROXY &&
			curl_easy_getinfo(slot->easy, CURLINFO_PROXY_ERROR,
							  &socks_error) == CURLE_OK)
			*retry = !(socks_error == CURLPX_USER_REJECTED ||
					   socks_error == CURLPX_NO_AUTH ||
					   socks_error == CURLPX_REQUEST_FAILED ||
					   socks_error == CURLPX_REPLY_NOT_ALLOWED ||
					   socks_error == CURLPX_LONG_USER ||
					   socks_error == CURLPX_LONG_PASSWD);
#endif
		return true;
	}
	return false;
}

/*
 * Turn a finished attempt into a result.  Returns true when the attempt
 * failed in a way a retry may cure.
 */
static bool
map_answer(Slot *slot, CURLcode rc, TaptalkResult *result)
{
	long		status = 0;

	if (slot->resp_nomem)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory"),
				 errdetail("Could not buffer the TapTalk response.")));

	if (slot->socket_nomem)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory"),
				 errdetail("Could not note a socket opened for libcurl.")));

	/* the status line comes first, so a status is known for most failures */
	if (curl_easy_getinfo(slot->easy, CURLINFO_RESPONSE_CODE, &status) != CURLE_OK)
		status = 0;

	if (slot->switching)
	{
		taptalk_set_error(result, TAPTALK_CODE_INVALID_RESPONSE, NULL,
						  "TapTalk answered HTTP status 101 (Switching Protocols), which was not asked for");
		result->http_status = 101;
		return false;
	}

	{
		bool		retry = false;

		if (map_proxy_failure(slot, rc, status, result, &retry))
			return retry;
	}

	if (rc == CURLE_OK)
	{
		taptalk_map_response(status, slot->resp ? slot->resp : "",
							 slot->resp_len, result);
		result->http_status = status;
		/* the status decides: TapTalk's envelope on a 429 or 503 too */
		return result->error_code != NULL && retryable_status(status);
	}

	if (slot->resp_overflow || rc == CURLE_FILESIZE_EXCEEDED ||
		slot->header_overflow)
	{
		char	   *what;

		if (slot->header_overflow)
			what = psprintf("response headers exceed %d bytes",
							MAX_HEADER_BYTES);
		else
			what = psprintf("response body exceeds %d bytes",
							TAPTALK_MAX_RESPONSE_BYTES);

		/* an answer that cannot be read is no envelope: its status decides */
		if (status >= 300)
		{
			taptalk_set_error(result, TAPTALK_CODE_HTTP_ERROR, NULL,
							  psprintf("TapTalk answered HTTP status %ld without an error envelope (%s)",
									   status, what));
			result->http_status = status;
			return retryable_status(status);
		}
		taptalk_set_error(result, TAPTALK_CODE_INVALID_RESPONSE, NULL, what);
		return false;
	}
	if (rc == CURLE_OPERATION_TIMEDOUT)
	{
		curl_off_t	pretransfer = 0;

		if (curl_easy_getinfo(slot->easy, CURLINFO_PRETRANSFER_TIME_T,
							  &pretransfer) != CURLE_OK)
			pretransfer = 0;
		if (pretransfer == 0 && !slot->connect_capped)
		{
			/* the connect timeout passed, with time left for another try */
			taptalk_set_error(result, TAPTALK_CODE_CONNECTION_FAILED, NULL,
							  multi_proxy_name ?
							  psprintf("could not connect to TapTalk through proxy \"%s\" within %d ms",
									   multi_proxy_name, taptalk_connect_timeout_ms) :
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
	if (slot->no_fds)
	{
		taptalk_set_error(result, TAPTALK_CODE_CONNECTION_FAILED, NULL,
						  "could not open a connection: no file descriptor is left in this backend");
		return true;
	}

	taptalk_set_error(result, TAPTALK_CODE_CONNECTION_FAILED, NULL,
					  multi_proxy_name ?
					  psprintf("%s (through proxy \"%s\")",
							   curl_message(slot, rc), multi_proxy_name) :
					  curl_message(slot, rc));
	return retryable_failure(rc);
}

/*
 * map_answer, and the Retry-After of a 429 or a 503 in the result (the
 * worker's pause and backoff use it).
 */
static bool
map_attempt(Slot *slot, CURLcode rc, TaptalkResult *result)
{
	bool		retry = map_answer(slot, rc, result);

	result->not_sent = false;
	result->sent_at = slot->attempt_at;
	result->retry_after_ms = 0;
	if (result->error_code != NULL &&
		(result->http_status == 429 || result->http_status == 503))
		result->retry_after_ms = slot->retry_after_ms;
	return retry;
}

/*
 * When to try a failed attempt again, or 0 for no retry: after the
 * Retry-After of a 429 or 503 when it fits in what is left of the request's
 * timeout and in RETRY_AFTER_MAX_MS (else no retry: it could not succeed in
 * time); otherwise after an exponential backoff with jitter, only while the
 * request's timeout leaves room for it.
 */
static TimestampTz
retry_time(TaptalkPath path, Slot *slot, const TaptalkResult *result)
{
	long		delay_ms;

	if (slot->attempt >= run_max_retries)
		return 0;
	if (result->retry_after_ms > 0)
	{
		if (result->retry_after_ms > RETRY_AFTER_MAX_MS ||
			result->retry_after_ms + 10 >= remaining_ms(slot->deadline))
			return 0;
		taptalk_stats_rate_wait(path, result->retry_after_ms * 1000);
		return TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
										   result->retry_after_ms);
	}
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

/*
 * Detach a slot's handle and release oversized buffers.  Runs in cleanup
 * after an error too, so it never allocates: a released body buffer is made
 * again by prepare_transport when the slot is next used.
 */
static void
release_slot(Slot *slot)
{
	/* nothing to be done about a failure here; the transfer is abandoned */
	if (slot->attached)
		(void) curl_multi_remove_handle(multi, slot->easy);
	slot->attached = false;
	slot->busy = false;
	slot->retry_at = 0;
	slot->reserved = false;
	if (slot->resp_cap > KEEP_BUFFER_BYTES)
	{
		free(slot->resp);
		slot->resp = NULL;
		slot->resp_cap = 0;
	}
	slot->resp_len = 0;
	if (slot->body.data != NULL && slot->body.maxlen > KEEP_BUFFER_BYTES)
	{
		pfree(slot->body.data);
		slot->body.data = NULL;
		slot->body.maxlen = 0;
		slot->body.len = 0;
	}
}

/* Count a finished request in the path's statistics. */
static void
record_finished(TaptalkPath path, Slot *slot, const TaptalkResult *result)
{
	taptalk_stats_finished(path, result->error_code,
						   (int64) (GetCurrentTimestamp() - slot->started));
}

/*
 * Count a finished attempt in the path's statistics, with what libcurl says
 * the transfer cost: the connections it had to open, the bytes of the HTTP
 * request and of the response (status line and headers, then body).
 *
 * CURLINFO_SIZE_UPLOAD_T counts the body bytes sent.  CURLINFO_REQUEST_SIZE
 * counts the request line and headers and, when libcurl sent a small body
 * in the same write (libcurl 7.x does for bodies under 64 kB), that body
 * too: then it exceeds the body alone and is the whole request by itself.
 * The regression test compares the sum with the bytes the mock received.
 */
static void
record_attempt(TaptalkPath path, Slot *slot)
{
	long		connects = 0;
	long		request_size = 0;
	long		header_size = 0;
	curl_off_t	uploaded = 0;
	curl_off_t	downloaded = 0;

	if (curl_easy_getinfo(slot->easy, CURLINFO_NUM_CONNECTS, &connects) != CURLE_OK)
		connects = 0;
	if (curl_easy_getinfo(slot->easy, CURLINFO_REQUEST_SIZE, &request_size) != CURLE_OK)
		request_size = 0;
	if (curl_easy_getinfo(slot->easy, CURLINFO_SIZE_UPLOAD_T, &uploaded) != CURLE_OK)
		uploaded = 0;
	if (curl_easy_getinfo(slot->easy, CURLINFO_HEADER_SIZE, &header_size) != CURLE_OK)
		header_size = 0;
	if (curl_easy_getinfo(slot->easy, CURLINFO_SIZE_DOWNLOAD_T, &downloaded) != CURLE_OK)
		downloaded = 0;
	request_size = Max(request_size, 0);
	uploaded = Max(uploaded, 0);
	if (request_size <= uploaded)
		request_size += uploaded;
	taptalk_stats_attempt(path, (uint64) Max(connects, 0), (uint64) request_size,
						  (uint64) Max(header_size, 0) + (uint64) Max(downloaded, 0));
}

/*
 * Report a request that libcurl refused to start, and free its slot.  The
 * refused start counts as an attempt that sent and received nothing.
 */
static void
settle_start_failure(TaptalkPath path, Slot *slot, taptalk_done_fn done,
					 void *arg)
{
	TaptalkResult result;

	taptalk_set_error(&result, TAPTALK_CODE_CONNECTION_FAILED, NULL,
					  slot->errbuf);
	release_slot(slot);
	taptalk_stats_attempt(path, 0, 0, 0);
	record_finished(path, slot, &result);
	done(arg, slot->id, &result);
}

/*
 * Report a request whose next attempt taptalk.max_rate could not fit in
 * its timeout, without sending it, and free its slot: TIMEOUT, marked not
 * sent.  A first attempt counts as an attempt that sent and received
 * nothing.
 */
static void
settle_unsent(TaptalkPath path, Slot *slot, taptalk_done_fn done, void *arg)
{
	TaptalkResult result;

	taptalk_set_error(&result, TAPTALK_CODE_TIMEOUT, NULL,
					  psprintf("not sent: \"taptalk.max_rate\" (%g requests/s) left no time to send it within its timeout of %d ms",
							   taptalk_max_rate, taptalk_timeout_ms));
	result.not_sent = true;
	release_slot(slot);
	if (slot->attempt == 0)
		taptalk_stats_attempt(path, 0, 0, 0);
	record_finished(path, slot, &result);
	done(arg, slot->id, &result);
}

/*
 * Send the slot's next attempt now, or note when it may be: under
 * taptalk.max_rate (or the worker's pace) an attempt first reserves its
 * send time (ratelimit.c), then waits for it in the run's loop, on the
 * latch.  The wait is within the request's timeout, which runs from when
 * the request was taken up.  Returns false when the request is settled
 * instead: no send time within its timeout, or libcurl refused to start it.
 */
static bool
launch(TaptalkPath path, Slot *slot, struct curl_slist *headers,
	   taptalk_done_fn done, void *arg)
{
	if (!slot->reserved)
	{
		TimestampTz now = GetCurrentTimestamp();
		TimestampTz at;

		at = taptalk_rate_reserve(now, slot->deadline - SEND_MARGIN_MS * 1000,
								  &slot->ticket);
		if (at == 0)
		{
			settle_unsent(path, slot, done, arg);
			return false;
		}
		if (at > now)
		{
			slot->retry_at = at;
			slot->reserved = true;
			taptalk_stats_rate_wait(path, at - now);
			return true;
		}
	}
	else
	{
		/* a send time given before a hold began waits for its end too */
		TimestampTz held = taptalk_rate_held(GetCurrentTimestamp());

		if (held != 0)
		{
			if (held > slot->deadline - SEND_MARGIN_MS * 1000)
			{
				settle_unsent(path, slot, done, arg);
				return false;
			}
			slot->retry_at = held;
			return true;
		}
	}
	slot->reserved = false;
	if (!start_attempt(slot, headers))
	{
		settle_start_failure(path, slot, done, arg);
		return false;
	}
	return true;
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
 * Hand every finished transfer's result to done(), or schedule its retry.
 * Returns how many requests finished.
 */
static int
collect_finished(TaptalkPath path, taptalk_done_fn done, void *arg)
{
	CURLMsg    *msg;
	int			left;
	int			finished = 0;

	while ((msg = curl_multi_info_read(multi, &left)) != NULL)
	{
		Slot	   *slot = NULL;
		TaptalkResult result;
		MemoryContext old;
		bool		retry;

		if (msg->msg != CURLMSG_DONE)
			continue;
		if (curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE,
							  (char **) &slot) != CURLE_OK || slot == NULL)
			elog(ERROR, "libcurl transfer without its slot");
		(void) curl_multi_remove_handle(multi, slot->easy);
		slot->attached = false;
		(void) reconcile_sockets(slot);
		record_attempt(path, slot);

		old = MemoryContextSwitchTo(result_cxt);
		retry = map_attempt(slot, msg->data.result, &result);
		if (result.http_status == 429)
			taptalk_stats_rate_limited(path);
		retry = retry && (slot->retry_at = retry_time(path, slot, &result)) != 0;
		MemoryContextSwitchTo(old);
		if (retry)
		{
			MemoryContextReset(result_cxt);
			continue;
		}
		release_slot(slot);
		finished++;
		record_finished(path, slot, &result);
		done(arg, slot->id, &result);
		MemoryContextReset(result_cxt);
	}
	return finished;
}

/*
 * When a run is left with requests still waiting for their send time (an
 * error, a cancel), give the times back, latest first (ratelimit.c).
 * Never allocates.
 */
static void
give_back_send_times(void)
{
	Slot	   *waiting[TAPTALK_MAX_CONCURRENCY];
	int			n = 0;

	for (int i = 0; i < nslots && n < TAPTALK_MAX_CONCURRENCY; i++)
	{
		if (slots[i]->busy && slots[i]->reserved)
			waiting[n++] = slots[i];
	}
	/* latest first; a handful at most, so an insertion sort */
	for (int i = 1; i < n; i++)
	{
		Slot	   *s = waiting[i];
		int			j = i;

		for (; j > 0 && waiting[j - 1]->ticket.at < s->ticket.at; j--)
			waiting[j] = waiting[j - 1];
		waiting[j] = s;
	}
	for (int i = 0; i < n; i++)
		taptalk_rate_release(&waiting[i]->ticket);
}

/*
 * Send the requests that next() produces, at most `concurrency` at a time,
 * and hand each result to done().  Returns when every request has finished;
 * raises only for interrupts, configuration errors and out of memory, after
 * detaching every transfer.  A request's taptalk.timeout starts when it is
 * first sent and covers its at most `max_retries` retries.  Every attempt and every finished
 * request is counted in the statistics of `path`; a request still in flight
 * when the loop is left by an error or an interrupt counts as abandoned.
 */
void
taptalk_transport_run(TaptalkPath path, taptalk_next_fn next,
					  taptalk_done_fn done, void *arg, int concurrency,
					  int max_retries)
{
	struct curl_slist *headers;

	Assert(concurrency >= 1 && concurrency <= TAPTALK_MAX_CONCURRENCY);

	prepare_transport(concurrency);
	headers = current_headers();
	run_max_retries = max_retries;

	PG_TRY();
	{
		bool		exhausted = false;
		int			busy = 0;

		for (;;)
		{
			TimestampTz now;
			long		wait_ms = MAX_WAIT_MS;

			/* fill the free slots with new requests */
			while (!exhausted && busy < concurrency)
			{
				Slot	   *slot = free_slot(concurrency);
				TaptalkNext got;

				ensure_body(slot);
				resetStringInfo(&slot->body);
				got = next(arg, &slot->id, &slot->body);
				if (got == TAPTALK_NEXT_NONE)
					exhausted = true;
				if (got != TAPTALK_NEXT_REQUEST)
					break;
				slot->busy = true;
				busy++;
				slot->attempt = 0;
				slot->started = GetCurrentTimestamp();
				slot->deadline = TimestampTzPlusMilliseconds(slot->started,
															 taptalk_timeout_ms);
				slot->reserved = false;
				if (!launch(path, slot, headers, done, arg))
					busy--;
			}
			if (busy == 0)
			{
				if (exhausted)
					break;
				elog(ERROR, "taptalk request source waits with no request in flight");
			}

			/*
			 * start the retries and the reserved sends that are due; note
			 * when the next one is
			 */
			now = GetCurrentTimestamp();
			for (int i = 0; i < concurrency; i++)
			{
				Slot	   *slot = slots[i];

				if (!slot->busy || slot->retry_at == 0)
					continue;
				if (slot->retry_at <= now)
				{
					if (!slot->reserved)
						slot->attempt++;
					if (!launch(path, slot, headers, done, arg))
						busy--;
					else if (slot->reserved)
						wait_ms = Min(wait_ms, ms_until(slot->retry_at, now));
				}
				else
					wait_ms = Min(wait_ms, ms_until(slot->retry_at, now));
			}
			if (timer_armed)
				wait_ms = Min(wait_ms, ms_until(timer_at, now));

			/*
			 * Wait for a socket, the timer, a retry or the latch.  Nothing to
			 * wait for when libcurl wants to run now (a transfer was just
			 * added): interrupts are still checked below.
			 */
			if (wait_ms > 0 && busy > 0)
			{
				WaitEvent	events[3];
				int			n;

				n = WaitEventSetWait(wait_set, wait_ms, events,
									 lengthof(events), wait_event_info);
				for (int i = 0; i < n; i++)
				{
					if (events[i].events & WL_LATCH_SET)
						ResetLatch(MyLatch);
				}
			}
			CHECK_FOR_INTERRUPTS();

			drive_ready();
			busy -= collect_finished(path, done, arg);
		}
	}
	PG_FINALLY();
	{
		give_back_send_times();
		for (int i = 0; i < nslots; i++)
		{
			if (slots[i]->busy)
				taptalk_stats_abandoned(path);
			if (slots[i]->busy || slots[i]->attached)
				release_slot(slots[i]);
		}
		(void) reconcile_sockets(NULL);
		MemoryContextReset(result_cxt);
	}
	PG_END_TRY();
}
