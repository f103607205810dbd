# taptalk: PostgreSQL extension that requests TapTalk.io auth tickets

MODULE_big = taptalk
OBJS = src/taptalk.o src/request.o src/response.o src/transport.o

EXTENSION = taptalk
DATA = taptalk--1.0.sql

REGRESS = init validation request response encoding faults cancel privileges trigger batch reuse protocols
REGRESS_OPTS = --inputdir=.

CURL_CONFIG ?= curl-config
PG_CPPFLAGS = -I$(srcdir)/src $(shell $(CURL_CONFIG) --cflags) -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers
SHLIB_LINK = $(shell $(CURL_CONFIG) --libs)

EXTRA_CLEAN = results regression.diffs regression.out

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

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
