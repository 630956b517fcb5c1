"""A veth pair with one end in a private network namespace, always removed (context manager).

    with VethPair("lt") as v:       # v.here: the root-namespace end (luaprobe captures on it)
        ...                         # v.there: the end inside namespace v.ns (the generator sends on it)

Neither end gets an address and IPv6 is disabled on both, so the only frames are the ones we send and the
host's routing is untouched; the generated frames are addressed to made-up MACs and dropped by the stack
after AF_PACKET sockets have seen them.  Traffic never leaves this machine.
"""
from __future__ import annotations

import os
import shutil
import subprocess

IP = shutil.which("ip") or "/usr/sbin/ip"


def available() -> str | None:
    """None when veth pairs can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespace, veth, AF_PACKET)"
    if not os.access(IP, os.X_OK):
        return "needs iproute2's `ip`"
    return None


def _sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def _no_ipv6(path):
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError:
        pass


class VethPair:
    def __init__(self, tag: str = "lt"):
        pid = os.getpid() % 100000
        self.ns, self.here, self.there = f"lp-{tag}-{pid}", f"{tag}0-{pid}", f"{tag}1-{pid}"

    def __enter__(self):
        self.close()                                          # leftovers of a killed earlier run
        try:
            _sh(IP, "netns", "add", self.ns)
            _sh(IP, "link", "add", self.here, "type", "veth", "peer", "name", self.there)
            _no_ipv6(f"/proc/sys/net/ipv6/conf/{self.here}/disable_ipv6")
            _no_ipv6(f"/proc/sys/net/ipv6/conf/{self.there}/disable_ipv6")
            _sh(IP, "link", "set", self.there, "netns", self.ns)
            # a device moved into a namespace takes that namespace's defaults: IPv6 is on again there, and
            # it would send router and neighbour solicitations that the capture end sees
            _sh(IP, "netns", "exec", self.ns, "sh", "-c",
                f"echo 1 > /proc/sys/net/ipv6/conf/{self.there}/disable_ipv6")
            _sh(IP, "link", "set", self.here, "up")
            _sh(IP, "-n", self.ns, "link", "set", self.there, "up")
        except BaseException:
            self.close()
            raise
        return self

    def netns_exec(self, *cmd) -> list:
        """The argv that runs cmd inside the namespace."""
        return [IP, "netns", "exec", self.ns, *cmd]

    def rx_packets(self) -> int:
        """The kernel's count of frames received on the capture end (sysfs `statistics/rx_packets`): a truth
        kept apart from both the sender's and the probe's counters."""
        with open(f"/sys/class/net/{self.here}/statistics/rx_packets") as f:
            return int(f.read())

    def close(self):
        _sh(IP, "link", "del", self.here, check=False)      # deletes the peer too
        _sh(IP, "netns", "del", self.ns, check=False)

    def __exit__(self, *exc):
        self.close()
        return False
