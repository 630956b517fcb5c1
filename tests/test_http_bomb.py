"""Decompression bombs in HTTP bodies (engine/streams/http.lua, zlib.lua; docs/filex.md "Decompression bombs").

A gzip / deflate body stops being decoded once its decoded bytes exceed both ``bomb_min`` (RunConfig
``http_bomb_min_mb``, default 1 MiB) and ``bomb_ratio`` (``http_bomb_ratio``, default 100) times the compressed
bytes received: libhtp's compression-bomb-limit rule (Suricata; libhtp's own ratio is 2048).  The bytes decoded
up to there are delivered, flagged ``decompression_bomb`` and counted; the connection's next messages are parsed
as usual.  Truth: Python's zlib / gzip (the delivered bytes are a prefix of Python's decompression, read with
``max_length``) and the sizes the test builds; captures are built with tests/pktbuild.py.
"""
from __future__ import annotations

import gzip
import os
import random
import zlib

import pytest

from luaprobe.engine.fastpath.run import FastPath, RunConfig
from luaprobe.shm.luajit import new_runtime
from tests import pktbuild as pb

MIB = 1 << 20
PIECE = 65536                      # zlib.lua's output piece: the rule may pass its bound by less than one piece

LUA = r"""
local http = require 'luaprobe.engine.streams.http'
local T = {}
-- segs: list of {dir, string}; returns bodies {dir, body, total, incomplete, path}, stats
function T.run(segs, opts)
  local bodies, cur = {}, {}
  local H = http.new{
    bomb_ratio = opts.bomb_ratio, bomb_min = opts.bomb_min,
    on_body = function(dir, req, resp, p, n)
      cur[dir] = cur[dir] or {}
      cur[dir][#cur[dir] + 1] = type(p) == 'string' and p:sub(1, n) or require('ffi').string(p, n)
    end,
    on_body_end = function(dir, req, resp, total, flags)
      bodies[#bodies + 1] = { dir, table.concat(cur[dir] or {}), total, flags.incomplete or false, req:get_path() }
      cur[dir] = nil
    end,
  }
  for _, s in ipairs(segs) do H:data(s[1], s[2], #s[2]) end
  H:close()
  return bodies, H.stats
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
    bodies, stats = t.run(tbl, lua.table_from({k.encode(): v for k, v in opts.items()}))
    out = []
    for b in bodies.values():
        d, body, total, inc, path = b.values()
        out.append((d, body, total, inc.decode() if isinstance(inc, bytes) else inc, path.decode()))
    return out, {k.decode(): v for k, v in stats.items()}


def zeros_gz(n: int, wbits: int = 31) -> bytes:
    """``n`` zero bytes compressed (wbits 31: gzip, 15: zlib, -15: raw deflate), streamed: ratio ~1030:1."""
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block = bytes(MIB)
    parts = [c.compress(block) for _ in range(n // MIB)]
    return b"".join(parts) + c.compress(bytes(n % MIB)) + c.flush()


def log_text(n: int) -> bytes:
    """About ``n`` bytes of server-log-like text: gzip's ratio on it is ~20:1 (checked by the tests)."""
    rng = random.Random(7)
    paths = [f"/api/v1/items/{rng.randrange(10**6)}" for _ in range(8)]
    lines, size, i = [], 0, 0
    while size < n:
        t = i // 20
        line = (f"2026-12-02T12:{t // 60 % 60:02d}:{t % 60:02d}Z INFO GET {rng.choice(paths)} "
                f"status={rng.choice((200, 200, 200, 304, 404))} bytes={rng.randrange(10)}\n").encode()
        lines.append(line)
        size += len(line)
        i += 1
    return b"".join(lines)[:n]


def prefix_of(wire: bytes, n: int, wbits: int = 47) -> bytes:
    """The first ``n`` bytes of Python's decompression of ``wire`` (wbits 47: gzip or zlib header)."""
    return zlib.decompressobj(wbits).decompress(wire, n)


def response(body: bytes, coding: str, chunked: bool = False) -> bytes:
    headers = [("Content-Encoding", coding)]
    if chunked:
        payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 5000]), body[i:i + 5000])
                           for i in range(0, len(body), 5000)) + b"0\r\n\r\n"
        headers.append(("Transfer-Encoding", "chunked"))
    else:
        payload = body
        headers.append(("Content-Length", str(len(body))))
    return pb.http_response(payload, headers=headers)


def segments(req_path: str, resp: bytes, mss: int = 1460) -> list[tuple[int, bytes]]:
    segs = [(0, pb.http_request(req_path))]
    return segs + [(1, resp[i:i + mss]) for i in range(0, len(resp), mss)]


# ============================================================================ the parser (http.lua)

@pytest.mark.parametrize("coding, wbits, chunked", [("gzip", 31, False), ("gzip", 31, True), ("deflate", 15, False),
                                                    ("deflate", -15, True), ("x-gzip", 31, False)])
def test_a_bomb_stops_at_the_rule_and_the_next_message_is_whole(T, coding, wbits, chunked):
    """64 MiB of zeros in ~64 KB of gzip / zlib / raw deflate: decoding stops past 1 MiB (the default bomb_min; the
    ratio is ~1030, above the default 100), the delivered bytes are the content's first bytes, the body is flagged
    and counted, and the response after it on the same connection is delivered whole."""
    wire = zeros_gz(64 * MIB, wbits)
    assert 1000 < 64 * MIB / len(wire) < 1100
    nxt = log_text(200_000)
    segs = segments("/bomb", response(wire, coding, chunked)) + segments("/next", response(gzip.compress(nxt), "gzip"))
    bodies, stats = run(T, segs)
    (d1, got, total, inc, p1), (d2, got2, _, inc2, p2) = bodies
    assert (d1, p1, inc) == (1, "/bomb", "decompression_bomb")
    assert MIB < len(got) == total <= MIB + PIECE
    assert got == prefix_of(wire, len(got), wbits if wbits < 0 else 47)
    assert (d2, p2, got2, inc2) == (1, "/next", nxt, False)
    assert stats["decompression_bombs"] == 1 and stats["errors"] == 0


def test_stacked_codings_count_against_the_bytes_on_the_wire(T):
    """``Content-Encoding: gzip, gzip`` (a bomb in a bomb: 256 MiB of zeros in a few hundred bytes): the ratio is the
    final output over the bytes received, so decoding stops past bomb_min as well."""
    inner = zeros_gz(256 * MIB)
    wire = gzip.compress(inner)
    assert len(wire) < 2000
    bodies, stats = run(T, segments("/double", response(wire, "gzip, gzip")))
    ((_, got, _, inc, _),) = bodies
    assert inc == "decompression_bomb" and MIB < len(got) <= MIB + PIECE
    assert got == prefix_of(inner, len(got))
    assert stats["decompression_bombs"] == 1


def test_an_ordinary_20_to_1_body_is_unaffected(T):
    """8 MiB of log text gzips at ~20:1 (Python measures it here): far below the default ratio of 100, delivered whole."""
    body = log_text(8 * MIB)
    wire = gzip.compress(body)
    assert 15 < len(body) / len(wire) < 30
    for chunked in (False, True):
        bodies, stats = run(T, segments("/log", response(wire, "gzip", chunked)))
        assert [(b[1] == body, b[3]) for b in bodies] == [(True, False)]
        assert stats["decompression_bombs"] == 0


def test_ratio_zero_is_no_limit(T):
    wire = zeros_gz(16 * MIB)
    bodies, stats = run(T, segments("/bomb", response(wire, "gzip")), bomb_ratio=0)
    ((_, got, total, inc, _),) = bodies
    assert (total, inc, stats["decompression_bombs"]) == (16 * MIB, False, 0)
    assert got == bytes(16 * MIB)


def test_both_bounds_must_be_passed(T):
    """The rule's two parts, with small bounds: random bytes (ratio ~1) pass any bomb_min when bomb_ratio is 2; zeros
    pass bomb_ratio 10 at once but are decoded whole up to bomb_min (100 000 bytes)."""
    rnd = random.Random(3).randbytes(3 * MIB)
    bodies, stats = run(T, segments("/rnd", response(gzip.compress(rnd), "gzip")), bomb_ratio=2, bomb_min=1000)
    assert [(b[1] == rnd, b[3]) for b in bodies] == [(True, False)] and stats["decompression_bombs"] == 0
    wire = zeros_gz(4 * MIB)
    bodies, stats = run(T, segments("/z", response(wire, "gzip")), bomb_ratio=10, bomb_min=100_000)
    ((_, got, _, inc, _),) = bodies
    assert inc == "decompression_bomb" and 100_000 < len(got) <= 100_000 + PIECE
    assert got == bytes(len(got))


# ============================================================================ a capture through filex_monitor

PLUGIN = r"""
local OUT = %(out)s
TrisulPlugin = {
  id = { name = "bomb copy" },
  filex_monitor = {
    onfile_http = function(engine, ts, flow, path, req, resp, length, is_chunk, incomplete)
      local f = assert(io.open(path, "rb")); local data = f:read("*a"); f:close()
      local name = req:get_path():gsub("[^%%w]", "_")
      local g = assert(io.open(OUT .. "/" .. name .. ".body", "ab")); g:write(data); g:close()
      local m = assert(io.open(OUT .. "/manifest.tsv", "a"))
      m:write(req:get_path(), "\t", length, "\t", tostring(is_chunk), "\t", tostring(incomplete), "\n"); m:close()
    end,
  },
}
"""


def capture(tmp_path, exchanges: list[list[tuple[str, bytes]]]) -> str:
    """One TCP connection per list of (path, response) exchanges (keep-alive), one after the other."""
    frames = []
    for k, exch in enumerate(exchanges):
        c = pb.Conv(cport=40000 + k, t0=1700000000.0 + 10 * k)
        c.handshake()
        for path, resp in exch:
            c.send(True, pb.http_request(path))
            c.send(False, resp)
        c.close()
        frames += c.frames
    pcap = tmp_path / "bomb.pcap"
    pb.write_pcap(pcap, frames)
    return str(pcap)


def extract(tmp_path, pcap: str, name: str, **kw):
    out = tmp_path / (name + ".d")
    out.mkdir()
    plugin = tmp_path / (name + ".lua")
    plugin.write_text(PLUGIN % {"out": "[==[" + str(out) + "]==]"})
    summary = FastPath(RunConfig(plugins=[str(plugin)], files=[pcap], out_dir=str(tmp_path / (name + ".out")),
                                 **kw)).run()
    assert summary["input_errors"] == [] and summary["plugin_problems"] == []
    (st,) = summary["filex"]
    rows = [line.split("\t") for line in (out / "manifest.tsv").read_text().splitlines()]
    bodies = {p.name[:-5]: p.read_bytes() for p in out.glob("*.body")}
    return st, rows, bodies


def test_a_bomb_in_a_capture_is_cut_flagged_and_counted_and_the_run_goes_on(tmp_path):
    """256 MiB of zeros as ~250 KB of gzip (ratio ~1030), between ordinary gzip bodies on the same keep-alive
    connection and on a second one.  The bomb's file holds the content's first bytes, past 1 MiB and at most one
    inflate piece more, and is flagged; the counters agree (one bomb body, one such file); every other body is
    whole.  Before, the whole 256 MiB was decoded and handed over in 52 parts of 5 MiB."""
    wire = zeros_gz(256 * MIB)
    text = log_text(3 * MIB)
    small = os.urandom(20_000).hex().encode()
    pcap = capture(tmp_path, [[("/before", response(gzip.compress(small), "gzip")),
                               ("/bomb", response(wire, "gzip")),
                               ("/after", response(gzip.compress(text), "gzip", chunked=True))],
                              [("/other", response(zlib.compress(small), "deflate"))]])
    st, rows, bodies = extract(tmp_path, pcap, "default")
    got = bodies["_bomb"]
    assert MIB < len(got) <= MIB + PIECE and got == prefix_of(wire, len(got))
    assert rows == [["/before", str(len(small)), "false", "nil"],
                    ["/bomb", str(len(got)), "false", "decompression_bomb"],
                    ["/after", str(len(text)), "false", "nil"],
                    ["/other", str(len(small)), "false", "nil"]]
    assert (bodies["_before"], bodies["_after"], bodies["_other"]) == (small, text, small)
    assert st["incomplete_decompression_bomb"] == st["http_decompression_bombs"] == 1
    assert st["files"] == 4 and st["chunks"] == 0 and st["bytes"] == len(got) + 2 * len(small) + len(text)
    assert st["http_bodies"] == 4 and st["http_errors"] == 0
    assert sum(v for k, v in st.items() if k.startswith("incomplete_")) == 1

    # the settings reach the parser: a higher bomb_min lets more through, a ratio above deflate's ~1030 none
    st, rows, bodies = extract(tmp_path, pcap, "min4", http_bomb_min_mb=4.0)
    got = bodies["_bomb"]
    assert 4 * MIB < len(got) <= 4 * MIB + PIECE and got == bytes(len(got))
    assert rows[1][1:] == [str(len(got)), "false", "decompression_bomb"] and st["http_decompression_bombs"] == 1


def test_a_ratio_above_deflates_maximum_lets_a_body_through_in_parts(tmp_path):
    """http_bomb_ratio 2000 (above deflate's ~1030:1): a 16 MiB body of zeros is decoded whole, in 5 MiB parts."""
    wire = zeros_gz(16 * MIB)
    pcap = capture(tmp_path, [[("/zeros", response(wire, "gzip"))]])
    st, rows, bodies = extract(tmp_path, pcap, "r2000", http_bomb_ratio=2000)
    assert bodies["_zeros"] == bytes(16 * MIB)
    assert [r[1:] for r in rows] == [[str(5 * MIB), "true", "nil"]] * 3 + [[str(MIB), "true", "nil"]]
    assert st["http_decompression_bombs"] == 0 and st["incomplete_decompression_bomb"] == 0
