/*
 * bench/curl_loop.c: the physical limit of one HTTP client on this machine.
 *
 * POSTs the same auth ticket request N times, in turn, with one reused
 * libcurl easy handle (one keep-alive connection), with the headers the
 * taptalk extension sends (Server-Key, Content-Type, Accept, an empty Expect
 * and its User-Agent).  Every answer must be HTTP 200; the program fails at
 * the first that is not.  Prints one line:
 *
 *   requests=N seconds=S rps=R connections=C cpu_us=U
 *
 * where C is the number of connections libcurl opened (1 when keep-alive
 * works) and U the CPU time (user and system) this process spent per
 * request.  Built and run by scripts/bench:
 *
 *   curl_loop URL SERVER_KEY_ID SERVER_KEY_SECRET BODY N
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
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

int
main(int argc, char **argv)
{
	const char *url;
	const char *body;
	long		n;
	char	   *pair;
	char	   *key;
	char	   *key_header;
	struct curl_slist *headers = NULL;
	CURL	   *easy;
	char		errbuf[CURL_ERROR_SIZE];
	size_t		received = 0;
	long		connections = 0;
	double		started;
	double		seconds;
	double		cpu_started;
	double		cpu;

	if (argc != 6 || (n = atol(argv[5])) <= 0)
	{
		fprintf(stderr, "usage: %s URL SERVER_KEY_ID SERVER_KEY_SECRET BODY N\n",
				argv[0]);
		return 2;
	}
	url = argv[1];
	body = argv[4];

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
	headers = curl_slist_append(headers, key_header);
	headers = curl_slist_append(headers, "Content-Type: application/json");
	headers = curl_slist_append(headers, "Accept: application/json");
	headers = curl_slist_append(headers, "Expect:");
	easy = curl_easy_init();
	if (headers == NULL || easy == NULL)
	{
		fprintf(stderr, "out of memory\n");
		return 1;
	}

	/* the options the extension sets that matter on the wire */
	curl_easy_setopt(easy, CURLOPT_URL, url);
	curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(easy, CURLOPT_HTTPHEADER, headers);
	curl_easy_setopt(easy, CURLOPT_USERAGENT, "taptalk/1.0");
	curl_easy_setopt(easy, CURLOPT_POST, 1L);
	curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE, (long) strlen(body));
	curl_easy_setopt(easy, CURLOPT_POSTFIELDS, body);
	curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, discard);
	curl_easy_setopt(easy, CURLOPT_WRITEDATA, &received);
	curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, 10000L);
	curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, errbuf);

	cpu_started = cpu_seconds();
	started = now_seconds();
	for (long i = 0; i < n; i++)
	{
		CURLcode	rc;
		long		status = 0;
		long		opened = 0;

		errbuf[0] = '\0';
		received = 0;
		rc = curl_easy_perform(easy);
		if (rc != CURLE_OK)
		{
			fprintf(stderr, "request %ld: %s\n", i + 1,
					errbuf[0] ? errbuf : curl_easy_strerror(rc));
			return 1;
		}
		curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
		if (status != 200 || received == 0)
		{
			fprintf(stderr, "request %ld: HTTP %ld, %zu body bytes\n",
					i + 1, status, received);
			return 1;
		}
		curl_easy_getinfo(easy, CURLINFO_NUM_CONNECTS, &opened);
		connections += opened;
	}
	seconds = now_seconds() - started;
	cpu = cpu_seconds() - cpu_started;

	printf("requests=%ld seconds=%.3f rps=%.0f connections=%ld cpu_us=%.1f\n",
		   n, seconds, n / seconds, connections, cpu * 1e6 / n);

	curl_easy_cleanup(easy);
	curl_slist_free_all(headers);
	curl_global_cleanup();
	free(key_header);
	free(key);
	free(pair);
	return 0;
}
