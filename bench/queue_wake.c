/*
 * bench/queue_wake.c: the client side of the queue's wake-latency
 * measurement (phase Q of scripts/bench, bench/queue.sh).
 *
 * N times, on an idle queue: in a transaction, taptalk_enqueue(REQUEST,
 * CALLBACK); then read the clock (CLOCK_REALTIME, the clock nginx logs
 * with) and send COMMIT at once.  The worker is woken by that COMMIT and
 * sends the request, whose arrival nginx logs; the callback, run when the
 * worker records the outcome, NOTIFYs CHANNEL with the request's id.  The
 * program waits for that notification, then until pg_stat_activity shows
 * the worker idle and waiting again, so that the next enqueue finds it
 * asleep.  Prints one line per request:
 *
 *   ID COMMIT_SENT_EPOCH_SECONDS
 *
 * and fails (exit 1) when a notification does not come within 10 s or the
 * worker is not idle again within 10 s.  Connects with libpq's environment
 * (PGHOST, PGPORT, ...).  Built and run by scripts/bench:
 *
 *   queue_wake N REQUEST CALLBACK CHANNEL
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <time.h>

#include <libpq-fe.h>

#define WAIT_S 10

static PGconn *conn;

static void
die(const char *what)
{
	fprintf(stderr, "queue_wake: %s: %s", what, PQerrorMessage(conn));
	exit(1);
}

/* run a statement that returns no row, or fail */
static void
exec_ok(const char *sql)
{
	PGresult   *res = PQexec(conn, sql);

	if (PQresultStatus(res) != PGRES_COMMAND_OK)
		die(sql);
	PQclear(res);
}

static double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* wait for the notification whose payload is `id` */
static void
await_notification(const char *id)
{
	double		deadline = now_s() + WAIT_S;

	for (;;)
	{
		PGnotify   *n;
		fd_set		fds;
		struct timeval tv;
		double		left;
		int			sock = PQsocket(conn);

		if (!PQconsumeInput(conn))
			die("reading notifications");
		while ((n = PQnotifies(conn)) != NULL)
		{
			int			match = strcmp(n->extra, id) == 0;

			PQfreemem(n);
			if (match)
				return;
		}
		left = deadline - now_s();
		if (left <= 0)
		{
			fprintf(stderr, "queue_wake: request %s: no notification within %d s\n",
					id, WAIT_S);
			exit(1);
		}
		FD_ZERO(&fds);
		FD_SET(sock, &fds);
		tv.tv_sec = (long) left;
		tv.tv_usec = (long) ((left - (long) left) * 1e6);
		if (select(sock + 1, &fds, NULL, NULL, &tv) < 0 && errno != EINTR)
		{
			perror("queue_wake: select");
			exit(1);
		}
	}
}

/* wait until the worker waits on its latch again, idle */
static void
await_idle_worker(void)
{
	double		deadline = now_s() + WAIT_S;
	struct timespec pause = {0, 1000 * 1000};

	for (;;)
	{
		PGresult   *res = PQexec(conn,
								 "SELECT count(*) FROM pg_catalog.pg_stat_activity"
								 " WHERE backend_type = 'taptalk worker'"
								 " AND state = 'idle' AND wait_event IS NOT NULL");
		int			idle;

		if (PQresultStatus(res) != PGRES_TUPLES_OK)
			die("pg_stat_activity");
		idle = atoi(PQgetvalue(res, 0, 0));
		PQclear(res);
		if (idle == 1)
			return;
		if (now_s() > deadline)
		{
			fprintf(stderr, "queue_wake: the worker is not idle after %d s\n", WAIT_S);
			exit(1);
		}
		nanosleep(&pause, NULL);
	}
}

int
main(int argc, char **argv)
{
	int			n;
	const char *params[2];
	char		listen[256];

	if (argc != 5)
	{
		fprintf(stderr, "usage: queue_wake N REQUEST CALLBACK CHANNEL\n");
		return 2;
	}
	n = atoi(argv[1]);
	params[0] = argv[2];
	params[1] = argv[3];

	conn = PQconnectdb("");
	if (PQstatus(conn) != CONNECTION_OK)
		die("connecting");
	snprintf(listen, sizeof(listen), "LISTEN %s", argv[4]);
	exec_ok(listen);
	await_idle_worker();

	for (int i = 0; i < n; i++)
	{
		PGresult   *res;
		char		id[32];
		double		sent;

		exec_ok("BEGIN");
		res = PQexecParams(conn,
						   "SELECT taptalk_enqueue($1::jsonb, $2::regprocedure)",
						   2, NULL, params, NULL, NULL, 0);
		if (PQresultStatus(res) != PGRES_TUPLES_OK)
			die("taptalk_enqueue");
		snprintf(id, sizeof(id), "%s", PQgetvalue(res, 0, 0));
		PQclear(res);

		sent = now_s();
		exec_ok("COMMIT");

		await_notification(id);
		await_idle_worker();
		printf("%s %.6f\n", id, sent);
	}
	PQfinish(conn);
	return 0;
}
