"""Many capture files in one run hold no descriptor per file (engine/capture/process.py: each file is mapped, and the
descriptor its size checks read, Capture.fd, is closed with the mapping when the file is done).

3d8f355 gave capture.lua a size check per file, a Python closure over an open descriptor that was closed only when
Lua's collector dropped the closure: 300 files under a soft RLIMIT_NOFILE of 128 left the capture process without
descriptors after ~150 of them ("input error: f270.pcap: byte offset 0: cannot map: Too many open files", exit 3,
111-116 such lines in two runs).  A real run, a real limit (set in the child before exec), no mock; the truth is the
record count of the file read by this test's own pcap reader, times the copies.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys

from tests.helpers import PCAPS
from tests.test_decode import iter_pcap

COPIES, LIMIT = 300, 128


def test_300_files_under_a_128_descriptor_limit_are_all_read(tmp_path):
    src = os.path.join(PCAPS, "dns-udp-a-aaaa-mx.pcap")
    records = sum(1 for _ in iter_pcap(src))
    files = []
    for k in range(COPIES):
        files.append(str(tmp_path / f"f{k:03d}.pcap"))
        shutil.copyfile(src, files[-1])

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "run", "--pcap", *files, "--out",
                        str(tmp_path / "out"), "--analysers", "counters", "-q", "--json"], capture_output=True,
                       text=True, timeout=600, preexec_fn=limit, stdin=subprocess.DEVNULL)
    assert "Too many open files" not in r.stderr, r.stderr[:2000]
    assert r.returncode == 0, (r.returncode, r.stderr[:2000])
    summary = json.loads(r.stdout)
    assert (summary["files_done"], summary["packets"], summary["input_errors"]) == (files, COPIES * records, []), \
        (len(summary["files_done"]), summary["packets"], summary["input_errors"][:3])
