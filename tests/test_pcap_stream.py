"""--pcap - (standard input) and FIFOs: the capture process reads the pcap/pcapng stream sequentially
(engine/capture/capture.lua stream, engine/capture/process.py) instead of mapping a file.  The real CLI with a
real pipe: the packets against tshark, the flows against a run on the file itself, damage as one line naming
the stream offset (exit 3), like a file."""
from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from tests import helpers

TSHARK = shutil.which("tshark")
PLUGIN = os.path.join(helpers.REPO, "engine", "examples", "tcp_ports.lua")
CAPTURES = ["http-website-keepalive.pcap", "pcapng-multi-if-dns.pcapng", "http-chunked-dvwa.pcapng",
            "mix-eth-tls-http-dns.pcap"]


def cli(*args, stdin=None, input=None):
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", PLUGIN, *args, "-q", "--json"],
                          cwd=helpers.REPO, capture_output=True, timeout=300, env=env, stdin=stdin, input=input)


def tshark_packets(path) -> int:
    out = subprocess.run([TSHARK, "-r", path, "-T", "fields", "-e", "frame.number"], capture_output=True,
                         text=True, check=True).stdout
    return len(out.split())


def flowkeys(out) -> list:
    db = sqlite3.connect(os.path.join(out, "luaprobe.sqlite"))
    try:
        return sorted(db.execute("SELECT flowkey, packets_az, packets_za FROM flows").fetchall())
    finally:
        db.close()


def chunked_writer(fd, data: bytes, seed: int):
    """Write data in random small pieces (records split across reads), then close."""
    rng = random.Random(seed)
    with os.fdopen(fd, "wb", buffering=0) as f:
        i = 0
        while i < len(data):
            k = rng.randrange(1, 3000)
            f.write(data[i:i + k])
            i += k
            if rng.random() < 0.05:
                time.sleep(0.01)          # the reader sees an empty pipe between pieces


@pytest.mark.skipif(TSHARK is None, reason="tshark not installed")
@pytest.mark.parametrize("name", CAPTURES)
def test_stdin_and_fifo_give_the_file_s_packets_and_flows(tmp_path, name):
    path = os.path.join(helpers.PCAPS, name)
    data = open(path, "rb").read()
    r = cli("--pcap", path, "--out", str(tmp_path / "file"))
    assert r.returncode == 0, r.stderr
    ref = json.loads(r.stdout)
    assert ref["packets"] == tshark_packets(path)
    # stdin through a pipe, written in small pieces
    rfd, wfd = os.pipe()
    t = threading.Thread(target=chunked_writer, args=(wfd, data, 1))
    t.start()
    try:
        r = cli("--pcap", "-", "--out", str(tmp_path / "stdin"), stdin=rfd)
    finally:
        os.close(rfd)
        t.join()
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["packets"], s["bytes"], s["flows"], s["files_done"]) == (ref["packets"], ref["bytes"], ref["flows"], ["-"])
    assert flowkeys(tmp_path / "stdin") == flowkeys(tmp_path / "file")
    # a FIFO, then a regular file after it
    fifo = str(tmp_path / "cap.fifo")
    os.mkfifo(fifo)
    t = threading.Thread(target=lambda: chunked_writer(os.open(fifo, os.O_WRONLY), data, 2))
    t.start()
    dns = os.path.join(helpers.PCAPS, "dns-udp-a-aaaa-mx.pcap")
    try:
        r = cli("--pcap", fifo, "--pcap", dns, "--out", str(tmp_path / "fifo"))
    finally:
        t.join()
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["packets"] == ref["packets"] + tshark_packets(dns) and s["files_done"] == [fifo, dns]


def test_cat_into_a_sharded_run(tmp_path):
    path = os.path.join(helpers.PCAPS, "http-website-keepalive.pcap")
    with open(path, "rb") as f:
        r = cli("--pcap", "-", "--shards", "2", "--out", str(tmp_path / "o"), stdin=f)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["packets"] == helpers.pcap_records(path)


@pytest.mark.parametrize("case", ["truncated", "not-a-capture", "empty"])
def test_damaged_streams_are_one_line_with_the_offset(tmp_path, case):
    good = open(os.path.join(helpers.PCAPS, "http-get-text.pcap"), "rb").read()
    data = {"truncated": good[:3000], "not-a-capture": b"hello world, not a pcap", "empty": b""}[case]
    r = cli("--pcap", "-", "--out", str(tmp_path / "o"), input=data)
    lines = r.stderr.decode().splitlines()
    assert r.returncode == 3 and len(lines) == 1, lines
    if case == "truncated":        # the first record that does not fit in the 3000 bytes, walked here
        off, n = 24, 0
        while off + 16 + int.from_bytes(good[off + 8:off + 12], "little") <= 3000:
            off, n = off + 16 + int.from_bytes(good[off + 8:off + 12], "little"), n + 1
        assert lines[0].startswith(f"luaprobe run: input error: -: byte offset {off}: truncated record")
        assert json.loads(r.stdout)["packets"] == n
    else:
        assert lines[0].startswith("luaprobe run: input error: -: byte offset 0: ")


def test_stdin_twice_is_a_usage_error(tmp_path):
    r = cli("--pcap", "-", "--pcap", "-", "--out", str(tmp_path / "o"), input=b"")
    assert r.returncode == 2 and r.stderr.decode().strip() == "luaprobe run: --pcap -: standard input can be read only once"
