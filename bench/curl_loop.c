/*
 * bench/curl_loop.c: the physical limit of an HTTP client on this machine.
 *
 * POSTs the same auth ticket request N times with the headers the taptalk
 * extension sends (Server-Key, Content-Type, Accept, an empty Expect and its
 * User-Agent).  Every answer must be HTTP 200; the program fails at the first
 * that is not.
 *
 * Without PARALLEL, one reused libcurl easy handle (one keep-alive
 * connection) sends the N requests in turn.  With PARALLEL, a multi handle
 * keeps PARALLEL requests in flight on PARALLEL reused easy handles: as soon
 * as one finishes, the next request is started on its handle before the
 * program waits again, so a slot is never left idle while requests remain
 * (what a client that keeps its slots full achieves against a slow server);
 * one request per handle, before the N and not counted, opens the
 * connections.  Prints one line:
 *
 *   requests=N seconds=S rps=R connections=C cpu_us=U parallel=P
 *
 * where C is the number of connections libcurl opened for the N requests (1
 * in turn, 0 in parallel when keep-alive works), U the CPU time (user and
 * system) this process spent per request, and S the time from the first
 * request's start to the last one's end.  Built and run by scripts/bench:
 *
 *   curl_loop URL SERVER_KEY_ID SERVER_KEY_SECRET BODY N [PARALLEL]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/resource.h>

#include <curl/curl.h>

/* the response body is not kept, only counted */
static size_t
discard(char *data, size_t size, size_t nmemb, void *userdata)
{
	(void) data;
	*(size_t *) userdata += size * nmemb;
	return size * nmemb;
}

static char *
base64(const char *in)
{
	static const char tbl[] =
		"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	size_t		len = strlen(in);
	char	   *out = malloc(4 * ((len + 2) / 3) + 1);
	char	   *p = out;

	if (out == NULL)
		return NULL;
	for (size_t i = 0; i < len; i += 3)
	{
		unsigned	v = (unsigned char) in[i] << 16;

		if (i + 1 < len)
			v |= (unsigned char) in[i + 1] << 8;
		if (i + 2 < len)
			v |= (unsigned char) in[i + 2];
		*p++ = tbl[(v >> 18) & 63];
		*p++ = tbl[(v >> 12) & 63];
		*p++ = i + 1 < len ? tbl[(v >> 6) & 63] : '=';
		*p++ = i + 2 < len ? tbl[v & 63] : '=';
	}
	*p = '\0';
	return out;
}

/* CPU time used so far by this process, user and system */
static double
cpu_seconds(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
		ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static double
now_seconds(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* what every request needs: the options the extension sets that matter */
struct request
{
	const char *url;
	const char *body;
	struct curl_slist *headers;
};

/* one easy handle and what its current request received */
struct slot
{
	CURL	   *easy;
	size_t		received;
	char		errbuf[CURL_ERROR_SIZE];
};

static int
slot_init(struct slot *slot, const struct request *req)
{
	CURL	   *easy = curl_easy_init();

	if (easy == NULL)
		return -1;
	slot->easy = easy;
	curl_easy_setopt(easy, CURLOPT_URL, req->url);
	curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(easy, CURLOPT_HTTPHEADER, req->headers);
	curl_easy_setopt(easy, CURLOPT_USERAGENT, "taptalk/1.0");
	curl_easy_setopt(easy, CURLOPT_POST, 1L);
	curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE, (long) strlen(req->body));
	curl_easy_setopt(easy, CURLOPT_POSTFIELDS, req->body);
	curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, discard);
	curl_easy_setopt(easy, CURLOPT_WRITEDATA, &slot->received);
	curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, 10000L);
	curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, slot->errbuf);
	curl_easy_setopt(easy, CURLOPT_PRIVATE, slot);
	return 0;
}

/* before a request: forget the last one's answer */
static void
slot_reset(struct slot *slot)
{
	slot->received = 0;
	slot->errbuf[0] = '\0';
}

/*
 * after a request: 0 when it got HTTP 200 with a body (adding the
 * connections it opened to *connections), or -1 after saying what failed
 */
static int
slot_check(struct slot *slot, CURLcode rc, long number, long *connections)
{
	long		status = 0;
	long		opened = 0;

	if (rc != CURLE_OK)
	{
		fprintf(stderr, "request %ld: %s\n", number,
				slot->errbuf[0] ? slot->errbuf : curl_easy_strerror(rc));
		return -1;
	}
	curl_easy_getinfo(slot->easy, CURLINFO_RESPONSE_CODE, &status);
	if (status != 200 || slot->received == 0)
	{
		fprintf(stderr, "request %ld: HTTP %ld, %zu body bytes\n",
				number, status, slot->received);
		return -1;
	}
	curl_easy_getinfo(slot->easy, CURLINFO_NUM_CONNECTS, &opened);
	*connections += opened;
	return 0;
}

/* n requests in turn on one handle; returns the connections opened, or -1 */
static long
run_serial(struct slot *slot, long n)
{
	long		connections = 0;

	for (long i = 0; i < n; i++)
	{
		slot_reset(slot);
		if (slot_check(slot, curl_easy_perform(slot->easy), i + 1,
					   &connections) != 0)
			return -1;
	}
	return connections;
}

/*
 * The parallel mode drives libcurl the way an event loop does: libcurl tells
 * us which sockets to watch (kept in one epoll descriptor) and when its next
 * timeout is due, and we tell it which socket is ready.  Only the transfers
 * with something to do are visited, so the client's cost per request does
 * not grow with the number in flight (curl_multi_perform visits every
 * transfer on each call).
 */
struct loop
{
	CURLM	   *multi;
	int			epfd;
	long		timeout_ms;		/* libcurl's next timeout, -1 for none */
};

static int
on_socket(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
	struct loop *loop = userp;
	struct epoll_event ev = {0};

	(void) easy;
	if (what == CURL_POLL_REMOVE)
	{
		epoll_ctl(loop->epfd, EPOLL_CTL_DEL, s, NULL);
		return 0;
	}
	ev.events = (what & CURL_POLL_IN ? EPOLLIN : 0) |
		(what & CURL_POLL_OUT ? EPOLLOUT : 0);
	ev.data.fd = s;
	if (epoll_ctl(loop->epfd, socketp ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, s, &ev) != 0)
	{
		perror("epoll_ctl");
		return -1;
	}
	/* from now on libcurl passes a non-NULL socketp: the socket is known */
	if (socketp == NULL)
		curl_multi_assign(loop->multi, s, loop);
	return 0;
}

static int
on_timer(CURLM *multi, long timeout_ms, void *userp)
{
	(void) multi;
	((struct loop *) userp)->timeout_ms = timeout_ms;
	return 0;
}

/* the multi handle and its epoll descriptor; 0, or -1 */
static int
loop_init(struct loop *loop, long parallel)
{
	loop->multi = curl_multi_init();
	loop->epfd = epoll_create1(EPOLL_CLOEXEC);
	loop->timeout_ms = -1;
	if (loop->multi == NULL || loop->epfd < 0)
	{
		fprintf(stderr, "could not create the multi handle or epoll descriptor\n");
		return -1;
	}
	curl_multi_setopt(loop->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
	curl_multi_setopt(loop->multi, CURLMOPT_SOCKETDATA, loop);
	curl_multi_setopt(loop->multi, CURLMOPT_TIMERFUNCTION, on_timer);
	curl_multi_setopt(loop->multi, CURLMOPT_TIMERDATA, loop);
	/* keep every slot's connection */
	curl_multi_setopt(loop->multi, CURLMOPT_MAXCONNECTS, parallel);
	return 0;
}

/*
 * n requests, parallel in flight at a time; returns the connections opened,
 * or -1.  A finished handle gets the next request at once, and libcurl runs
 * it before the next wait, so a slot is never idle while requests remain.
 * The connections stay in the multi handle's cache for the next run.
 */
static long
run_parallel(struct loop *loop, struct slot *slots, long parallel, long n)
{
	CURLM	   *multi = loop->multi;
	long		connections = 0;
	long		started = 0;
	long		finished = 0;
	int			running = 0;

	for (long i = 0; i < parallel && started < n; i++, started++)
	{
		slot_reset(&slots[i]);
		if (curl_multi_add_handle(multi, slots[i].easy) != CURLM_OK)
		{
			fprintf(stderr, "curl_multi_add_handle failed\n");
			return -1;
		}
	}
	while (finished < n)
	{
		struct epoll_event events[64];
		int			ready;
		CURLMsg    *msg;
		int			left;

		/* a timeout already due (a request just added) runs without waiting */
		if (loop->timeout_ms == 0)
			ready = 0;
		else
			ready = epoll_wait(loop->epfd, events, 64,
							   loop->timeout_ms < 0 ? 1000 : (int) loop->timeout_ms);
		if (ready < 0)
		{
			perror("epoll_wait");
			return -1;
		}
		if (ready == 0)
		{
			loop->timeout_ms = -1;
			curl_multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &running);
		}
		for (int i = 0; i < ready; i++)
		{
			int			flags = 0;

			if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
				flags |= CURL_CSELECT_IN;
			if (events[i].events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
				flags |= CURL_CSELECT_OUT;
			curl_multi_socket_action(multi, events[i].data.fd, flags, &running);
		}
		while ((msg = curl_multi_info_read(multi, &left)) != NULL)
		{
			struct slot *slot;

			if (msg->msg != CURLMSG_DONE)
				continue;
			curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &slot);
			finished++;
			if (slot_check(slot, msg->data.result, finished, &connections) != 0)
				return -1;
			curl_multi_remove_handle(multi, slot->easy);
			if (started < n)
			{
				slot_reset(slot);
				if (curl_multi_add_handle(multi, slot->easy) != CURLM_OK)
				{
					fprintf(stderr, "curl_multi_add_handle failed\n");
					return -1;
				}
				started++;
			}
		}
	}
	return connections;
}

int
main(int argc, char **argv)
{
	struct request req;
	long		n;
	long		parallel = 0;
	char	   *pair;
	char	   *key;
	char	   *key_header;
	struct slot *slots;
	struct loop loop;
	long		connections;
	double		started;
	double		seconds;
	double		cpu_started;
	double		cpu;

	if ((argc != 6 && argc != 7) || (n = atol(argv[5])) <= 0 ||
		(argc == 7 && (parallel = atol(argv[6])) <= 0))
	{
		fprintf(stderr, "usage: %s URL SERVER_KEY_ID SERVER_KEY_SECRET BODY N [PARALLEL]\n",
				argv[0]);
		return 2;
	}
	req.url = argv[1];
	req.body = argv[4];
	req.headers = NULL;

	pair = malloc(strlen(argv[2]) + strlen(argv[3]) + 2);
	if (pair == NULL)
		return 1;
	sprintf(pair, "%s:%s", argv[2], argv[3]);
	key = base64(pair);
	key_header = malloc(strlen(key) + sizeof("Server-Key: "));
	if (key == NULL || key_header == NULL)
		return 1;
	sprintf(key_header, "Server-Key: %s", key);

	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
	{
		fprintf(stderr, "curl_global_init failed\n");
		return 1;
	}
	req.headers = curl_slist_append(req.headers, key_header);
	req.headers = curl_slist_append(req.headers, "Content-Type: application/json");
	req.headers = curl_slist_append(req.headers, "Accept: application/json");
	req.headers = curl_slist_append(req.headers, "Expect:");
	slots = calloc(parallel > 0 ? parallel : 1, sizeof(struct slot));
	if (req.headers == NULL || slots == NULL)
	{
		fprintf(stderr, "out of memory\n");
		return 1;
	}
	for (long i = 0; i < (parallel > 0 ? parallel : 1); i++)
	{
		if (slot_init(&slots[i], &req) != 0)
		{
			fprintf(stderr, "out of memory\n");
			return 1;
		}
	}

	/* in parallel, one request per handle first opens the connections */
	if (parallel > 0 &&
		(loop_init(&loop, parallel) != 0 ||
		 run_parallel(&loop, slots, parallel, parallel) < 0))
		return 1;

	cpu_started = cpu_seconds();
	started = now_seconds();
	if (parallel > 0)
		connections = run_parallel(&loop, slots, parallel, n);
	else
		connections = run_serial(&slots[0], n);
	seconds = now_seconds() - started;
	cpu = cpu_seconds() - cpu_started;
	if (connections < 0)
		return 1;

	printf("requests=%ld seconds=%.3f rps=%.0f connections=%ld cpu_us=%.1f parallel=%ld\n",
		   n, seconds, n / seconds, connections, cpu * 1e6 / n,
		   parallel > 0 ? parallel : 1);

	if (parallel > 0)
	{
		curl_multi_cleanup(loop.multi);
		close(loop.epfd);
	}
	for (long i = 0; i < (parallel > 0 ? parallel : 1); i++)
		curl_easy_cleanup(slots[i].easy);
	free(slots);
	curl_slist_free_all(req.headers);
	curl_global_cleanup();
	free(key_header);
	free(key);
	free(pair);
	return 0;
}
