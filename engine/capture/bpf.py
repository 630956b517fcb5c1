"""Compile pcap-filter expressions to classic BPF with libpcap's own compiler (``pcap_compile``).

libpcap is reached through ctypes (``libpcap.so.0.8``, Debian package ``libpcap0.8``): no tcpdump
subprocess and no header files are needed.  The result is the same instruction list ``tcpdump -ddd``
prints (``code jt jf k`` per line, decimal), which engine/capture/afpacket.lua attaches with
``SO_ATTACH_FILTER``.  Source: pcap_compile(3PCAP), pcap_open_dead(3PCAP), pcap_create(3PCAP).
"""
from __future__ import annotations

import ctypes
import ctypes.util

PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF      # pcap/pcap.h
PCAP_ERRBUF_SIZE = 256
SNAPLEN = 262144


class BpfError(ValueError):
    """A --bpf expression that cannot be compiled (or libpcap is missing)."""


class _Insn(ctypes.Structure):          # struct bpf_insn, pcap/bpf.h
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _Program(ctypes.Structure):       # struct bpf_program, pcap/bpf.h
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_Insn))]


_lib = None


def _libpcap():
    """The loaded libpcap, its prototypes declared; BpfError when it is not installed."""
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("pcap") or "libpcap.so.0.8"
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            raise BpfError("cannot compile BPF filters: libpcap is not installed "
                           "(apt-get install libpcap0.8)") from None
        vp, cp = ctypes.c_void_p, ctypes.c_char_p
        for fn, res, args in (("pcap_open_dead", vp, [ctypes.c_int, ctypes.c_int]),
                              ("pcap_create", vp, [cp, cp]),
                              ("pcap_activate", ctypes.c_int, [vp]),
                              ("pcap_close", None, [vp]),
                              ("pcap_geterr", cp, [vp]),
                              ("pcap_freecode", None, [ctypes.POINTER(_Program)]),
                              ("pcap_compile", ctypes.c_int,
                               [vp, ctypes.POINTER(_Program), cp, ctypes.c_int, ctypes.c_uint32])):
            f = getattr(lib, fn)
            f.restype, f.argtypes = res, args
        _lib = lib
    return _lib


def _compile(lib, handle, expr: str) -> tuple[str | None, str | None]:
    """(program text, None) or (None, libpcap's error) for ``expr`` on an open pcap handle."""
    prog = _Program()
    if lib.pcap_compile(handle, ctypes.byref(prog), expr.encode(), 1, PCAP_NETMASK_UNKNOWN) != 0:
        return None, (lib.pcap_geterr(handle) or b"pcap_compile failed").decode(errors="replace")
    try:
        return "\n".join(f"{i.code} {i.jt} {i.jf} {i.k}"
                         for i in (prog.bf_insns[n] for n in range(prog.bf_len))), None
    finally:
        lib.pcap_freecode(ctypes.byref(prog))


def _compile_live(lib, expr: str, interface: str) -> str | None:
    """Compile for an activated live handle on ``interface`` (Linux VLAN semantics), or None when the
    interface cannot be activated (no privileges, no such device) or the expression fails there."""
    errbuf = ctypes.create_string_buffer(PCAP_ERRBUF_SIZE)
    h = lib.pcap_create(interface.encode(), errbuf)
    if not h:
        return None
    try:
        if lib.pcap_activate(h) < 0:           # warnings are > 0 and leave the handle usable
            return None
        return _compile(lib, h, expr)[0]
    finally:
        lib.pcap_close(h)


def compile_bpf(expr: str, linktype: int = 1, interface: str | None = None) -> str:
    """Compile a pcap-filter expression to classic BPF: ``"code jt jf k"`` lines, one instruction each.

    With ``interface``, compiles on an activated live handle for it (needs root or CAP_NET_RAW): libpcap
    then tests VLAN tags the Linux way (the kernel strips them before the filter runs, and ``vlan``
    looks at the skb's tag).  Otherwise, or when that fails, it compiles for a dead handle of
    ``linktype`` (no privileges; ``vlan`` then only matches tags still in the frame).

    Raises BpfError naming the expression and libpcap's message when it cannot be compiled.
    """
    lib = _libpcap()
    if interface:
        prog = _compile_live(lib, expr, interface)
        if prog is not None:
            return prog
    h = lib.pcap_open_dead(linktype, SNAPLEN)
    if not h:
        raise BpfError(f"cannot compile BPF filter {expr!r}: pcap_open_dead failed")
    try:
        prog, why = _compile(lib, h, expr)
    finally:
        lib.pcap_close(h)
    if prog is None:
        raise BpfError(f"cannot compile BPF filter {expr!r}: {why}")
    return prog
