"""Live capture (engine/capture/afpacket.lua): AF_PACKET + TPACKET_V3 on a veth pair, end to end through `luaprobe run`.

Each test builds a private network namespace and a veth pair: lp0-<pid> stays here (luaprobe captures on it),
lp1-<pid> moves into the namespace, from where a sender writes UDP datagrams to a static neighbour (no address
on the capturing side, so the host's routing is untouched).  The namespace and the veth are always removed.
IPv6 is off on both ends (inside the namespace too: a moved device takes the namespace's defaults), so the
only frames are the ones a test sends, and the kernel's rx_packets on the capture end counts them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from tests import helpers

G_UDP = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}"
PORT_GROUP = "{AAAAAAAA-0000-4000-8000-00000000000A}"   # key = UDP destination port, meter 0 packets
PEER_IP, OUR_IP = "10.231.77.2", "10.231.77.1"
IP = shutil.which("ip")

needs_root = pytest.mark.skipif(os.geteuid() != 0 or IP is None,
                                reason="live capture tests need root (netns, veth, AF_PACKET) and iproute2's `ip`")


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def _carrier_ready(ip, dev, ns=None) -> bool:
    """True once ``dev`` (in netns ``ns``) is UP with a real qdisc (``ip link show``: not "qdisc noop")."""
    out = sh(ip, *(("-n", ns) if ns else ()), "link", "show", dev).stdout
    return "state UP" in out and "qdisc noop" not in out


@pytest.fixture
def veth():
    """(capture interface, namespace): lp0-<pid> here, lp1-<pid> in netns lp-test-<pid>; removed at teardown."""
    pid = os.getpid()
    ns, here, there = f"lp-test-{pid}", f"lp0-{pid}", f"lp1-{pid}"
    sh(IP, "link", "del", here, check=False)               # leftovers of a killed earlier run
    sh(IP, "netns", "del", ns, check=False)
    try:
        sh(IP, "netns", "add", ns)
        sh(IP, "link", "add", here, "type", "veth", "peer", "name", there)
        for path in (f"/proc/sys/net/ipv6/conf/{here}/disable_ipv6",):
            try:
                with open(path, "w") as f:
                    f.write("1")
            except OSError:
                pass
        sh(IP, "link", "set", there, "netns", ns)
        sh(IP, "netns", "exec", ns, "sh", "-c", f"echo 1 > /proc/sys/net/ipv6/conf/{there}/disable_ipv6")
        sh(IP, "link", "set", here, "up")
        sh(IP, "-n", ns, "addr", "add", f"{PEER_IP}/24", "dev", there)
        sh(IP, "-n", ns, "link", "set", there, "up")
        sh(IP, "-n", ns, "link", "set", "lo", "up")
        with open(f"/sys/class/net/{here}/address") as f:
            mac = f.read().strip()
        sh(IP, "-n", ns, "neigh", "replace", OUR_IP, "lladdr", mac, "dev", there, "nud", "permanent")
        # "link set up" returns before the kernel's link watcher (rate-limited, up to 1 s) attaches the real
        # qdiscs; until then both ends have noop_qdisc, which drops every frame sent (no capture can see it)
        helpers.wait_for(lambda: _carrier_ready(IP, here) and _carrier_ready(IP, there, ns), timeout=10,
                         interval=0.01)
        yield here, ns
    finally:
        sh(IP, "link", "del", here, check=False)            # deletes the peer too
        sh(IP, "netns", "del", ns, check=False)


def rx_packets(ifname) -> int:
    """The kernel's count of frames received on ifname (sysfs), kept apart from luaprobe's counters."""
    with open(f"/sys/class/net/{ifname}/statistics/rx_packets") as f:
        return int(f.read())


def wait_delivered(ifname, before: int, count: int):
    """Until the kernel has received `count` frames on ifname since `before`: they are then in the capture
    socket's ring, and a stop drains that ring (engine/capture/afpacket.lua Live:run)."""
    helpers.wait_for(lambda: rx_packets(ifname) - before >= count, timeout=30, interval=0.01)


def send_udp(ns, counts: dict, size=64, src=PEER_IP, dst=OUR_IP):
    """Send counts[port] UDP datagrams to dst:port from inside the namespace, in paced bursts."""
    code = f"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(({src!r}, 40000))
plan = {counts!r}
left = dict(plan)
i = 0
while any(left.values()):
    for port in plan:
        if left[port]:
            s.sendto(b"x" * {size}, ({dst!r}, port))
            left[port] -= 1
            i += 1
            if i % 100 == 0:
                time.sleep(0.002)
"""
    sh(IP, "netns", "exec", ns, sys.executable, "-c", code)


def send_vlan_frames(ns, dev, to_dev, vid, port, count, size):
    """Write 802.1Q-tagged Ethernet/IPv4/UDP frames with an AF_PACKET socket on dev (in the namespace)."""
    dst = open(f"/sys/class/net/{to_dev}/address").read().strip()
    code = f"""
import socket, struct, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(({dev!r}, 0))
src = open('/sys/class/net/{dev}/address').read().strip()
mac = lambda m: bytes.fromhex(m.replace(':', ''))
payload = b'y' * {size}
udp = struct.pack('!HHHH', 40000, {port}, 8 + len(payload), 0) + payload
ip = bytearray(struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                           socket.inet_aton('10.231.78.2'), socket.inet_aton('10.231.78.1')))
c = sum(struct.unpack('!10H', bytes(ip)))
c = (c & 0xffff) + (c >> 16); c = (c & 0xffff) + (c >> 16)
ip[10:12] = struct.pack('!H', ~c & 0xffff)
frame = mac({dst!r}) + mac(src) + struct.pack('!HH', 0x8100, {vid}) + b'\\x08\\x00' + bytes(ip) + udp
for i in range({count}):
    s.send(frame)
    if i % 100 == 99:
        time.sleep(0.002)
"""
    sh(IP, "netns", "exec", ns, sys.executable, "-c", code)


def write_plugins(d, monitor_out=None, ticks=None):
    """udp_ports.lua (packets per UDP destination port) and metronome.lua in folder d; with `ticks`, the metronome
    appends each call's ts (packet or wall-clock seconds) to that file, one line per call."""
    d.mkdir()
    (d / "udp_ports.lua").write_text(f'''
TrisulPlugin = {{
  id = {{ name = "udp ports" }},
  simplecounter = {{
    protocol_guid = "{G_UDP}",
    onpacket = function(engine, layer)
      engine:update_counter("{PORT_GROUP}", tostring(layer:getbyte(2) * 256 + layer:getbyte(3)), 0, 1)
    end,
  }},
}}
''')
    record = (f'local f = io.open({str(ticks)!r}, "a"); f:write(string.format("%.3f\\n", ts)); f:close()'
              if ticks else "")
    (d / "metronome.lua").write_text(f'''
TrisulPlugin = {{
  id = {{ name = "metronome" }},
  engine_monitor = {{ onmetronome = function(engine, ts, tick, interval) {record} end }},
}}
''')


def bound(ifname, proc=None) -> bool:
    """True once a packet socket is bound to ifname; with `proc`, one held by luaprobe's capture process (a
    descendant of proc running luaprobe.engine.capture.process), so a socket of another process (an earlier
    run's, or a probe) cannot make a test send before its capture listens."""
    idx = int(open(f"/sys/class/net/{ifname}/ifindex").read())
    with open("/proc/net/packet") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    inodes = {r[8] for r in rows if len(r) > 8 and int(r[4]) == idx and r[3] == "0003"}
    if proc is None or not inodes:
        return bool(inodes)
    import psutil
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for k in kids:
        try:
            if "luaprobe.engine.capture.process" not in k.cmdline():
                continue
            for fd in os.listdir(f"/proc/{k.pid}/fd"):
                if os.readlink(f"/proc/{k.pid}/fd/{fd}") in {f"socket:[{i}]" for i in inodes}:
                    return True
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
            continue
    return False


def run_live(tmp_path, ifname, *extra):
    out, stats = tmp_path / "out", tmp_path / "stats.json"
    proc = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(tmp_path / "plugins"),
                             "--interface", ifname, "--out", str(out), "--stats-json", str(stats), *extra],
                            cwd=helpers.REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, out, stats


def stop(proc, sig=signal.SIGINT):
    proc.send_signal(sig)
    try:
        so, se = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        so, se = proc.communicate()
        raise AssertionError(f"luaprobe did not stop after {sig!r}:\n{so}\n{se}")
    return proc.returncode, so, se


def wait_bound(proc, ifname):
    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"luaprobe exited early ({proc.returncode}): {proc.communicate()}")
        return bound(ifname, proc)
    helpers.wait_for(ready, timeout=60, interval=0.05)


def port_counts(out) -> dict:
    with sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True) as c:
        return {k: v for k, v in c.execute("SELECT key, sum(value) FROM counters WHERE group_guid = ? AND meter = 0 "
                                           "GROUP BY key", (PORT_GROUP.upper(),))}


def hook_calls(summary, name, hook) -> int:
    return sum(p["hook_calls"].get(hook, 0) for p in summary["plugins"] if os.path.basename(p["plugin"]) == name)


@pytest.mark.root
@needs_root
def test_live_counts_every_udp_packet_and_stops_on_sigint(tmp_path, veth):
    ifname, ns = veth
    ticks = tmp_path / "ticks"
    write_plugins(tmp_path / "plugins", ticks=ticks)
    proc, out, stats = run_live(tmp_path, ifname)
    with helpers.killed_when_left(proc):
        wait_bound(proc, ifname)
        rx0 = rx_packets(ifname)
        t0 = time.monotonic()
        send_udp(ns, {9999: 2000, 9998: 300})
        send_s = time.monotonic() - t0
        sent_at = time.time()
        # idle: wall-clock ticks must keep the metronome going.  A tick of a second that began after the last
        # packet (+0.5 s of slack for its kernel timestamp) comes from the wall clock, not from packet time (was
        # a 2.5 s sleep: a fast path starved that long on a loaded machine had not ticked yet)
        helpers.wait_for(lambda: ticks.exists() and any(float(x) > sent_at + 0.5 for x in ticks.read_text().split()),
                         timeout=60, interval=0.05)
        rc, so, se = stop(proc)
    assert rc == 0, (so, se)
    s = json.loads(stats.read_text())
    assert s["interface"] == ifname and s["input_errors"] == []
    assert port_counts(out) .get("9999") == 2000 and port_counts(out).get("9998") == 300, (port_counts(out), se)
    assert s["packets"] == s["captured_live"] == 2300 == rx_packets(ifname) - rx0
    assert s["drops"]["capture"] == 0 and s["drops"]["kernel"] == 0, s["drops"]
    assert hook_calls(s, "metronome.lua", "engine_monitor.onmetronome") >= 1, s["plugins"]
    assert "drops: packet ring full 0  kernel 0" in so
    print(f"sent 2300 datagrams in {send_s:.3f} s")


@pytest.mark.root
@needs_root
def test_bpf_filter_lets_only_matching_packets_in(tmp_path, veth):
    ifname, ns = veth
    write_plugins(tmp_path / "plugins")
    proc, out, stats = run_live(tmp_path, ifname, "--bpf", "udp port 9999")
    with helpers.killed_when_left(proc):
        wait_bound(proc, ifname)
        rx0 = rx_packets(ifname)
        send_udp(ns, {9999: 500, 9998: 700, 53: 100})
        wait_delivered(ifname, rx0, 1300)
        rc, so, se = stop(proc, signal.SIGTERM)
    assert rc == 0, (so, se)
    s = json.loads(stats.read_text())
    assert port_counts(out) == {"9999": 500}
    assert s["packets"] == s["captured_live"] == 500 and s["bpf"] == "udp port 9999"
    assert s["drops"]["capture"] == 0 and s["drops"]["kernel"] == 0


@pytest.mark.root
@needs_root
def test_full_packet_ring_drops_and_counts(tmp_path, veth):
    """The packet ring is never waited on: a slow plug-in makes the capture drop, and every packet is
    accounted for: seen = processed + ring-full drops.  The plug-in's first packet waits until the kernel has
    received all 3000 (the `go` file): before, the drops depended on the sender outpacing a 1 ms/packet hook,
    which a loaded machine that slows the sender (2 ms pauses per 100) more than the fast path need not do."""
    ifname, ns = veth
    d = tmp_path / "plugins"
    go = tmp_path / "go"
    write_plugins(d)
    (d / "slow.lua").write_text(f'''
local waited = false
TrisulPlugin = {{
  id = {{ name = "slow" }},
  simplecounter = {{
    protocol_guid = "{G_UDP}",
    onpacket = function(engine, layer)
      while not waited do
        local f = io.open({str(go)!r})
        if f then f:close(); waited = true else local t = os.clock() + 0.002; while os.clock() < t do end end
      end
      local t = os.clock() + 0.001
      while os.clock() < t do end
    end,
  }},
}}
''')
    # a 64 KiB packet ring holds ~500 small frames; the slow plug-in takes 1 ms per packet
    code = (f"import json, sys; from luaprobe.engine.fastpath.run import FastPath, RunConfig; "
            f"s = FastPath(RunConfig(plugins=[{str(d)!r}], files=[], out_dir={str(tmp_path / 'out')!r}, "
            f"interface={ifname!r}, packet_ring_size=1 << 16, hook_budget=0)).run(); "
            f"json.dump(s, open({str(tmp_path / 's.json')!r}, 'w'), default=str)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=helpers.REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with helpers.killed_when_left(proc):
        wait_bound(proc, ifname)
        rx0 = rx_packets(ifname)
        send_udp(ns, {9999: 3000})
        wait_delivered(ifname, rx0, 3000)
        go.touch()                                   # (hook_budget=0: the wait is not interrupted)
        rc, so, se = stop(proc)
    assert rc == 0, (so, se)
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["drops"]["capture"] > 0, s["drops"]
    assert s["captured_live"] == s["packets"] + s["drops"]["capture"] == 3000 - s["drops"]["kernel"]
    assert port_counts(tmp_path / "out").get("9999", 0) == s["packets"]


G_VLAN = "{4C500002-0000-4000-8000-4C5056C4E002}"
VLAN_GROUP = "{AAAAAAAA-0000-4000-8000-00000000000B}"


@pytest.mark.root
@needs_root
def test_vlan_tag_stripped_by_the_kernel_is_put_back(tmp_path, veth):
    """veth hands tagged frames to AF_PACKET with the tag in tp_vlan_tci (offload); plug-ins still see the
    802.1Q layer and its VLAN id, and the wire length includes the tag."""
    ifname, ns = veth
    there = ifname.replace("lp0-", "lp1-")
    d = tmp_path / "plugins"
    write_plugins(d)
    (d / "vlan.lua").write_text(f'''
TrisulPlugin = {{
  id = {{ name = "vlan ids" }},
  simplecounter = {{
    protocol_guid = "{G_VLAN}",
    onpacket = function(engine, layer)
      local vid = (layer:getbyte(0) % 16) * 256 + layer:getbyte(1)
      engine:update_counter("{VLAN_GROUP}", tostring(vid), 0, 1)
      engine:update_counter("{VLAN_GROUP}", tostring(vid), 1, layer:total_bytes())
    end,
  }},
}}
''')
    proc, out, stats = run_live(tmp_path, ifname, "--bpf", "vlan and udp port 9997")
    with helpers.killed_when_left(proc):
        wait_bound(proc, ifname)
        rx0 = rx_packets(ifname)
        send_vlan_frames(ns, there, ifname, vid=7, port=9997, count=200, size=100)
        wait_delivered(ifname, rx0, 200)
        rc, so, se = stop(proc)
    assert rc == 0, (so, se)
    assert port_counts(out) == {"9997": 200}
    with sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True) as c:
        rows = dict(c.execute("SELECT meter, sum(value) FROM counters WHERE group_guid = ? AND key = '7' "
                              "GROUP BY meter", (VLAN_GROUP.upper(),)))
    assert rows == {0: 200, 1: 200 * (14 + 4 + 20 + 8 + 100)}, rows


def test_run_needs_exactly_one_source(tmp_path):
    # cwd tmp_path: the default --out (./out) is the test's own, not the repository's (another run of these tests
    # at the same moment held it: "another luaprobe run or daemon is writing into it now")
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(tmp_path), "--pcap", "x.pcap",
                        "--interface", "lo"], cwd=str(tmp_path), capture_output=True, text=True)
    assert r.returncode == 2 and "not allowed with" in r.stderr
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(tmp_path)], cwd=str(tmp_path),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--pcap --interface" in r.stderr
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(tmp_path), "--interface", "nosuch0if"],
                       cwd=str(tmp_path), capture_output=True, text=True)
    assert r.returncode == 2 and "nosuch0if: no such network interface" in r.stderr


def test_bad_bpf_expression_is_a_usage_error_naming_it(tmp_path):
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(tmp_path), "--interface", "lo",
                        "--bpf", "udp prot 9999"], cwd=str(tmp_path), capture_output=True, text=True)
    assert r.returncode == 2
    assert "cannot compile BPF filter 'udp prot 9999'" in r.stderr and "syntax error" in r.stderr


def test_compile_bpf_and_parse_in_lua():
    from luaprobe.engine.capture.process import compile_bpf
    from luaprobe.shm.luajit import new_runtime
    text = compile_bpf("udp port 9999")
    lines = text.splitlines()
    assert lines[0] == "40 0 0 12"          # ldh [12]: libpcap starts an Ethernet filter at the EtherType
    assert len(lines) > 5 and all(len(x.split()) == 4 for x in lines)
    lua = new_runtime()
    n = lua.eval("function(t) local p, n = require('luaprobe.engine.capture.afpacket').parse_filter(t); return n end")(text.encode())
    assert n == len(lines)


def packet_socket_inodes(pid) -> set:
    """Inodes of the AF_PACKET sockets bound to a device (proto ETH_P_ALL) held by pid or its descendants."""
    kids, todo = {pid}, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                new = [int(x) for x in f.read().split()]
        except OSError:
            continue
        kids.update(new)
        todo.extend(new)
    held = set()
    for p in kids:
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                link = os.readlink(f"/proc/{p}/fd/{fd}")
                if link.startswith("socket:["):
                    held.add(link[8:-1])
        except OSError:
            pass
    with open("/proc/net/packet") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return {r[8] for r in rows if len(r) > 8 and r[3] == "0003" and int(r[4]) > 0 and r[8] in held}


@pytest.mark.root
@needs_root
def test_loopback_counts_each_packet_once(tmp_path):
    """On lo an AF_PACKET socket sees each frame twice (PACKET_OUTGOING and PACKET_HOST); like libpcap, the
    outgoing copy is skipped.  Truth: the datagrams a UDP socket received, and dumpcap (libpcap) on lo."""
    import random
    import socket
    port, n = random.randint(40000, 60000), 500
    dumpcap = shutil.which("dumpcap")
    write_plugins(tmp_path / "plugins")
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.bind(("127.0.0.1", port))
    rx.settimeout(10)
    proc, out, stats = run_live(tmp_path, "lo", "--bpf", f"udp port {port}")
    pcap = tmp_path / "truth.pcap"
    dc = (subprocess.Popen([dumpcap, "-q", "-i", "lo", "-f", f"udp port {port}", "-w", str(pcap)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
          if dumpcap else None)
    try:
        def ready():
            # luaprobe: its capture process's socket (bound after its ring and filter are set up); not any packet
            # socket of the run: `run` compiles --bpf on a live libpcap handle, a socket bound to lo for a moment,
            # which made this test send while the capture was not yet there (0 packets counted, CI 11a).
            # dumpcap: its output file's header, written once its capture is open and filtered
            if proc.poll() is not None:
                raise AssertionError(f"luaprobe exited early ({proc.returncode}): {proc.communicate()}")
            return bound("lo", proc) and (dc is None or (pcap.exists() and pcap.stat().st_size > 0))
        helpers.wait_for(ready, timeout=60, interval=0.05)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        got = 0
        for i in range(n):
            tx.sendto(b"z" * 64, ("127.0.0.1", port))
            if i % 50 == 49:
                while got <= i:               # lo cannot lose what the receiver takes in time
                    rx.recv(2048)
                    got += 1
        while got < n:
            rx.recv(2048)
            got += 1
        tx.close()
        time.sleep(0.2)                       # both captures' blocks retire after 10 ms / dumpcap's buffer
        rc, so, se = stop(proc)
    finally:
        rx.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if dc is not None:
            dc.send_signal(signal.SIGINT)
            dc.communicate(timeout=30)
    assert rc == 0, (so, se)
    s = json.loads(stats.read_text())
    assert s["packets"] == s["captured_live"] == n, s
    assert s["loopback_outgoing"] == n and s["drops"]["capture"] == 0 and s["drops"]["kernel"] == 0, s
    assert s["kernel_packets"] == s["packets"] + s["loopback_outgoing"]
    assert port_counts(out) == {str(port): n}
    with sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True) as c:
        rows = c.execute("SELECT packets_az + packets_za FROM flows WHERE porta = ? OR portz = ?",
                         (port, port)).fetchall()
    assert rows == [(n,)], rows
    if dc is not None:
        tshark = shutil.which("tshark")
        if tshark:
            r = subprocess.run([tshark, "-r", str(pcap), "-Y", f"udp.dstport == {port}", "-T", "fields",
                                "-e", "frame.number"], capture_output=True, text=True, check=True)
            assert len(r.stdout.split()) == n


@pytest.mark.root
@needs_root
def test_a_bpf_run_compiles_its_filter_once_and_the_capture_opens_no_libpcap_handle(tmp_path):
    """`luaprobe run --interface lo --bpf EXPR` compiles EXPR on a live libpcap handle (Linux VLAN semantics) to
    check it; the capture process then compiled it again the same way, opening a second libpcap handle: a packet
    socket bound to the interface for a moment, which a test (or an operator) takes for the capture being
    there.  Now the capture process gets the program text (--bpf-program), equal to what libpcap compiles on a
    live handle for lo, and holds one packet socket: its own."""
    from luaprobe.engine.capture.bpf import compile_bpf
    write_plugins(tmp_path / "plugins")
    proc, _out, _stats = run_live(tmp_path, "lo", "--bpf", "udp port 9")
    try:
        wait_bound(proc, "lo")

        def capture():
            import psutil
            return next(k for k in psutil.Process(proc.pid).children(recursive=True)
                        if "luaprobe.engine.capture.process" in helpers.cmdline(k))
        cmd = capture().cmdline()
        rc, so, se = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert rc == 0, (so, se)
    assert "--bpf-program" in cmd, cmd
    assert cmd[cmd.index("--bpf-program") + 1] == compile_bpf("udp port 9", 1, "lo")


@pytest.mark.root
@needs_root
def test_sharded_live_run_ends_when_a_capture_process_dies(tmp_path, veth):
    """--shards 2 live: kill -9 of one of the two capture processes ends the run by itself, as one fast path's
    capture death does (the other capture process is stopped and walks what it captured): exit 1, one line naming
    the dead process, `capture_death` with its shard's packets.  Before: the run went on with one capture process
    until a signal stopped it (and then exited 3, `capture process ended unexpectedly`)."""
    import psutil
    ifname, ns = veth
    write_plugins(tmp_path / "plugins")
    proc, out, stats = run_live(tmp_path, ifname, "--shards", "2", "--json", "-q")
    with helpers.killed_when_left(proc):
        wait_bound(proc, ifname)
        send_udp(ns, {port: 50 for port in range(9000, 9016)})
        caps = [k for k in psutil.Process(proc.pid).children(recursive=True)
                if "luaprobe.engine.capture.process" in helpers.cmdline(k)]
        assert len(caps) == 2
        caps[0].kill()
        try:
            so, se = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the run went on after its capture process died") from None
    assert proc.returncode == 1, se
    s = json.loads(so)
    dead = s["capture_death"]
    assert dead["pid"] == caps[0].pid and dead["how"] == "killed by SIGKILL"
    assert dead["packets"] in [sh["packets"] for sh in s["shards"]], s["shards"]
    lines = [ln for ln in se.splitlines() if ln.startswith("luaprobe run:")]
    assert len(lines) == 1 and f"(pid {caps[0].pid}) was killed by SIGKILL" in lines[0] \
        and "its shard's packet ring" in lines[0], se
