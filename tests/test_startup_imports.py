"""What a `luaprobe run` over a capture file loads while it starts (issue 10 "honest accounting": the run's fixed cost).

The capture process, which the packet loop waits for, imports neither numpy (engine/capture/pcapfile.py takes the
mapped file's address through the buffer protocol) nor cryptography; the run's own process has not imported
cryptography (only a TLS certificate needs it: engine/streams/certs.py, engine/analysers/certs.py) by the time its
plug-ins load.  The store writer imports neither.

How: a real run whose plug-in's top level blocks, while it loads, on opening a FIFO the test holds; the capture
file (1.9 MB) does not fit the 1 MiB packet ring, so the capture process, which nobody drains yet, waits on the
full ring.  Meanwhile the test reads each process's memory map (/proc/PID/maps: the shared libraries of every
imported extension module: numpy/_core/_multiarray_umath*.so, cryptography/hazmat/bindings/_rust*.so), then
lets the plug-in go; the run ends with exit 0 and every packet (tshark's count of the file, pinned below).
"""
from __future__ import annotations

import json
import os
import subprocess
import time

from tests import helpers
from tests.proc_tools import LUAPROBE, reaped, tagged_env, tagged_processes

CAPTURE = os.path.join(helpers.REPO, "tests", "data", "trisul-16minutes.pcap")
SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")
TCP_FRAMES = 78       #: `tshark -r engine/examples/sample.pcap -Y tcp | wc -l`
FRAMES = 7000         #: `tshark -r tests/data/trisul-16minutes.pcap | wc -l`

PLUGIN = r"""
-- blocks at its first load until the test opens GATE for writing (io.open of a FIFO waits for a writer)
if not io.open(DONE, "r") then
  local f = assert(io.open(GATE, "r"))
  f:read("*a")
  f:close()
  assert(io.open(DONE, "w")):close()
end
TrisulPlugin = { id = { name = "gate" },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer) end } }
"""


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def _libraries(maps: str, *names: str) -> list[str]:
    """Mapped files of ``maps`` under a directory named one of ``names`` (site-packages/numpy/..., ...)."""
    return sorted({line.split()[-1] for line in maps.splitlines()
                   if any(f"/{n}/" in line for n in names)})


def _child(procs, marker: str):
    for p in procs:
        try:
            if any(marker in a for a in p.cmdline()):
                return p
        except Exception:  # noqa: BLE001 - gone meanwhile
            continue
    return None


def test_capture_process_and_run_load_no_numpy_or_cryptography_they_do_not_use(tmp_path):
    gate, done = tmp_path / "gate", tmp_path / "done"
    os.mkfifo(gate)
    plugin = tmp_path / "gate.lua"
    plugin.write_text(f"local GATE, DONE = {json.dumps(str(gate))}, {json.dumps(str(done))}\n" + PLUGIN)
    env, tag = tagged_env()
    with reaped(tag):
        run = subprocess.Popen([*LUAPROBE, "run", str(plugin), "--pcap", CAPTURE, "--out", str(tmp_path / "o"),
                                "--packet-ring-mb", "1", "--hook-budget", "0", "--stats-json", str(tmp_path / "s.json"),
                                "-q"], cwd=helpers.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        try:
            deadline = time.monotonic() + 120
            capture = writer = None
            while time.monotonic() < deadline and run.poll() is None:
                procs = tagged_processes(tag)
                capture = _child(procs, "luaprobe.engine.capture.process")
                writer = _child(procs, "luaprobe.engine.store.writer")
                # the capture process maps the file after its imports, then fills the ring and waits on it
                if capture is not None and writer is not None and CAPTURE in _maps(capture.pid):
                    break
                time.sleep(0.01)
            assert run.poll() is None, run.communicate()
            assert capture is not None and CAPTURE in _maps(capture.pid), "the capture process was not seen reading"
            assert capture.is_running(), "the capture process ended: the file fit the ring"
            assert _libraries(_maps(capture.pid), "numpy", "cryptography") == []
            assert _libraries(_maps(writer.pid), "numpy", "cryptography") == []
            assert _libraries(_maps(run.pid), "cryptography") == []
            assert _libraries(_maps(run.pid), "lupa"), "the run's own process maps no lupa: wrong process read"
        finally:
            with open(gate, "w") as f:          # lets the plug-in's top level go (and the run end) in any case
                f.write("go")
        out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["packets"] == FRAMES


def test_flowmon_full_record_width_is_flowrows():
    """engine/plugins/flowmon.py no longer imports engine/fastpath/flowrows.py (numpy) for its width."""
    from luaprobe.engine.fastpath import flowrows
    from luaprobe.engine.plugins import flowmon
    assert flowmon.FLOW_ROW_FIELDS == flowrows.FIELDS


WRITER = r"""
-- writes a line per TCP packet into a file it never closes: the bytes sit in the C stdio buffer of Lua's io
-- library until the VM is closed (its __gc) or the process's stdio is flushed
local f = assert(io.open(OUT, "w"))
TrisulPlugin = { id = { name = "unclosed" },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer) f:write("tcp packet\n") end } }
"""


def test_the_run_ends_without_losing_what_a_plugin_left_unflushed(tmp_path):
    """The `luaprobe` command ends without the interpreter's teardown (cli._exit_now); what the teardown did that
    a plug-in sees is still done: a file it opened and never closed holds every line it wrote (one per TCP packet:
    tshark's 78 TCP frames of the sample), and the exit code is the command's."""
    out = tmp_path / "lines.txt"
    plugin = tmp_path / "unclosed.lua"
    plugin.write_text(f"local OUT = {json.dumps(str(out))}\n" + WRITER)
    env, tag = tagged_env()
    with reaped(tag):
        p = subprocess.run([*LUAPROBE, "run", str(plugin), "--pcap", SAMPLE, "--out", str(tmp_path / "o"), "-q"],
                           cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert out.read_text().splitlines() == ["tcp packet"] * TCP_FRAMES
    bad = subprocess.run([*LUAPROBE, "run", str(plugin), "--pcap", SAMPLE, "--out", str(tmp_path / "o"), "-q"],
                         cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "already holds the results" in bad.stderr     # exit 2: the --out check
