"""Test helpers that own cleanup: every process and shared-memory segment a test starts.

Like psutil's test helpers, cleanup is registered, not hoped for: the autouse
fixture in conftest.py snapshots this process's children and segments before
each test and, afterwards, kills and reaps any new child process and unlinks
any new segment.  A test that passed but leaked either is turned into a failure,
because a leak in a test is a leak a user would hit.
"""
from __future__ import annotations

import contextlib
import errno
import os
import struct
import subprocess
import sys
import time

import psutil
import pytest

from luaprobe.shm import segment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The captures the tests read, shipped in the repository (tests/data/MANIFEST.md: source and licence).
PCAPS = os.path.join(REPO, "tests", "data")
# The optional larger corpus (captures no test needs beyond tests/test_pcapfile.py's pinned check).
CORPUS = os.environ.get("LUAPROBE_CORPUS", os.path.join(REPO, "..", "shared", "pcaps"))


def children() -> list[psutil.Process]:
    """All live descendants of this process."""
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def our_segments(pids=None) -> set[str]:
    """luaprobe segments owned by this process (or any of ``pids``)."""
    pids = {os.getpid()} if pids is None else set(pids) | {os.getpid()}
    return {n for n in segment.list_segments() if segment.owner_pid(n) in pids}


def kill_tree(procs) -> list[int]:
    """SIGKILL and reap the given processes; returns the pids that were still alive."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)
    return alive


def finish(proc: subprocess.Popen, timeout: float):
    """Wait up to ``timeout`` seconds for ``proc`` to end and return its ``(stdout, stderr)`` (Popen.communicate).
    When it has not ended by then, or the wait is interrupted, kill it, reap it and re-raise (TimeoutExpired).
    A test that fails before it gets here leaves the process to the autouse no_leaks fixture (conftest.py)."""
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@contextlib.contextmanager
def killed_when_left(proc: subprocess.Popen):
    """``with killed_when_left(proc):`` -- whatever the body's outcome, ``proc`` still running after it is
    SIGKILLed and reaped (its pipes read to the end); a body that stopped it (and read its output) leaves it be."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def cmdline(p) -> list[str]:
    """``p.cmdline()`` of a psutil.Process, or [] when it is gone or a zombie (a child that has just exited, read while
    a test looks for another among its siblings: psutil.ZombieProcess, NoSuchProcess) or unreadable."""
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def wait_for(cond, timeout: float = 10.0, interval: float = 0.005, fail: bool = True):
    """Poll ``cond()`` until it returns a truthy value (returned) or fail after ``timeout`` seconds (``fail=False``:
    return the last falsy value instead)."""
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            if not fail:
                return v
            raise AssertionError(f"condition not met within {timeout} s: {cond}")
        time.sleep(interval)


def fifo_writer(fifo, proc: subprocess.Popen, timeout: float = 120.0) -> int:
    """The write end of the FIFO ``fifo`` (blocking) once ``proc`` has opened it for reading: an O_WRONLY |
    O_NONBLOCK open fails with ENXIO until a reader exists.  Fails when ``proc`` ends first (with its output)."""
    def opened():
        assert proc.poll() is None, proc.communicate()
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            return None
    fd = wait_for(opened, timeout=timeout)
    os.set_blocking(fd, True)
    return fd


def run_python(code: str, *args, **kw) -> subprocess.Popen:
    """Start ``python -c code`` in the repo (its children are reaped by the fixture)."""
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, **kw)


_SLOW_WALK = """
local n = 0
TrisulPlugin = { id = { name = "slow" },
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function()
      n = n + 1
      if n == 100 then local f = io.open("%s", "w"); f:close()%s end          -- the walk has begun
      local t = os.clock() while os.clock() - t < %s do end
    end } }
"""
# held: the hook waits at its 100th packet (up to 5 s, half the default hook budget) until the file `go` exists, so
# what the test does meanwhile happens at that packet whatever the machine's load
_HOLD = """
        local t = os.time()
        while os.time() - t < 5 do local g = io.open("%s") if g then g:close() break end end"""


def slow_walk_lua(walking, hook_s: float, go=None) -> str:
    """A TCP simplecounter spending `hook_s` s of CPU per packet that creates the file `walking` at its 100th packet
    and, with `go` (a path), then waits there until `go` exists (at most 5 s)."""
    return _SLOW_WALK % (walking, _HOLD % go if go else "", hook_s)


def start_slow_walk(tmp_path, hook_s: float, *args: str, held: bool = False):
    """`luaprobe run --json` of a TCP simplecounter spending `hook_s` s per packet over a generated capture
    (12,000 TCP packets, 100 flows, seed 7) with extra CLI `args`.  Returns (Popen with text stdout/stderr
    pipes, tshark's frame.len per record, path of the file the hook creates at its 100th packet).  `held`: the
    hook waits at that packet (slow_walk_lua) until the test creates tmp_path / "go" (`release(tmp_path)`)."""
    pcap = tmp_path / "synth.pcap"
    subprocess.run([sys.executable, "-m", "luaprobe.engine", "gen", "--out", str(pcap), "--flows", "100",
                    "--packets", "12000", "--seed", "7", "--mix", "tcp=100"], check=True, capture_output=True)
    sizes = [int(x) for x in subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.len"],
                                            capture_output=True, text=True, check=True).stdout.split()]
    walking = tmp_path / "walking"
    plug = tmp_path / "slow.lua"
    plug.write_text(slow_walk_lua(walking, hook_s, tmp_path / "go" if held else None))
    p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine", "run", str(plug), "--pcap", str(pcap), "--out",
                          str(tmp_path / "out"), "--json", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p, sizes, walking


def release(tmp_path) -> None:
    """Let a `held` slow walk (start_slow_walk) go on past its 100th packet."""
    (tmp_path / "go").touch()


def write_plugin(tmp_path, body: str, name: str = "plugin.lua") -> str:
    """Write a plug-in file (a TrisulPlugin with an id is prepended when missing)."""
    if "TrisulPlugin" not in body:
        body = 'TrisulPlugin = { id = { name = "test" } }\n' + body
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def assert_accounting(stats: dict) -> None:
    """The accounting identity of T.async."""
    terms = ("ok", "nil_result", "error", "timeout", "dropped", "pending")
    assert stats["scheduled"] == sum(stats[t] for t in terms), stats
    reasons = ("dropped_overflow", "dropped_stopping", "dropped_start", "dropped_no_workers")
    if "dropped_overflow" in stats:        # every drop has its reason (engine/plugins/async.lua DROP_KEY)
        assert stats["dropped"] == sum(stats[r] for r in reasons), stats


def pcap_records(path) -> int:
    """Records of a classic little-endian pcap file, walked here (an independent count, not luaprobe's)."""
    import struct
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\xd4\xc3\xb2\xa1", "classic little-endian pcap expected"
    off, n = 24, 0
    while off + 16 <= len(data):
        off += 16 + struct.unpack_from("<I", data, off + 8)[0]
        n += 1
    return n


def tshark_frames(path, *filt: str, check: bool = True) -> int:
    """Frames tshark reads from ``path`` (``filt``: more tshark arguments, e.g. "-Y", "ip"): an independent count.
    ``check=False`` for a file cut mid-record (tshark then exits 2 after the records before the cut)."""
    import shutil
    out = subprocess.run([shutil.which("tshark") or "tshark", "-r", str(path), *filt, "-T", "fields",
                          "-e", "frame.number"], capture_output=True, text=True, check=check).stdout
    return len(out.split())


@contextlib.contextmanager
def tmpfs(path, options: str):
    """``path`` (made if missing) as a tmpfs of its own with mount ``options`` ("size=1m", "ro,size=1m"); skips the
    test where mounting is not allowed (root and CAP_SYS_ADMIN needed); unmounted (lazily: a process may still
    hold it) on exit."""
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip("cannot mount a tmpfs here (root and CAP_SYS_ADMIN needed): "
                    + r.stderr.decode(errors="replace").strip())
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def file_walk_lua(ring_mb: int, grows: bool) -> str:
    """Lua source of a function(addr, size, fd) that walks a mapped capture file with engine/capture/capture.lua's
    file() (``grows``: its sixth argument, read on past ``size`` while the file grows) into a packet ring of its own of
    ``ring_mb`` MiB, as the capture process does; returns n, bytes, err, off and the records, each {ts_sec, ts_usec,
    word 3, caplen, bytes} (test_capture_cut.py / test_capture_grow.py worker processes)."""
    return ('''function(addr, size, fd)
  local ffi = require("ffi")
  local ring = require("luaprobe.shm.ring")
  local capture = require("luaprobe.engine.capture.capture")
  local cap = %d * 1024 * 1024
  local buf = ffi.new("uint8_t[?]", ring.region_size(cap, false))
  local r = ring.format(buf, cap, false)
  local n, bytes, err, off = capture.file(r, addr, size, function() return false end, fd, %s)
  local recs = {}
  while true do
    local p, len = r:peek()
    if p == nil then break end
    local h = ffi.cast("const uint32_t *", p)
    recs[#recs + 1] = { h[1], h[2], h[3], h[4], ffi.string(p + 32, h[4]) }
    r:advance(len)
  end
  r:release()
  return n, bytes, err, off, recs
end''' % (ring_mb, "true" if grows else "false"))


def line_worker(script: str):
    """A generator for a module fixture: ``python -c script`` with text stdin / stdout pipes (a worker answering one
    line per request line), closed and waited for at the end."""
    p = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    yield p
    p.stdin.close()
    p.wait(timeout=60)


#: Lua, to put before a test chunk that uses it: ``attach_loop_ir(where, out)`` attaches a trace event handler that
#: appends to the table ``out`` the IR of every looping root trace starting at a location ending in ``where``
#: (e.g. "flowtable.lua:1490"): its operation numbers, comma-separated (names: tools/bench/walkir.py IR_NAMES), read
#: with jit.util.traceir when the trace stops (a later flush would reuse its number).  ``jit.attach(function() end)``
#: ends it.  Used by the tests that check what a loop compiles to (tests/test_flush_touch.py,
#: tests/test_expire_chunks.py).
LOOP_IR_LUA = r"""
local function attach_loop_ir(where, out)
  local ju = require "jit.util"
  local starts = {}
  jit.attach(function(what, tr, func, pc, a)
    if what == "start" then
      starts[tr] = { ju.funcinfo(func, pc).loc or "?", a }
    elseif what == "stop" then
      local s, info = starts[tr], ju.traceinfo(tr)
      if s and s[2] == nil and info and info.linktype == "loop" and s[1]:sub(-#where) == where then
        local ops = {}
        for ref = 1, info.nins do
          local m, ot = ju.traceir(tr, ref)
          if m then ops[#ops + 1] = tostring(math.floor(ot / 256)) end
        end
        out[#out + 1] = table.concat(ops, ",")
      end
    end
  end, "trace")
end
"""


#: Lua, to put before a test chunk that uses it: ``udp_flow(d, i)`` makes decoder record ``d`` (decode.new()) the UDP
#: packet 10.1.(i >> 8).(i & 255):(1024 + i) -> 192.0.2.1:53 of flow number i (0 <= i < 65536), for a flow table's
#: update without a capture (tests/test_flush_touch.py, tests/test_expire_chunks.py).
UDP_FLOW_LUA = r"""
local function udp_flow(d, i)
  require("luaprobe.engine.fastpath.decode").decode(d, '', 0, 9999)
  d.ip_version, d.ipproto = 4, 17
  d.src[0], d.src[1], d.src[2], d.src[3] = 10, 1, bit.rshift(i, 8), bit.band(i, 255)
  d.dst[0], d.dst[1], d.dst[2], d.dst[3] = 192, 0, 2, 1
  d.sport, d.dport = 1024 + i, 53
end
"""


class Ipv4Pcap:
    """An Ethernet / IPv4 capture built in memory (microsecond pcap, link type 1): `frame(src, dst, proto, l4)`
    appends one frame (4-byte addresses, IP protocol number, the L4 header and payload; padded to Ethernet's 60
    bytes), `step_us` microseconds after the previous one, the first at 1 s + step_us; `write(path)` writes the file."""

    def __init__(self, step_us: int):
        self.step, self.t = step_us, 1_000_000
        self.out = [struct.pack("<IHHiIII", 0xa1b2c3d4, 2, 4, 0, 0, 65535, 1)]

    def frame(self, src: bytes, dst: bytes, proto: int, l4: bytes) -> None:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, src, dst)
        fr = b"\x00\x01\x02\x03\x04\x05\x00\x01\x02\x03\x04\x06\x08\x00" + ip + l4
        fr += b"\x00" * max(0, 60 - len(fr))
        self.t += self.step
        self.out.append(struct.pack("<IIII", self.t // 1_000_000, self.t % 1_000_000, len(fr), len(fr)) + fr)

    def write(self, path) -> None:
        with open(path, "wb") as f:
            f.write(b"".join(self.out))
