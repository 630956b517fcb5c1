"""HTTP/1.x message framing and content codings of engine/streams/http.lua (RFC 9110 §8.4, §8.6;
RFC 9112 §6, §7): generated messages (random chunking, stacked codings, multi-member gzip, header
spellings, repeated / list-valued fields, segment boundaries) checked against Python's own gzip /
zlib, and the ambiguous framings (CL+TE, differing Content-Lengths, oversize headers) counted.
"""
from __future__ import annotations

import gzip
import random
import zlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from luaprobe.shm.luajit import new_runtime

LUA = r"""
local http = require 'luaprobe.engine.streams.http'
local T = {}
-- segs: list of {dir, string}; returns bodies {dir, body, flags...}, requests {method, path, truncated}, stats
function T.run(segs, opts)
  local bodies, cur, reqs = {}, {}, {}
  local H = http.new{
    max_header = opts.max_header,
    on_request = function(h) reqs[#reqs + 1] = { h:get_method(), h:get_path(), h._truncated or false } end,
    on_body = function(dir, req, resp, p, n)
      cur[dir] = cur[dir] or {}
      cur[dir][#cur[dir] + 1] = type(p) == 'string' and p:sub(1, n) or require('ffi').string(p, n)
    end,
    on_body_end = function(dir, req, resp, total, flags)
      bodies[#bodies + 1] = { dir, table.concat(cur[dir] or {}), total, flags.incomplete or false,
                              flags.encoding or false, flags.trailing or 0 }
      cur[dir] = nil
    end,
  }
  for _, s in ipairs(segs) do H:data(s[1], s[2], #s[2]) end
  H:close()
  return bodies, reqs, H.stats
end
return T
"""


@pytest.fixture(scope="module")
def T():
    lua = new_runtime(encoding=None)
    return lua, lua.execute(LUA)


def run(T, segs, **opts):
    lua, t = T
    tbl = lua.table_from([lua.table_from([d, s]) for d, s in segs])
    bodies, reqs, stats = t.run(tbl, lua.table_from({k.encode(): v for k, v in opts.items()}))
    bodies = [list(b.values()) for b in bodies.values()]
    for b in bodies:
        for i in (3, 4):
            if isinstance(b[i], bytes):
                b[i] = b[i].decode()
    return bodies, [list(r.values()) for r in reqs.values()], {k.decode(): v for k, v in stats.items()}


REQ = b"GET /f HTTP/1.1\r\nHost: h\r\n\r\n"


def encode(body: bytes, codings, rng) -> bytes:
    for c in codings:                                   # applied in the listed order
        if c in ("gzip", "x-gzip"):
            if len(body) > 10 and rng.random() < 0.5:   # several gzip members (RFC 1952 §2.2)
                k = rng.randrange(1, len(body))
                body = gzip.compress(body[:k]) + gzip.compress(body[k:])
            else:
                body = gzip.compress(body)
        elif c == "deflate":
            body = zlib.compress(body)
    return body


def decode_py(data: bytes, codings) -> bytes:
    """Python's own decoders, in reverse order (the independent truth)."""
    for c in reversed(codings):
        if c in ("gzip", "x-gzip"):
            data = gzip.decompress(data)
        elif c == "deflate":
            data = zlib.decompress(data)
    return data


def spell(name, rng):
    return rng.choice([name, name.lower(), name.upper()])


@st.composite
def messages(draw):
    rng = random.Random(draw(st.integers(0, 2**32)))
    n = draw(st.integers(0, 4000))
    body = bytes(rng.choice(b"abcdefgh \n") if rng.random() < 0.8 else rng.randrange(256) for _ in range(n))
    ce = draw(st.lists(st.sampled_from(["gzip", "x-gzip", "deflate", "identity"]), max_size=3))
    framing = draw(st.sampled_from(["length", "length-list", "length-repeat", "chunked", "te-gzip-chunked",
                                    "close"]))
    te = ["gzip"] if framing == "te-gzip-chunked" else []
    wire = encode(body, [c for c in ce if c != "identity"], rng)
    wire_te = encode(wire, te, rng)
    headers = []
    if ce:
        if len(ce) > 1 and rng.random() < 0.5:           # the list as repeated field lines
            for c in ce:
                headers.append((spell("Content-Encoding", rng), c))
        else:
            headers.append((spell("Content-Encoding", rng), (", " if rng.random() < 0.5 else ",").join(ce)))
    if framing == "length":
        headers.append((spell("Content-Length", rng), str(len(wire_te))))
        payload = wire_te
    elif framing == "length-list":
        headers.append(("Content-Length", f"{len(wire_te)}, {len(wire_te)}"))
        payload = wire_te
    elif framing == "length-repeat":
        headers += [("Content-Length", str(len(wire_te))), ("content-length", str(len(wire_te)))]
        payload = wire_te
    elif framing == "close":
        headers.append(("Connection", "close"))
        payload = wire_te
    else:
        headers.append((spell("Transfer-Encoding", rng), ", ".join(te + ["chunked"])))
        out, pos = [], 0
        while pos < len(wire_te):
            k = rng.randint(1, 700)
            size = ("0" * rng.randint(0, 3)) + format(k if pos + k <= len(wire_te) else len(wire_te) - pos,
                                                        rng.choice(["x", "X"]))
            ext = rng.choice(["", ";a=b", " ; name=\"v\"", ";x"])
            piece = wire_te[pos:pos + k]
            out.append(size.encode() + ext.encode() + b"\r\n" + piece + b"\r\n")
            pos += len(piece)
        out.append(b"0" * rng.randint(1, 3) + b"\r\n" + (b"X-T: 1\r\n" if rng.random() < 0.3 else b"") + b"\r\n")
        payload = b"".join(out)
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers) + b"\r\n"
    msg = head + payload
    cuts = sorted(rng.sample(range(1, len(msg)), min(len(msg) - 1, rng.randint(0, 12)))) if len(msg) > 1 else []
    segs, prev = [], 0
    for c in cuts + [len(msg)]:
        segs.append(msg[prev:c])
        prev = c
    return body, ce + te, wire_te, segs, framing


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=messages())
def test_generated_messages_decode_like_python(T, m):
    body, codings, wire, segs, framing = m
    assert decode_py(wire, codings) == body                 # the generator itself, by Python
    bodies, _, stats = run(T, [(0, REQ)] + [(1, s) for s in segs])
    if not body and not wire and framing != "close" and framing != "chunked" and framing != "te-gzip-chunked":
        assert bodies == []                                  # Content-Length: 0 has no body
        return
    (b,) = bodies
    assert b[1] == body and b[2] == len(body)
    assert b[3] is False                                     # complete
    assert stats["errors"] == 0 and stats["resyncs"] == 0


def test_unknown_coding_delivered_raw_and_flagged(T):
    raw = b"\x28\xb5\x2f\xfd not really zstd"
    msg = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip, zstd\r\nContent-Length: %d\r\n\r\n%s" % (len(raw), raw)
    bodies, _, stats = run(T, [(0, REQ), (1, msg)])
    assert bodies == [[1, raw, len(raw), "unknown_encoding", "gzip, zstd", 0]]
    assert stats["unknown_codings"] == 1


def test_gzip_trailing_garbage_flagged_not_lost(T):
    body = b"x" * 500
    data = gzip.compress(body) + b"\0\0\0\0"
    msg = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
    (b,), _, stats = run(T, [(0, REQ), (1, msg)])
    z = zlib.decompressobj(47)                      # Python's zlib: the body, and the rest as unused_data
    assert b[1] == z.decompress(data) == body and b[5] == len(z.unused_data) == 4
    assert stats["gzip_trailing"] == 1 and stats["gzip_trailing_bytes"] == 4


@pytest.mark.parametrize("split", [None, 1, 2, 12])
@pytest.mark.parametrize("damage", ["deflate-data", "method-byte"])
def test_a_damaged_gzip_member_after_the_first_is_a_decode_error_not_trailing_bytes(T, split, damage):
    """A second gzip member that starts with the gzip magic (1f 8b) but does not inflate (its deflate data damaged, or
    an unknown compression method) is part of the body that could not be decoded: the body is the first member,
    flagged decode_error, as gunzip ("invalid compressed data") and Python's gzip.decompress (an error) see it.
    Before, a member that failed before its first output byte was taken for trailing garbage: the body was
    flagged complete (flags.trailing = its bytes), so the lost second member went unnoticed. `split`: the body
    cut into two segments that many bytes after the first member's end (the magic split across feeds). Truth:
    Python's gzip / zlib."""
    one, two = b"first member " * 100, b"second member " * 200
    m2 = gzip.compress(two)
    m2 = m2[:30] + b"\0" * 50 if damage == "deflate-data" else m2[:2] + b"\x09" + m2[3:]
    data = gzip.compress(one) + m2
    with pytest.raises((OSError, EOFError, zlib.error)):
        gzip.decompress(data)                           # Python: not a whole gzip file
    z = zlib.decompressobj(47)
    assert z.decompress(data) == one and z.unused_data == m2   # what decodes: the first member
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(data)
    msg = head + data
    cut = len(head) + len(gzip.compress(one)) + split if split else None
    segs = [(1, msg)] if cut is None else [(1, msg[:cut]), (1, msg[cut:])]
    (b,), _, stats = run(T, [(0, REQ)] + segs)
    assert b[1] == one and b[3] == "decode_error" and b[5] == 0, b
    assert stats["gzip_trailing"] == 0


@pytest.mark.parametrize("tail", [b"\n", b"\0", b" "])
@pytest.mark.parametrize("split", [False, True])
def test_one_byte_after_the_gzip_data_is_trailing_not_a_truncated_gzip(T, tail, split):
    """A whole gzip member followed by one byte that cannot begin another member (a newline a script printed after
    its compressed output, a NUL): the body is whole, the byte is trailing (flags.trailing = 1), as with two or more
    such bytes. Before, one byte was too few for zlib to fail on, so the body was flagged decode_incomplete (a
    truncated gzip) though every byte decoded and the member's CRC checked. `split`: the byte in a segment of its
    own. Truth: Python's zlib (the body, and the byte as unused_data)."""
    body = b"whole body " * 300
    data = gzip.compress(body) + tail
    z = zlib.decompressobj(47)
    assert z.decompress(data) == body and z.eof and z.unused_data == tail
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(data)
    msg = head + data
    segs = [(1, msg[:-1]), (1, msg[-1:])] if split else [(1, msg)]
    (b,), _, stats = run(T, [(0, REQ)] + segs)
    assert b[1] == body and b[3] is False and b[5] == 1, b
    assert stats["gzip_trailing"] == 1 and stats["gzip_trailing_bytes"] == 1


def test_truncated_gzip_is_incomplete(T):
    data = gzip.compress(b"y" * 5000)[:-12]
    msg = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nConnection: close\r\n\r\n" + data
    (b,), _, _ = run(T, [(0, REQ), (1, msg)])
    assert b[3] == "decode_incomplete" and b[1] == zlib.decompressobj(47).decompress(data)


def test_cl_and_te_counted_te_wins(T):
    """RFC 9112 §6.3 item 3: Transfer-Encoding overrides Content-Length; the pair is counted."""
    msg = (b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    bodies, reqs, stats = run(T, [(0, msg)])
    assert bodies == [[0, b"hello", 5, False, False, 0]]
    assert [r[:2] for r in reqs] == [[b"POST", b"/x"], [b"GET", b"/next"]] and stats["cl_te"] == 1


def test_differing_content_lengths_counted_not_guessed(T):
    """RFC 9112 §6.3 item 5: differing Content-Length values: no body is guessed; the parser
    resynchronises at the next message."""
    msg = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhelloXX"
           b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    bodies, _, stats = run(T, [(0, REQ + REQ), (1, msg)])
    assert bodies == [[1, b"ok", 2, False, False, 0]] and stats["bad_content_length"] == 1
    # a list of equal values is one length
    msg = b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello"
    bodies, _, stats = run(T, [(0, REQ), (1, msg)])
    assert bodies == [[1, b"hello", 5, False, False, 0]] and stats["bad_content_length"] == 0


def test_request_te_not_chunked_is_a_framing_error(T):
    msg = b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\nabc"
    bodies, reqs, stats = run(T, [(0, msg)])
    assert bodies == [] and stats["bad_transfer_encoding"] == 1 and reqs[0][:2] == [b"POST", b"/x"]


@pytest.mark.parametrize("uri_len,limit", [(6010, 65536), (70000, 65536), (20000, 8192)])
def test_long_request_line(T, uri_len, limit):
    """Request lines up to the limit (default 64 KiB) parse whole in any segmentation; longer ones
    keep the method and the URI's first bytes, marked truncated and counted, and the message goes on."""
    uri = "/search?q=" + "x" * (uri_len - 10)
    req = f"GET {uri} HTTP/1.1\r\nHost: h\r\nX-Long: {'y' * 100}\r\n\r\n".encode()
    segs = [(0, req[i:i + 1448]) for i in range(0, len(req), 1448)]
    msg = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    bodies, reqs, stats = run(T, segs + [(1, msg)], max_header=limit)
    (r,) = reqs
    assert r[0] == b"GET" and bodies == [[1, b"ok", 2, False, False, 0]]
    if uri_len + 20 <= limit:
        assert r[1] == uri.encode() and r[2] is False and stats["oversize_headers"] == 0
    else:
        assert uri.encode().startswith(r[1]) and len(r[1]) >= limit - 10 and r[2] is True
        assert stats["oversize_headers"] == 1
