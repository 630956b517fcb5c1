"""The flow table's huge_pages setting (engine/fastpath/hugepages.py, `--huge-pages`, `[fastpath] huge_pages`).

Independent truths: the kernel's own view of the flow table's mappings in /proc/self/smaps while a real fast path
holds them (``VmFlags``: ``hg`` = MADV_HUGEPAGE, ``nh`` = MADV_NOHUGEPAGE; ``AnonHugePages``: huge pages the kernel
gave), and for ``auto`` a sysfs tree written here (a directory passed as the root, not a mock of the kernel) laid
out as Linux's drivers/virtio/virtio.c writes it.  Before: no setting, every array advised MADV_HUGEPAGE.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from luaprobe.engine.fastpath import hugepages
from luaprobe.engine.fastpath.run import FastPath, RunConfig
from tests import helpers

EX = os.path.join(helpers.REPO, "engine", "examples")
PLUGIN = os.path.join(EX, "tcp_ports.lua")
PCAP = os.path.join(helpers.PCAPS, "tcp-echo-many-flows.pcap")       # 500 TCP flows
THP = "/sys/kernel/mm/transparent_hugepage/enabled"
ARRAYS = ("flows", "cold", "lru", "free_stack")    # >= 2 MiB at the default capacity (1M flows): mappings


def thp_mode() -> str | None:
    """The kernel's THP mode (the bracketed word of /sys/kernel/mm/transparent_hugepage/enabled), or None."""
    try:
        text = open(THP).read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


def smaps() -> list[dict]:
    """/proc/self/smaps as [{"start", "end", "VmFlags": set, "AnonHugePages": kB, "Rss": kB}]."""
    out: list[dict] = []
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                out.append({"start": lo, "end": hi})
            elif head == "VmFlags:":
                out[-1]["VmFlags"] = set(line.split()[1:])
            elif head in ("AnonHugePages:", "Rss:"):
                out[-1][head[:-1]] = int(line.split()[1])
    return out


def mapping_of(addr: int, maps: list[dict]) -> dict:
    hit = [m for m in maps if m["start"] <= addr < m["end"]]
    assert len(hit) == 1, hex(addr)
    return hit[0]


def run_fast_path(tmp_path, value: str) -> tuple[dict, dict]:
    """A real fast-path run with huge_pages=value; (summary, {array: its smaps entry}) read after the run, while the
    FastPath still holds its flow table (the 500 flows of the capture written into it)."""
    fp = FastPath(RunConfig(plugins=[PLUGIN], files=[PCAP], out_dir=str(tmp_path / "out"), huge_pages=value))
    s = fp.run()
    assert s["packets"] > 0 and s["flows"] >= 500 and not s["input_errors"]
    addr = fp.driver_lua.eval("function(ft) local ffi = require('ffi'); return "
                              + ", ".join(f"tonumber(ffi.cast('intptr_t', ft.{a}))" for a in ARRAYS) + " end")
    maps = smaps()
    return s, {a: mapping_of(x, maps) for a, x in zip(ARRAYS, addr(fp.driver.ft))}


@pytest.mark.parametrize("value", ["on", "off", "auto"])
def test_flow_table_mappings_carry_the_advice(tmp_path, value):
    s, maps = run_fast_path(tmp_path, value)
    want_huge = {"on": True, "off": False, "auto": hugepages.decide("auto")["huge_pages"]}[value]
    assert s["flow_table_pages"]["setting"] == value and s["flow_table_pages"]["huge_pages"] is want_huge
    for name, m in maps.items():
        flags = m["VmFlags"]
        assert (("hg" in flags), ("nh" in flags)) == (want_huge, not want_huge), (name, flags)
    if thp_mode() in ("always", "madvise"):
        # the records of 500 flows lie in the first 2 MiB of `flows`: one huge page given, or none
        assert (maps["flows"]["AnonHugePages"] > 0) is want_huge, maps["flows"]
    if not want_huge:
        assert all(m["AnonHugePages"] == 0 for m in maps.values()), maps


@pytest.mark.parametrize("flag, setting", [(["--huge-pages", "OFF"], "off"), ([], "auto")])
def test_cli_flag_reaches_the_flow_table_and_the_summary(tmp_path, flag, setting):
    """`luaprobe run --huge-pages off`: the summary (--stats-json) names the setting, the decision and its reason;
    without the flag the setting is auto (the default since the A/B of docs/benchmarks.md "The flow table's
    huge_pages setting") and its decision is the sysfs rule's on this machine."""
    stats = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", PLUGIN, "--pcap", PCAP, "--out",
                        str(tmp_path / "out"), *flag, "--stats-json", str(stats), "-q"],
                       cwd=helpers.REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert json.loads(stats.read_text())["flow_table_pages"] == hugepages.decide(setting)


def virtio(root, name: str, device: int, features: str, bound: bool = True) -> None:
    """A virtio device under root/sys/bus/virtio/devices/NAME as Linux lays it out: ``device`` ("0x0005"),
    ``features`` (one character per feature bit, bit 0 first, 64 of them), ``driver`` (a link when bound)."""
    d = root / "sys" / "bus" / "virtio" / "devices" / name
    d.mkdir(parents=True)
    (d / "device").write_text(f"0x{device:04x}\n")
    (d / "features").write_text(features.ljust(64, "0") + "\n")
    if bound:
        drv = root / "sys" / "bus" / "virtio" / "drivers" / f"drv{device}"
        drv.mkdir(parents=True, exist_ok=True)
        os.symlink(drv, d / "driver")


REPORTING = "011001"     # bits 1, 2 and 5 (VIRTIO_BALLOON_F_REPORTING) as this machine's balloon has them


@pytest.mark.parametrize("devices, huge", [
    ([], True),                                                           # /sys/bus/virtio missing
    ([("virtio0", 5, REPORTING, True)], False),                           # a reporting balloon: 4 KiB pages
    ([("virtio0", 1, "1" * 8, True), ("virtio1", 5, REPORTING, True)], False),   # not the first device
    ([("virtio0", 5, "011000", True)], True),                            # a balloon without reporting
    ([("virtio0", 5, REPORTING, False)], True),                           # not bound to its driver
    ([("virtio0", 1, REPORTING, True), ("virtio1", 2, REPORTING, True)], True),  # bit 5 of a net / block device
])
def test_auto_rule_on_a_sysfs_tree(tmp_path, devices, huge):
    if devices:
        (tmp_path / "sys" / "bus" / "virtio" / "devices").mkdir(parents=True)
    for name, device, features, bound in devices:
        virtio(tmp_path, name, device, features, bound)
    d = hugepages.decide("auto", root=str(tmp_path))
    assert d["setting"] == "auto" and d["huge_pages"] is huge
    assert "free page reporting" in d["reason"] and d["reason"].startswith("auto: the virtio balloon ") is not huge
    for v, h in (("on", True), ("off", False)):                  # explicit values do not look at the machine
        assert hugepages.decide(v, root=str(tmp_path))["huge_pages"] is h


def test_unreadable_features_count_as_no_reporting(tmp_path):
    virtio(tmp_path, "virtio0", 5, REPORTING)
    (tmp_path / "sys" / "bus" / "virtio" / "devices" / "virtio0" / "features").unlink()
    assert hugepages.decide("auto", root=str(tmp_path))["huge_pages"] is True
    virtio(tmp_path, "virtio1", 5, REPORTING)
    (tmp_path / "sys" / "bus" / "virtio" / "devices" / "virtio1" / "device").write_text("garbage\n")
    assert hugepages.balloon_reporting(str(tmp_path)) is None


def test_parse():
    assert [hugepages.parse(v) for v in ("auto", " On ", "OFF")] == ["auto", "on", "off"]
    for bad in ("", "yes", "true", "1", "huge"):
        with pytest.raises(ValueError, match="must be 'auto', 'on' or 'off'"):
            hugepages.parse(bad)
