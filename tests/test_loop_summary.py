"""The packet loop's own accounting in the run summary (engine/fastpath/run.py, issue 10): packet_loop_warmup (the
first WARMUP_BATCHES batches: packets, wall and thread CPU up to their end, inside packet_loop_s /
packet_loop_cpu_s) and packet_loop_rusage (the fast-path thread's page faults and context switches over the loop).
Packet counts are checked against capinfos (Wireshark), which counts the capture's records itself."""
import os
import subprocess


from luaprobe.engine.fastpath.run import WARMUP_BATCHES, FastPath, RunConfig
from tests.helpers import PCAPS

EMPTY_TCP = """
TrisulPlugin = {
  id = { name = "empty", description = "empty TCP hook", author = "test", version_major = 1, version_minor = 0 },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}", onpacket = function(engine, layer) end },
}
"""


def capinfos_packets(path: str) -> int:
    out = subprocess.run(["capinfos", "-M", "-c", path], capture_output=True, text=True, check=True).stdout
    return int(out.split("Number of packets:")[1].split()[0])


def run(tmp_path, pcap: str, batch: int) -> dict:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "empty.lua").write_text(EMPTY_TCP)
    return FastPath(RunConfig(plugins=[str(plugins)], files=[os.path.join(PCAPS, pcap)], out_dir=str(tmp_path / "out"),
                              batch=batch)).run()


def test_warmup_is_the_first_batches_of_the_loop(tmp_path):
    pcap = "tcp-echo-many-flows.pcap"
    s = run(tmp_path, pcap, batch=16)
    assert s["packets"] == capinfos_packets(os.path.join(PCAPS, pcap))
    w = s["packet_loop_warmup"]
    assert w["batches"] == WARMUP_BATCHES
    # a batch holds 1..16 packets (it ends early at a new packet-time second or when the ring has no more)
    assert WARMUP_BATCHES <= w["packets"] <= WARMUP_BATCHES * 16 < s["packets"]
    assert 0 < w["cpu_s"] <= s["packet_loop_cpu_s"] and 0 < w["s"] <= s["packet_loop_s"]
    ru = s["packet_loop_rusage"]
    assert set(ru) == {"minflt", "majflt", "nvcsw", "nivcsw"} and all(v >= 0 for v in ru.values())


def test_no_warmup_figure_for_a_shorter_loop(tmp_path):
    pcap = "http-get-text.pcap"
    s = run(tmp_path, pcap, batch=1024)
    assert s["packets"] == capinfos_packets(os.path.join(PCAPS, pcap)) < WARMUP_BATCHES
    assert s["packet_loop_warmup"] == {}
    assert s["packet_loop_cpu_s"] > 0 and set(s["packet_loop_rusage"]) == {"minflt", "majflt", "nvcsw", "nivcsw"}
