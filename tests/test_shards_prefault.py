"""The summary's ``flow_prefault`` of a sharded run (engine/fastpath/shards.py merge_prefault): each shard process runs
its own prefault helper thread (engine/fastpath/flowtable.lua start_prefaulter), and the run's summary states them as
one, as docs/operations.md describes the field: ``helper`` true / false, the helpers' counts, a kernel's refusal as
its ``errno``, the reason when there is no helper.  Real runs of the CLI with 2 shards on a real capture; the flows
and packets against tshark's count (tcp-echo-many-flows.pcap: ``capinfos -c`` 82 582 packets, ``tshark -q -z
conv,tcp`` 500 conversations).  The refusal of an older kernel (MADV_POPULATE_WRITE unknown: EINVAL) is made by an
LD_PRELOAD madvise that refuses that advice (built here with the C compiler), in every process of the run.

Before (summed as plain counts): ``"helper": 2``; two shards' EINVAL ``"errno": 44``; without helpers ``"helper": 0``
and no reason."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests import helpers

PCAP = os.path.join(helpers.PCAPS, "tcp-echo-many-flows.pcap")
PACKETS, FLOWS = 82582, 500          # capinfos -c; tshark -q -z conv,tcp
PLUGIN = os.path.join(helpers.REPO, "engine", "examples", "tcp_ports.lua")
NO_SMALL_TABLE = "the flow records are not a mapping of their own (under 2 MiB)"   # flowtable.lua start_prefaulter

NOPOP = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
/* madvise as a kernel before 5.14 answers it: MADV_POPULATE_WRITE (23) is unknown advice */
int madvise(void *a, size_t l, int adv) {
    static int (*real)(void *, size_t, int);
    if (adv == 23) { errno = EINVAL; return -1; }
    if (!real) real = (int (*)(void *, size_t, int))dlsym(RTLD_NEXT, "madvise");
    return real(a, l, adv);
}
"""


def run2(tmp_path, *args, env=None) -> dict:
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", PLUGIN, "--pcap", PCAP,
                        "--out", str(tmp_path / "out"), "--shards", "2", "--json", *args], cwd=helpers.REPO,
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                       env=dict(os.environ, **(env or {})))
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["packets"] == PACKETS and s["flows"] == FLOWS and not s["input_errors"], s
    assert len(s["shards"]) == 2
    return s


def test_two_shards_helpers_are_one_helper_true(tmp_path):
    s = run2(tmp_path)
    fp = s["flow_prefault"]
    assert fp["helper"] is True and fp["errno"] == 0 and "reason" not in fp, fp
    # the fast path of each shard that saw packets maps its first chunk itself (its helper has mapped nothing yet:
    # 1 024 records); every helper is woken at its start for the index's next doubling (the 1M-flow table's index is
    # one mapping: flowtable.lua prefault_index)
    busy = sum(x["packets"] > 0 for x in s["shards"])
    assert fp["records_mapped_by_fast_path"] == busy * 1024 and fp["wakeups"] >= 2, fp


def test_two_shards_without_helpers_say_so_and_why(tmp_path):
    fp = run2(tmp_path, "--flow-capacity", "1024")["flow_prefault"]
    assert fp == {"helper": False, "reason": NO_SMALL_TABLE}, fp


@pytest.mark.skipif((shutil.which("cc") or shutil.which("gcc")) is None, reason="needs a C compiler")
def test_two_shards_refused_by_the_kernel_state_its_errno_once(tmp_path):
    src, lib = tmp_path / "nopop.c", tmp_path / "nopop.so"
    src.write_text(NOPOP)
    subprocess.run([shutil.which("cc") or shutil.which("gcc"), "-shared", "-fPIC", "-O2", "-o", str(lib), str(src),
                    "-ldl"], check=True)
    fp = run2(tmp_path, env={"LD_PRELOAD": str(lib)})["flow_prefault"]
    # the helpers started, their first madvise was refused (EINVAL = 22), they mapped nothing; the fast paths mapped
    # (tried to) every chunk themselves, and the flows are all there (tshark's count, above)
    assert fp["helper"] is True and fp["errno"] == 22 and fp["pages"] == 0, fp
