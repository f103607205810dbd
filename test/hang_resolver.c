/*
 * hang_resolver.c: an LD_PRELOAD shim for the tests.  getaddrinfo() for the
 * host named by TAPTALK_HANG_HOST sleeps TAPTALK_HANG_SECONDS and then fails
 * with EAI_NONAME, as a DNS server that does not answer would; every other
 * name is resolved as usual.  When TAPTALK_HANG_REPORT names a file, each
 * hanging lookup appends a line saying which of SIGINT, SIGTERM, SIGUSR1 and
 * SIGQUIT the calling thread has blocked.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int (*getaddrinfo_fn) (const char *, const char *,
							   const struct addrinfo *, struct addrinfo **);

static void
report_mask(const char *path)
{
	sigset_t	mask;
	FILE	   *f;

	if (path == NULL || pthread_sigmask(SIG_BLOCK, NULL, &mask) != 0)
		return;
	f = fopen(path, "a");
	if (f == NULL)
		return;
	fprintf(f, "SIGINT=%s SIGTERM=%s SIGUSR1=%s SIGQUIT=%s\n",
			sigismember(&mask, SIGINT) ? "blocked" : "open",
			sigismember(&mask, SIGTERM) ? "blocked" : "open",
			sigismember(&mask, SIGUSR1) ? "blocked" : "open",
			sigismember(&mask, SIGQUIT) ? "blocked" : "open");
	fclose(f);
}

int
getaddrinfo(const char *node, const char *service,
			const struct addrinfo *hints, struct addrinfo **res)
{
	static getaddrinfo_fn real = NULL;
	const char *hang = getenv("TAPTALK_HANG_HOST");

	if (node != NULL && hang != NULL && strcmp(node, hang) == 0)
	{
		const char *secs = getenv("TAPTALK_HANG_SECONDS");

		report_mask(getenv("TAPTALK_HANG_REPORT"));
		sleep(secs ? (unsigned) atoi(secs) : 5);
		return EAI_NONAME;
	}
	if (real == NULL)
		real = (getaddrinfo_fn) dlsym(RTLD_NEXT, "getaddrinfo");
	return real(node, service, hints, res);
}
