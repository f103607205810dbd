# taptalk: PostgreSQL extension that requests TapTalk.io auth tickets

MODULE_big = taptalk
OBJS = src/taptalk.o src/secret.o src/request.o src/response.o src/transport.o \
	src/stats.o src/queue.o src/worker.o src/encoding.o src/callback.o src/claim.o \
	src/proxy.o src/ratelimit.o src/pacing.o

EXTENSION = taptalk
DATA = taptalk--1.0.sql taptalk--1.0--1.1.sql taptalk--1.1--1.2.sql

# The tests need the mock TapTalk server and a cluster with taptalk preloaded
# and pointed at it, so they run as TAP tests (t/*.pl), which start both:
# t/001_regress.pl runs sql/*.sql through pg_regress, the others are the
# multi-session, restart, load and timing tests.  REGRESS stays empty so that
# "make installcheck" does not also run sql/*.sql against the running server.
#   make installcheck                                  everything
#   make installcheck PROVE_TESTS=t/010_tls.pl         one TAP test
#   make installcheck PROVE_TESTS=t/001_regress.pl TAPTALK_REGRESS=batch
#                                                      one sql file (after init)
TAP_TESTS = 1
export TAPTALK_REGRESS

CURL_CONFIG ?= curl-config
PG_CPPFLAGS = -I$(srcdir)/src $(shell $(CURL_CONFIG) --cflags) -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers
SHLIB_LINK = $(shell $(CURL_CONFIG) --libs)

EXTRA_CLEAN = results regression.diffs regression.out

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
ifneq ($(PGXS),)
include $(PGXS)
else ifneq ($(filter-out demo test bench soak dist,$(or $(MAKECMDGOALS),all)),)
# only the targets below, which install what they need, work without it
$(error $(PG_CONFIG) was not found: install postgresql-server-dev-15, or set PG_CONFIG)
endif

# The two commands of the README; both do their own set-up.
.PHONY: demo test bench soak dist
demo:
	./scripts/demo

test:
	./scripts/test

bench:
	./scripts/bench

soak:
	./scripts/soak

# The release archive taptalk-VERSION.zip (VERSION from META.json), made by
# git archive from the last commit: uncommitted changes are not in it.
dist:
	./scripts/check-meta
	@version=$$(python3 -c 'import json; print(json.load(open("META.json"))["version"])') && \
	if [ -n "$$(git status --porcelain)" ]; then \
		echo "warning: uncommitted changes are not in the archive" >&2; fi && \
	git archive --format=zip --prefix=taptalk-$$version/ -o taptalk-$$version.zip HEAD && \
	echo "taptalk-$$version.zip"
