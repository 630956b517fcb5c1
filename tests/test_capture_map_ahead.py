"""The capture loop maps its file ahead while the packet ring is full (engine/capture/capture.lua map_ahead).

capture.file walks an 8 MiB capture file into a 64 KiB packet ring nobody reads, so the ring is full after ~60
records and the loop would sleep for space.  The truth is the kernel's: /proc/self/smaps ``Rss`` of the file's
mapping (pages mapped into this process), against what the copy itself read (~60 records of 1 000 bytes, plus the
kernel's fault-around of 64 KiB).  The loop also adds the bytes up in the ring's header (Ring:mapped_ahead, the run
summary's ``packet_ring_mapped_ahead_mb``).  ``stop()`` is the loop's own stop check: it is called after every chunk mapped
ahead and after every sleep for space, so the number of calls fixes how far the loop got; no timing is involved.
"""
from __future__ import annotations

import struct

import pytest

from luaprobe.engine.capture.pcapfile import open_capture
from luaprobe.shm.luajit import new_runtime

MiB = 1 << 20
FRAME = 1000


def write_pcap(path, records: int) -> None:
    """A classic pcap (microseconds, Ethernet) of `records` frames of FRAME bytes."""
    frame = bytes(range(256)) * (FRAME // 256) + bytes(FRAME % 256)
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i in range(records):
            f.write(struct.pack("<IIII", 1_700_000_000 + i // 1000, i % 1000, FRAME, FRAME) + frame)


def mapping_rss(address: int) -> int:
    """Bytes of the mapping that holds `address` that are mapped into this process (/proc/self/smaps Rss)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


WALK = """function(addr, size, fd, calls, window)
  local ffi = require("ffi")
  local ring = require("luaprobe.shm.ring")
  local capture = require("luaprobe.engine.capture.capture")
  local cap = 65536
  local buf = ffi.new("uint8_t[?]", ring.region_size(cap, false))
  local r = ring.format(buf, cap, false)
  capture.AHEAD_WINDOW = window
  capture.ahead_bytes, capture.ahead_calls = 0, 0
  local k = 0
  local n, bytes, err, off, stopped = capture.file(r, addr, size, function() k = k + 1; return k >= calls end, fd)
  return n, stopped, capture.ahead_bytes, capture.ahead_calls, r:mapped_ahead(), buf
end"""


@pytest.fixture(scope="module")
def capture_file(tmp_path_factory):
    """A classic pcap of just under 8 MiB: 8 256 records of FRAME bytes, shared by the module's tests; its path."""
    path = tmp_path_factory.mktemp("ahead") / "big.pcap"
    write_pcap(path, 8 * MiB // (FRAME + 16))
    return str(path)


def walk(path, calls, window):
    """capture.file over `path` into a 64 KiB ring nobody reads, with `window` bytes as AHEAD_WINDOW, stopped at the
    loop's `calls`-th stop check -> (records copied, stopped, bytes mapped ahead, madvise calls, Rss bytes of the
    file's mapping after the walk).  Checks that the ring header's count equals the loop's own."""
    lua = new_runtime()
    with open_capture(path) as c:
        n, stopped, ahead, madvises, in_header, _buf = lua.eval(WALK)(c.address, c.size, c.fd, calls, window)
        assert in_header == ahead                # the ring's header counter (the run summary's mapped-ahead MiB)
        return int(n), stopped, int(ahead), int(madvises), mapping_rss(c.address)


def test_full_ring_maps_the_file_ahead_instead_of_sleeping(capture_file):
    # three chunks mapped (a stop check after each), the third check stops the walk
    n, stopped, ahead, madvises, rss = walk(capture_file, 3, 256 * MiB)
    assert stopped and n < 64                   # the ring held the records copied; nobody read them
    assert rss >= 3 * MiB                        # the kernel's count: mapped ahead, not read by the copy
    assert (ahead, madvises) == (3 * MiB, 3)


def test_mapping_ahead_stops_at_the_window(capture_file):
    # a 2 MiB window past the reader: the chunks up to it (a stop check after each), then the loop sleeps for space
    # (50 ms, the wait's timeout: nobody reads) and the next stop check ends the walk
    n, stopped, ahead, madvises, rss = walk(capture_file, 4, 2 * MiB)
    assert stopped and n < 64
    reader = 24 + (n + 1) * (16 + FRAME)         # the walker read the record that did not fit
    start, end = reader - reader % 4096, -(-(reader + 2 * MiB) // 4096) * 4096
    assert end - start <= rss <= end             # nothing mapped past the window (the copy read below `start`)
    assert (ahead, madvises) == (end - start, 3)
