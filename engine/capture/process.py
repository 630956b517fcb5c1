"""The capture process: fills the packet ring from capture files (``python -m luaprobe.engine.capture.process``).

Started by the fast path (:mod:`luaprobe.engine.fastpath.run`) with the packet ring's
segment name and the files to read, in order.  Each file ends with an EOF
record, or an ERROR record naming the byte offset of the corruption (the
packets before it have been pushed); an END record closes the input.  The
per-packet loop is engine/capture/capture.lua.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import stat
import struct
import sys

from luaprobe.shm import segment
from luaprobe.shm.luajit import new_runtime

from luaprobe.engine.capture.bpf import BpfError, compile_bpf
from luaprobe.engine.capture.pcapfile import InputError, open_capture
from luaprobe.engine.plugins.errors import split_lua_error

from luaprobe.shm.exits import EXIT_INPUT, STOP_SIGNALS, die_with_parent


#: byte offset in a shard's doorbell segment of a uint64: packets the capture process has committed to that shard's
#: ring (files / --generate; stored at every publish).  The shard's own counter is at 64 (shards.PROGRESS_OFFSET).
PUSHED_OFFSET = 72


def link_type(interface: str) -> int:
    """pcap linktype of the frames an AF_PACKET SOCK_RAW socket on ``interface`` delivers."""
    try:
        with open(f"/sys/class/net/{interface}/type") as f:
            hatype = int(f.read())
    except (OSError, ValueError):
        return 1
    return {1: 1, 772: 1, 65534: 101}.get(hatype, 1)      # Ethernet, loopback, raw IP (tun)


def _live(args, lua, ring, control, pkt, stop) -> int:
    """Capture from --interface (engine/capture/afpacket.lua) until SIGTERM, then END."""
    from luaprobe.shm.luajit import table
    try:
        flt = args.bpf_program or (compile_bpf(args.bpf, link_type(args.interface), args.interface)
                                   if args.bpf else None)
        h = lua.eval("function(o) return require('luaprobe.engine.capture.afpacket').open(o) end")(
            table(lua, {"interface": args.interface, "filter": flt, "fanout": args.fanout, "fd": args.socket_fd}))
    except Exception as e:                                  # BpfError, or a LuaError from open()
        msg = e.args[0] if isinstance(e, BpfError) else split_lua_error(e)[1]
        control(ring, pkt.ERROR, f"\t{msg}\tinterface {args.interface}".encode())
        control(ring, pkt.END, b"")
        return EXIT_INPUT
    try:
        lua.eval("function(h, r, s) return h:run(r, s, 1.0) end")(h, ring, lambda: stop[0])
    finally:
        lua.eval("function(h) h:close() end")(h)
    control(ring, pkt.END, b"")
    return 0


def _generate(args, lua, ring, control, pkt, stop) -> int:
    """--generate SPEC: the generator's packets into the ring with backpressure (nothing lost), then EOF
    ("generate:SPEC") and END; SIGTERM stops early (END only)."""
    from luaprobe.engine.gen.traffic import UsageError
    from luaprobe.engine.gen.stream import feed_ring
    try:
        feed_ring(args.generate, lua, ring, lambda: stop[0])
    except UsageError as e:
        control(ring, pkt.ERROR, f"\t{e}\tgenerate:{args.generate}".encode())
        control(ring, pkt.END, b"")
        return EXIT_INPUT
    if not stop[0]:
        control(ring, pkt.EOF, f"generate:{args.generate}".encode())
    control(ring, pkt.END, b"")
    return 0


STREAM_BUFFER = 8 << 20      #: bytes of a stream's read buffer (a record or pcapng block must fit)


def is_stream(path) -> bool:
    """``-`` (standard input) or a FIFO: read sequentially instead of mapped (docs/operations.md)."""
    if path == "-":
        return True
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def _read_stream(path, lua, ring, stop) -> bool:
    """Walk the pcap/pcapng stream on stdin (``-``) or the FIFO ``path`` into the ring as it arrives
    (capture.lua stream); True when stop ended it early.  Raises InputError naming the stream offset."""
    import numpy as np
    import select
    buf = np.empty(STREAM_BUFFER, np.uint8)
    view = memoryview(buf)
    s = lua.eval("function(a, n) return require('luaprobe.engine.capture.capture').stream(a, n) end")(
        int(buf.ctypes.data), STREAM_BUFFER)
    space = lua.eval("function(s) return s:space() end")
    feed = lua.eval("function(s, r, n, eof, stop) return s:feed(r, n, eof, stop) end")
    try:
        # a FIFO is opened without waiting for its writer (open(2) would block until one comes, and a stop signal
        # could not end the wait: the fast path killed us after 15 s and reported an input error); the select
        # below waits for it instead, noticing a stop every 0.2 s (Linux reports no hang-up before a first writer)
        fd = 0 if path == "-" else os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        if path != "-":
            os.set_blocking(fd, True)
    except OSError as e:
        raise InputError(path, 0, f"cannot open: {e.strerror}") from None
    try:
        while True:
            if stop[0]:
                return True
            if not select.select([fd], [], [], 0.2)[0]:      # SIGTERM is noticed while the writer is quiet
                continue
            off, room = space(s)
            try:
                n = os.readv(fd, [view[off:off + room]])
            except OSError as e:
                raise InputError(path, int(s.consumed) + off, f"read error: {e.strerror}") from None
            try:
                err, eoff, stopped, more = feed(s, ring, n, n == 0, lambda: stop[0])
            except Exception as e:                          # a bad capture header raises in Lua
                eoff, msg = split_lua_error(e)
                raise InputError(path, eoff, msg) from None
            if err is not None:
                raise InputError(path, int(eoff), err.decode("utf-8", "replace"))
            if stopped:
                return True
            if not more:
                return False
    finally:
        if path != "-":
            os.close(fd)
        del view


def main(argv=None) -> int:
    """Read every file into the ring; exit 0, or 3 if some file had an input error."""
    ap = argparse.ArgumentParser(prog="luaprobe-capture")
    ap.add_argument("--ring", required=True, help="packet ring segment; files/--generate: several, comma-separated "
                                                    "(one per shard: packets are hashed into them, engine/fastpath/shards.py)")
    ap.add_argument("--ppid", type=int, required=True)
    ap.add_argument("--bell", default="", help="doorbell segment(s) the consumer(s) sleep on (one per ring)")
    ap.add_argument("--fanout", type=int, help="live: join this AF_PACKET fanout group (PACKET_FANOUT_HASH)")
    ap.add_argument("--interface", help="capture live from this interface until SIGTERM")
    ap.add_argument("--bpf", help="tcpdump filter expression (with --interface)")
    ap.add_argument("--bpf-program", help="live: the --bpf expression already compiled (\"code jt jf k\" lines; "
                                          "compiled before a privilege drop, engine/daemon/privileges.py)")
    ap.add_argument("--socket-fd", type=int, help="live: an inherited, unbound AF_PACKET socket to use instead of "
                                                  "opening one (opened as root before a privilege drop)")
    ap.add_argument("--loop", action="store_true", help="repeat the files until SIGTERM (soak runs, supervisor)")
    ap.add_argument("--speed", type=float, default=0.0, help="files and streams: replay at this many packet-time "
                    "seconds per second (0: as fast as the packet ring takes them; engine/capture/capture.lua pace)")
    ap.add_argument("--skip", type=int, default=0, help="files: read on after the first N packets of the input (a "
                    "daemon's restarted fast path: those its predecessors walked; engine/daemon/supervisor.py)")
    ap.add_argument("--generate", metavar="SPEC", help="run the generator into the ring (engine/gen/stream.py)")
    ap.add_argument("files", nargs="*")
    args = ap.parse_args(argv)
    if (bool(args.interface) + bool(args.files) + bool(args.generate)) != 1 or (args.bpf and not args.interface):
        ap.error("give capture files, or --interface IF [--bpf EXPR], or --generate SPEC")
    if not (math.isfinite(args.speed) and args.speed >= 0) or (args.speed and not args.files):
        ap.error("--speed: a finite number >= 0, with capture files only")
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))   # files too: stop reading, push END
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # ^C / a hangup to the run's group: the fast path stops
    signal.signal(signal.SIGHUP, signal.SIG_IGN)        # us (SIGTERM); ignoring drops one pending since our birth
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)   # blocked by FastPath.run / Shards since before our
    die_with_parent(args.ppid)                                 # birth: a ^C during our start-up cannot kill us
    names, bell_names = args.ring.split(","), args.bell.split(",") if args.bell else []
    if (bell_names and len(bell_names) != len(names)) or (len(names) > 1 and args.interface):
        ap.error("--bell needs one doorbell per ring; --interface takes one ring (one process per shard)")
    segs = [segment.attach(n, populate=True) for n in names]     # packet rings: no page fault in the copy loop
    bells = [segment.attach(n) for n in bell_names]
    lua = new_runtime()
    cap = lua.eval("require('luaprobe.engine.capture.capture')")
    attach = lua.eval("function(a) return require('luaprobe.shm.ring').attach(a) end")
    rings = [attach(seg.address) for seg in segs]
    for r, bell in zip(rings, bells):
        lua.eval("function(r, a) r.data_bell = require('ffi').cast('uint32_t *', a) end")(r, bell.address)
    ring = rings[0] if len(rings) == 1 else lua.eval(
        "function(t, bells, off) local ffi = require('ffi'); local p = {}; "
        "for i, a in ipairs(bells) do p[i] = ffi.cast('uint64_t *', a + off) end; "
        "return require('luaprobe.engine.capture.capture').sharder(t, #p > 0 and p or nil) end")(
            lua.table_from(rings), lua.table_from([b.address for b in bells]), PUSHED_OFFSET)
    pkt = lua.eval("require('luaprobe.engine.plugins.packet')")
    control = lua.eval("function(r, k, t) require('luaprobe.engine.capture.capture').control(r, k, t) end")
    run_file = lua.eval("function(r, a, s, stop, fd, skip) return require('luaprobe.engine.capture.capture').file(r, a, s, "
                        "stop, fd, true, skip) end")    # true: a file that grows while it is read is read on (grow)
    if args.interface:
        return _live(args, lua, ring, control, pkt, stop)
    if args.generate:
        return _generate(args, lua, ring, control, pkt, stop)
    cap.speed = args.speed                                 # 0: not paced (capture.lua push)
    failed = False
    skip = 0 if args.loop else max(0, args.skip)

    eof_sent = set()

    def files():                                            # --loop: again and again until SIGTERM
        again = False
        while True:
            for path in args.files:
                if stop[0]:
                    return
                if again:
                    cap.next_pass()                         # each file of a later pass goes on from the newest packet
                yield path
            if not args.loop or failed:
                return
            again = True
    def warn_clipped(path) -> None:
        n = int(cap.clipped)
        if n:
            cap.clipped = 0
            limit = int(lua.eval("function(r) return (r.rings and r.rings[1] or r).max_record end")(ring)) - int(pkt.REC_SIZE)
            from luaprobe.shm import logs
            logs.setup()
            logs.log.warning("%s: %d packet record(s) longer than the packet ring's record limit were cut to %d "
                             "captured bytes (wire length kept; raise --packet-ring-mb / [fastpath] packet_ring_mb)",
                             logs.path_text(os.fsencode(path)), n, limit)

    for path in files():
        try:
            if is_stream(path):
                stopped = _read_stream(path, lua, ring, stop)
                warn_clipped(path)
                if stopped:
                    break
                eof_sent.add(path)
                control(ring, pkt.EOF, os.fsencode(path))
                continue
            with open_capture(path) as c:
                try:
                    n, nbytes, err, off, stopped, skipped = run_file(ring, c.address, c.size, lambda: stop[0], c.fd,
                                                                     skip)
                    skip -= int(skipped)
                except Exception as e:                      # a bad file header raises in Lua
                    off, msg = split_lua_error(e)
                    raise InputError(path, off, msg) from None
            warn_clipped(path)
            if err is not None:
                raise InputError(path, int(off), err.decode("utf-8", "replace"))
            if stopped:                                     # not read to its end: no EOF (files_done)
                break
            if not args.loop or path not in eof_sent:      # looping: one EOF per file (files_done stays small)
                eof_sent.add(path)
                control(ring, pkt.EOF, os.fsencode(path))   # the name as given, any bytes
        except InputError as e:
            failed = True
            control(ring, pkt.ERROR, f"{e.offset}\t{e.message}\t".encode() + os.fsencode(e.path))
    control(ring, pkt.END, b"")
    del cap
    return EXIT_INPUT if failed else 0


if __name__ == "__main__":
    sys.exit(main())
