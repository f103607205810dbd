#!/usr/bin/env python3
"""Self-test for test/mock_taptalk.py (the mock TapTalk.io server).

Starts the mock on loopback ports it chooses itself and reports (--port 0:
plain HTTP, a second plain port for redirects and, when the openssl command
is available, a TLS port with a throw-away self-signed certificate) inside a
temporary directory, then checks the API contract, every fault mode, the
path prefix modes, the control endpoint, the JSON-lines log and the
behaviour under concurrency; then explicit ports and --exit-on-eof.

Usage:  python3 test/mock_selftest.py [-v]

Prints one line per check ("ok" / "FAIL") and exits non-zero if any check
failed.  The mock process is stopped (SIGTERM) before exiting.
"""

import base64
import email.utils
import http.client
import json
import os
import select
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MOCK = os.path.join(HERE, "mock_taptalk.py")
API = "/v1/server/auth_ticket/request"
KEY_ID = "selftest-id"
KEY_SECRET = "selftest-secret"
GOOD_KEY = base64.b64encode(("%s:%s" % (KEY_ID, KEY_SECRET)).encode()).decode()

VERBOSE = "-v" in sys.argv[1:]
failures = []
passes = 0


def check(name, cond, detail=""):
    global passes
    if cond:
        passes += 1
        print("ok   %s" % name)
    else:
        failures.append(name)
        print("FAIL %s%s" % (name, (" -- " + str(detail)) if detail else ""))
    sys.stdout.flush()
    return cond


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def user(x="u1", **over):
    body = {
        "userIPAddress": "182.253.177.234",
        "userAgent": "selftest/1.0",
        "userPlatform": "android",
        "userDeviceID": "aaaa-bbbb-cccc-dddd",
        "xcUserID": x,
        "fullName": "Jony",
    }
    for k, v in over.items():
        if v is DROP:
            body.pop(k, None)
        else:
            body[k] = v
    return body


DROP = object()


def success_bytes(x):
    return json.dumps({"status": 200,
                       "error": {"code": "", "message": "", "field": ""},
                       "data": {"userID": "tt-" + x, "ticket": "ticket-" + x}},
                      separators=(",", ":"), ensure_ascii=False).encode()


def env_bytes(status, code, message, field=""):
    return json.dumps({"status": status,
                       "error": {"code": code, "message": message,
                                 "field": field},
                       "data": {}}, separators=(",", ":")).encode()


class Resp:
    def __init__(self, status, headers, body, elapsed):
        self.status = status
        self.headers = headers
        self.body = body
        self.elapsed = elapsed

    def h(self, name):
        return self.headers.get(name.lower())

    def __repr__(self):
        return "Resp(%r, %r, %r)" % (self.status, self.headers,
                                     self.body[:200])


def post(port, body, key=GOOD_KEY, path=API, headers=None, conn=None,
         method="POST", timeout=10):
    """POST with http.client; returns Resp."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    if isinstance(body, (dict, list)):
        data = json.dumps(body).encode()
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = body
    hdrs = {"Content-Type": "application/json"}
    if key is not None:
        hdrs["Server-Key"] = key
    if headers:
        hdrs.update(headers)
    t0 = time.monotonic()
    conn.request(method, path, body=data if method != "GET" else None,
                 headers=hdrs)
    r = conn.getresponse()
    payload = r.read()
    el = time.monotonic() - t0
    res = Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, payload,
               el)
    if own:
        conn.close()
    return res


def raw_request(path, body, key=GOOD_KEY, extra=(), method="POST",
                host="127.0.0.1"):
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: %s" % host]
    if key is not None:
        lines.append("Server-Key: %s" % key)
    lines.append("Content-Type: application/json")
    lines.append("Content-Length: %d" % len(body))
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def raw_outcome(port, data, timeout=5.0):
    """Send raw bytes; return ('rst'|'eof'|'data', bytes)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        got = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return ("rst", got)
            if not chunk:
                return ("eof" if not got else "data", got)
            got += chunk
            if b"\r\n\r\n" in got:
                _, hd, rest = split_head(got)
                if len(rest) >= int(hd.get("content-length", "0")):
                    return ("data", got)
    finally:
        s.close()


def read_stream(port, data, seconds, limit=None):
    """Send raw request, read for `seconds` (or until `limit` bytes)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    got = bytearray()
    try:
        s.sendall(data)
        end = time.monotonic() + seconds
        s.settimeout(0.05)
        while time.monotonic() < end:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                break
            got += chunk
            if limit is not None and len(got) >= limit:
                break
    finally:
        s.close()
    return bytes(got)


def split_head(data):
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return lines[0], hdrs, rest


class Log:
    def __init__(self, path):
        self.path = path

    def lines(self):
        with open(self.path, "rb") as fh:
            raw = fh.read()
        out = []
        for line in raw.split(b"\n"):
            if line:
                out.append(json.loads(line.decode("ascii")))
        return out

    def requests(self):
        return [e for e in self.lines() if e.get("event") == "request"]

    def find_body(self, needle):
        return [e for e in self.requests() if needle in e.get("body", "")]


def still_serving(port, tag):
    try:
        r = post(port, user("alive-" + tag), timeout=5)
        return r.status == 200 and r.body == success_bytes("alive-" + tag)
    except Exception as e:
        return False


def start_mock(tmp, ports, tls=None, extra=(), name="", stdin=None):
    log = os.path.join(tmp, name + "requests.jsonl")
    pidfile = os.path.join(tmp, name + "mock.pid")
    cmd = [sys.executable, MOCK] + list(extra)
    for p in ports:
        cmd += ["--port", str(p)]
    if tls:
        cmd += ["--tls-port", str(tls[0]), "--tls-cert", tls[1],
                "--tls-key", tls[2]]
    cmd += ["--key-id", KEY_ID, "--key-secret", KEY_SECRET, "--log", log,
            "--pidfile", pidfile]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=None if VERBOSE else subprocess.PIPE,
                            stdin=subprocess.DEVNULL if stdin is None
                            else stdin)
    deadline = time.monotonic() + 10
    line = b""
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 0.1)
        if r:
            line = proc.stdout.readline()
            break
        if proc.poll() is not None:
            break
    return proc, log, pidfile, line


def ready_ports(line):
    """The ports of a "mock ready ports=P1,P2 tls_port=P3" line:
    ([P1, P2], P3 or None), or None when the line has another form."""
    words = line.decode("ascii", "replace").split()
    if words[:2] != ["mock", "ready"] or len(words) not in (3, 4) \
            or not words[2].startswith("ports="):
        return None
    try:
        plain = [int(p) for p in words[2][6:].split(",") if p]
        tls = None
        if len(words) == 4:
            if not words[3].startswith("tls_port="):
                return None
            tls = int(words[3][9:])
    except ValueError:
        return None
    return plain, tls


def check_startup_options(tmp):
    """Explicit ports are reported as given; --exit-on-eof ends the mock
    when its stdin closes (a parent that died)."""
    p1, p2 = free_port(), free_port()
    proc, _, _, line = start_mock(tmp, [p1, p2], name="explicit-")
    try:
        check("explicit ports are reported on the ready line",
              line == ("mock ready ports=%d,%d\n" % (p1, p2)).encode(), line)
        check("explicit port serves", still_serving(p1, "explicit"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    proc, _, _, line = start_mock(tmp, [0], extra=["--exit-on-eof"],
                                  name="eof-", stdin=subprocess.PIPE)
    try:
        got = ready_ports(line)
        check("--exit-on-eof: the mock starts",
              got is not None and len(got[0]) == 1, line)
        proc.stdin.close()
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            rc = None
        check("--exit-on-eof: the mock exits (0) when stdin closes", rc == 0,
              rc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def make_cert(tmp):
    if not shutil.which("openssl"):
        return None
    cert = os.path.join(tmp, "cert.pem")
    key = os.path.join(tmp, "key.pem")
    r = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
         "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if r.returncode != 0:
        return None
    return cert, key


# ======================================================================
def run_checks(port, port2, tls_port, cert, log, tmp):
    L = Log(log)

    # --- log file basics
    st = os.stat(log)
    check("log file mode 0644", stat.S_IMODE(st.st_mode) == 0o644,
          oct(st.st_mode))

    # --- success + keep-alive
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    r1 = post(port, user("ka-1"), conn=conn)
    r2 = post(port, user("ka-2"), conn=conn)
    conn.close()
    check("success status 200", r1.status == 200, r1)
    check("success body exact", r1.body == success_bytes("ka-1"), r1.body)
    check("success content-type json",
          r1.h("content-type") == "application/json", r1.headers)
    check("success second request on same connection",
          r2.status == 200 and r2.body == success_bytes("ka-2"), r2)
    e1 = L.find_body('"ka-1"')
    e2 = L.find_body('"ka-2"')
    ok = len(e1) == 1 and len(e2) == 1 and e1[0]["conn"] == e2[0]["conn"]
    check("keep-alive: both requests logged with same conn", ok, (e1, e2))
    if ok:
        cid = e1[0]["conn"]
        conns = [e for e in L.lines()
                 if e["event"] == "connection" and e["conn"] == cid]
        check("keep-alive: exactly one connection event",
              len(conns) == 1 and conns[0]["port"] == port, conns)
        check("log seq increases", e2[0]["seq"] == e1[0]["seq"] + 1,
              (e1[0]["seq"], e2[0]["seq"]))
        check("log request fields",
              e1[0]["method"] == "POST" and e1[0]["path"] == API
              and e1[0]["port"] == port and e1[0]["body_is_json"] is True
              and json.loads(e1[0]["body"])["xcUserID"] == "ka-1", e1[0])

    # --- xcUserID as integer, non-ASCII
    r = post(port, user(42))
    check("integer xcUserID -> tt-42", r.status == 200
          and r.body == success_bytes("42"), r)
    r = post(port, user("ünï-çødé"))
    check("non-ASCII xcUserID echoed as UTF-8", r.status == 200
          and r.body == success_bytes("ünï-çødé"), r)
    r = post(port, user("x" * 50))
    check("xcUserID of 50 chars accepted", r.status == 200, r)
    r = post(port, dict(user("opt"), email="a@b.c", phone="62811",
                        username="u", photoThumbnailURL="http://t",
                        photoFullsizeURL="http://f", userRoleCode="user"))
    check("all optional fields accepted", r.status == 200
          and r.body == success_bytes("opt"), r)

    # --- server key
    r = post(port, user(), key=None)
    check("missing Server-Key -> 400 40001", r.status == 400 and r.body ==
          env_bytes(400, "40001",
                    "Request headers are required (Server-Key)"), r)
    r = post(port, user(), key="")
    check("empty Server-Key -> 400 40001", r.status == 400 and r.body ==
          env_bytes(400, "40001",
                    "Request headers are required (Server-Key)"), r)
    r = post(port, user(), key="d3Jvbmc6a2V5")
    check("wrong Server-Key -> 401 40101", r.status == 401 and r.body ==
          env_bytes(401, "40101", "Invalid server key"), r)
    out = raw_outcome(port, raw_request(API, user("lc-key"), key=None,
                                        extra=("server-key: " + GOOD_KEY,)))
    check("Server-Key header name case-insensitive",
          out[0] == "data" and out[1].startswith(b"HTTP/1.1 200 "), out)

    # --- body
    for label, body in (("not json", b"hello"), ("json array", b"[1,2]"),
                        ("empty body", b""),
                        ("invalid utf-8", b'{"a":"\xff"}')):
        r = post(port, body)
        check("body %s -> 400 40000" % label, r.status == 400 and r.body ==
              env_bytes(400, "40000", "Invalid request body"), r)

    # --- required fields
    codes = [("userIPAddress", "101"), ("userAgent", "102"),
             ("userPlatform", "103"), ("userDeviceID", "104"),
             ("xcUserID", "105"), ("fullName", "106")]
    for name, code in codes:
        want = env_bytes(400, "40002", "Param '%s' is required" % name, code)
        r = post(port, user("req", **{name: DROP}))
        check("missing %s -> 40002 field %s" % (name, code),
              r.status == 400 and r.body == want, r)
        r = post(port, user("req", **{name: "   "}))
        check("blank %s -> required" % name,
              r.status == 400 and r.body == want, r)
        r = post(port, user("req", **{name: [1] if name == "xcUserID"
                                      else 7}))
        check("non-string %s -> required" % name,
              r.status == 400 and r.body == want, r)
    r = post(port, user("req", userPlatform="windows"))
    check("userPlatform invalid -> 40002 103", r.status == 400 and r.body ==
          env_bytes(400, "40002", "Param 'userPlatform' is invalid", "103"),
          r)
    r = post(port, user("req", userPlatform="windows", userDeviceID=DROP))
    check("field order: platform checked before device id",
          r.body == env_bytes(400, "40002", "Param 'userPlatform' is invalid",
                              "103"), r)
    r = post(port, user("x" * 51))
    check("xcUserID too long -> 40002 105", r.status == 400 and r.body ==
          env_bytes(400, "40002", "Param 'xcUserID' is too long", "105"), r)
    for name, code in (("email", "107"), ("phone", "108"),
                       ("username", "109"), ("photoThumbnailURL", "110"),
                       ("photoFullsizeURL", "111"), ("userRoleCode", "112")):
        r = post(port, user("opt", **{name: 12}))
        check("optional %s non-string -> invalid %s" % (name, code),
              r.status == 400 and r.body == env_bytes(
                  400, "40002", "Param '%s' is invalid" % name, code), r)

    # --- routing
    r = post(port, user(), path="/nope")
    check("unknown path -> 404 not found",
          r.status == 404 and r.body == b"not found", r)
    r = post(port, None, method="GET")
    check("GET on API path -> 405", r.status == 405, r)
    r = post(port, user(), path="/bogus/1" + API)
    check("unknown prefix mode -> 404", r.status == 404, r)

    # --- stats
    before = len(L.requests())
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", "/_mock/stats")
    rr = c.getresponse()
    sbody = rr.read()
    c.close()
    try:
        stats = json.loads(sbody)
    except ValueError:
        stats = None
    check("stats endpoint 200 JSON", rr.status == 200 and isinstance(
        stats, dict) and set(stats) == {"connections", "requests"}, sbody)
    check("stats counts match log", stats is not None
          and stats["requests"] == before
          and stats["connections"] == len([e for e in L.lines()
                                           if e["event"] == "connection"]),
          (stats, before))
    check("stats request not logged", len(L.requests()) == before)

    # --- log: header order, exact body, invalid utf-8
    raw = (b"POST " + API.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           b"X-First: one\r\nserver-KEY: " + GOOD_KEY.encode() +
           b"\r\nContent-Length: 10\r\nX-Last: z z\r\n\r\n{\"a\":\"\xff\xfe\"}")
    out = raw_outcome(port, raw)
    check("invalid utf-8 body -> 40000", out[0] == "data"
          and out[1].startswith(b"HTTP/1.1 400 "), out)
    ev = [e for e in L.requests()
          if ["X-First", "one"] in e["headers"]]
    check("log: raw request logged", len(ev) == 1, ev)
    if ev:
        e = ev[0]
        check("log: headers in order with names as sent",
              e["headers"] == [["Host", "127.0.0.1"], ["X-First", "one"],
                               ["server-KEY", GOOD_KEY],
                               ["Content-Length", "10"], ["X-Last", "z z"]],
              e["headers"])
        check("log: body_b64 exact",
              base64.b64decode(e["body_b64"]) == b'{"a":"\xff\xfe"}', e)
        check("log: body_is_json false for invalid utf-8",
              e["body_is_json"] is False, e)
        check("log: body decoded with replacement",
              e["body"] == '{"a":"\ufffd\ufffd"}', e["body"])
    with open(log, "rb") as fh:
        rawlog = fh.read()
    check("log: ASCII only, newline terminated",
          rawlog.endswith(b"\n") and all(b < 128 for b in rawlog))

    check("log: compact JSON lines",
          all(line.startswith(b'{"event":"')
              for line in rawlog.split(b"\n") if line)
          and b'"event":"request"' in rawlog)

    # abrupt client disconnects: partial headers, partial body, during a
    # slow answer; the mock must stay quiet and keep serving
    for data in (b"POST " + API.encode() + b" HTTP/1.1\r\nHost: x",
                 raw_request(API, user("partial"))[:-5],
                 raw_request(API, user("fault-slow-200"))):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(data)
        time.sleep(0.02)
        s.close()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(raw_request(API, user("fault-slow-200")))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                 struct.pack("ii", 1, 0))
    s.close()
    time.sleep(0.3)
    check("still serving after abrupt client disconnects",
          still_serving(port, "abrupt"))

    # logged before the response
    r = post(port, user("before-resp"))
    check("log: request line present when response arrives",
          len(L.find_body("before-resp")) == 1)

    # --- chunked request body, Expect: 100-continue, Connection: close
    body = json.dumps(user("chunked")).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 10]), body[i:i + 10])
                      for i in range(0, len(body), 10)) + b"0\r\n\r\n"
    raw = ("POST %s HTTP/1.1\r\nHost: x\r\nServer-Key: %s\r\n"
           "Transfer-Encoding: chunked\r\n\r\n" % (API, GOOD_KEY)).encode()
    out = raw_outcome(port, raw + chunks)
    _, hd, rest = split_head(out[1]) if out[1] else ("", {}, b"")
    check("chunked request body accepted",
          out[1].startswith(b"HTTP/1.1 200 ")
          and rest == success_bytes("chunked"), out)
    ev = L.find_body('"chunked"')
    check("chunked body logged exactly", len(ev) == 1 and
          base64.b64decode(ev[0]["body_b64"]) == body, ev)

    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    body = json.dumps(user("expect")).encode()
    s.sendall(("POST %s HTTP/1.1\r\nHost: x\r\nServer-Key: %s\r\n"
               "Content-Length: %d\r\nExpect: 100-continue\r\n\r\n"
               % (API, GOOD_KEY, len(body))).encode())
    first = s.recv(100)
    s.sendall(body)
    got = b""
    while b'"ticket-expect"' not in got:
        c = s.recv(65536)
        if not c:
            break
        got += c
    s.close()
    check("Expect: 100-continue answered",
          first.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
          and b"HTTP/1.1 200 OK" in first + got, (first, got))

    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(raw_request(API, user("conn-close"),
                          extra=("Connection: close",)))
    got = b""
    while True:
        c = s.recv(65536)
        if not c:
            break
        got += c
    s.close()
    status, hd, rest = split_head(got)
    check("Connection: close honoured",
          status.startswith("HTTP/1.1 200") and hd.get("connection") ==
          "close" and rest == success_bytes("conn-close"), got)

    # --- fault modes
    r = post(port, user("fault-slow-300"))
    check("fault-slow-300 sleeps then succeeds", r.status == 200
          and r.body == success_bytes("fault-slow-300")
          and r.elapsed >= 0.29, (r, r.elapsed))

    out = raw_outcome(port, raw_request(API, user("fault-reset")))
    check("fault-reset -> TCP RST, no data", out == ("rst", b""), out)
    out = raw_outcome(port, raw_request(API, user("fault-close")))
    check("fault-close -> clean EOF, no data", out == ("eof", b""), out)

    r = post(port, user("fault-html500"))
    check("fault-html500", r.status == 500 and r.h("content-type") ==
          "text/html" and r.body ==
          b"<html><body><h1>500 Internal Server Error</h1></body></html>", r)
    r = post(port, user("fault-envelope500"))
    check("fault-envelope500", r.status == 500 and r.body ==
          env_bytes(500, "50000", "Internal server error"), r)
    for code in (404, 502, 429, 200):
        r = post(port, user("fault-status-%d" % code))
        check("fault-status-%d" % code, r.status == code and r.body ==
              b"status %d" % code and r.h("content-type").startswith(
                  "text/plain"), r)
    r = post(port, user("fault-badjson"))
    check("fault-badjson", r.status == 200 and r.body ==
          b'{"status":200,"data":{"userID":"1","ticket":', r)
    r = post(port, user("fault-notjson"))
    check("fault-notjson", r.status == 200 and r.body == b"OK"
          and r.h("content-type").startswith("text/plain"), r)
    r = post(port, user("fault-emptybody"))
    check("fault-emptybody", r.status == 200 and r.body == b""
          and r.h("content-length") == "0", r)
    r = post(port, user("fault-noticket"))
    try:
        d = json.loads(r.body)
    except ValueError:
        d = {}
    check("fault-noticket", r.status == 200 and d.get("status") == 200
          and list(d.get("data", {})) == ["userID"], r)
    r = post(port, user("fault-numeric-userid"))
    check("fault-numeric-userid", r.status == 200 and r.body ==
          b'{"status":200,"error":{"code":"","message":"","field":""},'
          b'"data":{"userID":4242,"ticket":"ticket-numeric"}}', r)

    # huge: full 1 MiB over keep-alive, then 100 MiB partial read
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    r = post(port, user("fault-huge-1"), conn=conn)
    r2 = post(port, user("after-huge"), conn=conn)
    conn.close()
    check("fault-huge-1 full body", r.status == 200 and len(r.body) ==
          1048576 and r.body.startswith(
              b'{"status":200,"data":{"userID":"1","ticket":"AAAA')
          and r.body.endswith(b"AAAA"), (r.status, len(r.body)))
    check("keep-alive works after a huge body",
          r2.status == 200 and r2.body == success_bytes("after-huge"), r2)
    got = read_stream(port, raw_request(API, user("fault-huge-100")), 10,
                      limit=2 * 1048576)
    status, hd, rest = split_head(got)
    check("fault-huge-100 headers", status.startswith("HTTP/1.1 200")
          and hd.get("content-length") == str(100 * 1048576), hd)
    check("fault-huge-100 read 2 MiB then disconnect",
          len(got) >= 2 * 1048576 and rest.startswith(
              b'{"status":200,"data":{"userID":"1","ticket":"AAA'), len(got))
    check("still serving after huge disconnect", still_serving(port, "huge"))

    got = read_stream(port, raw_request(API, user("fault-endless")), 0.3)
    status, hd, rest = split_head(got)
    check("fault-endless streams chunked data",
          status.startswith("HTTP/1.1 200")
          and hd.get("transfer-encoding") == "chunked"
          and "content-length" not in hd and len(rest) > 5 * 1024,
          (status, hd, len(rest)))
    check("still serving after endless", still_serving(port, "endless"))

    got = read_stream(port, raw_request(API, user("fault-endless-headers")),
                      0.3)
    check("fault-endless-headers streams header lines",
          got.startswith(b"HTTP/1.1 200 OK\r\nX-Filler-1: " + b"x" * 1000
                         + b"\r\nX-Filler-2: ")
          and b"\r\n\r\n" not in got and len(got) > 20 * 1000, len(got))
    check("still serving after endless-headers",
          still_serving(port, "endless-headers"))

    got = read_stream(port, raw_request(API, user("fault-interim-101")), 0.3)
    check("fault-interim-101 answers 101 and nothing more",
          got == b"HTTP/1.1 101 Switching Protocols\r\n\r\n", got)
    got = read_stream(port, raw_request(API, user("fault-interim-103")), 0.3)
    status, hd, rest = split_head(got)
    check("fault-interim-103 answers 103, then the success",
          status == "HTTP/1.1 103 Early Hints"
          and rest.startswith(b"HTTP/1.1 200 OK\r\n")
          and rest.endswith(success_bytes("fault-interim-103")), got)
    check("still serving after interim-101", still_serving(port, "interim"))

    r = post(port, user("fault-deep-5"))
    check("fault-deep-5", r.status == 200 and r.body ==
          b'{"status":200,"data":[[[[[]]]]]}', r)
    r = post(port, user("fault-bigticket"))
    try:
        d = json.loads(r.body)
        t = d["data"]["ticket"]
    except (ValueError, KeyError, TypeError):
        t = ""
    check("fault-bigticket 1 MiB ticket", r.status == 200 and
          len(t) == 1048576 and t == "T" * 1048576, len(t))
    r = post(port, user("fault-nul"))
    check("fault-nul raw NUL", r.status == 200 and r.body ==
          b'{"status":200,"error":{"code":"","message":"","field":""},'
          b'"data":{"userID":"1","ticket":"ab\x00cd"}}', r)
    r = post(port, user("fault-badutf8"))
    bad = False
    try:
        r.body.decode("utf-8")
    except UnicodeDecodeError:
        bad = True
    check("fault-badutf8 raw invalid UTF-8 ticket", r.status == 200 and bad
          and b'"ticket":"ab\xff\xfecd"' in r.body, r)

    for code in (301, 302, 303, 307, 308):
        r = post(port, user("fault-redirect-%d" % code))
        check("fault-redirect-%d Location" % code, r.status == code
              and r.h("location") == "http://127.0.0.1:%d%s" % (port2, API)
              and r.body == b"moved", r)

    seq = [post(port, user("fault-flaky-2-tokA")).status for _ in range(4)]
    check("fault-flaky-2 -> 503,503,200,200", seq == [503, 503, 200, 200], seq)
    r = post(port, user("fault-flaky-1-tokB"))
    check("fault-flaky 503 body", r.status == 503 and
          r.body == b"service unavailable", r)
    outs = [raw_outcome(port, raw_request(API,
                                          user("fault-flakyreset-2-tokC")))[0]
            for _ in range(3)]
    check("fault-flakyreset-2 -> rst,rst,data", outs == ["rst", "rst",
                                                         "data"], outs)
    seq = [post(port, user("fault-answer-429-env-1-2-tokD"))
           for _ in range(3)]
    check("fault-answer-429-env-1-2 -> 429,429,200 with Retry-After 1 and "
          "the envelope 42900",
          [r.status for r in seq] == [429, 429, 200]
          and seq[0].h("retry-after") == "1"
          and json.loads(seq[0].body)["error"]["code"] == "42900"
          and json.loads(seq[0].body)["error"]["message"]
          == "Too many requests", [(r.status, r.body) for r in seq])
    r = post(port, user("fault-answer-503-text-date5-1-tokE"))
    check("fault-answer-503-text-date5: an HTTP-date about 5 s ahead",
          r.status == 503 and r.body == b"status 503" and 3 <= (
              email.utils.parsedate_to_datetime(r.h("retry-after"))
              .timestamp() - time.time()) <= 6, r)
    r = post(port, user("fault-answer-429-empty-neg5-1-tokF"))
    check("fault-answer-429-empty-neg5: no body, Retry-After -5",
          r.status == 429 and r.body == b"" and r.h("retry-after") == "-5", r)
    seq = [post(port, user("fault-quota-2-grpA-%d" % i)).status
           for i in range(4)]
    check("fault-quota-2: at most 2 of a group per second succeed",
          seq.count(429) >= 1 and seq[0] == 200, seq)
    r = post(port, user("fault-envelope-field"))
    check("fault-envelope-field", r.status == 400 and r.body ==
          env_bytes(400, "40002", "Param 'email' is invalid", "107"), r)
    x = "fault-unicode-note-raw-4e2d"
    r = post(port, user(x))
    check("fault-unicode-note-raw: raw UTF-8 in ignored members",
          r.status == 200 and r.body ==
          b'{"status":200,"note":"\xe4\xb8\xad","error":{"code":"",'
          b'"message":"","field":""},"data":{"userID":"tt-' + x.encode()
          + b'","ticket":"ticket-' + x.encode() + b'","note":"\xe4\xb8\xad"}}',
          r)
    r = post(port, user("fault-unicode-userid-esc-1f600"))
    check("fault-unicode-userid-esc: surrogate pair escape in userID",
          r.status == 200 and b'"userID":"tt-\\ud83d\\ude00"' in r.body
          and json.loads(r.body)["data"]["userID"] == "tt-\U0001F600", r)
    r = post(port, user("fault-unicode-ticket-raw-e9"))
    check("fault-unicode-ticket-raw: raw UTF-8 in ticket",
          r.status == 200 and b'"ticket":"ticket-\xc3\xa9"' in r.body, r)
    r = post(port, user("fault-unicode-code-esc-e9"))
    check("fault-unicode-code-esc: escape in error.code", r.status == 400
          and r.body == env_bytes(400, "4000\u00e9",
                                  "Param 'fullName' is invalid", "106"), r)
    r = post(port, user("fault-unicode-field-raw-4e2d"))
    check("fault-unicode-field-raw: raw UTF-8 in error.field",
          r.status == 400 and b'"field":"10\xe4\xb8\xad"' in r.body, r)
    r = post(port, user("fault-unicode-message-esc-4e2d"))
    check("fault-unicode-message-esc: escape in error.message",
          r.status == 400 and r.body == env_bytes(
              400, "40002", "Param 'fullName' has \u4e2d", "106"), r)
    for bad in ("fault-unicode-note-raw-d800", "fault-unicode-note-raw-0",
                "fault-unicode-note-raw-4E2D", "fault-unicode-x-raw-41",
                "fault-unicode-note-utf16-41"):
        r = post(port, user(bad))
        check("%s -> normal success" % bad, r.status == 200 and r.body ==
              success_bytes(bad), r)
    r = post(port, user("fault-escapes-all"))
    check("fault-escapes-all", r.status == 200 and json.loads(r.body)["data"]
          == {"userID": 'a"b\\c/d\b\f\n\r\te\u00e9\U0001F600',
              "ticket": "ticket-escapes"}
          and b'"\\u0075serID"' in r.body and b"\\uD83D\\ude00" in r.body, r)
    for case, needle in (("lone", b'"tt-\\ud800"'),
                         ("unpaired", b'"tt-\\ud800\\u0041"'),
                         ("low", b'"tt-\\udc00\\ud800"'),
                         ("nul", b'"a\\u0000b"'),
                         ("ignored", b'"note":"\\ud800 \\udc00\\ud800 \\u0000"')):
        r = post(port, user("fault-escapes-" + case))
        check("fault-escapes-" + case, r.status == 200 and needle in r.body, r)
    r = post(port, user("fault-escapes-other"))
    check("fault-escapes-other -> normal success", r.status == 200 and
          r.body == success_bytes("fault-escapes-other"), r)
    # a root member twice: json.loads keeps the later one, as jsonb does
    for case, want in (
            ("data", {"userID": "tt-later"}),
            ("error", {"code": "40101", "message": "Invalid server key"}),
            ("error-null", None),
            ("data-null", None)):
        r = post(port, user("fault-dup-" + case))
        key = "data" if case.startswith("data") else "error"
        check("fault-dup-" + case, r.status == 200 and
              r.body.count(b'"%s":' % key.encode()) == 2 and
              json.loads(r.body)[key] == want, r)
    r = post(port, user("fault-dup-other"))
    check("fault-dup-other -> normal success", r.status == 200 and
          r.body == success_bytes("fault-dup-other"), r)
    r = post(port, user("fault-whatever"))
    check("unknown fault-... -> success", r.status == 200 and r.body ==
          success_bytes("fault-whatever"), r)

    # --- prefix modes
    r = post(port, user("d"), path="/delay/300" + API)
    check("/delay/300 delays and succeeds", r.status == 200 and
          r.elapsed >= 0.29 and r.body == success_bytes("d"), r.elapsed)
    sts = [post(port, user("fe"), path="/failevery/3" + API).status
           for _ in range(6)]
    check("/failevery/3 -> every 3rd is 503",
          sts == [200, 200, 503, 200, 200, 503], sts)
    sts = [post(port, user("fe"), path="/delay/1/failevery/2" + API).status
           for _ in range(4)]
    check("composed /delay/1/failevery/2 (own counter)",
          sts == [200, 503, 200, 503], sts)
    r = post(port, user("fe"), key="bad", path="/failevery/1000" + API)
    check("prefix then key check", r.status == 401, r)

    # chaos: wait for each phase with enough margin
    period = 1000
    for phase in (0, 3, 2, 1):
        deadline = time.time() + 5
        while time.time() < deadline:
            t = time.time() * 1000
            if int(t // period % 4) == phase and t % period < 500:
                break
            time.sleep(0.01)
        data = raw_request("/chaos/%d%s" % (period, API), user("chaos"))
        t0 = time.monotonic()
        out = raw_outcome(port, data)
        el = time.monotonic() - t0
        if phase == 0:
            ok = out[0] == "data" and out[1].startswith(b"HTTP/1.1 200 ")
        elif phase == 1:
            ok = out[0] == "data" and out[1].startswith(b"HTTP/1.1 200 ") \
                and el >= 1.9
        elif phase == 2:
            ok = out == ("rst", b"")
        else:
            ok = out[0] == "data" and out[1].startswith(b"HTTP/1.1 503 ")
        check("chaos phase %d" % phase, ok, (out, el))

    # --- TLS
    if tls_port:
        ctx = ssl.create_default_context(cafile=cert)
        c = http.client.HTTPSConnection("127.0.0.1", tls_port, timeout=5,
                                        context=ctx)
        r = post(tls_port, user("tls-1"), conn=c)
        r2 = post(tls_port, user("tls-2"), conn=c)
        c.close()
        check("TLS success + keep-alive", r.body == success_bytes("tls-1")
              and r2.body == success_bytes("tls-2"), (r, r2))
        ev = L.find_body('"tls-1"')
        check("TLS request logged with TLS port",
              len(ev) == 1 and ev[0]["port"] == tls_port, ev)
        rejected = False
        try:
            c = http.client.HTTPSConnection(
                "127.0.0.1", tls_port, timeout=5,
                context=ssl.create_default_context())
            c.request("GET", "/_mock/stats")
            c.getresponse().read()
        except ssl.SSLError:
            rejected = True
        finally:
            c.close()
        check("TLS client rejecting the cert fails", rejected)
        s = socket.create_connection(("127.0.0.1", tls_port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")   # plain text to TLS port
        try:
            s.recv(100)
        except OSError:
            pass
        s.close()
        ctx = ssl.create_default_context(cafile=cert)
        c = http.client.HTTPSConnection("127.0.0.1", tls_port, timeout=5,
                                        context=ctx)
        r = post(tls_port, user("tls-3"), conn=c)
        c.close()
        check("TLS still serving after rejected handshakes",
              r.body == success_bytes("tls-3"), r)
    else:
        print("skip TLS checks (no openssl)")

    # --- second port
    r = post(port2, user("p2"))
    check("second port serves", r.body == success_bytes("p2"), r)
    ev = L.find_body('"p2"')
    check("second port logged", len(ev) == 1 and ev[0]["port"] == port2, ev)

    # --- concurrency
    results = []
    lock = threading.Lock()

    def one(i, path, x):
        try:
            r = post(port, user(x), path=path, timeout=20)
            st_ = r.status
        except Exception as e:
            st_ = repr(e)
        with lock:
            results.append(st_)

    def run_parallel(n, path, x):
        del results[:]
        ths = [threading.Thread(target=one, args=(i, path, x + str(i)))
               for i in range(n)]
        t0 = time.monotonic()
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        return time.monotonic() - t0

    el = run_parallel(50, "/delay/50" + API, "par")
    check("50 concurrent /delay/50 in well under 1 s",
          results.count(200) == 50 and el < 0.8, (el, results[:5]))
    el = run_parallel(16, API, "fault-slow-500-")
    check("16 concurrent slow requests in parallel",
          results.count(200) == 16 and el < 1.5, (el, results[:5]))

    socks = []
    try:
        for i in range(300):
            socks.append(socket.create_connection(("127.0.0.1", port),
                                                  timeout=10))
        for i, s in enumerate(socks):
            s.sendall(raw_request(API, user("c300-%d" % i)))
        good = 0
        for i, s in enumerate(socks):
            want = success_bytes("c300-%d" % i)
            got = b""
            while not got.endswith(want):
                c = s.recv(65536)
                if not c:
                    break
                got += c
            if got.startswith(b"HTTP/1.1 200 ") and got.endswith(want):
                good += 1
        check("300 concurrent keep-alive connections", good == 300, good)
        # reuse all 300 connections once more
        for i, s in enumerate(socks):
            s.sendall(raw_request(API, user("c300b-%d" % i)))
        good = 0
        for i, s in enumerate(socks):
            want = success_bytes("c300b-%d" % i)
            got = b""
            while not got.endswith(want):
                c = s.recv(65536)
                if not c:
                    break
                got += c
            if got.endswith(want):
                good += 1
        check("300 connections reused (keep-alive)", good == 300, good)
    finally:
        for s in socks:
            s.close()

    # --- throughput
    n = 3000
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = json.dumps(user("perf")).encode()
    hdrs = {"Server-Key": GOOD_KEY, "Content-Type": "application/json"}
    t0 = time.monotonic()
    okc = 0
    for i in range(n):
        c.request("POST", API, body=body, headers=hdrs)
        rr = c.getresponse()
        if rr.status == 200 and rr.read():
            okc += 1
    el = time.monotonic() - t0
    c.close()
    rate = n / el
    check("throughput on one keep-alive connection (%.0f req/s)" % rate,
          okc == n and rate > 1000, rate)

    check("mock still serving at the end", still_serving(port, "end"))


def main():
    tmp = tempfile.mkdtemp(prefix="mock-selftest-")
    proc = None
    try:
        # port 0: the system chooses, the ready line says which
        certkey = make_cert(tmp)
        tls = (0, certkey[0], certkey[1]) if certkey else None
        proc, log, pidfile, line = start_mock(tmp, [0, 0], tls)
        got = ready_ports(line)
        if not check("mock prints 'mock ready ports=P1,P2%s'"
                     % (" tls_port=P3" if tls else ""),
                     got is not None and len(got[0]) == 2
                     and (got[1] is not None) == bool(tls)
                     and len(set(got[0] + ([got[1]] if tls else []))) ==
                     2 + bool(tls) and 0 not in got[0] and got[1] != 0,
                     line):
            return 1
        (port, port2), tls_port = got
        with open(pidfile) as fh:
            pid = int(fh.read().strip())
        check("pidfile holds the mock pid", pid == proc.pid, pid)
        try:
            run_checks(port, port2, tls_port if tls else None,
                       certkey[0] if certkey else None, log, tmp)
        except Exception as e:
            import traceback
            traceback.print_exc()
            check("self-test ran without exceptions", False, repr(e))
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            rc = None
        check("mock exits cleanly on SIGTERM", rc == 0, rc)
        check("pidfile removed on exit", not os.path.exists(pidfile))
        if proc.stderr is not None:
            err = proc.stderr.read()
            check("mock wrote nothing to stderr", not err, err[-2000:])
        check_startup_options(tmp)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print("%d passed, %d failed" % (passes, len(failures)))
    if failures:
        print("failed: " + ", ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
