#!/usr/bin/env python3
"""Hostile request bodies for taptalk_auth_ticket (t/040_fuzz.pl).

Writes COUNT inputs, one per line as "ID<TAB>BASE64", where BASE64 holds the
exact bytes of a would-be JSON text (so that invalid UTF-8 survives COPY).
The inputs are built from a seeded random.Random only: the same seed and
count always give the same file.

    fuzz_requests.py --seed 42 --count 2000 --out inputs.tsv [--stats]

First every JSON type (null, booleans, numbers, strings, arrays, objects,
nested) in every field of an otherwise valid request; then inputs of these
kinds, chosen at random, weighted:
  - a valid request with fields deleted, duplicated, or replaced by a value
    of any JSON type (null, booleans, integers small and huge, decimals,
    exponents, strings, arrays, objects, nested containers);
  - strings of every sort in every field: quotes, backslashes, control
    characters, non-ASCII, non-BMP, combining marks, U+2028, BOM, non-ASCII
    white space, text that looks like escapes; escaped or raw;
  - escapes PostgreSQL's jsonb refuses: \\u0000, lone surrogates;
  - raw bytes that are not UTF-8 (inside and outside strings);
  - deep nesting (up to 100,000 levels) in a field and at the top;
  - huge strings (64 KiB to 1 MiB) in known and unknown fields;
  - thousands of keys; duplicate keys; empty and very long keys;
  - top-level values that are not objects; truncated or malformed JSON;
  - xcUserID at and past its 50-character limit, as numbers of every shape.
No input makes the mock misbehave on purpose: an xcUserID never starts with
"fault-".
"""

import argparse
import base64
import json
import random
import sys

FIELDS = ["userIPAddress", "userAgent", "userPlatform", "userDeviceID",
          "xcUserID", "fullName", "email", "phone", "username",
          "photoThumbnailURL", "photoFullsizeURL", "userRoleCode"]
REQUIRED = FIELDS[:6]
MIB = 1024 * 1024


class Raw:
    """Bytes put into the output as they are (any JSON text, or not)."""

    def __init__(self, data):
        self.data = data


class Obj:
    """An object as a list of pairs, so keys may repeat."""

    def __init__(self, pairs):
        self.pairs = pairs


class Gen:
    def __init__(self, seed, big_bytes):
        self.r = random.Random(seed)
        self.big_bytes = big_bytes
        self.kinds = {}

    # ------------------------------------------------------------ strings
    SPECIAL = ['"', "\\", "/", "\b", "\f", "\n", "\r", "\t", "\x01", "\x1f", "\x7f", "\u0080", "\u00a0", "\u00e9", "\u2028",
               "\u2029", "\ufeff", "\ufffd", "\uffff", "\u200b", "\u202e",
               "\u0301", "\u3000", "\u65e5\u672c", "\U0001F600",
               "\U0010FFFF", "\\u0041", "\\", "'", "<script>", "%00",
               "\r\n", " ", "\t\n", "NULL", "null", "1e5"]

    def text(self, max_len=40):
        r = self.r
        mode = r.randrange(8)
        n = r.randrange(max_len + 1)
        if mode == 0:
            s = "".join(r.choice("abcdefghijklmnopqrstuvwxyz0123456789-_. ")
                        for _ in range(n))
        elif mode == 1:
            s = "".join(r.choice(self.SPECIAL) for _ in range(min(n, 12)))
        elif mode == 2:
            s = "".join(chr(r.randrange(0x20, 0x7f)) for _ in range(n))
        elif mode == 3:
            s = "".join(chr(r.randrange(0x80, 0xd800)) for _ in range(n))
        elif mode == 4:
            s = "".join(chr(r.randrange(0x10000, 0x110000)) for _ in range(n))
        elif mode == 5:
            s = "".join(chr(r.choice([r.randrange(1, 0x20), 0x7f,
                                      r.randrange(0xe000, 0x10000)]))
                        for _ in range(n))
        elif mode == 6:
            s = r.choice(["", " ", "\t", "\u00a0", "\u3000", "\u2003",
                          "\x1c", "\x85", "android", "ios", "web", "Android",
                          "web ", "ios\n"])
        else:
            s = "x" * n
        if s.startswith("fault-"):
            s = "f" + s
        return s

    def enc_str(self, s):
        """A JSON string, with escapes chosen at random."""
        r = self.r
        if r.random() < 0.5 or len(s) > 4096:
            return json.dumps(s, ensure_ascii=r.random() < 0.5).encode(
                "utf-8", "surrogatepass")
        out = []
        for ch in s:
            c = ord(ch)
            if ch in '"\\' or c < 0x20:
                out.append("\\u%04x" % c if r.random() < 0.5
                           else json.dumps(ch)[1:-1])
            elif c > 0xffff and r.random() < 0.5:
                c -= 0x10000
                out.append("\\u%04X\\u%04x" % (0xd800 + (c >> 10),
                                               0xdc00 + (c & 0x3ff)))
            elif c > 0x7f and r.random() < 0.3:
                out.append("\\u%04x" % c)
            elif ch == "/" and r.random() < 0.5:
                out.append("\\/")
            else:
                out.append(ch)
        return ('"' + "".join(out) + '"').encode("utf-8", "surrogatepass")

    def bad_string(self):
        """A string jsonb or UTF-8 will refuse, as raw bytes."""
        r = self.r
        pre = self.text(8).encode("utf-8")
        bad = r.choice([
            b"\\u0000", b"\\u0000\\u0000", b"\\ud800", b"\\udc00",
            b"\\ud800\\u0041", b"\\ud800x", b"\\uDBFF", b"\\ud83d\\ud83d",
            b"\xff", b"\xfe\xff", b"\xc3", b"\xc3\x28", b"\xe2\x82",
            b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80",
            b"\xf8\x88\x80\x80\x80", b"\\x41", b"\\u12", b"\\uZZZZ",
            b"\\", b"\x00", b"\n", b"\t"])
        return Raw(b'"' + pre + bad + self.text(8).encode("utf-8") + b'"')

    # ------------------------------------------------------------- values
    def number(self):
        r = self.r
        return Raw(r.choice([
            b"0", b"-0", b"1", b"-1", b"6.0", b"7.5", b"-3", b"1e5", b"1E+2",
            b"1e-5", b"0.0", b"-0.0", b"1e308", b"1e-308", b"2e1000",
            b"123456789012345678901234567890123456789012345678901",
            b"12345678901234567890123456789012345678901234567890",
            b"9223372036854775807", b"9223372036854775808",
            b"-9223372036854775809", b"1.00000000000000000000001",
            b"1e131071", b"1e-16383", b"1e200000", b"0.1e-200000",
            b"01", b"+1", b".5", b"1.", b"1e", b"NaN", b"Infinity", b"-",
            b"0x10", b"1_000",
            str(r.randrange(-10 ** 30, 10 ** 30)).encode(),
            ("%.17g" % r.uniform(-1e10, 1e10)).encode(),
            b"1" + b"0" * r.randrange(1, 3000)]))

    def value(self, depth=0):
        r = self.r
        k = r.randrange(14)
        if k == 0:
            return None
        if k == 1:
            return r.random() < 0.5
        if k in (2, 3):
            return self.number()
        if k in (4, 5, 6, 7):
            return self.text()
        if k == 8:
            return self.bad_string()
        if k == 9 and depth < 4:
            return [self.value(depth + 1) for _ in range(r.randrange(4))]
        if k == 10 and depth < 4:
            return Obj([(self.text(10), self.value(depth + 1))
                        for _ in range(r.randrange(4))])
        if k == 11 and r.random() < 0.5:
            return self.deep()
        if k == 12 and r.random() < 0.05:
            return self.big_text()
        return self.text(60)

    def deep(self):
        r = self.r
        n = r.choice([10, 64, 65, 100, 1000, 5000, 10000, 100000])
        o, c = r.choice([(b"[", b"]"), (b'{"a":', b"}"), (b'[{"k":', b"}]")])
        if o == b'[{"k":':
            n //= 2
        inner = r.choice([b"1", b'"x"', b"null", b"[]", b"{}"])
        return Raw(o * n + inner + c * n)

    def big_text(self):
        r = self.r
        size = r.choice([64 * 1024, 300 * 1024, self.big_bytes])
        ch = r.choice(["A", "\u00e9", "\u65e5", "\U0001F600", '"', "\\", "\n"])
        s = ch * (size // len(ch.encode("utf-8")))
        return s

    # ----------------------------------------------------------- requests
    def base(self):
        r = self.r
        xc = self.text(20) or "x"
        if r.random() < 0.5:
            xc = "fz-%d" % r.randrange(10 ** 6)
        pairs = [("userIPAddress", "10.0.0.%d" % r.randrange(256)),
                 ("userAgent", "fuzz/1.0"),
                 ("userPlatform", r.choice(["android", "ios", "web"])),
                 ("userDeviceID", "dev-%d" % r.randrange(1000)),
                 ("xcUserID", xc),
                 ("fullName", "Fuzz %d" % r.randrange(1000))]
        for f in FIELDS[6:]:
            if r.random() < 0.3:
                pairs.append((f, self.text(30)))
        r.shuffle(pairs)
        return pairs

    def xc_value(self):
        r = self.r
        k = r.randrange(7)
        if k == 0:
            return "y" * r.choice([49, 50, 51, 100])
        if k == 1:
            return r.choice(["\u00e9", "\U0001F600", "\u65e5"]) * \
                r.choice([49, 50, 51])
        if k == 2:
            return self.number()
        if k == 3:
            return self.text(60)
        return self.value()

    def make(self):
        r = self.r
        k = r.choices(
            ["mutate", "strings", "types", "bad_escape", "deep", "huge",
             "many_keys", "dup_keys", "top_level", "malformed", "xcuserid",
             "valid"],
            weights=[20, 14, 14, 8, 6, 1, 4, 5, 5, 6, 8, 8])[0]
        self.kinds[k] = self.kinds.get(k, 0) + 1
        pairs = self.base()
        if k == "valid":
            pass
        elif k == "mutate":
            for _ in range(r.randrange(1, 4)):
                op = r.randrange(4)
                i = r.randrange(len(pairs))
                if op == 0:
                    del pairs[i]
                elif op == 1:
                    pairs[i] = (pairs[i][0], self.value())
                elif op == 2:
                    pairs.insert(r.randrange(len(pairs) + 1),
                                 (r.choice(FIELDS), self.value()))
                else:
                    pairs.append((self.text(12), self.value()))
                if not pairs:
                    break
        elif k == "strings":
            for i in range(len(pairs)):
                if pairs[i][0] != "userPlatform" and r.random() < 0.6:
                    pairs[i] = (pairs[i][0], self.text(80))
        elif k == "types":
            f = r.choice(FIELDS)
            pairs = [p for p in pairs if p[0] != f] + [(f, self.value())]
        elif k == "bad_escape":
            i = r.randrange(len(pairs))
            pairs[i] = (pairs[i][0], self.bad_string())
            if r.random() < 0.2:
                pairs.append((Raw(self.bad_string().data), 1))
        elif k == "deep":
            if r.random() < 0.2:
                return self.deep().data
            i = r.randrange(len(pairs))
            pairs[i] = (pairs[i][0], self.deep())
        elif k == "huge":
            f = r.choice(["fullName", "email", "userAgent", "username",
                          "userDeviceID", "unknownBig", "xcUserID"])
            pairs = [p for p in pairs if p[0] != f] + [(f, self.big_text())]
        elif k == "many_keys":
            n = r.choice([100, 1000, 3000, 5000])
            if r.random() < 0.5:
                pairs += [("k%d" % i, i) for i in range(n)]
            else:
                pairs += [(r.choice(FIELDS), self.text(5)) for _ in range(n)]
            r.shuffle(pairs)
        elif k == "dup_keys":
            f = r.choice(FIELDS)
            for _ in range(r.randrange(1, 5)):
                pairs.append((f, self.value() if r.random() < 0.5
                              else self.text(10)))
        elif k == "top_level":
            return self.encode(r.choice([
                [], [Obj(pairs)], "string", None, True, False, 0,
                Raw(b"1e5"), [1, 2, 3], Raw(b'""'), self.text(20)]))
        elif k == "malformed":
            data = self.encode(Obj(pairs))
            cut = r.randrange(4)
            if cut == 0:
                return data[:r.randrange(len(data))]
            if cut == 1:
                return data + r.choice([b"x", b",", b"}", b"{}", b"\x00",
                                        b" garbage", b"\xff"])
            if cut == 2:
                return b"\xef\xbb\xbf" + data
            return r.choice([b"", b" ", b"{", b"}", b"{,}", b'{"a"}',
                             b'{"a":}', b"{'a':1}", b'{"a":1,}',
                             b"[1,]", b"{\"a\":1 \"b\":2}", b"nul",
                             b"tru", b'"\\"', b'{"a":"\\q"}'])
        elif k == "xcuserid":
            pairs = [p for p in pairs if p[0] != "xcUserID"] + \
                [("xcUserID", self.xc_value())]
        if k != "dup_keys" and r.random() < 0.05:
            pairs.append((r.choice(["", " ", "XCUSERID", "xcUserId",
                                    "k" * r.choice([100, 10000])]), 1))
        return self.encode(Obj(pairs))

    def sweep(self):
        """Every JSON type in every field of a valid request, in order."""
        values = [None, True, False, 0, Raw(b"-1.5e3"), "", "s", [], ["x"],
                  Obj([]), Obj([("a", 1)]), Raw(b"[[[[{}]]]]")]
        out = []
        for f in FIELDS:
            for v in values:
                pairs = [p for p in self.base() if p[0] != f] + [(f, v)]
                out.append(self.encode(Obj(pairs)))
        self.kinds["sweep"] = len(out)
        return out

    # ------------------------------------------------------------ encoding
    def encode(self, v):
        r = self.r
        if isinstance(v, Raw):
            return v.data
        if v is None:
            return b"null"
        if v is True:
            return b"true"
        if v is False:
            return b"false"
        if isinstance(v, int):
            return str(v).encode()
        if isinstance(v, str):
            return self.enc_str(v)
        ws = r.choice([b"", b"", b" ", b"\n", b"\t", b"\r\n "])
        if isinstance(v, list):
            return b"[" + (b"," + ws).join(self.encode(x) for x in v) + b"]"
        if isinstance(v, Obj):
            parts = []
            for key, val in v.pairs:
                key_b = key.data if isinstance(key, Raw) else self.enc_str(key)
                if key == "xcUserID":
                    val = self.safe_xc(val)
                parts.append(key_b + ws + b":" + ws + self.encode(val))
            return b"{" + ws + (b"," + ws).join(parts) + ws + b"}"
        raise TypeError(type(v))

    @staticmethod
    def safe_xc(val):
        if isinstance(val, str) and val.startswith("fault-"):
            return "f" + val
        return val


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--out", required=True)
    ap.add_argument("--big-bytes", type=int, default=MIB)
    ap.add_argument("--stats", action="store_true",
                    help="print how many inputs of each kind were written")
    args = ap.parse_args()

    g = Gen(args.seed, args.big_bytes)
    sweep = g.sweep()
    total = 0
    with open(args.out, "w", encoding="ascii") as out:
        for i in range(1, args.count + 1):
            data = sweep[i - 1] if i <= len(sweep) else g.make()
            total += len(data)
            out.write("%d\t%s\n" % (i, base64.b64encode(data).decode()))
    if args.stats:
        kinds = " ".join("%s=%d" % kv for kv in sorted(g.kinds.items()))
        print("%d inputs, %d bytes, seed %d: %s"
              % (args.count, total, args.seed, kinds))


if __name__ == "__main__":
    sys.exit(main())
