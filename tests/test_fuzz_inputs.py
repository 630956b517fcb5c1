"""Fuzz: mutated real captures (four of tests/data, and tests/data/cases) through the pcap / pcapng reader and the
decoders (decode, IP reassembly, flow table) in-process, and a few through `luaprobe run`.

What must hold for any bytes: no hang, no crash (no Lua error, no Python exception other than the
documented InputError), and a bad file gives ONE clear error naming the file and a byte offset inside it
(exit status 3 from the CLI, no traceback).
"""
from __future__ import annotations

import glob
import os
import random
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from luaprobe.engine.capture.pcapfile import InputError, open_capture
from luaprobe.shm.luajit import new_runtime
from tests import helpers

SEEDS = sorted([os.path.join(helpers.PCAPS, f) for f in ("http-gzip-eicar.pcap", "pcapng-be-allblocks.pcapng",
                                                           "sll2-linux.pcap", "ipv6-icmp6.pcap")]
               + glob.glob(os.path.join(helpers.REPO, "tests", "data", "cases", "*", "input.pcap")))

LUA = r"""
local ffi = require 'ffi'
local pcapfile = require 'luaprobe.engine.capture.pcapfile'
local decode = require 'luaprobe.engine.fastpath.decode'
local flowtable = require 'luaprobe.engine.fastpath.flowtable'
local ipreasm = require 'luaprobe.engine.fastpath.ipreasm'
require 'luaprobe.engine.plugins.packet'
-- walk a capture held at addr: every record decoded, fragments reassembled, flows tracked
return function(addr, size)
  local r = pcapfile.open(addr, size)
  local e = ffi.new('lp_pkt')
  local ft = flowtable.new{ capacity = 1024 }
  local R = ipreasm.new()
  local n, datagrams = 0, 0
  while true do
    local p, caplen, wirelen, sec, nsec, lt = r:next()
    if not p then break end
    e.data, e.caplen, e.wirelen = p, caplen, wirelen
    decode.decode(e.d, p, caplen, lt)
    if e.d.frag ~= 0 then
      local frame, len = R:add(e, sec)
      if frame then
        datagrams = datagrams + 1
        decode.decode(e.d, frame, len, lt)
        ft:update(e.d, sec, len)
      end
    else
      ft:update(e.d, sec, wirelen)
      if e.d.ip_version ~= 0 then decode.flowkey(e.d) end
    end
    n = n + 1
  end
  return n, r.error, r.error_offset, datagrams
end
"""


@pytest.fixture(scope="module")
def walk():
    lua = new_runtime()
    return lua.execute(LUA)


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        if op < 0.4 and b:                                   # flip bytes
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256)
        elif op < 0.55 and len(b) > 4:                       # a 32-bit length-like field set to an edge value
            i = rng.randrange(len(b) - 4)
            b[i:i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x00\x00\x10\x00", b"\x40\x00\x00\x00"])
        elif op < 0.7:                                       # truncate
            del b[rng.randrange(len(b) + 1):]
        elif op < 0.85 and b:                                # delete a run
            i = rng.randrange(len(b))
            del b[i:i + rng.randint(1, 64)]
        else:                                                # insert junk
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return bytes(b)


def check_walk(walk, path: str):
    """Walk `path`; returns None or the InputError. Asserts the error is clear and in bounds."""
    size = os.path.getsize(path)
    try:
        cap = open_capture(path)
    except InputError as e:
        assert e.offset == 0 and str(e).startswith(path + ": byte offset 0: ")
        return e
    with cap:
        try:
            n, err, off, _ = walk(cap.address, cap.size)
        except Exception as e:                               # only the header error of pcapfile.open
            msg = e.args[0] if e.args else str(e)
            msg = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
            m = re.match(r"offset (\d+): (.+)", msg)
            assert m and "stack traceback" not in msg.split("\n")[0], msg
            assert int(m.group(1)) < max(size, 1)
            return InputError(path, int(m.group(1)), m.group(2))
    if err is not None:
        err = err.decode("utf-8", "replace")
        assert 0 <= off < size and err and "\n" not in err
        return InputError(path, off, err)
    return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(SEEDS), salt=st.integers(0, 2**32))
@pytest.mark.timeout(120)
def test_mutated_captures_walk_cleanly(walk, tmp_path, seed, salt):
    data = open(seed, "rb").read()
    mutant = mutate(data, random.Random(salt))
    path = str(tmp_path / ("m-" + os.path.basename(seed)))
    with open(path, "wb") as f:
        f.write(mutant)
    check_walk(walk, path)


def test_seeds_are_clean(walk):
    for s in SEEDS:
        assert check_walk(walk, s) is None, s


@pytest.mark.timeout(300)
def test_cli_reports_one_clear_error(tmp_path):
    """A few mutants end to end: exit 0 (readable) or 3 with exactly one 'input error: FILE: byte offset N:'
    line, N inside the file, and no traceback."""
    rng = random.Random(12)
    exe = os.path.join(os.path.dirname(sys.executable), "luaprobe")
    plugin = os.path.join(helpers.REPO, "tests", "data", "cases", "probe.lua")
    seen_error = 0
    for k in range(6):
        seed = SEEDS[k % len(SEEDS)]
        data = open(seed, "rb").read()
        mutant = mutate(data, rng) if k % 3 else data[:len(data) * 2 // 3]     # every third: a truncation
        path = str(tmp_path / f"m{k}-{os.path.basename(seed)}")
        with open(path, "wb") as f:
            f.write(mutant)
        r = subprocess.run([exe, "run", plugin, "--pcap", path, "--out", str(tmp_path / f"o{k}"), "-q"],
                           capture_output=True, text=True, timeout=120)
        assert "Traceback" not in r.stderr and r.returncode in (0, 3), (r.returncode, r.stderr)
        errs = [line for line in r.stderr.splitlines() if "input error" in line]
        if k % 3 == 0:                        # cut inside a record: always an input error (exit 3)
            assert r.returncode == 3, r.stderr
        if r.returncode == 3:
            seen_error += 1
            assert len(errs) == 1, r.stderr
            m = re.search(re.escape(path) + r": byte offset (\d+): \S", errs[0])
            assert m and int(m.group(1)) < len(mutant), errs[0]
        else:
            assert errs == []
    assert seen_error >= 2
