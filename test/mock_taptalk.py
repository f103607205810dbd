#!/usr/bin/env python3
"""Mock TapTalk.io server for the taptalk extension's test suite.

This is a small HTTP/1.1 server (Python 3 standard library only) that
imitates TapTalk.io's "Request Auth Ticket" server API:

    POST /v1/server/auth_ticket/request

and adds a set of fault-injection modes so that the tests can check how the
extension behaves with slow, broken, hostile or misbehaving servers.

Command line
------------

    mock_taptalk.py --port 58480 [--port 58481 ...]
                    [--tls-port 58443 --tls-cert cert.pem --tls-key key.pem]
                    --key-id ID --key-secret SECRET
                    --log /path/requests.jsonl
                    [--pidfile F] [--redirect-port P] [--host 127.0.0.1]

  --port           plain HTTP port to listen on (repeatable); 0 lets the
                   system choose a free port (reported on the ready line).
  --tls-port       HTTPS port (0: chosen by the system); needs --tls-cert
                   and --tls-key (PEM files).  A client rejecting the
                   certificate is harmless.
  --key-id/--key-secret
                   the accepted Server-Key is base64(ID + ":" + SECRET).
  --log            JSON-lines log file, truncated at start (mode 0644).
  --pidfile        written (with this process id) once the server is ready.
  --redirect-port  port used in the Location of fault-redirect-* answers;
                   defaults to the second --port if given, else the first.
  --host           address to bind (default 127.0.0.1).
  --exit-on-eof    end (as on SIGTERM) when stdin reaches end of file, so a
                   parent that holds the other end of a pipe cannot leave
                   the mock running when it dies.

When every socket is bound the server writes the pidfile and prints one
line on stdout with the ports it listens on, in the order given:

    mock ready ports=58480,58481 tls_port=58443

(" tls_port=..." only with --tls-port; "ports=" is empty without --port).
SIGTERM or SIGINT ends it cleanly (exit 0).

Connections are persistent (keep-alive) unless the client sends
"Connection: close" (or speaks HTTP/1.0 without "Connection: keep-alive").
Request bodies are read by Content-Length or "Transfer-Encoding: chunked";
"Expect: 100-continue" is answered with "100 Continue".  Every response
carries Content-Length except the chunked/endless fault modes.

Log format (one compact JSON object per line, ASCII only)
-------------------------------------------------

  {"event":"connection","port":P,"conn":N}
      for every accepted connection (N counts from 1; P is the listening
      port, the one chosen when 0 was given; for TLS the line is written
      before the handshake).
  {"event":"request","port":P,"conn":N,"seq":S,"method":"POST",
   "path":"/v1/server/auth_ticket/request",
   "headers":[["Host","127.0.0.1:58480"],["Server-Key","..."],...],
   "body":"<body as UTF-8, errors replaced>","body_b64":"<exact bytes>",
   "body_is_json":true|false,"t":T}
      for every complete request (except GET /_mock/stats), written before
      the response is sent.  S counts from 1; headers keep the received
      order and name spelling ("path" is the request target as sent);
      body_is_json is true when the body is strict UTF-8 and valid JSON;
      T is when it was read, in seconds since the epoch.
  {"event":"ratelimited","port":P,"group":G,"t":T}
      for each request that fault-quota-* answers with 429.

Control endpoint
----------------

  GET /_mock/stats  ->  200 {"connections":N,"requests":M}  (not logged)
  any other path outside the API  ->  404 text/plain "not found"
  API path with a method other than POST  ->  405

API contract
------------

1. Path prefix modes, parsed from the segments before /v1/ and applied in
   the order given (they compose), e.g. /delay/100/failevery/3/v1/...:
     /delay/<ms>          sleep <ms> milliseconds before answering.
     /failevery/<n>       every n-th request seen with the same prefix
                          string answers 503 text/plain "service unavailable".
     /chaos/<period_ms>   phase = time.time()*1000 // period_ms % 4:
                          0 healthy, 1 sleep 2000 ms then answer normally,
                          2 TCP RST without response, 3 503 text/plain.
   Unknown segment names (or bad values) answer 404.
2. Server-Key header (name case-insensitive) must equal
   base64(ID:SECRET).  Missing/empty: 400 "40001" "Request headers are
   required (Server-Key)".  Wrong: 401 "40101" "Invalid server key".
3. The body must be a UTF-8 JSON object, else 400 "40000" "Invalid request
   body".
4. Fields, checked in this order, errors are 400 with code "40002":
     userIPAddress(101) userAgent(102) userPlatform(103) userDeviceID(104)
     xcUserID(105) fullName(106): required, strings (xcUserID may also be
     an integer JSON number), non-blank -> "Param 'NAME' is required".
     userPlatform not android/ios/web -> "Param 'userPlatform' is invalid".
     xcUserID longer than 50 characters -> "Param 'xcUserID' is too long".
     email(107) phone(108) username(109) photoThumbnailURL(110)
     photoFullsizeURL(111) userRoleCode(112): optional, when present must
     be strings -> "Param 'NAME' is invalid".
   The envelope's "field" is the numeric code as a string.
5. Fault modes chosen by x = str(xcUserID):
     fault-slow-<ms>            sleep <ms>, then success
     fault-reset                TCP RST, nothing sent
     fault-close                clean close (FIN), nothing sent
     fault-html500              500 text/html error page
     fault-envelope500          500 envelope "50000" "Internal server error"
     fault-status-<code>        <code> (200..599) text/plain "status <code>"
     fault-badjson              200 truncated JSON
     fault-notjson              200 text/plain "OK"
     fault-emptybody            200 with Content-Length 0
     fault-noticket             200 envelope, data has userID only
     fault-numeric-userid       200 envelope, userID 4242 (a number),
                                ticket "ticket-numeric"
     fault-huge-<MiB>           200 application/json of <MiB> MiB, streamed
     fault-huge503-<MiB>        the same with status 503
     fault-headers503           status line 503, then endless headers
     fault-partial              200 with Content-Length 200, 20 bytes of
                                body, then the connection closes
     fault-hugechunked-<MiB>    the same without Content-Length (chunked), so
                                the client only learns the size by reading
     fault-endless              200 chunked, 1 KiB of spaces every 10 ms
                                (gives up after 120 s)
     fault-endless-headers      status line then an endless stream of
                                X-Filler-<i> header lines, one per 1 ms
                                (gives up after 120 s)
     fault-deep-<n>             200 {"status":200,"data":[[[...]]]} n deep
     fault-bigticket            200 envelope, ticket is 1 MiB of 'T'
     fault-nul                  200 envelope, ticket contains a raw NUL byte
     fault-badutf8              200 envelope, ticket contains bytes ff fe
     fault-redirect-<code>      301/302/303/307/308 with Location
                                http://127.0.0.1:<redirect-port>/v1/server/
                                auth_ticket/request, text/plain "moved"
     fault-flaky-<n>-<token>    first n requests for <token> answer 503
                                text/plain "service unavailable", later ones
                                succeed
     fault-flakyreset-<n>-<token>  same, but the first n are TCP RSTs
     fault-quota-<n>-<group>-<id>
                                a rate limit: at most n requests of <group>
                                per calendar second succeed, the others
                                answer 429, "Retry-After: 1" and TapTalk's
                                envelope "42900" "Too many requests", and
                                the log gets {"event":"ratelimited",
                                "port":P,"group":G,"t":T}
     fault-quotaplain-<n>-<group>-<id>
                                the same rate limit, but the others answer
                                429 text/plain with no Retry-After
     fault-answer-<status>-<body>-<after>-<n>-<token>
                                the first n requests for <token> answer
                                <status> (400..599), later ones succeed.
                                <body>: env (TapTalk's envelope, code
                                <status>00, message the status's reason,
                                429: "42900" "Too many requests"), text
                                (text/plain "status <status>") or empty.
                                <after>, the Retry-After header: none (no
                                header), <s> (delta-seconds, any digits),
                                date<s> (an HTTP-date <s> s from now),
                                neg<s> ("-<s>") or junk ("soon")
     fault-envelope-field       400 envelope "40002" "Param 'email' is
                                invalid" field "107"
     fault-interim-<code>       the interim answer "HTTP/1.1 <code> <reason>"
                                (100..199) with no headers; after 101
                                (Switching Protocols, never asked for)
                                nothing more until the client closes (gives
                                up after 120 s), after any other code the
                                normal success
     fault-dup-<case>           200, a root member given twice (JSON allows
                                it; the later one wins, as in jsonb):
                                  data        "data" with userID "tt-first"
                                              and ticket "ticket-first",
                                              then "data" with userID
                                              "tt-later" only
                                  error       "error" 40002 with message
                                              and field "107", then "error"
                                              "40101" "Invalid server key"
                                              with no field
                                  error-null  "error" 40002 as above, then
                                              "error": null; success data
                                  data-null   success data, then "data":
                                              null
                                any other case answers the normal success
     fault-unicode-<place>-<form>-<hex>
                                the character U+<hex> (1 to 6 lower-case
                                hex digits; not NUL, not a surrogate) in one
                                place of the answer, written as UTF-8 (form
                                raw) or as a \\uXXXX escape, a surrogate pair
                                above U+FFFF (form esc).  <place>:
                                  note     success, plus "note":"<c>" in the
                                           root and in data (ignored members)
                                  userid   success with userID "tt-<c>"
                                  ticket   success with ticket "ticket-<c>"
                                  code     400 envelope, code "4000<c>",
                                           message "Param 'fullName' is
                                           invalid", field "106"
                                  field    400 envelope "40002", that
                                           message, field "10<c>"
                                  message  400 envelope "40002", message
                                           "Param 'fullName' has <c>",
                                           field "106"
                                any other place, form or code point answers
                                the normal success
     fault-escapes-<case>       200 envelope written with JSON escapes:
                                  all      data's key "\\u0075serID" (userID)
                                           with "a\\"b\\\\c\\/d\\b\\f\\n\\r\\te" and
                                           "\\u00E9\\uD83D\\ude00" (upper and lower
                                           case hex), ticket "ticket-escapes"
                                  lone     userID "tt-\\ud800" (a lone high
                                           surrogate)
                                  unpaired userID "tt-\\ud800\\u0041" (a high
                                           surrogate, then no low one)
                                  low      userID "tt-\\udc00\\ud800" (low
                                           before high)
                                  nul      ticket "a\\u0000b"
                                  ignored  all three in a member "note" of
                                           data, userID and ticket plain
                                any other case answers the normal success
     any other fault-...        normal success
6. Success: 200 application/json
     {"status":200,"error":{"code":"","message":"","field":""},
      "data":{"userID":"tt-<x>","ticket":"ticket-<x>"}}
   Error envelopes: {"status":S,"error":{"code":C,"message":M,"field":F},
   "data":{}}.  All JSON is compact, UTF-8, non-ASCII kept as is.
"""

import argparse
import base64
import email.utils
import json
import os
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import traceback
from http import HTTPStatus

API_PATH = "/v1/server/auth_ticket/request"
STATS_PATH = "/_mock/stats"

MAX_HEAD = 256 * 1024          # request line + headers
MAX_BODY = 64 * 1024 * 1024    # request body
IO_TIMEOUT = 300.0             # idle keep-alive / read / write timeout
STREAM_TIMEOUT = 30.0          # write timeout while streaming endless data
HANDSHAKE_TIMEOUT = 10.0
ENDLESS_CAP = 120.0
CHUNK = 64 * 1024

REQUIRED_FIELDS = (
    ("userIPAddress", "101"),
    ("userAgent", "102"),
    ("userPlatform", "103"),
    ("userDeviceID", "104"),
    ("xcUserID", "105"),
    ("fullName", "106"),
)
OPTIONAL_FIELDS = (
    ("email", "107"),
    ("phone", "108"),
    ("username", "109"),
    ("photoThumbnailURL", "110"),
    ("photoFullsizeURL", "111"),
    ("userRoleCode", "112"),
)
PLATFORMS = ("android", "ios", "web")
REDIRECT_CODES = (301, 302, 303, 307, 308)

HTML500 = b"<html><body><h1>500 Internal Server Error</h1></body></html>"
SERVICE_UNAVAILABLE = b"service unavailable"


class ClientGone(Exception):
    """The peer went away (EOF, reset, timeout) - stop quietly."""


class BadRequest(Exception):
    """Malformed HTTP; answer with a plain error and close."""

    def __init__(self, status, text):
        Exception.__init__(self, text)
        self.status = status
        self.text = text


def parse_uint(s, max_digits=9):
    if s and len(s) <= max_digits and s.isascii() and s.isdigit():
        return int(s)
    return None


def reason(status):
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status %d" % status


def dump_json(obj):
    """Compact UTF-8 JSON; falls back to \\u escapes for lone surrogates."""
    try:
        return json.dumps(obj, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":"),
                          ensure_ascii=True).encode("ascii")


def envelope(status, code, message, field, data=None):
    return dump_json({
        "status": status,
        "error": {"code": code, "message": message, "field": field},
        "data": {} if data is None else data,
    })


def success_body(x):
    return envelope(200, "", "", "",
                    {"userID": "tt-" + x, "ticket": "ticket-" + x})


UNICODE_FORMS = ("raw", "esc")


def unicode_answer(x, spec):
    """(status, body) of fault-unicode-<spec>, or None when spec is not
    <place>-<form>-<hex> with a known place and form and a character."""
    parts = spec.split("-")
    if len(parts) != 3 or parts[1] not in UNICODE_FORMS:
        return None
    place, form, hexcp = parts
    if not (1 <= len(hexcp) <= 6 and
            all(c in "0123456789abcdef" for c in hexcp)):
        return None
    cp = int(hexcp, 16)
    if cp == 0 or cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
        return None
    c = chr(cp)
    invalid = "Param 'fullName' is invalid"
    if place == "note":
        status = 200
        obj = {"status": 200, "note": c,
               "error": {"code": "", "message": "", "field": ""},
               "data": {"userID": "tt-" + x, "ticket": "ticket-" + x,
                        "note": c}}
    elif place in ("userid", "ticket"):
        status = 200
        obj = {"status": 200,
               "error": {"code": "", "message": "", "field": ""},
               "data": {"userID": "tt-" + (c if place == "userid" else x),
                        "ticket": "ticket-" + (c if place == "ticket"
                                               else x)}}
    elif place in ("code", "field", "message"):
        status = 400
        obj = {"status": 400,
               "error": {"code": "4000" + c if place == "code" else "40002",
                         "message": ("Param 'fullName' has " + c
                                     if place == "message" else invalid),
                         "field": "10" + c if place == "field" else "106"},
               "data": {}}
    else:
        return None
    # everything else in the answer is ASCII, so ensure_ascii escapes
    # exactly the one character
    body = json.dumps(obj, separators=(",", ":"),
                      ensure_ascii=(form == "esc")).encode("utf-8")
    return status, body


ESCAPES_OK = b'"error":{"code":"","message":"","field":""}'
ESCAPE_BODIES = {
    "all": b'{"status":200,' + ESCAPES_OK + b',"data":{"\\u0075serID":'
           b'"a\\"b\\\\c\\/d\\b\\f\\n\\r\\te\\u00E9\\uD83D\\ude00",'
           b'"ticket":"ticket-escapes"}}',
    "lone": b'{"status":200,' + ESCAPES_OK + b',"data":{"userID":'
            b'"tt-\\ud800","ticket":"ticket-lone"}}',
    "unpaired": b'{"status":200,' + ESCAPES_OK + b',"data":{"userID":'
                b'"tt-\\ud800\\u0041","ticket":"ticket-unpaired"}}',
    "low": b'{"status":200,' + ESCAPES_OK + b',"data":{"userID":'
           b'"tt-\\udc00\\ud800","ticket":"ticket-low"}}',
    "nul": b'{"status":200,' + ESCAPES_OK + b',"data":{"userID":'
           b'"tt-nul","ticket":"a\\u0000b"}}',
    "ignored": b'{"status":200,' + ESCAPES_OK + b',"data":{"note":'
               b'"\\ud800 \\udc00\\ud800 \\u0000","userID":"tt-ignored",'
               b'"ticket":"ticket-ignored"}}',
}

# fault-dup-<case>: a root member given twice
DUP_ERROR_40002 = (b'"error":{"code":"40002","message":"Param \'email\' is '
                   b'invalid","field":"107"}')
DUP_DATA_OK = b'"data":{"userID":"tt-first","ticket":"ticket-first"}'
DUP_BODIES = {
    "data": b'{"status":200,' + ESCAPES_OK + b',' + DUP_DATA_OK
            + b',"data":{"userID":"tt-later"}}',
    "error": b'{"status":200,' + DUP_ERROR_40002 + b',"data":{},'
             b'"error":{"code":"40101","message":"Invalid server key"}}',
    "error-null": b'{"status":200,' + DUP_ERROR_40002 + b',' + DUP_DATA_OK
                  + b',"error":null}',
    "data-null": b'{"status":200,' + ESCAPES_OK + b',' + DUP_DATA_OK
                 + b',"data":null}',
}


class State:
    """Shared server state: counters, log file, fault counters."""

    def __init__(self, args):
        self.args = args
        secret = "%s:%s" % (args.key_id, args.key_secret)
        self.server_key = base64.b64encode(
            secret.encode("utf-8")).decode("ascii")
        self.redirect_port = args.redirect_port
        self.log_lock = threading.Lock()
        self.conn_count = 0
        self.req_count = 0
        self.counter_lock = threading.Lock()
        self.failevery = {}
        self.flaky = {}
        self.quota = {}
        fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                     | os.O_APPEND, 0o644)
        try:
            os.fchmod(fd, 0o644)
        except OSError:
            pass
        self.log_fd = fd
        self.tls_ctx = None

    def _write_line(self, obj):
        data = (json.dumps(obj, ensure_ascii=True, separators=(",", ":"))
                + "\n").encode("ascii")
        # A single write() on an O_APPEND file; loop only as a safety net.
        view = memoryview(data)
        while view:
            n = os.write(self.log_fd, view)
            view = view[n:]

    def log_connection(self, port):
        with self.log_lock:
            self.conn_count += 1
            n = self.conn_count
            self._write_line({"event": "connection", "port": port,
                              "conn": n})
        return n

    def log_request(self, port, conn, req):
        body = req.body
        try:
            json.loads(body.decode("utf-8", "strict"))
            is_json = True
        except (UnicodeDecodeError, ValueError, RecursionError):
            is_json = False
        b64 = base64.b64encode(body).decode("ascii")
        text = body.decode("utf-8", "replace")
        with self.log_lock:
            self.req_count += 1
            seq = self.req_count
            self._write_line({
                "event": "request", "port": port, "conn": conn, "seq": seq,
                "method": req.method, "path": req.target,
                "headers": [[k, v] for k, v in req.headers],
                "body": text, "body_b64": b64, "body_is_json": is_json,
                "t": time.time(),
            })
        return seq

    def log_ratelimited(self, port, group):
        with self.log_lock:
            self._write_line({"event": "ratelimited", "port": port,
                              "group": group, "t": time.time()})

    def quota_take(self, group, per_second):
        """Whether a request of group fits in its quota of the current
        second (per_second requests per calendar second)."""
        second = int(time.time())
        with self.counter_lock:
            sec, n = self.quota.get(group, (second, 0))
            if sec != second:
                sec, n = second, 0
            n += 1
            self.quota[group] = (sec, n)
            return n <= per_second

    def stats(self):
        with self.log_lock:
            return {"connections": self.conn_count,
                    "requests": self.req_count}

    def bump(self, table, key):
        with self.counter_lock:
            n = table.get(key, 0) + 1
            table[key] = n
            return n


class Request:
    __slots__ = ("method", "target", "version", "headers", "body",
                 "keep_alive")

    def header(self, name):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


class Connection:
    """One accepted client connection, served in its own thread."""

    def __init__(self, state, sock, port, conn_id, tls):
        self.state = state
        self.sock = sock
        self.port = port
        self.conn_id = conn_id
        self.tls = tls
        self.buf = bytearray()
        self.abort = False   # close with RST
        self.done = False    # socket already closed

    # ---------------------------------------------------------------- I/O
    def recv_more(self):
        try:
            data = self.sock.recv(65536)
        except (OSError, ssl.SSLError):
            raise ClientGone()
        if not data:
            raise ClientGone()
        self.buf += data

    def send(self, data):
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError):
            raise ClientGone()

    def tls_hello(self):
        """On a plain port, a TLS client's first bytes (a handshake record,
        0x16) are held unanswered until the client goes away or IO_TIMEOUT
        passes: a server that stalls the handshake.  Parsing them as HTTP
        would answer whenever the random bytes of the ClientHello happen to
        hold an empty line.  Returns True when the connection was such a
        client."""
        try:
            self.recv_more()
        except ClientGone:
            return True
        if self.buf[:1] != b"\x16":
            return False
        try:
            while self.sock.recv(65536):
                pass
        except (OSError, ssl.SSLError):
            pass
        return True

    def read_head(self):
        """Return the header block (bytes) or None on clean EOF."""
        scan = 0
        while True:
            # tolerate empty lines before the request line
            while self.buf[:1] in (b"\r", b"\n") and self.buf:
                if self.buf[:2] == b"\r\n":
                    del self.buf[:2]
                elif self.buf[:1] == b"\n":
                    del self.buf[:1]
                elif len(self.buf) == 1:
                    break
                else:
                    raise BadRequest(400, "bad request")
            idx = self.buf.find(b"\n\r\n", scan)
            idx2 = self.buf.find(b"\n\n", scan)
            end = None
            if idx >= 0 and (idx2 < 0 or idx < idx2):
                end, skip = idx, 3
            elif idx2 >= 0:
                end, skip = idx2, 2
            if end is not None:
                head = bytes(self.buf[:end])
                del self.buf[:end + skip]
                return head
            if len(self.buf) > MAX_HEAD:
                raise BadRequest(431, "request header fields too large")
            scan = max(0, len(self.buf) - 2)
            try:
                data = self.sock.recv(65536)
            except (OSError, ssl.SSLError):
                raise ClientGone()
            if not data:
                if not self.buf:
                    return None
                raise ClientGone()
            self.buf += data

    def read_exact(self, n):
        while len(self.buf) < n:
            self.recv_more()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_line(self):
        scan = 0
        while True:
            idx = self.buf.find(b"\n", scan)
            if idx >= 0:
                line = bytes(self.buf[:idx])
                del self.buf[:idx + 1]
                return line.rstrip(b"\r")
            if len(self.buf) > MAX_HEAD:
                raise BadRequest(400, "bad request")
            scan = len(self.buf)
            self.recv_more()

    # ------------------------------------------------------------ parsing
    def read_request(self):
        head = self.read_head()
        if head is None:
            return None
        lines = head.split(b"\n")
        first = lines[0].rstrip(b"\r").decode("latin-1")
        parts = first.split(" ")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise BadRequest(400, "bad request")
        method, target, version = parts
        if not version.startswith("HTTP/1."):
            raise BadRequest(505, "http version not supported")
        headers = []
        for raw in lines[1:]:
            line = raw.rstrip(b"\r").decode("latin-1")
            if not line:
                continue
            if line[0] in " \t" and headers:
                name, value = headers[-1]
                headers[-1] = (name, (value + " " + line.strip(" \t")))
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip(" \t"):
                raise BadRequest(400, "bad request")
            headers.append((name, value.strip(" \t")))
        req = Request()
        req.method = method
        req.target = target
        req.version = version
        req.headers = headers
        tokens = set()
        te = None
        clen = None
        expect = None
        for k, v in headers:
            lk = k.lower()
            if lk == "connection":
                tokens.update(t.strip().lower() for t in v.split(","))
            elif lk == "transfer-encoding":
                te = v.lower()
            elif lk == "content-length":
                if not v.isascii() or not v.isdigit():
                    raise BadRequest(400, "bad content-length")
                n = int(v)
                if clen is not None and clen != n:
                    raise BadRequest(400, "bad content-length")
                clen = n
            elif lk == "expect":
                expect = v.lower()
        if version == "HTTP/1.0":
            req.keep_alive = "keep-alive" in tokens
        else:
            req.keep_alive = "close" not in tokens
        chunked = te is not None and te.split(",")[-1].strip() == "chunked"
        if te is not None and not chunked:
            raise BadRequest(501, "transfer-encoding not supported")
        if (clen is not None and clen > MAX_BODY):
            raise BadRequest(413, "payload too large")
        if expect == "100-continue" and version != "HTTP/1.0" \
                and (chunked or clen):
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        if chunked:
            req.body = self.read_chunked()
        elif clen:
            req.body = self.read_exact(clen)
        else:
            req.body = b""
        return req

    def read_chunked(self):
        out = bytearray()
        while True:
            line = self.read_line()
            size_txt = line.split(b";", 1)[0].strip()
            try:
                size = int(size_txt, 16)
            except ValueError:
                raise BadRequest(400, "bad chunk size")
            if size < 0:
                raise BadRequest(400, "bad chunk size")
            if size == 0:
                # trailers until an empty line
                while self.read_line():
                    pass
                return bytes(out)
            if len(out) + size > MAX_BODY:
                raise BadRequest(413, "payload too large")
            out += self.read_exact(size)
            self.read_line()   # CRLF after the chunk data

    # ---------------------------------------------------------- responses
    def respond(self, req, status, ctype, body, extra=()):
        """Send one complete response; return whether to keep going."""
        keep = req.keep_alive if req is not None else False
        lines = ["HTTP/1.1 %d %s" % (status, reason(status)),
                 "Server: mock-taptalk"]
        if ctype:
            lines.append("Content-Type: " + ctype)
        for k, v in extra:
            lines.append("%s: %s" % (k, v))
        if status != 204 and not (100 <= status < 200):
            lines.append("Content-Length: %d" % len(body))
        else:
            body = b""
        lines.append("Connection: " + ("keep-alive" if keep else "close"))
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.send(head + body)
        return keep

    def text(self, req, status, text):
        if isinstance(text, str):
            text = text.encode("utf-8")
        return self.respond(req, status, "text/plain; charset=utf-8", text)

    def json_resp(self, req, status, body):
        return self.respond(req, status, "application/json", body)

    def env_error(self, req, status, code, message, field=""):
        return self.json_resp(req, status,
                              envelope(status, code, message, field))

    def reset(self):
        """Close with a TCP RST and no response."""
        self.abort = True
        return False

    def clean_close(self):
        return False

    # ------------------------------------------------------------- main
    def run(self):
        try:
            self._run()
        except Exception:
            try:
                traceback.print_exc(file=sys.stderr)
            except Exception:
                pass
        finally:
            self.close()

    def _run(self):
        if self.tls:
            try:
                self.sock.settimeout(HANDSHAKE_TIMEOUT)
                self.sock = self.state.tls_ctx.wrap_socket(
                    self.sock, server_side=True)
            except (OSError, ssl.SSLError, ValueError):
                return
        try:
            self.sock.settimeout(IO_TIMEOUT)
        except OSError:
            return
        if not self.tls and self.tls_hello():
            return
        while True:
            try:
                req = self.read_request()
            except ClientGone:
                return
            except BadRequest as e:
                try:
                    self.text(None, e.status, e.text)
                except ClientGone:
                    pass
                return
            if req is None:
                return
            try:
                keep = self.handle(req)
            except ClientGone:
                return
            if not keep:
                return

    def close(self):
        if self.done:
            return
        self.done = True
        sock = self.sock
        try:
            if self.abort:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                except OSError:
                    pass
            else:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except (OSError, ssl.SSLError, ValueError):
                    pass
            sock.close()
        except Exception:
            pass

    # ---------------------------------------------------------- routing
    def handle(self, req):
        path = req.target.split("?", 1)[0]
        if path == STATS_PATH:
            if req.method not in ("GET", "HEAD"):
                return self.respond(req, 405, "text/plain; charset=utf-8",
                                    b"method not allowed",
                                    (("Allow", "GET"),))
            return self.json_resp(req, 200, dump_json(self.state.stats()))
        self.state.log_request(self.port, self.conn_id, req)
        if not path.endswith(API_PATH):
            return self.text(req, 404, "not found")
        prefix = path[:-len(API_PATH)]
        modes = parse_prefix(prefix)
        if modes is None:
            return self.text(req, 404, "not found")
        if req.method != "POST":
            return self.respond(req, 405, "text/plain; charset=utf-8",
                                b"method not allowed", (("Allow", "POST"),))
        for i, (name, value) in enumerate(modes):
            if name == "delay":
                time.sleep(value / 1000.0)
            elif name == "failevery":
                n = self.state.bump(self.state.failevery, (prefix, i))
                if n % value == 0:
                    return self.text(req, 503, SERVICE_UNAVAILABLE)
            elif name == "chaos":
                phase = int(time.time() * 1000 // value % 4)
                if phase == 1:
                    time.sleep(2.0)
                elif phase == 2:
                    return self.reset()
                elif phase == 3:
                    return self.text(req, 503, SERVICE_UNAVAILABLE)
        return self.handle_api(req)

    def handle_api(self, req):
        key = req.header("Server-Key")
        if key is None or key == "":
            return self.env_error(req, 400, "40001",
                                  "Request headers are required (Server-Key)")
        if key != self.state.server_key:
            return self.env_error(req, 401, "40101", "Invalid server key")
        try:
            obj = json.loads(req.body.decode("utf-8", "strict"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            return self.env_error(req, 400, "40000", "Invalid request body")
        for name, code in REQUIRED_FIELDS:
            v = obj.get(name)
            if name == "xcUserID" and isinstance(v, int) \
                    and not isinstance(v, bool):
                v = str(v)
            if not isinstance(v, str) or not v.strip():
                return self.env_error(req, 400, "40002",
                                      "Param '%s' is required" % name, code)
            if name == "userPlatform" and v not in PLATFORMS:
                return self.env_error(req, 400, "40002",
                                      "Param 'userPlatform' is invalid", code)
            if name == "xcUserID" and len(v) > 50:
                return self.env_error(req, 400, "40002",
                                      "Param 'xcUserID' is too long", code)
        for name, code in OPTIONAL_FIELDS:
            if name in obj and not isinstance(obj[name], str):
                return self.env_error(req, 400, "40002",
                                      "Param '%s' is invalid" % name, code)
        x = obj["xcUserID"]
        x = x if isinstance(x, str) else str(x)
        if x.startswith("fault-"):
            return self.fault(req, x)
        return self.json_resp(req, 200, success_body(x))

    # ------------------------------------------------------------ faults
    def fault(self, req, x):
        st = self.state
        f = x[len("fault-"):]
        if f.startswith("slow-"):
            ms = parse_uint(f[5:])
            if ms is not None:
                time.sleep(min(ms, 600000) / 1000.0)
        elif f == "reset":
            return self.reset()
        elif f == "close":
            return self.clean_close()
        elif f == "html500":
            return self.respond(req, 500, "text/html", HTML500)
        elif f == "envelope500":
            return self.env_error(req, 500, "50000", "Internal server error")
        elif f.startswith("status-"):
            code = parse_uint(f[7:], 3)
            if code is not None and 200 <= code <= 599:
                return self.text(req, code, "status %d" % code)
        elif f == "badjson":
            return self.json_resp(
                req, 200, b'{"status":200,"data":{"userID":"1","ticket":')
        elif f == "notjson":
            return self.text(req, 200, "OK")
        elif f == "emptybody":
            return self.json_resp(req, 200, b"")
        elif f == "noticket":
            return self.json_resp(req, 200, envelope(
                200, "", "", "", {"userID": "tt-" + x}))
        elif f == "numeric-userid":
            return self.json_resp(req, 200, envelope(
                200, "", "", "", {"userID": 4242, "ticket": "ticket-numeric"}))
        elif f.startswith("huge-"):
            mib = parse_uint(f[5:], 6)
            if mib is not None:
                return self.huge(req, min(mib, 102400))
        elif f.startswith("huge503-"):
            mib = parse_uint(f[8:], 6)
            if mib is not None:
                return self.huge(req, min(mib, 102400), status=503)
        elif f == "headers503":
            return self.endless_headers(status=503)
        elif f == "partial":
            return self.partial(req)
        elif f.startswith("hugechunked-"):
            mib = parse_uint(f[12:], 6)
            if mib is not None:
                return self.huge(req, min(mib, 102400), chunked=True)
        elif f == "endless":
            return self.endless()
        elif f == "endless-headers":
            return self.endless_headers()
        elif f.startswith("deep-"):
            n = parse_uint(f[5:], 8)
            if n is not None:
                n = min(n, 10000000)
                body = (b'{"status":200,"data":' + b"[" * n + b"]" * n
                        + b"}")
                return self.json_resp(req, 200, body)
        elif f == "bigticket":
            return self.json_resp(req, 200, envelope(
                200, "", "", "", {"userID": "tt-" + x,
                                  "ticket": "T" * 1048576}))
        elif f == "nul":
            return self.json_resp(
                req, 200,
                b'{"status":200,"error":{"code":"","message":"","field":""},'
                b'"data":{"userID":"1","ticket":"ab\x00cd"}}')
        elif f == "badutf8":
            return self.json_resp(
                req, 200,
                b'{"status":200,"error":{"code":"","message":"","field":""},'
                b'"data":{"userID":"tt-' + x.encode("utf-8", "replace")
                + b'","ticket":"ab\xff\xfecd"}}')
        elif f.startswith("redirect-"):
            code = parse_uint(f[9:], 3)
            if code in REDIRECT_CODES:
                loc = "http://127.0.0.1:%d%s" % (st.redirect_port, API_PATH)
                return self.respond(req, code, "text/plain; charset=utf-8",
                                    b"moved", (("Location", loc),))
        elif f.startswith("flaky-") or f.startswith("flakyreset-"):
            kind, _, rest = f.partition("-")
            n_txt, sep, token = rest.partition("-")
            n = parse_uint(n_txt)
            if sep and n is not None:
                count = st.bump(st.flaky, (kind, token))
                if count <= n:
                    if kind == "flaky":
                        return self.text(req, 503, SERVICE_UNAVAILABLE)
                    return self.reset()
        elif f.startswith("quota-") or f.startswith("quotaplain-"):
            kind, _, spec = f.partition("-")
            n_txt, sep, rest = spec.partition("-")
            group = rest.partition("-")[0]
            n = parse_uint(n_txt)
            if sep and group and n is not None and not st.quota_take(group, n):
                st.log_ratelimited(self.port, group)
                if kind == "quotaplain":
                    return self.text(req, 429, "Too Many Requests")
                return self.respond(req, 429, "application/json",
                                    envelope(429, "42900",
                                             "Too many requests", ""),
                                    (("Retry-After", "1"),))
        elif f.startswith("answer-"):
            answer = self.counted_answer(req, f[len("answer-"):])
            if answer is not None:
                return answer
        elif f == "envelope-field":
            return self.env_error(req, 400, "40002",
                                  "Param 'email' is invalid", "107")
        elif f.startswith("interim-"):
            code = parse_uint(f[8:], 3)
            if code is not None and 100 <= code <= 199:
                self.send(b"HTTP/1.1 %d %s\r\n\r\n"
                          % (code, reason(code).encode("ascii")))
                if code == 101:
                    return self.switched()
        elif f.startswith("dup-") and f[4:] in DUP_BODIES:
            return self.json_resp(req, 200, DUP_BODIES[f[4:]])
        elif f.startswith("escapes-") and f[8:] in ESCAPE_BODIES:
            return self.json_resp(req, 200, ESCAPE_BODIES[f[8:]])
        elif f.startswith("unicode-"):
            answer = unicode_answer(x, f[len("unicode-"):])
            if answer is not None:
                return self.json_resp(req, answer[0], answer[1])
        return self.json_resp(req, 200, success_body(x))

    def counted_answer(self, req, spec):
        """fault-answer-<status>-<body>-<after>-<n>-<token>: the answer of
        one of the first n requests for token, or None (the success)."""
        parts = spec.split("-", 4)
        if len(parts) != 5:
            return None
        status = parse_uint(parts[0], 3)
        body, after, n = parts[1], parts[2], parse_uint(parts[3])
        if (status is None or not 400 <= status <= 599 or n is None
                or body not in ("env", "text", "empty")):
            return None
        if self.state.bump(self.state.flaky, ("answer", spec)) > n:
            return None
        extra = []
        if after.isascii() and after.isdigit():
            extra.append(("Retry-After", after))
        elif after.startswith("date") and parse_uint(after[4:]) is not None:
            when = time.time() + parse_uint(after[4:])
            extra.append(("Retry-After",
                          email.utils.formatdate(when, usegmt=True)))
        elif after.startswith("neg") and parse_uint(after[3:]) is not None:
            extra.append(("Retry-After", "-" + after[3:]))
        elif after == "junk":
            extra.append(("Retry-After", "soon"))
        elif after != "none":
            return None
        if body == "env":
            return self.respond(req, status, "application/json",
                                envelope(status, "%d00" % status,
                                         "Too many requests" if status == 429
                                         else reason(status), ""), extra)
        if body == "text":
            return self.respond(req, status, "text/plain; charset=utf-8",
                                ("status %d" % status).encode("ascii"),
                                extra)
        return self.respond(req, status, None, b"", extra)

    def huge(self, req, mib, chunked=False, status=200):
        total = mib * 1048576
        keep = req.keep_alive
        length = ("Transfer-Encoding: chunked" if chunked
                  else "Content-Length: %d" % total)
        head = ("HTTP/1.1 %d %s\r\nServer: mock-taptalk\r\n"
                "Content-Type: application/json\r\n"
                "%s\r\nConnection: %s\r\n\r\n"
                % (status, reason(status), length,
                   "keep-alive" if keep else "close")).encode("ascii")
        start = b'{"status":200,"data":{"userID":"1","ticket":"'[:total]
        first_len = min(total, CHUNK)
        first = start + b"A" * (first_len - len(start))
        fill = memoryview(b"A" * CHUNK)

        def frame(data):
            if not chunked:
                return bytes(data)
            return b"%x\r\n" % len(data) + bytes(data) + b"\r\n"
        try:
            self.sock.settimeout(STREAM_TIMEOUT)
        except OSError:
            return False
        self.send(head + frame(first))
        left = total - first_len
        while left > 0:
            n = min(left, CHUNK)
            self.send(frame(fill[:n]))
            left -= n
        if chunked:
            self.send(b"0\r\n\r\n")
        try:
            self.sock.settimeout(IO_TIMEOUT)
        except OSError:
            return False
        return keep

    def endless(self):
        try:
            self.sock.settimeout(STREAM_TIMEOUT)
        except OSError:
            return False
        chunk = b"400\r\n" + b" " * 1024 + b"\r\n"
        self.send(b"HTTP/1.1 200 OK\r\nServer: mock-taptalk\r\n"
                  b"Content-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                  + chunk)
        deadline = time.monotonic() + ENDLESS_CAP
        while time.monotonic() < deadline:
            time.sleep(0.010)
            self.send(chunk)
        self.send(b"0\r\n\r\n")
        return False

    def switched(self):
        """After a 101: the other protocol never says anything; wait for
        the client to close, or ENDLESS_CAP."""
        deadline = time.monotonic() + ENDLESS_CAP
        while time.monotonic() < deadline:
            try:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                if not self.sock.recv(65536):
                    break
            except socket.timeout:
                break
            except (OSError, ssl.SSLError, ValueError):
                break
        return False

    def partial(self, req):
        """200 announcing 200 bytes of body, 20 sent, then the connection
        closes."""
        self.send(b"HTTP/1.1 200 OK\r\nServer: mock-taptalk\r\n"
                  b"Content-Type: application/json\r\n"
                  b"Content-Length: 200\r\n\r\n"
                  b'{"status":200,"data"')
        return False

    def endless_headers(self, status=200):
        try:
            self.sock.settimeout(STREAM_TIMEOUT)
        except OSError:
            return False
        filler = b"x" * 1000
        self.send(b"HTTP/1.1 %d %s\r\n" % (status, reason(status).encode("ascii")))
        deadline = time.monotonic() + ENDLESS_CAP
        i = 0
        while time.monotonic() < deadline:
            i += 1
            self.send(b"X-Filler-%d: " % i + filler + b"\r\n")
            time.sleep(0.001)
        return False


def parse_prefix(prefix):
    """Parse '/name/value/...' mode segments; None when invalid."""
    if prefix == "":
        return []
    segs = prefix.split("/")
    if segs[0] != "" or len(segs) % 2 != 1:
        return None
    modes = []
    for i in range(1, len(segs), 2):
        name, value = segs[i], parse_uint(segs[i + 1])
        if value is None:
            return None
        if name == "delay":
            modes.append((name, min(value, 600000)))
        elif name in ("failevery", "chaos"):
            if value < 1:
                return None
            modes.append((name, value))
        else:
            return None
    return modes


# -------------------------------------------------------------- listeners
def make_listener(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(1024)
    return s, s.getsockname()[1]


def accept_loop(state, lsock, port, tls, stop):
    while not stop.is_set():
        try:
            sock, _ = lsock.accept()
        except OSError:
            if stop.is_set():
                return
            time.sleep(0.05)
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        try:
            conn_id = state.log_connection(port)
            conn = Connection(state, sock, port, conn_id, tls)
            t = threading.Thread(target=conn.run, daemon=True,
                                 name="conn-%d" % conn_id)
            t.start()
        except Exception:
            try:
                sock.close()
            except OSError:
                pass
            time.sleep(0.01)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Mock TapTalk.io auth ticket server for tests.")
    ap.add_argument("--port", type=int, action="append", default=[],
                    help="plain HTTP port (repeatable)")
    ap.add_argument("--tls-port", type=int)
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--key-id", required=True)
    ap.add_argument("--key-secret", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--pidfile")
    ap.add_argument("--redirect-port", type=int)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--exit-on-eof", action="store_true")
    args = ap.parse_args(argv)
    if not args.port and args.tls_port is None:
        ap.error("at least one --port or --tls-port is required")
    if args.tls_port is not None and not (args.tls_cert and args.tls_key):
        ap.error("--tls-port needs --tls-cert and --tls-key")
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    state = State(args)
    listeners = []
    for p in args.port:
        lsock, p = make_listener(args.host, p)
        listeners.append((lsock, p, False))
    plain = [p for _, p, _ in listeners]
    tls_port = None
    if args.tls_port is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        try:
            ctx.set_alpn_protocols(["http/1.1"])
        except (NotImplementedError, AttributeError):
            pass
        state.tls_ctx = ctx
        lsock, tls_port = make_listener(args.host, args.tls_port)
        listeners.append((lsock, tls_port, True))
    if args.redirect_port is None:
        if len(plain) >= 2:
            args.redirect_port = plain[1]
        elif plain:
            args.redirect_port = plain[0]
        else:
            args.redirect_port = tls_port
    state.redirect_port = args.redirect_port

    for lsock, p, tls in listeners:
        threading.Thread(target=accept_loop, args=(state, lsock, p, tls, stop),
                         daemon=True, name="accept-%d" % p).start()

    if args.pidfile:
        tmp = args.pidfile + ".tmp"
        with open(tmp, "w") as fh:
            fh.write("%d\n" % os.getpid())
        os.replace(tmp, args.pidfile)
    if args.exit_on_eof:
        def watch_stdin():
            try:
                while os.read(0, 4096):
                    pass
            except OSError:
                pass
            stop.set()
        threading.Thread(target=watch_stdin, daemon=True,
                         name="stdin").start()
    ready = "mock ready ports=%s" % ",".join(str(p) for p in plain)
    if tls_port is not None:
        ready += " tls_port=%d" % tls_port
    try:
        sys.stdout.write(ready + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        pass

    while not stop.is_set():
        stop.wait(0.5)

    for lsock, _, _ in listeners:
        try:
            lsock.close()
        except OSError:
            pass
    if args.pidfile:
        try:
            with open(args.pidfile) as fh:
                mine = fh.read().strip() == str(os.getpid())
            if mine:
                os.unlink(args.pidfile)
        except OSError:
            pass
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
