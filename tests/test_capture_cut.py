"""A capture file cut (truncated in place) while the capture process is reading past the new end, not waiting for
packet-ring space (test_capture_death.py covers a cut during the wait).

Before: the read of the first page wholly past the new end faulted (SIGBUS) and the capture process died with the
records it had read since its last publish (up to 63 a ring), all lost, though they lie wholly before the cut; a cut
inside a page first gave zero-filled phantom records (the rest of that page reads as zeros).  Now: every record
wholly before the cut is walked once, none past it, and the run ends with exit 3 and one line naming the file and the
byte offset of the first record the file no longer holds (engine/capture/capture.lua push / settle, shm/_lpsync.c
lp_cutguard_arm).

Deterministic: the test stops the capture process (SIGSTOP) while it copies a burst of records, reads from the
packet ring's shared memory which records it has copied but not yet published (records past the ring's published
tail that match the file's records byte for byte), cuts the file at an offset chosen among them (inside a record
header, inside a record's data, at a record's end, at a page boundary), then lets it go on (SIGCONT).  Truth: tshark's
frames of the cut file (count and frame.len), the record offsets walked here from the file's own bytes.  One other
outcome is right and is checked exactly too: a stop that lands between the capture process's size check and its
publish (the check is a system call; a stop often takes effect as it returns) has every record it had read checked
before the cut, so exactly those are walked (their bytes were read before the cut), and the line names the offset
where they end.  The second half drives capture.lua's file() directly over files cut before the walk, at chosen and
at hypothesis-drawn offsets.
"""
from __future__ import annotations

import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import hypothesis
import hypothesis.strategies
import psutil
import pytest

from tests import helpers

RECORDS = 40000
PAGE = mmap.PAGESIZE


def _write_capture(path, count: int = RECORDS) -> list[tuple[int, int, bytes]]:
    """A classic pcap of `count` (RECORDS) Ethernet/IPv4/TCP frames of 120-1010 bytes, each unique (its number in the payload
    and its timestamp).  Returns (offset of the record header, frame length, record bytes) per record."""
    out, recs, off = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)], [], 24
    for i in range(count):
        n = 120 + (i * 7919) % 891
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, n - 14, i & 0xFFFF, 0, 64, 6, 0, bytes([10, 0, i % 7, 1]),
                         bytes([10, 1, 0, i % 5 + 1]))
        tcp = struct.pack("!HHIIBBHHH", 1024 + i % 100, 80, i, 0, 0x50, 0x18, 65535, 0, 0)
        payload = (b"%08d" % i) * ((n - 54) // 8 + 1)
        frame = b"\0\1\2\3\4\5\6\7\x08\x09\x0a\x0b\x08\x00" + ip + tcp + payload[:n - 54]
        rec = struct.pack("<IIII", 1_700_000_000 + i // 1000, (i % 1000) * 1000, n, n) + frame
        recs.append((off, n, rec))
        out.append(rec)
        off += len(rec)
    with open(path, "wb") as f:
        f.write(b"".join(out))
    return recs


def _unpublished(ring: mmap.mmap, by_ts: dict, recs) -> list[int]:
    """Numbers of the file's records the (stopped) capture process has copied into `ring` past its published tail,
    i.e. read and not yet published: the ring's records after the tail (shm/ring.lua layout: an 8-byte {len, flags}
    header, flags 1 a PAD to the end of the data area; engine/plugins/packet.lua's 32-byte lp_pktrec, then the
    frame) that equal a file record byte for byte, in increasing record number (older data of the previous lap, or a
    record half copied, ends the walk)."""
    cap, tail = struct.unpack_from("<Q", ring, 8)[0], struct.unpack_from("<Q", ring, 64)[0]
    data, idx, last, out = 4096, tail % cap, -1, []
    while True:
        ln, flags = struct.unpack_from("<II", ring, data + idx)
        if flags == 1:
            idx = 0
            continue
        if ln < 32 or idx + 8 + ln > cap:
            return out
        kind, sec, nsec, wire, caplen = struct.unpack_from("<IIIII", ring, data + idx + 8)
        i = by_ts.get((sec, nsec))
        if kind != 0 or i is None or i <= last or caplen != recs[i][1] or \
                ring[data + idx + 40:data + idx + 40 + caplen] != recs[i][2][16:]:
            return out
        out.append(i)
        last = i
        idx += 8 + ((ln + 7) & ~7)
        if idx >= cap:
            idx = 0


def _stop(proc: psutil.Process) -> None:
    proc.send_signal(signal.SIGSTOP)
    helpers.wait_for(lambda: proc.status() == psutil.STATUS_STOPPED, timeout=30, interval=0.0005)


def _choose_cut(kind: str, got: list[int], recs) -> int | None:
    """The cut offset for `kind` among the records read and not published (`got`), so that at least one of them lies
    wholly before it and the capture has read past it; None when this stop does not allow it."""
    if len(got) < 3:
        return None
    if kind == "header":                       # inside the header of the last record read (its page: zeros after)
        return recs[got[-1]][0] + 7
    if kind == "data":                         # inside the data of the second one (the reader pages ahead)
        off, n, _ = recs[got[1]]
        return off + 16 + n // 2
    if kind == "boundary":                     # exactly at a record's end: a shorter file, whole records only
        return recs[got[len(got) // 2]][0]
    lo, hi = recs[got[1]][0], recs[got[-1]][0]   # "page": a page boundary inside the read records
    first = (lo // PAGE + 1) * PAGE
    return first if first < hi else None


def _catch_a_burst(out, pcap, plug, shards: str, kind: str, recs, by_ts):
    """Run over `pcap` into `out`, stop the capture process while it copies a burst, cut the file at an offset of
    `kind` among the records it has read and not published (_choose_cut) and let it go on: (the run, the cut, those
    records' numbers); None (the run reaped) when the run ended before a stop caught such a burst."""
    p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine", "run", str(plug), "--pcap", str(pcap), "--out",
                          str(out), "--json", "--packet-ring-mb", "4", "--shards", shards],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def capture():
        if p.poll() is not None:
            return "ended"
        for k in psutil.Process(p.pid).children(recursive=True):
            try:
                cmd = k.cmdline()
            except psutil.Error:
                continue
            if "luaprobe.engine.capture.process" in " ".join(cmd):
                return k, cmd[cmd.index("--ring") + 1].split(",")
    found = helpers.wait_for(capture, timeout=120)
    if found == "ended":
        helpers.finish(p, 300)
        return None
    cap, names = found
    fds = [os.open(f"/dev/shm/{n}", os.O_RDONLY) for n in names]
    rings = [mmap.mmap(fd, 0, prot=mmap.PROT_READ) for fd in fds]
    for fd in fds:
        os.close(fd)
    cut, got = None, []
    try:
        seen = 0
        while cut is None:                     # each pass: the capture publishes (it is copying a burst), stop it
            if p.poll() is not None:
                break
            tails = sum(struct.unpack_from("<Q", r, 64)[0] for r in rings)
            if tails == seen:
                time.sleep(0.00005)
                continue
            seen = tails
            _stop(cap)
            got = sorted(i for r in rings for i in _unpublished(r, by_ts, recs))
            if got == list(range(got[0], got[0] + len(got))) if got else False:
                cut = _choose_cut(kind, got, recs)   # (the records after the last publish, in one ring or both)
            if cut is not None and cut >= recs[-1][0]:
                cut = None
            if cut is None:
                cap.send_signal(signal.SIGCONT)
        if cut is not None:
            os.truncate(pcap, cut)
    finally:
        for r in rings:
            r.close()
        try:
            cap.send_signal(signal.SIGCONT)
        except psutil.Error:
            pass
    if cut is None:
        helpers.finish(p, 300)
        return None
    return p, cut, got


@pytest.mark.parametrize("kind,shards", [("header", "1"), ("data", "1"), ("boundary", "1"), ("page", "1"),
                                         ("data", "2")])
def test_a_cut_behind_the_reader_loses_no_record_before_it(tmp_path, kind, shards):
    pcap = tmp_path / "cut.pcap"
    recs = _write_capture(pcap)
    by_ts = {(1_700_000_000 + i // 1000, (i % 1000) * 1_000_000): i for i in range(RECORDS)}
    plug = tmp_path / "slow.lua"
    plug.write_text(helpers.slow_walk_lua(tmp_path / "walking", 0.000002))
    for attempt in range(3):                   # a run that ends before a stop caught a burst (a busy machine): again
        caught = _catch_a_burst(tmp_path / f"out{attempt}", pcap, plug, shards, kind, recs, by_ts)
        if caught is not None:
            break
    assert caught is not None, "three runs ended before a stop caught the capture process copying"
    p, cut, got = caught
    out, err = helpers.finish(p, 300)
    frames = [int(x) for x in subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.len"],
                                             capture_output=True, text=True).stdout.split()]
    c = len(frames)
    assert c == sum(1 for r in recs if r[0] + len(r[2]) <= cut) and got[0] < c   # tshark: the whole records before it
    if p.returncode == 0 and got[-1] == len(recs) - 1:   # the burst that ends the file, stopped after its last fstat
        summary = json.loads(out)                          # and before its publish: every record was read before the
        assert err == "" and summary["packets"] == len(recs) and not summary["input_errors"], (err, summary)   # cut
        assert summary["bytes"] == sum(r[1] for r in recs), summary              # (real bytes): nothing lost, exit 0
        return
    assert p.returncode == 3, (err, got[-1], cut)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("luaprobe run: input error: "), err
    summary = json.loads(out)
    assert summary["input_errors"] == [lines[0][len("luaprobe run: input error: "):]] and not summary.get("capture_death")
    assert summary.get("packets_read", summary["packets"]) == summary["packets"]
    if summary["packets"] == c:                # the records wholly before the cut, as tshark reads the cut file
        assert summary["bytes"] == sum(frames)
        if kind == "boundary":
            want = f"{pcap}: byte offset {cut}: the file was cut to {cut} bytes while it was read"
        else:
            off, n_cap, _ = next(r for r in recs if r[0] + len(r[2]) > cut)
            left = cut - off
            what = (f"truncated record header ({left} of 16 bytes)" if left < 16
                    else f"truncated record: caplen {n_cap} but {left - 16} bytes left")
            want = f"{pcap}: byte offset {off}: {what}"
    else:                                      # stopped between its size check and the publish: every record it
        k = got[-1] + 1                        # had read was checked before the cut, and is walked (real bytes)
        assert summary["packets"] == k and summary["bytes"] == sum(r[1] for r in recs[:k]), (summary, c, got)
        end = recs[got[-1]][0] + len(recs[got[-1]][2])
        want = f"{pcap}: byte offset {end}: the file was cut to {cut} bytes after the records before this offset were read"
    assert summary["input_errors"] == [want], (summary["input_errors"], want, c, got)
    assert not helpers.our_segments([p.pid])


# ---------------------------------------------------------------------------------------------------------------
# The walk itself, cut anywhere: the file is cut after it is mapped and before it is walked, so the walker (which
# checks the size only when it publishes, every 64 records) reads past the new end within the first 64 records (the
# rest of the new end's page reads as zeros, the pages past it fault), and for later cuts its check sees the new
# size before it gets there.  A worker process runs engine/capture/capture.lua's file() into a ring of its own (one
# cut per line on stdin, a JSON line back): on the old code the first read of a page past the end killed it (SIGBUS).
# Truth: the record offsets and bytes of the generated file, walked here; tshark's frames of the cut file.

WORKER = r'''
import json, os, shutil, sys, zlib
from luaprobe.shm.luajit import new_runtime
from luaprobe.engine.capture.pcapfile import open_capture
lua = new_runtime()
walk = lua.eval("""''' + helpers.file_walk_lua(4, False) + r'''""")
for line in sys.stdin:
    src, work, cut = line.split()
    shutil.copyfile(src, work)
    with open_capture(work) as c:
        os.truncate(work, int(cut))
        try:
            n, nbytes, err, off, recs = walk(c.address, c.size, c.fd)
        except Exception as e:                 # a capture header that cannot be read raises "offset N: ..."
            off, err = e.args[0].split("\nstack traceback:")[0].split(": ", 1)
            n, nbytes, off, err, recs = 0, 0, int(off.split()[1]), err.encode(), lua.table()
    recs = [[int(r[1]), int(r[2]), int(r[3]), int(r[4]), zlib.crc32(r[5])] for r in recs.values()]
    print(json.dumps({"n": int(n), "bytes": int(nbytes), "err": err.decode() if err else None,
                      "off": int(off) if off is not None else None, "recs": recs}), flush=True)
'''


def _write_pcapng(path, count: int) -> list[tuple[int, int, bytes]]:
    """A little-endian pcapng (SHB, IDB with microsecond ticks, then `count` EPBs of the frames _write_capture makes).
    Returns (block offset, frame length, block bytes) per packet."""
    tmp = str(path) + ".pcap"
    recs = _write_capture(tmp, count)
    os.unlink(tmp)
    shb = struct.pack("<IIIHHqI", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1, 28)
    idb = struct.pack("<IIHHII", 1, 20, 1, 0, 65535, 20)
    out, blocks, off = [shb, idb], [], len(shb) + len(idb)
    for _, n, rec in recs:
        sec, usec = struct.unpack_from("<II", rec)
        t = sec * 1_000_000 + usec
        pad = (4 - n % 4) % 4
        blen = 32 + n + pad
        blk = struct.pack("<IIIIIII", 6, blen, 0, t >> 32, t & 0xFFFFFFFF, n, n) + rec[16:] + b"\0" * pad + \
            struct.pack("<I", blen)
        blocks.append((off, n, blk))
        out.append(blk)
        off += blen
    with open(path, "wb") as f:
        f.write(b"".join(out))
    return blocks


@pytest.fixture(scope="module")
def cut_worker():
    yield from helpers.line_worker(WORKER)


@pytest.fixture(scope="module")
def cut_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cutwalk")
    return {"pcap": (d / "w.pcap", _write_capture(d / "w.pcap", 200)),
            "pcapng": (d / "w.pcapng", _write_pcapng(d / "w.pcapng", 200)), "dir": d}


def _want(fmt: str, recs, cut: int, header_end: int) -> tuple[int, str]:
    """Offset and message of the input error for a file of `fmt` cut to `cut` bytes (the walker's error for a file
    that short at the first record it lacks; at a record's end, the cut itself)."""
    if fmt == "pcapng":                        # the capture header is the SHB; the IDB after it is a block
        header_end, recs = 28, [(28, 0, b"\0" * 20)] + list(recs)
    if cut < header_end:
        return 0, None                         # the header's own error (checked by prefix)
    nxt = [r for r in recs if r[0] + len(r[2]) > cut]
    if not nxt:
        return cut, f"the file was cut to {cut} bytes while it was read"
    off, n, blk = nxt[0]
    left = cut - off
    if left == 0:
        return cut, f"the file was cut to {cut} bytes while it was read"
    if fmt == "pcap":
        return off, (f"truncated record header ({left} of 16 bytes)" if left < 16
                     else f"truncated record: caplen {n} but {left - 16} bytes left")
    return off, (f"truncated block header ({left} bytes left)" if left < 12
                 else f"block length {len(blk)} exceeds the {left} bytes left")


def _check_cut(worker, files, fmt: str, cut: int, tshark: bool = False) -> None:
    path, recs = files[fmt]
    work = files["dir"] / f"cut.{fmt}"
    worker.stdin.write(f"{path} {work} {cut}\n")
    worker.stdin.flush()
    line = worker.stdout.readline()
    assert line, f"the capture walk died at cut {cut} ({fmt}): status {worker.poll()}"
    got = json.loads(line)
    whole = [r for r in recs if r[0] + len(r[2]) <= cut]
    assert got["n"] == len(whole) and got["bytes"] == sum(r[1] for r in whole), (cut, got["n"], len(whole))
    want = []
    for off, n, blk in whole:                 # ts, wire, cap, bytes of each record as the file holds it
        if fmt == "pcap":
            sec, usec = struct.unpack_from("<II", blk)
            data = blk[16:16 + n]
        else:
            hi, lo = struct.unpack_from("<II", blk, 12)
            sec, usec = divmod((hi << 32) | lo, 1_000_000)
            data = blk[28:28 + n]
        want.append([sec, usec * 1000, n, n, zlib.crc32(data)])
    assert got["recs"] == want, cut             # no phantom, none twice, none lost
    off, msg = _want(fmt, recs, cut, recs[0][0])
    assert got["off"] == off, (cut, got)
    if msg is None:
        assert got["err"].startswith(f"the file was cut to {cut} bytes while it was read: "), got["err"]
    else:
        assert got["err"] == msg, (cut, got["err"], msg)
    if tshark:
        frames = subprocess.run(["tshark", "-r", str(work), "-T", "fields", "-e", "frame.len"], capture_output=True,
                                text=True).stdout.split()
        assert [int(x) for x in frames] == [r[1] for r in whole]


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_a_walk_past_a_cut_delivers_the_records_before_it(cut_worker, cut_files, fmt):
    """Chosen cuts, tshark as the truth: inside the first page, inside a record header, at a record's end, at a page
    boundary, one byte short of the end, past the first 64 records, in the capture header, to nothing, at the end of
    the headers before the first record (pcapng: the interface block's end; the error named the section header's end,
    offset 28, found by the hypothesis test below)."""
    recs = cut_files[fmt][1]
    r3, r40, r150 = recs[3], recs[40], recs[150]
    for cut in (r3[0] + 5, r40[0] + 11, r40[0], (r40[0] // PAGE + 1) * PAGE, recs[-1][0] + len(recs[-1][2]) - 1,
                r150[0] + 20, 10, 0, recs[0][0]):     # recs[0][0]: the end of the headers (pcapng: SHB and IDB)
        _check_cut(cut_worker, cut_files, fmt, cut, tshark=cut >= recs[0][0])


@hypothesis.settings(max_examples=150, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(data=hypothesis.strategies.data())
@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_a_walk_past_a_cut_anywhere_delivers_exactly_the_records_before_it(cut_worker, cut_files, fmt, data):
    path, recs = cut_files[fmt]
    size = recs[-1][0] + len(recs[-1][2])
    cut = data.draw(hypothesis.strategies.one_of(
        hypothesis.strategies.integers(0, size - 1),
        hypothesis.strategies.integers(0, 70).map(lambda k: recs[k][0] + (recs[k][0] * 31) % 40)))
    _check_cut(cut_worker, cut_files, fmt, cut)


_GUARD = r'''
import ctypes, mmap, os, signal, sys
import numpy as np
import luaprobe.shm._lpsync as m
lib = ctypes.CDLL(m.__file__)
lib.lp_cutguard_arm.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
view = np.frombuffer(mm, dtype=np.uint8)
assert lib.lp_cutguard_arm(view.ctypes.data, size, fd) == 0
os.truncate(sys.argv[1], 100)
print(int(view[size - 1]), int(view[50]), flush=True)   # past the cut: the guard's zero page; before it: the file's
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGBUS)                  # sent, not a fault: the default action, as without a guard
elif sys.argv[2] == "tgkill":
    import threading
    signal.pthread_kill(threading.get_ident(), signal.SIGBUS)
print("survived", flush=True)
'''


@pytest.mark.parametrize("how", ["kill", "tgkill"])
def test_a_sigbus_sent_by_a_process_is_not_taken_for_a_cut(tmp_path, how):
    """The cut guard (shm/_lpsync.c lp_cutguard_arm) handles only the kernel's SIGBUS of a load past a cut (si_code >
    0): one sent by kill(2) or tgkill (SI_USER, SI_TKILL; its si_addr field is the sender's pid and uid) ends the
    process by its default action, as it did before the guard.  Before: the handler restored the old disposition and
    returned, so the signal was lost and the process ran on ("survived").  The guarded read past the cut reads zeros
    and the one before it the file's byte (checked first, in the same process)."""
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(1, 251)) * 100)          # 25 000 bytes: seven pages, none of them zero
    r = subprocess.run([sys.executable, "-c", _GUARD, str(path), how], capture_output=True, text=True, timeout=60,
                       cwd=helpers.REPO)
    assert r.stdout.split("\n")[0] == f"0 {51}", (r.stdout, r.stderr)
    assert "survived" not in r.stdout and r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr)


def test_the_guard_reads_zeros_past_a_cut_and_lives(tmp_path):
    """Positive control of the harness above: no signal sent, the guarded read past the cut returns zeros and the
    process exits 0."""
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(1, 251)) * 100)
    r = subprocess.run([sys.executable, "-c", _GUARD, str(path), "none"], capture_output=True, text=True, timeout=60,
                       cwd=helpers.REPO)
    assert r.returncode == 0 and r.stdout.split() == ["0", "51", "survived"], (r.returncode, r.stdout, r.stderr)
