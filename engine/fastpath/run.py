"""The fast path: capture process -> packet ring -> decode -> plug-in hooks -> outputs.

Python orchestrates; every per-packet loop is LuaJIT: the capture process
copies records into the packet ring (engine/capture/capture.lua), the driver VM
pops, decodes and tracks flows into a batch (engine/fastpath/driver.lua), and
each simplecounter VM walks the batch by address (engine/plugins/host.lua).
Between batches Python delivers T.async results, fires packet-time ticks
(engine_monitor metronome and windows), and ships outputs to the SQLite
writer process.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

from luaprobe.shm import cpus, segment
from luaprobe.shm.exits import EXIT_PLUGIN, EXIT_STOPPED, STOP_SIGNALS, describe_exit, early_stop
from luaprobe.shm.ring import region_size
from luaprobe.shm.luajit import method, new_runtime
from luaprobe.shm.searchpath import search_path
from luaprobe.engine.plugins import tenv
from luaprobe.workers.pool import AsyncConfig
from luaprobe.engine.store import meters

from luaprobe.shm import logs
from luaprobe.engine.plugins.errors import first_line as _first_line, load_error, text as lua_text
from luaprobe.engine.plugins.vm import PluginError, PluginVM, _text
from luaprobe.engine.plugins.discovery import decl_rows, discover, group_names, group_rows, keyinfo_rows, \
    old_onupdate_warning, probe_all
from luaprobe.engine.plugins.flowmon import FlowBackends, full_row, stored
from luaprobe.engine.fastpath import hugepages
from luaprobe.engine.fastpath.stepinput import StepInput
from luaprobe.engine.streams.reasm import ReassemblyStage
from luaprobe.engine.analysers import Analysers, group_rows as analyser_group_rows, parse_names as parse_analysers
from luaprobe.engine.plugins.monitors import TYPES as MONITOR_TYPES, Monitors, Script, group_names as monitor_group_names
from luaprobe.engine.plugins.asyncruntime import AsyncRuntime
from luaprobe.engine.store.writer import StoreDied, StoreError, StoreWriter
from luaprobe.engine.daemon.control import write_json
from luaprobe.engine.daemon.usage import UsageError


def _bytes(x) -> bytes:
    """A Lua string from a plug-in VM as the bytes it holds (numbers and the like as their text)."""
    return x if isinstance(x, bytes) else str(x).encode()


PKT, EOF, ERROR, END, STATS, TIME = 0, 1, 2, 3, 4, 5
BACKEND_KINDS = ("engine_monitor", "sg_monitor", "flowtracker")   #: backend types run per backend instance
ALERT_POLL = 10000      #: step_alert calls at most per inputfilter and poll (once a packet-time second, _poll_alerts)
MAX_GAP_TICKS = 300        #: metronome ticks fired for one gap in packet time (a replay may jump years)
#: s: while the packet ring is empty, rows queued for the store writer are shipped at least this often (a quiet
#: input: a paced replay, a live interface at a low rate, fills no batch of StoreWriter's; docs/operations.md)
IDLE_SHIP_SECS = 1.0
#: batches at the start of the packet loop that the summary's packet_loop_warmup accounts for apart: LuaJIT records
#: and compiles most of the driver's and the plug-in VMs' traces in them, a cost per run, not per packet (issue 10)
WARMUP_BATCHES = 64


def _thread_rusage():
    """getrusage(RUSAGE_THREAD) of the calling thread (Linux)."""
    return resource.getrusage(resource.RUSAGE_THREAD)


def _prefault_summary(d: dict) -> dict | None:
    """The summary's ``flow_prefault`` from the driver's stats: the helper thread's pages mapped, madvise calls, CPU
    seconds (the kernel's zeroing of new flows' pages, off the packet loop's thread), errno of a refusal, the fast
    path's wake-ups of it and the records it still mapped itself (helper behind); None without a helper."""
    p = d.get("prefault")
    if not p:
        return {"helper": False, "reason": _text(d.get("prefault_off") or b"")} if "prefault_off" in d else None
    return {"helper": True, "pages": int(p[b"pages"]), "calls": int(p[b"calls"]), "cpu_s": round(p[b"cpu_s"], 4),
            "errno": int(p[b"err"]), "wakeups": int(p[b"kicks"]), "records_mapped_by_fast_path": int(p[b"self_faulted"])}


def _rusage_delta(a, b) -> dict:
    """The fast-path thread's counts between two _thread_rusage() reads: minor / major page faults, voluntary
    context switches (waits) and involuntary ones (another task took the CPU: the machine's share of a run's
    spread, docs/benchmarks.md); {} when the loop never ran."""
    if a is None or b is None:
        return {}
    return {k: getattr(b, "ru_" + k) - getattr(a, "ru_" + k) for k in ("minflt", "majflt", "nvcsw", "nivcsw")}


def preflight(cfg) -> None:
    """What must hold before anything starts (one fast path, or the shards' coordinator before it starts any
    shard): PluginError when there is no plug-in file; UsageError when the async backend "ray" is asked for and
    the ray package is not installed.  (Backend instances are 1..64 by the settings table, engine/daemon/settings.py.)"""
    files = discover(cfg.plugins, cfg.lua_path)
    if cfg.lua_input is not None and not os.path.isfile(cfg.lua_input):
        raise PluginError(f"--lua-input {cfg.lua_input}: no such file")
    if not files and cfg.plugins:           # no PLUGIN at all: a run of the --analysers alone (cli.py checks)
        raise PluginError("no plug-in files found in " + ", ".join(cfg.plugins))
    if cfg.async_config.backend == "ray":
        import importlib.util
        if importlib.util.find_spec("ray") is None:
            raise UsageError('--async-backend ray: the ray package is not installed (pip install \'luaprobe[ray]\')')


#: every plug-in file of the run has only script types luaprobe does not run (cli.run_exit_code's reason, exit 4)
NOTHING_RUNS = "no plug-in of this run can run: every script type found is unsupported ({n} {where}; docs/plugins.md)"


def mentions_async(files) -> bool:
    """True when one of the plug-in files names ``async`` (``T.async:schedule``, ``T.async.copy``, ``local A =
    T.async``): the run then starts a warm spare worker (workers/spare.py) before it loads them.  Only when the
    first worker starts depends on it, never what runs: a plug-in that reaches T.async only through a module it
    requires starts its first worker cold, as every worker did before issue 11; a file that names it without
    scheduling anything leaves a spare idle until the run ends.  An unreadable file counts as naming it."""
    for path in files:
        try:
            with open(path, "rb") as f:
                if b"async" in f.read():
                    return True
        except OSError:
            return True
    return False


def _upper(v) -> str:
    return _text(v).upper()


def _info_key(row) -> str:
    """A key_info row's identity in the store, (group GUID, key), as one string: the key as text, or its bytes
    in hex behind a NUL when they are not UTF-8 (the store keeps those as a BLOB: docs/schema.md)."""
    key = row[1]
    if isinstance(key, bytes):
        try:
            key = key.decode("utf-8")
        except UnicodeDecodeError:
            key = "\0" + key.hex()
    return f"{_upper(row[0])} {key}"


#: Declarations the store upserts (one row per group, docs/schema.md): rows_written counts distinct groups, and a
#: sharded run's merged summary counts the union of its shards' (every shard declares the same groups).
DECLARED = {"counter_groups": lambda r: _upper(r[0]), "decl_groups": lambda r: f"{_text(r[0])} {_upper(r[1])}"}


def skip_args(cfg) -> list:
    """The capture process's ``--skip N`` for a daemon's restarted fast path over files (not looping)."""
    return ["--skip", str(cfg.skip_packets)] if cfg.skip_packets and not cfg.loop and cfg.files else []


def speed_args(cfg) -> list:
    """The capture process's ``--speed X`` for a paced replay of files (``[source] speed`` / ``run --speed``; none
    at 0, as fast as the packet ring takes them)."""
    return ["--speed", repr(float(cfg.speed))] if cfg.speed and cfg.files else []


def file_args(cfg) -> list:
    """The capture process's arguments for a source of files (one fast path's and a sharded run's capture alike):
    ``[--loop] [--speed X] [--skip N] FILE...``."""
    return ["--loop"] * bool(cfg.loop) + speed_args(cfg) + skip_args(cfg) + list(cfg.files)


def file_sizes(files) -> dict:
    """{path: size in bytes} of the regular files among ``files`` at the capture's start (the capture process maps
    them: engine/capture/capture.lua); FIFOs, ``-`` and paths that cannot be stat'ed are left out."""
    out = {}
    for f in files or ():
        try:
            st = os.stat(f)
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(st.st_mode):
            out[f] = st.st_size
    return out


def shrunk_file(sizes: dict, status) -> str | None:
    """The input error (``FILE: byte offset N: ...``) when the capture process died of SIGBUS and an input file it
    maps was cut, else None: a SIGBUS with every file whole, or any other death, stays a capture death (exit 1).
    ``sizes``: file_sizes() at the start; N is the file's size now.  A fallback: the capture process's cut guard
    (shm/_lpsync.c lp_cutguard_arm) turns the SIGBUS of a read past a cut into zeros that it never publishes
    (engine/capture/capture.lua push), so it dies of one only when the guard cannot map over the page, and then the
    records it read since its last publish are not walked."""
    if status != -signal.SIGBUS:
        return None
    for path, size in sizes.items():
        try:
            now = os.stat(path).st_size
        except OSError:
            continue
        if now < size:
            return (f"{logs.path_text(os.fsencode(path))}: byte offset {now}: the file was cut to {now} bytes (it had "
                    f"{size}) while it was read: the packets the capture process had put in the packet ring were "
                    "walked, the rest of the input was not read")
    return None


def _crash_cleans_shm() -> None:
    """Give the crash handler (engine/plugins/_lpwatch.c crash_paths) this process's /dev/shm segments and
    directories, now and at every change (shm/segment.py on_owned_change): a plug-in's fault that kills the fast
    path (SIGSEGV / SIGBUS / SIGILL / SIGFPE) then leaves none behind (docs/operations.md "Exit codes").  Needs a
    LuaJIT loaded (new_runtime: _lpwatch's Lua symbols); without the built module nothing changes (the sweep and
    `luaprobe shm clean` still remove a dead run's segments)."""
    try:
        from luaprobe.engine.plugins import _lpwatch
    except ImportError:
        return
    if hasattr(_lpwatch, "crash_paths"):
        segment.on_owned_change(_lpwatch.crash_paths)


@dataclasses.dataclass
class RunConfig:
    """Everything `luaprobe run` decides."""

    plugins: list
    files: list
    out_dir: str = "out"
    lua_path: list = dataclasses.field(default_factory=list)
    async_config: AsyncConfig = dataclasses.field(default_factory=AsyncConfig)
    backend_instances: int = 2
    window: int = 60                  #: backend window (StreamingWindowMSecs / 1000)
    batch: int = 1024
    packet_ring_size: int = 1 << 25
    flow_capacity: int = 1 << 20
    pin_cpus: str = "auto"            #: capture process / fast-path thread CPU pinning (shm/cpus.py)
    huge_pages: str = "auto"          #: the flow table's pages: "auto" | "on" | "off" (engine/fastpath/hugepages.py)
    prefault_ahead: int = 16384       #: flow records a helper thread maps ahead (flowtable.lua start_prefaulter); 0: none
    idle_timeout: float = 120.0
    active_timeout: float = 1800.0
    stats_file: str | None = None     #: a JSON snapshot (FastPath.snapshot) rewritten every stats_interval
    heartbeat_file: str | None = None  #: touched every 0.5 s while the fast path makes progress (supervisor stall check)
    stats_interval: float = 1.0
    progress: object = None           #: callable(packets, bytes) every 0.25 s (the CLI's progress bar)
    filex_dir: str | None = None      #: extracted files (default: a private directory under /dev/shm)
    data_dir: str | None = None       #: T.env App>DataDirectory (default OUT/trisul/data: engine/plugins/tenv.py)
    db_root: str | None = None        #: T.env App>DBRoot (default OUT/trisul/dbroot)
    run_state_dir: str | None = None  #: T.env App>RunStateDirectory (default OUT/trisul/run)
    filex_chunk_mb: float = 5.0       #: onfile_http chunk size (Trisul ChunkSizeMB)
    filex_dir_cap_mb: float = 256.0   #: extraction stops (counted) above this many bytes in the directory
    http_max_header: int = 65536      #: bytes of an HTTP start line + header block kept (more: counted, docs/filex.md)
    http_bomb_ratio: int = 100        #: decoding of a compressed HTTP body stops past this many decoded bytes per
                                      #: compressed byte received ... (0: no limit; docs/filex.md "Decompression bombs")
    http_bomb_min_mb: float = 1.0     #: ... once it decoded more than this many MiB (libhtp's compression-bomb-limit)
    frag_timeout: float = 30.0        #: s of packet time an IP datagram waits for its fragments (docs/filex.md)
    frag_max_mb: float = 16.0         #: IP fragment bytes held over all datagrams; the oldest is dropped above
    interface: str | None = None      #: live capture from this interface instead of files (docs/live.md)
    bpf: str | None = None            #: tcpdump filter expression for the live capture
    loop: bool = False                #: repeat the files until stopped (soak runs; [source] loop in docs/operations.md)
    speed: float = 0.0                #: files: packet-time seconds replayed per second (0: as fast as possible;
                                      #: [source] speed / run --speed, docs/operations.md "Paced replay")
    skip_packets: int = 0             #: files, not looping: the first N packets of the input are not read (a daemon's
                                      #: restarted fast path goes on after those its predecessors walked)
    generate: str | None = None       #: the capture process runs the generator with this SPEC (engine/gen/stream.py)
    lua_input: str | None = None      #: an inputfilter script whose step is the input, no capture process (run
                                      #: --lua-input; engine/fastpath/stepinput.py)
    lua_args: str | None = None       #: that script's T.args (run --args; Trisul's -args)
    shards: int = 1                   #: fast-path processes sharing the input by flow hash (engine/fastpath/shards.py)
    shard: dict | None = None         #: in a shard process (set by engine/fastpath/shards.py): index, count, ring,
                                      #: bell, summary_file, coordinator (pid); None in a single fast path
    on_loaded: object = None          #: callable(problems: list[str]) once the plug-ins are loaded (the daemon)
    on_fatal: object = None           #: callable(code, line) before the process ends itself (the daemon's last_error)
    hook_budget: float = 10.0         #: s a hook may run before it is interrupted (0 = off; docs/operations.md)
    plugin_memory_mb: int = 4096      #: MiB of Lua memory per plug-in VM (0 = no limit; docs/operations.md)
    analysers: str = ""               #: built-in analysers to run and store: "all", "none" or "counters,dns,http,tls"
    user: str | None = None           #: drop to this user after opening the capture socket(s) (docs/live.md)
    group: str | None = None          #: with user: this group only
    capture_fds: list | None = None   #: live, set by engine/daemon/privileges.py: AF_PACKET sockets opened before
                                      #: the drop, one per capture process (passed with --socket-fd, then closed here)
    bpf_program: str | None = None    #: the bpf expression compiled before the drop ("code jt jf k" lines)
    out_lock_fd: int | None = None    #: the descriptor of out_dir's claim (engine/daemon/usage.py OutClaim: its flock),
                                      #: inherited by every process of the run that writes into out_dir (store
                                      #: writers, shard processes), so out_dir stays locked until the last has exited


def capture_socket_args(cfg: RunConfig, k: int) -> list:
    """Extra arguments of live capture process ``k`` when its socket was opened before a privilege drop."""
    out = ["--bpf-program", cfg.bpf_program] if cfg.bpf_program else []
    return out + (["--socket-fd", str(cfg.capture_fds[k])] if cfg.capture_fds else [])


def close_fds(cfg: RunConfig) -> None:
    """Close this process's copies of the capture sockets once the capture processes hold theirs."""
    for fd in cfg.capture_fds or []:
        try:
            os.close(fd)
        except OSError:
            pass
    cfg.capture_fds = None


#: script type -> (Host setup method, Host per-batch method) for the types that walk every batch
BATCH_WALKERS = {
    "simplecounter": ("setup_simplecounter", "run_batch"),
    "protocol_handler": ("setup_protocol_handler", "run_protocol_batch"),
    "packet_storage": ("setup_packet_storage", "run_storage_batch"),
}


class _SignalWatch:
    """The second SIGINT / SIGTERM must stop the run even when the main thread cannot run its Python signal
    handler because a hook never returns (an endless compiled loop: LuaJIT cannot be interrupted there).
    The C-level handler still writes each signal number to the wakeup fd; this thread reads it (lupa releases
    the GIL while Lua runs) and, 2 s after a second stop signal the main thread has not handled, kills every
    process of the run, unlinks its shared memory and exits 1 (what a handled hard stop also does)."""

    GRACE = 2.0
    STUCK_GRACE = 2.0                  #: s past the hook budget before a hook that was not interrupted ends the run

    def __init__(self, fp, signals: bool = True):
        self.fp = fp
        self.signals = 0
        self.done = False
        self.take_signals = signals    #: False: only the budget while plug-ins load (the daemon's child)
        self.r = None

    def start(self) -> bool:
        if not self.take_signals:
            threading.Thread(target=self._run, name="luaprobe-load-watch", daemon=True).start()
            return True
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:
            old = 0
        if old != -1:                          # someone else's wakeup fd (or none possible): leave it
            if old not in (0, -1):
                signal.set_wakeup_fd(old)
            os.close(r)
            os.close(w)
            return False
        self.r, self.w = r, w
        threading.Thread(target=self._run, name="luaprobe-signal-watch", daemon=True).start()
        return True

    def stop(self) -> None:
        self.done = True
        if self.r is None:
            return
        signal.set_wakeup_fd(-1)
        os.close(self.w)                       # the thread's select sees EOF

    def _run(self) -> None:
        import select
        first_at = second_at = None
        hinted = False
        while not self.done:
            if self.r is None:                 # budget only
                time.sleep(0.25)
                self._check_budget()
                continue
            ready, _, _ = select.select([self.r], [], [], 0.25)
            if ready:
                data = os.read(self.r, 64)
                if not data:
                    break
                stops = [b for b in data if b in STOP_SIGNALS]
                self.signals += len(stops)
                if self.signals >= 1 and first_at is None:
                    first_at, first_sig = time.monotonic(), stops[0]
                    if self.fp.cfg.hook_budget > 0:     # a hook slowed down to its budget stops now, not later
                        from luaprobe.engine.plugins import _lpwatch
                        _lpwatch.stop_now()
                if self.signals >= 2 and second_at is None:
                    second_at = time.monotonic()
            if first_at is not None and self.fp.loading and self.fp._stop == 0 and not self.done \
                    and time.monotonic() - first_at > self.GRACE:
                self._stopped_loading(first_sig)   # nothing to lose yet: one signal is enough
            if first_at is not None and not hinted and second_at is None and self.fp._stop == 0 \
                    and not self.fp.loading and time.monotonic() - first_at > 1.0:
                hinted = True                  # the main thread has not seen the signal: a hook is running
                sys.stderr.write("luaprobe run: stopping, but a plug-in hook has not returned for 1 s; "
                                 "send the signal again to stop hard\n")
                sys.stderr.flush()
            if second_at is not None and time.monotonic() - second_at > self.GRACE and self.fp._stop != 3 \
                    and not self.done:
                self._hard_stop()
            self._check_budget()
        if self.r is not None:                 # the budget-only watch (the daemon's child) has no pipe
            os.close(self.r)

    def _check_budget(self) -> None:
        """A hook past its budget that the watchdog's interrupt cannot reach (a loop LuaJIT compiled into a trace
        never returns to the interpreter; a long C call) for STUCK_GRACE s: the fast-path thread is lost, so the
        run ends here as a plug-in error (exit 4), the way a hard stop does (engine/plugins/_lpwatch.c)."""
        if self.fp.cfg.hook_budget <= 0 or self.done or (not self.take_signals and not self.fp.loading):
            return
        from luaprobe.engine.plugins import _lpwatch
        late = _lpwatch.stuck_for()
        if late > self.STUCK_GRACE:
            self._hard_stop(
                f"luaprobe run: plug-in error: {_lpwatch.message()}, and {late:.0f} s later it still runs in code "
                "the interrupt cannot reach (a loop LuaJIT compiled, or a C function): stopped hard (workers and "
                "capture killed; rows already handed to the store writer are committed; no summary)\n", EXIT_PLUGIN)

    def _stopped_loading(self, signum: int) -> None:
        """A stop signal the main thread has not taken for GRACE s while a plug-in's top level runs (an endless
        loop, which --hook-budget 0 never interrupts, or a compiled one the budget cannot reach): no packet has been
        read, so one signal ends the run, as a stop during start-up does (128 + signal number)."""
        name = signal.Signals(signum).name
        where = getattr(self.fp, "loading_file", None) or "a plug-in"
        self._hard_stop(f"luaprobe run: stopped by {name} while loading plug-ins: the top level of {where} has not "
                        f"returned for {self.GRACE:g} s (an endless loop?); nothing was read\n", 128 + signum)

    def _hard_stop(self, line: str | None = None, code: int = 1) -> None:
        import psutil
        if line and self.fp.cfg.on_fatal is not None:
            try:
                self.fp.cfg.on_fatal(code, line.strip().removeprefix("luaprobe run: "))
            except Exception:                  # noqa: BLE001 - best effort on the way out
                pass
        sys.stderr.write(line or "luaprobe run: stopped hard by a second signal while a hook did not return "
                         "(workers and capture killed; rows already handed to the store writer are committed)\n")
        try:
            kids = psutil.Process().children(recursive=True)
        except psutil.Error:
            kids = []
        for k in kids:
            try:
                if k.pid != getattr(getattr(self.fp, "store", None), "pid", None):
                    k.kill()
            except psutil.Error:
                pass
        store = getattr(self.fp, "store", None)
        proc = getattr(store, "_proc", None)
        if proc is not None and proc.stdin:
            try:
                proc.stdin.close()             # EOF: the writer commits what it has and exits
                proc.wait(10)
            except Exception:                  # noqa: BLE001 - best effort on the way out
                proc.kill()
        psutil.wait_procs(kids, timeout=5)
        for name in segment.list_segments(os.getpid()):
            try:
                segment.unlink(name)
            except OSError:
                pass
        sys.stderr.flush()
        os._exit(code)


@dataclasses.dataclass
class Instance:
    """One script-type instance: its VM and what it runs."""

    vm: PluginVM
    kind: str                          # simplecounter | countergroup | frontend | engine_monitor
    pipeline: str
    run_batch = None
    budgeted = False                   # the hook budget (watchdog) is active for this instance
    disabled = None                    # why the fast path stopped calling it (its memory limit), else None
    batches_skipped = 0                # batches not walked since it was disabled
    flow_counters = False              # engine:add_flow_counter was called (a VM without a packet walk of its own)
    clsid = ""                         # channellistener: its plug-in's id.clsid, upper case (T.host:broadcast)


def _message_rows(sender, rows) -> list:
    """(sender, pipeline, msgid, msg bytes, already delivered to the sender, class id: "" but for a broadcast) of a
    VM's posted message rows."""
    out = []
    for r in rows.values():
        v = list(r.values())
        out.append((sender, _text(v[0]), _text(v[1]), _bytes(v[2]), len(v) > 3 and bool(v[3]),
                    _text(v[4]) if len(v) > 4 else ""))
    return out


_IPR_KEYS = ("ip_fragments", "ip_datagrams", "ip_frag_timeouts", "ip_frag_incomplete", "ip_frag_overlaps",
             "ip_frag_duplicates", "ip_frag_malformed", "ip_frag_dropped_cap", "ip_frag_in_no_flow")


class FastPath:
    """Run plug-ins over capture files to completion; :meth:`run` returns the summary dict."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.instances: list[Instance] = []
        self.flowrecord_listeners: list[Instance] = []   #: messagemonitors with onnewflowrecord (new_flow_record)
        self.input_errors: list[str] = []
        self.plugin_problems: list[str] = []
        self.protocols: list[tuple[str, str]] = []     #: protocol_handler (guid, name), registration order
        self.pstore = self.pstore_lua = None              #: packet_storage: the store and its VM
        self.packet_storage: dict = {}                    #: its counters at the end (stored, skipped, ...)
        self.files_done: list[str] = []
        self.sec = None
        self.sec_usec = 0                   #: µs of the packet that opened second self.sec (TIME records)
        self.origin_tus = None          # the first packet's time, µs (_set_origin)
        self.window_start = None
        self.ticks = 0
        self.capture_stats = None       #: live: [seen, ring_drops, kernel_drops, kernel_packets, freeze_q, looped]
        self._stop = 0                  #: 1 = stop asked (signal / request_stop), 2 = capture told to stop
        self.stopped_by = None          #: "SIGINT" / "SIGTERM" / "request" when the run was stopped early
        self.draining = False           #: in the T.async drain at the end of input (_finish)
        self._end_drain = False         #: a shard told by its coordinator: the input is all read, do not wait
        self.stopped_during = None      #: "drain": the stop came during that drain (the whole input was read)
        self._reload = False            #: set by request_reload_backends (SIGHUP under the supervisor)
        self._retiring: list = []       #: [(instance, monotonic deadline)]: replaced backends still draining
        self.backend_reloads = 0
        self.late_packets = 0           #: packets older than the engine's packet time (counted in the current bucket)
        self._last_stats = -1e9
        self._last_progress = -1e9
        self._last_store_check = -1e9    #: _maybe_stats: when the store writer was last looked at
        self._shipped_at = -1e9          #: the packet loop, idle: when queued rows were last shipped (IDLE_SHIP_SECS)
        self._stats_due = -1e9           #: monotonic s when _maybe_stats has anything to do next (_next_due)
        self.loop_start = self.loop_end = None   #: monotonic time of the first batch / after the last one
        self.loop_cpu_start = self.loop_cpu_end = None   #: this thread's CPU time at the same two points
        self.loop_ru_start = self.loop_ru_end = None     #: and its getrusage (page faults, context switches)
        self.loop_batches = 0           #: batches walked
        self.warmup = None              #: (monotonic, thread CPU, packets) after the first WARMUP_BATCHES batches
        self.rows_written = {"counters": 0, "alerts": 0, "resources": 0, "fts": 0, "key_info": 0, "flows": 0}
        self.declared: dict = {}       # {kind: {group key}} for the DECLARED kinds (rows_written counts these)
        self.info_keys: set = set()    # (group, key) of every key_info row: the store keeps one row (label) per key
        self.stage = None               #: ReassemblyStage when a reassembly_handler is loaded
        self.flowmon = None             #: FlowBackends (sg_monitor / flowtracker)
        self.shard_index = cfg.shard["index"] if cfg.shard else 0
        self.messages_undelivered = 0   #: post_message_* with no instance of that pipeline in this process
        self._posted = False            #: a message was posted since the last delivery (_on_post)
        self.analysers = None
        self.monitors = Monitors(cfg.backend_instances)
        self.loading = True             #: plug-ins are being loaded (the load watch of _SignalWatch acts only then)

    # ----------------------------------------------------------------- setup
    def _load_plugins(self, rt: AsyncRuntime) -> None:
        cfg = self.cfg
        # each top level under the hook budget (engine/plugins/host.lua boot); the daemon's stall rule watches
        # loading too (supervisor._check_stall): a beat naming each file before it loads
        self.infos = probe_all(cfg.plugins, cfg.lua_path, cfg.hook_budget, before=self._loading,
                               lua_input=cfg.lua_input, lua_args=cfg.lua_args)
        if not self.infos and cfg.plugins:
            raise PluginError("no plug-in files found in " + ", ".join(cfg.plugins))
        for i in self.infos:                 # warned, not adapted: see discovery.old_onupdate_warning
            if i.old_onupdate:
                logs.log.warning(old_onupdate_warning(i))
        self.groups = {i.countergroup["guid"].upper(): i.countergroup for i in self.infos if i.countergroup}
        # protocol_handler protocols, registered in this order in every VM (engine/plugins/protocol.lua)
        self.protocols = [(i.protocol["guid"], i.protocol["name"]) for i in self.infos
                          if i.protocol and not i.errors and "protocol_handler" in i.types]
        self.group_names = group_names(self.infos)
        self.stage = ReassemblyStage(self.driver_lua, cfg.flow_capacity, cfg.idle_timeout, self.driver.ft.flows,
                                          self.driver.ft.cold, self.driver.ft)
        self.flowmon = FlowBackends(self._write, {i.path: i.flowtracker for i in self.infos if i.flowtracker},
                                    self.shard_index)
        for info in self.infos:
            self.plugin_problems += info.problems
            if info.errors:
                continue                                   # cannot load: already reported
            for kind in info.runnable_types:
                if kind in MONITOR_TYPES:          # every shard: each sees its own flows' items
                    self._load_monitor(rt, info.path, kind)
                elif kind in BACKEND_KINDS:
                    if kind == "engine_monitor" and self.shard_index:   # once for the probe: in shard 0
                        continue
                    for k in range(cfg.backend_instances):
                        self._instantiate(rt, info.path, kind, "backend", str(k))
                elif kind == "inputfilter" and self.shard_index:   # its alerts once for the probe: in shard 0 (a
                    continue                                        # socket it binds, a queue it drains: once)
                else:
                    self._instantiate(rt, info.path, kind, "frontend", secrets.token_hex(4).upper()[:7])
        self._announce_flowrecords()

    def _announce_flowrecords(self) -> None:
        """With a messagemonitor that has onnewflowrecord loaded, every frontend VM's new_flow_record announces its
        records (engine.lua wants_flowrecords); without one, nothing is queued for nobody."""
        if self.flowrecord_listeners:
            for inst in self.instances:
                if inst.pipeline == "frontend":
                    inst.vm.lua.eval("function(h) h.engine.wants_flowrecords = true end")(inst.vm.host)

    def _wait_workers(self, rt) -> None:
        """Before the packet loop: the workers of plug-ins asking for more than one (started at load,
        engine/plugins/vm.py) run their task loops (AsyncRuntime.wait_workers; the heartbeat goes on, a stop
        signal ends the wait).  Workers not up within the task timeout: one plug-in problem line each."""
        rt.beat = self._beat
        for line in rt.wait_workers(stop=lambda: self._stop != 0):
            logs.log.error("%s", line)
            self.plugin_problems.append(line)

    def _preflight(self) -> None:
        preflight(self.cfg)

    def _load_monitor(self, rt, path, kind) -> None:
        """A resource/fts/alert/cg monitor: one Script per attached group, backend_instances VMs each."""
        try:
            probe_vm = rt.load(path, instance="0", enginetype="backend", pipeline="backend", groups=self.groups, max_memory=self._max_memory(), load_budget=self.cfg.hook_budget,
                               start_workers=False, protocols=self.protocols, group_names=self.group_names,
                               contextid=self.shard_index)
        except PluginError as e:
            self.plugin_problems.append(str(e))
            return
        try:
            attached = Monitors.attachments(probe_vm, kind, monitor_group_names(self.groups))
        finally:
            rt.unload(probe_vm)
        if not attached:
            self.plugin_problems.append(f"{path}: {kind} attaches to no known group; it will not run")
            return
        for guid, name in attached:
            script = Script(kind, path, guid, name)
            for k in range(self.cfg.backend_instances):
                inst = self._instantiate(rt, path, kind, "backend", str(k), group=(guid, name))
                if inst is None:
                    break
                script.vms.append(inst.vm)
            if len(script.vms) == max(1, self.cfg.backend_instances):
                self.monitors.add(script)

    def _set_origin(self, lua) -> None:
        """After the first batch is read: its first packet's time (µs) is the time of the T.async tasks every VM
        scheduled before it had a time (onload); their results were waiting for it (docs/async.md "Time")."""
        self.origin_tus = int(lua.eval("function(d) local p = d.batch[0] "
                                       "return p.ts_sec * 1000000 + math.floor(p.ts_nsec / 1000) end")(self.driver))
        for inst in self.instances:
            inst.vm.set_origin(self.origin_tus)

    def _is_lua_input(self, path) -> bool:
        return self.cfg.lua_input is not None and os.path.realpath(path) == os.path.realpath(self.cfg.lua_input)

    def _contextid(self, pipeline, instance) -> int:
        """T.contextid of a VM: the shard for the frontend; for backend instance i of shard s of N shards,
        s + i * N, so that the backend instances of a script, which run side by side as Trisul's flusher threads
        do, each have their own (sg3.lua and sg2.lua name their log files /tmp/fdetails.<contextid>)."""
        if pipeline != "backend":
            return self.shard_index
        return self.shard_index + int(instance) * (self.cfg.shard["count"] if self.cfg.shard else 1)

    def _instantiate(self, rt, path, kind, pipeline, instance, group=None):
        try:
            self._loading(path)
            vm = rt.load(path, instance=instance, enginetype=pipeline, pipeline=pipeline, groups=self.groups, max_memory=self._max_memory(), load_budget=self.cfg.hook_budget,
                         start_workers="lazy", protocols=self.protocols, group_names=self.group_names,
                         contextid=self._contextid(pipeline, instance),
                         args=self.cfg.lua_args if self._is_lua_input(path) else None)
        except PluginError as e:
            self.plugin_problems.append(str(e))
            return
        inst = Instance(vm, kind, pipeline)
        label = f"{logs.path_text(os.path.basename(path))} [{kind}#{instance}]".encode()
        inst.budgeted = vm.lua.eval("function(h, s, l) return h:set_budget(s, l) end")(
            vm.host, float(self.cfg.hook_budget), label)
        if self.cfg.plugin_memory_mb:
            vm.lua.eval("function(h, m, l) h:set_memory_limit(m, l) end")(vm.host, int(self.cfg.plugin_memory_mb), label)
        if kind in MONITOR_TYPES:
            Monitors.prepare_vm(vm)
            if kind == "cg_monitor":
                vm.lua.eval("function(n, g) T.monitor_group_name = n; T.monitor_group_guid = g end")(
                    group[1].encode(), group[0].encode())
            mon = "function(...) return require('luaprobe.engine.plugins.monitor').%s(...) end"
            for fn in ("run_items", "cg_filter", "cg_flush", "cg_toppers"):
                setattr(vm, fn, vm.lua.eval(mon % fn))
        if kind in BATCH_WALKERS:
            setup, walk = BATCH_WALKERS[kind]
            args = (self._packet_store()[b"store_addr"], self.cfg.flow_capacity) if kind == "packet_storage" else ()
            problem = vm.lua.eval(f"function(h, ...) return h:{setup}(...) end")(vm.host, *args)
            if problem is not None:
                self.plugin_problems.append(f"{path}: {_text(problem)}")
                rt.unload(vm)
                return
            inst.run_batch = self._budgeted(inst, walk)
        elif kind == "filex_monitor":
            events = self._budgeted(inst, "run_filex_events")
            # one number per filex_monitor instance of this run, in its file names: every instance writes its own
            # copy of a body into the shared directory, and two instances must never share (and remove) one file
            self._filex_seq = getattr(self, "_filex_seq", 0) + 1
            opts = {b"dir": self._filex_dir(rt).encode(), b"instance": self._filex_seq, b"chunk_size": int(self.cfg.filex_chunk_mb * 1048576),
                    b"dir_cap": int(self.cfg.filex_dir_cap_mb * 1048576), b"max_header": int(self.cfg.http_max_header),
                    b"bomb_ratio": int(self.cfg.http_bomb_ratio), b"bomb_min": int(self.cfg.http_bomb_min_mb * 1048576),
                    b"votes": self.stage.add_filex(vm.host, events), b"batch": int(self.driver.batch_addr)}
            vm.lua.eval("function(h, o) return h:setup_filex(o) end")(vm.host, vm.lua.table_from(opts))
        elif kind in ("reassembly_handler", "flowmonitor"):
            problem = self.stage.add(vm, kind)
            if problem is not None:
                self.plugin_problems.append(f"{path}: {problem}")
                rt.unload(vm)
                return
        elif kind in ("sg_monitor", "flowtracker"):
            self.flowmon.add(inst)
        ok, res = vm.call(None, "onload")
        if not ok:                                         # an error, not a deliberate `return false`
            problem = f"{path}: onload failed: {_first_line(load_error(_text(res), path)) if res else '?'}"
            if problem not in self.plugin_problems:
                self.plugin_problems.append(problem)
        if not ok or res is False:
            why = "onload failed" if not ok else "onload returned false"
            logs.log.info("[%s#%s] %s: instance disabled", os.path.basename(path), instance, why)
            if kind in ("reassembly_handler", "flowmonitor"):
                self.stage.remove(vm)
            elif kind == "filex_monitor":
                self.stage.remove_filex(vm.host)
            self.flowmon.remove_vm(vm)
            rt.unload(vm)
            return None
        vm.take_counters = method(vm.lua, "take_counters")
        if self.origin_tus is not None:       # loaded during the run (a reload): its onload tasks get the second now
            vm.set_origin(max(self.origin_tus, (self.sec or 0) * 1_000_000))
        vm.take_outputs = method(vm.lua, "take_outputs")
        vm.expire_script_flows = method(vm.lua, "expire_script_flows")
        vm.set_time = method(vm.lua, "set_time")
        vm.deliver_message = method(vm.lua, "deliver_message")
        if kind == "inputfilter":
            vm.poll_alerts, vm.hook_error = method(vm.lua, "poll_alerts"), method(vm.lua, "hook_error")
        if kind == "channellistener":
            vm.deliver_channel = method(vm.lua, "deliver_channel")
            inst.clsid = _text(method(vm.lua, "clsid")(vm.host))
        vm.take_messages = method(vm.lua, "take_messages")
        vm.flows_ended = method(vm.lua, "flows_ended")
        if kind == "messagemonitor":
            vm.flow_metrics = method(vm.lua, "flow_metrics")
            vm.deliver_flowrecord = method(vm.lua, "deliver_flowrecord")
            if vm.lua.eval("function(h) local m = h.plugin.messagemonitor "
                           "return type(m) == 'table' and type(m.onnewflowrecord) == 'function' end")(vm.host):
                self.flowrecord_listeners.append(inst)
        vm.host.engine.flow_records = self._flow_records()      # engine.lua new_connection reads first_ts there
        vm.lua.eval("function(h, f) h.engine.on_post = f end")(vm.host, self._on_post)
        vm.host[b"on_disable"] = lambda line: self._disable(inst, _text(line))   # Host:call's budget strikes
        self.instances.append(inst)
        return inst

    # ----------------------------------------------------------------- ticks
    def _backend(self, hook: str, *args) -> None:
        """Call ``hook`` in every backend and monitor instance; before onendflush (args[0]: the window's end, which
        packet time has reached, or the end of input) the window's monitor items (_monitor_flush)."""
        if hook == "onendflush":                       # monitors: the window's items first
            self._monitor_flush(args[0])
        if hook == "onendflush" and self.flowmon is not None and self.flowmon.active:
            self._collect(args[0])                     # tags and records of the window reach the flow backends
            self.flowmon.flush(args[0])
        for inst in self.instances:
            if inst.kind in BACKEND_KINDS or inst.kind in MONITOR_TYPES:
                inst.vm.set_time(inst.vm.host.engine, args[0], 0)
                inst.vm.call(inst.kind, hook, inst.vm.host.engine, *args)

    def _tick(self, sec: int, usec: int = 0) -> None:
        """Packet time reached second `sec` (`usec`: of the packet that opened it, in every shard alike): one metronome
        tick per second elapsed (seconds without packets included, at most MAX_GAP_TICKS per gap), window edges,
        closed buckets, idle flows, the analysers' idle HTTP/TLS flows."""
        if self.sec is None:
            self.window_start = sec - sec % self.cfg.window
            self._backend("onbeginflush", self.window_start)
        else:
            first = max(self.sec + 1, sec - MAX_GAP_TICKS + 1)
            for s in range(first, sec + 1):
                self._second(s)
        self.sec, self.sec_usec = sec, usec
        self._poll_alerts(sec)
        for inst in self.instances:         # script-made flow records (flow import) idle past --idle-timeout end
            if inst.pipeline == "frontend" and inst.disabled is None:
                inst.vm.expire_script_flows(inst.vm.host.engine, sec, self.cfg.idle_timeout)
        self._collect(sec, tick=True)
        while self._exported(self.driver_expire(self.driver, sec)) == self.driver.exp_cap:
            pass
        if self.analysers is not None:
            # on the probe's clock, not on this process's own packets: a shard ends an idle HTTP flow (an unanswered
            # request's status:0 URL) at the second, and with the time, one fast path does
            self.analysers.tick(sec, usec)
        if self.stage is not None:              # reassembled flows the same way (onterminateflow, filex ends)
            self.stage.tick(sec, usec)

    def _poll_alerts(self, now) -> None:
        """Every inputfilter's step_alert, polled once a packet-time second and at the end of input (up to
        ALERT_POLL alerts each time): its alerts go where engine:add_alert_full's go (engine/plugins/inputfilter.py;
        a table that is not an alert is a hook error of step_alert, named, and is not stored)."""
        from luaprobe.engine.plugins.discovery import _to_py
        from luaprobe.engine.plugins.inputfilter import alert_row
        for inst in self.instances:
            if inst.kind != "inputfilter" or inst.disabled is not None:
                continue
            rows = []
            for a in _to_py(inst.vm.poll_alerts(inst.vm.host, ALERT_POLL)) or []:
                try:
                    rows.append(alert_row(a if isinstance(a, dict) else {}, os.path.basename(inst.vm.path)))
                except ValueError as e:
                    inst.vm.hook_error(inst.vm.host, b"inputfilter.step_alert", str(e).encode())
            if rows:
                self._route("alerts", rows, now)

    def _second(self, s: int) -> None:
        """Backend hooks for packet-time second `s`: window edge first, then the metronome."""
        w = self.cfg.window
        if s >= self.window_start + w:
            self._backend("onendflush", self.window_start + w)
            self.window_start = s - s % w
            self._backend("onbeginflush", self.window_start)
        self.ticks += 1
        self._backend("onmetronome", s, self.ticks, 1)

    def _start_analysers(self) -> None:
        """The built-in analysers VM, when --analysers or a monitor script asks for one (else nothing runs)."""
        names = parse_analysers(self.cfg.analysers) | self.monitors.producers()
        if not names:
            return
        self.analysers = Analysers(names, idle_timeout=self.cfg.idle_timeout)
        if "counters" in names:
            self._write("counter_groups", analyser_group_rows())

    def _collect(self, now, instances=None, tick: bool = False, counters_now=None, deliver: bool = True) -> None:
        """Move counters of closed buckets (all when now is None) and other outputs to the writer: of the
        analysers and every instance, or of ``instances`` only (a replaced backend, _retire_step).  ``counters_now``:
        close the counter buckets by this time instead of ``now`` (a window end packet time has reached, while the
        other outputs keep ``now``, the second they were made in).  ``deliver`` False (after every onunload ran):
        messages posted are not delivered (no VM takes one any more) and count as undelivered."""
        cnow = now if counters_now is None else counters_now
        if self.analysers is not None and instances is None:
            for kind, rows in self.analysers.take(cnow).items():
                self._route(kind, rows, now)
        messages = []
        counters = []
        for inst in self.instances if instances is None else instances:
            vm = inst.vm
            eng = vm.host.engine
            rows = vm.take_counters(eng, cnow, tick)
            counters += [tuple(r.values()) for r in rows.values()]
            out = vm.take_outputs(eng)
            for kind in ("alerts", "resources", "key_info", "edges"):
                self._route(kind, out[kind.encode()], now)
            self._flows(out[b"flows"])
            for r in out[b"flow_tags"].values():      # the tag's bytes as given (stored with \xNN escapes)
                fk, tag = _text(r[1]), _bytes(r[2])
                if not (self.flowmon is not None and self.flowmon.tag(fk, tag.decode("utf-8", "backslashreplace"))):
                    self.driver_tag(self.driver, fk.encode(), tag)
            messages += _message_rows(inst, out[b"messages"])
        if counters:      # parts of one counter from several VMs (backend instances, script types): merged by type
            self._route("counters", meters.merge_rows(counters), now)
        if deliver:
            self._dispatch(messages)
        else:
            self.messages_undelivered += len(messages)

    @staticmethod
    def _flow_counter_runner(inst):
        """The per-batch call of engine.lua flow_counter_batch for `inst`, made only once the VM added a flow
        counter (engine.on_flow_counters sets inst.flow_counters; a lupa call per batch costs 1-3 us, and most
        VMs never add one) and while the instance is not disabled (its memory limit)."""
        lua = inst.vm.lua
        lua.eval("function(h, f) h.engine.on_flow_counters = f end")(
            inst.vm.host, lambda: setattr(inst, "flow_counters", True))
        count = lua.eval("function(h, a, n) return h.engine:flow_counter_batch(a, n) end")
        return lambda h, a, n: count(h, a, n) if inst.flow_counters and inst.disabled is None else 0

    def _on_post(self) -> None:
        """A plug-in posted a message (engine.lua post): delivered after the batch under way."""
        self._posted = True

    def _deliver_messages(self) -> None:
        """Between batches: the messages posted since the last delivery reach their pipeline's instances."""
        self._posted = False
        messages = []
        for inst in self.instances:
            messages += _message_rows(inst, inst.vm.take_messages(inst.vm.host.engine))
        self._dispatch(messages)

    def _dispatch(self, messages) -> None:
        """Deliver (sender, pipeline, msgid, msg, delivered_to_sender, clsid) rows: a posted message to every
        instance of the pipeline (the sender's own VM unless Host:deliver_own gave it the message already); a
        T.host:broadcast (pipeline "channel") to the channellisteners of class clsid (_broadcast)."""
        for sender, pipeline, msgid, msg, own, clsid in messages:   # msg: bytes, delivered unchanged (any bytes)
            if pipeline == "channel":
                self._broadcast(sender, msgid, msg, clsid)
                continue
            if pipeline == "flowrecord":           # engine.lua new_flow_record: msgid the flow key
                for inst in self.flowrecord_listeners:
                    if inst.disabled is None:
                        inst.vm.deliver_flowrecord(inst.vm.host, msgid.encode(), msg)
                continue
            targets = [inst for inst in self.instances if inst.pipeline == pipeline]
            if not targets:          # e.g. to the backend from a shard other than 0 (docs/scale.md)
                self.messages_undelivered += 1
            for inst in targets:
                if not (own and inst is sender):
                    inst.vm.deliver_message(inst.vm.host, msgid.encode(), msg)

    def _broadcast(self, sender, msgid: str, msg: bytes, clsid: str) -> None:
        """T.host:broadcast to the channellisteners of plug-ins of class ``clsid`` (every one when ""), but not the
        sending plug-in's own (its file's VMs here stand for the one Trisul instance that sent it).  None listening
        is no fault (not counted as undelivered).  docs/plugins.md "channellistener"."""
        for inst in self.instances:
            if inst.kind == "channellistener" and clsid in ("", inst.clsid) and inst.vm.path != sender.vm.path:
                inst.vm.deliver_channel(inst.vm.host, msgid.encode(), msg)

    def _flow_records(self) -> int | bool:
        """The address of the driver's cold flow-record array (engine/fastpath/flowtable.lua lp_flow_cold: first_ts;
        fixed for the run), or False before the driver exists."""
        if getattr(self, "_records_addr", None) is None:
            lua = getattr(self, "driver_lua", None)
            if lua is None:
                return False
            self._records_addr = int(lua.eval("function(d) return tonumber(require('ffi').cast('intptr_t', "
                                              "d.ft.cold)) end")(self.driver))
        return self._records_addr

    def _exported(self, n: int) -> int:
        """The driver's last n exported flow records (engine/fastpath/flowrows.py) go where _flows sends
        records: held for sg_monitor / flowtracker when any is loaded, else written now.  Returns n."""
        if n:
            from luaprobe.engine.fastpath import flowrows     # imported in run() while the capture process starts
            recs = flowrows.view(self.exp_addr, n)
            if self.flowmon is not None and self.flowmon.active:
                self.flowmon.hold(flowrows.full_rows(flowrows.columns(recs, self.driver.exp_tags)))
            else:      # str / int / float / None by construction: the writer skips its per-row check
                self._write("flows", flowrows.stored(recs, self.driver.exp_tags), built=True)
            for inst in self.instances:          # per-flow plug-in state ends with its flow (engine.lua flows_ended)
                if inst.vm.host.engine.nflow_counters:
                    inst.vm.flows_ended(inst.vm.host.engine, self.exp_addr, n)
                if inst.kind == "messagemonitor":    # its latency / loss samples (host.lua flow_metrics)
                    inst.vm.flow_metrics(inst.vm.host, self.exp_addr, n, self.sec or 0)
        return n

    def _flows(self, rows) -> None:
        """Flow records (full rows, 14-field Lua rows from scripts): held for sg_monitor / flowtracker when
        any is loaded, else written now."""
        rows = [[_text(x) if isinstance(x, bytes) else x for x in r.values()] for r in rows.values()] \
            if hasattr(rows, "values") else rows
        if not rows:
            return
        if self.flowmon is not None and self.flowmon.active:
            self.flowmon.hold([full_row(r) for r in rows])
        else:
            self._write("flows", [stored(full_row(r)) for r in rows])

    def _route(self, kind: str, rows, now) -> None:
        """Outputs on their way to the store: through the monitors watching their group, if any."""
        if not self.monitors.scripts or kind not in ("counters", "alerts", "resources", "fts"):
            self._write(kind, rows)
            return
        rows = [tuple(r.values()) for r in rows.values()] if hasattr(rows, "values") else list(rows)
        g = 0 if kind == "counters" else 2                 # the group GUID as text; other bytes stay bytes
        rows = [r[:g] + (_text(r[g]),) + r[g + 1:] if isinstance(r[g], bytes) else r for r in rows]
        ts = now if now is not None else (self.sec or 0)
        if kind == "counters":
            self._write(kind, self.monitors.counters(rows, self.groups))
        else:
            self._write(kind, self.monitors.items(kind, rows, ts))

    def _monitor_flush(self, ts) -> None:
        """Window end ``ts``: monitor votes and onflush, then the kept items go to the store.  Packet time is at or past
        ``ts`` (or the input ended), so the counter buckets ending by ``ts`` close here, and cg_monitor's hooks for
        a window's buckets run inside that window, before its onendflush, as the other monitors' items do.  Before,
        they closed at the next tick, after the next window's onbeginflush: one window late (and in time when an
        sg_monitor or flowtracker was loaded, whose onendflush collects by the window end: _backend).  At the end of
        input _finish passes the last window's end: buckets a T.async result still to come in the drain may write
        in stay open (Engine:take_counters' hold), their hooks after the drain."""
        if not self.monitors.scripts:
            return
        self._collect(self.sec, counters_now=ts)
        for kind, rows in self.monitors.flush(ts).items():
            self._write(kind, rows)

    def _write(self, kind: str, rows, built: bool = False) -> None:
        """Rows go to the writer with Lua strings as bytes: the store keeps a plug-in's non-UTF-8 strings
        as BLOBs (exact bytes, docs/schema.md) and decodes the rest.  ``built``: StoreWriter.write's."""
        rows = [tuple(r.values()) for r in rows.values()] if hasattr(rows, "values") else rows
        if rows:
            self.store.write(kind, rows, built)
            if kind in DECLARED:       # upserts by GUID: count the distinct groups the database holds
                seen = self.declared.setdefault(kind, set())
                seen.update(DECLARED[kind](r) for r in rows)
                self.rows_written[kind] = len(seen)
            elif kind == "key_info":   # upserts per (group, key): a label per key, not one per call
                self.info_keys.update(_info_key(r) for r in rows)
                self.rows_written[kind] = len(self.info_keys)
            elif kind == "flow_toppers":   # a bucket ranked again rewrites its rows (keyed by rank): not new rows
                self.rows_written[kind] = self.flowmon.stats["toppers_written"]
            else:
                self.rows_written[kind] = self.rows_written.get(kind, 0) + len(rows)

    # ----------------------------------------------------------------- run
    def run(self) -> dict:
        """Process every input file; returns the summary (also stored in the run table)."""
        cfg = self.cfg
        t0 = time.monotonic()
        shard = cfg.shard
        rt = ring_seg = capture = self.store = None
        # any source: first signal = graceful stop, second = hard (a shard: shard_main's handlers, shards.py);
        # taken before anything that owns a process or a segment is made, all of which the finally below
        # undoes: a stop signal during start-up left the doorbell segment behind (CI, test_stop_startup)
        old_handlers = {} if shard else self._catch_stop_signals()
        mine = {s: signal.getsignal(s) for s in old_handlers}
        finished = False
        store_died = None
        if not shard and getattr(self, "_signal_watch", None) is None and cfg.hook_budget > 0:
            self._signal_watch = _SignalWatch(self, signals=False)   # the daemon's child: a plug-in's top level
            self._signal_watch.start()                                # stuck in a compiled loop ends it (exit 4)
        try:
            self._preflight()
            try:
                os.makedirs(cfg.out_dir, exist_ok=True)
            except OSError as e:             # checked before (usage.check_out_dir), but the disk may change
                raise UsageError(f"--out {cfg.out_dir}: cannot create it: {e.strerror}") from None
            acfg = dataclasses.replace(cfg.async_config, env=tenv.prepare(cfg),   # T.env for VMs and workers
                                       memory_mb=cfg.plugin_memory_mb)            # worker VMs: the same limit
            self.store = StoreWriter(os.path.join(cfg.out_dir, "luaprobe.sqlite"), flow_ids=(
                (shard["flow_id_base"], shard["count"], shard["index"]) if shard else None),
                lock_fd=cfg.out_lock_fd)      # out_dir stays claimed while the writer lives, even past our death
            rt = AsyncRuntime(acfg, lua_path=search_path(cfg.plugins + ([cfg.lua_input] if cfg.lua_input else []),
                                                         cfg.lua_path), bell_name=shard and shard["bell"])
            if mentions_async(discover(cfg.plugins, cfg.lua_path) + ([cfg.lua_input] if cfg.lua_input else [])):
                rt.prestart_worker()           # warm before the first task (workers/spare.py, issue 11)
            lua = new_runtime()
            _crash_cleans_shm()                # a plug-in's fault unlinks this process's segments as it dies
            files = not (cfg.interface or shard or cfg.lua_input)
            if shard:                          # the ring and its producer belong to engine/fastpath/shards.py
                ring_seg = segment.attach(shard["ring"], populate=True)
            else:                              # files: populated once the capture process starts up (below)
                ring_seg = segment.create("pkt", region_size(cfg.packet_ring_size, hints=True), populate=not files)
                lua.eval("function(a, c) require('luaprobe.shm.ring').format(a, c, true) end")(
                    ring_seg.address, cfg.packet_ring_size)
            if files:
                # files: the capture process starts up (Python, its imports, its LuaJIT VM: ~0.1 s) while this
                # process populates the ring, imports numpy (the flow export's flowrows), makes the driver and loads
                # the plug-ins; what it reads meanwhile waits in the ring (backpressure: it stops when it is full)
                capture = self._start_capture(ring_seg, rt)
                ring_seg.populate()
                from luaprobe.engine.fastpath import flowrows  # noqa: F401
            fp = lua.eval("require('luaprobe.engine.fastpath.driver')")
            self.pages = hugepages.decide(cfg.huge_pages)
            self.driver = fp.new(lua.table_from({b"ring": ring_seg.address, b"bell": rt.bell.address,
                                                 b"batch": cfg.batch, b"tick_first": True,
                                                 b"capacity": cfg.flow_capacity,
                                                 b"huge_pages": self.pages["huge_pages"],
                                                 b"prefault_ahead": cfg.prefault_ahead,
                                                 b"idle_timeout": cfg.idle_timeout,
                                                 b"active_timeout": cfg.active_timeout,
                                                 b"frag_timeout": float(cfg.frag_timeout),
                                                 b"frag_max_bytes": int(cfg.frag_max_mb * 1048576),
                                                 b"warn": lambda msg: logs.log.warning("%s", _text(msg))}))
            fill, ready = method(lua, "fill"), method(lua, "ready")
            self._driver_stats = method(lua, "stats")
            self._ring_fill = lua.eval("function(d) return d.ring:fill_records(), d.ring:fill_bytes(), d.ring.cap end")
            self.driver_expire = method(lua, "expire")
            self.exp_addr = int(self.driver.exp_addr)
            self.driver_tag = method(lua, "tag")
            self.driver_lua = lua
            if not files:                      # live / shard: hooks ready before the first packet arrives
                self._load_plugins(rt)
                self._wait_workers(rt)
                capture = _Coordinator(shard["coordinator"]) if shard else \
                    self._step_input(ring_seg.address) if cfg.lua_input else self._start_capture(ring_seg, rt)
            else:                              # files: the capture process started above (backpressure)
                self._load_plugins(rt)
                self._wait_workers(rt)
            self.loading = False
            if cfg.on_loaded is not None:
                problems = list(self.plugin_problems)
                unsupported = [p for p in problems if "not supported" in p]
                if unsupported and not self.instances:     # what run_exit_code says at the end (exit 4): the
                    problems.append(NOTHING_RUNS.format(n=len(unsupported), where="listed by luaprobe check"))   # daemon's start refuses it now
                cfg.on_loaded(problems)
            self._write("counter_groups", group_rows(self.infos))
            self._write("key_info", keyinfo_rows(self.infos))
            self._write("decl_groups", decl_rows(self.infos))
            self._start_analysers()
            batch_addr = int(self.driver.batch_addr)
            # protocol_handler instances first: they add their layers to the batch the others then read
            walkers = sorted((i for i in self.instances if i.run_batch is not None),
                             key=lambda i: i.kind != "protocol_handler")
            runners = [i.run_batch for i in walkers]
            hosts = [i.vm.host for i in walkers]
            for i in self.instances:            # frontend VMs without a packet walk: engine:add_flow_counter's
                if i.pipeline == "frontend" and i.run_batch is None:   # counters (engine.lua flow_counter_batch),
                    runners.append(self._flow_counter_runner(i))       # called once the VM has any
                    hosts.append(i.vm.host)
            if self.pstore is not None:         # after every packet_storage vote: write what they let through
                runners.append(self.pstore_lua.eval("function(s, a, n) return s:write_batch(a, n) end"))
                hosts.append(self.pstore)
            if self.analysers is not None:          # first: monitors see this batch's items in the same tick
                runners.insert(0, lambda _h, a, k, f=self.analysers.run_batch: f(a, k))
                hosts.insert(0, None)
            driver = self.driver
            # files and --generate (sharded too): packets still in the ring at a stop are not walked
            # (not_walked_at_stop); live runs walk what was captured before the stop (docs/live.md, operations.md), and
            # a --lua-input what its step gave (at most one round of step calls)
            skip = None if cfg.interface or cfg.lua_input else method(lua, "skip")
            rt.abort = lambda: self._stop == 3
            rt.beat = self._beat
            self._beat(force=True)
            stage = self.stage if self.stage.active else None
            new_flows = method(lua, "new_flows") if self.flowmon.wants_new else None
            if shard:                           # packets released, for the coordinator if this process dies
                from luaprobe.engine.fastpath.shards import PROGRESS_OFFSET
                lua.eval("function(d, a) d.progress_p = require('ffi').cast('uint64_t *', a) end")(
                    driver, rt.bell.address + PROGRESS_OFFSET)
            self._pin(capture)
            loop_open = False                   # batches walked since loop_end was last read
            steps = capture if isinstance(capture, StepInput) else None
            monotonic, service = time.monotonic, rt.service
            while True:
                if self._stop == 1:
                    self._stop_capture(capture)
                elif self._stop == 3:               # a second signal seen inside a Lua callback
                    raise KeyboardInterrupt
                if self._stop and skip is not None:  # a stop ends the walk: the rest of the ring is counted
                    if skip(driver):
                        self._maybe_stats(rt, capture)
                        continue
                    n = 0
                else:
                    if self.loop_start is None:     # the first batch's fill is in the loop (it holds most of
                        before = time.monotonic(), time.thread_time(), _thread_rusage()   # LuaJIT's first traces)
                    n, sec = fill(driver)
                if n:
                    if self.loop_start is None:
                        self.loop_start, self.loop_cpu_start, self.loop_ru_start = before
                        self._set_origin(lua)
                    sec = int(sec)
                    if self.sec is None or sec > self.sec:
                        self._tick(sec)
                    elif sec < self.sec:        # late (reordered / merged input): time never goes backwards
                        self.late_packets += n
                    if stage is not None:
                        stage.batch(batch_addr, n)
                    for run_batch, host in zip(runners, hosts):
                        run_batch(host, batch_addr, n)
                    if new_flows is not None:
                        self.flowmon.new_flows(self._new_flows(new_flows(driver, n)), sec)
                    if self._posted:            # post_message_*: delivered between batches
                        self._deliver_messages()
                    loop_open = True            # its end is read once the ring has no batch (loop_end below)
                    service()
                    if monotonic() >= self._stats_due:   # heartbeat / store check / progress / stats: due times
                        self._maybe_stats(rt, capture)   # only (a call per batch was ~1 us of ~1 020 packets)
                    if self._reload or self._retiring:
                        self._reload_step(rt)
                    self.loop_batches += 1
                    if self.loop_batches == WARMUP_BATCHES:     # the first batches' share of the loop (summary)
                        self.warmup = time.monotonic(), time.thread_time(), int(driver.packets)
                    continue
                if loop_open:                   # after the last batch of a run of batches: two clock reads (~2 us,
                    loop_open = False           # not vDSO here) once, not per batch (issue 10)
                    self.loop_end, self.loop_cpu_end = time.monotonic(), time.thread_time()
                    self.loop_ru_end = _thread_rusage()
                kind = driver.ctl_kind
                if kind is None and steps is not None:     # --lua-input: the script's step is the input
                    self._step_tick_pending()              # the last round's frames are walked: its clock's tick
                    if not steps.more:
                        break
                    self._step_round(steps, rt)
                    continue
                if kind is None:
                    rt.service()
                    if self._reload or self._retiring:
                        self._reload_step(rt)
                    if cfg.interface:
                        self._live_idle(capture)
                    if self._stop == 2 and time.monotonic() > self._stop_deadline and capture.poll() is None:
                        capture.kill()                   # reported as "ended unexpectedly"
                        self._capture_killed_at_stop = True
                    self._maybe_stats(rt, capture)
                    if self.store is not None and time.monotonic() - self._shipped_at >= IDLE_SHIP_SECS:
                        self._shipped_at = time.monotonic()      # the ring is empty: rows queued for the store
                        self.store.ship()                        # go now, not when a batch fills
                    if capture.poll() is not None and not ready(driver):
                        if getattr(self, "_capture_killed_at_stop", False):
                            self.input_errors.append(f"capture process ended unexpectedly (status {capture.returncode})")
                        elif cut := shrunk_file(getattr(self, "_input_sizes", {}), capture.returncode):
                            self.input_errors.append(cut)
                        else:                            # killed or crashed: every packet it put in the ring is walked
                            self.capture_death = {"pid": capture.pid, "status": capture.returncode,
                                                  "how": describe_exit(capture.returncode),
                                                  "packets": int(self.driver.packets)}
                        break
                    rt.wait(0.05, extra_ready=lambda: ready(driver))
                    continue
                raw = driver.ctl_text
                txt = _text(raw)
                if kind == EOF:                    # a file name: any bytes (shown escaped: logs.path_text)
                    self.files_done.append(logs.path_text(raw))
                    self._jit_mark(lua)
                elif kind == ERROR:
                    off, msg, path = txt.split("\t", 2)
                    path = logs.path_text(raw.split(b"\t", 2)[2])
                    where = f"byte offset {off}: " if off else ""
                    self.input_errors.append(f"{path}: {where}{msg}")   # printed once, by whoever reports the
                    logs.log.debug("input error: %s: %s%s", path, where, msg)   # summary (CLI, daemon child)
                elif kind == STATS:
                    self.capture_stats = [int(x) for x in txt.split("\t")]
                elif kind == TIME:             # second txt opens: before its first packet (the driver's tick_first),
                    # or, sharded input, another shard's packet opened it
                    sec, _, usec = txt.partition(" ")   # "sec usec": the packet that opened it
                    sec = int(sec)
                    if self.sec is None or sec > self.sec:
                        self._tick(sec, int(usec or 0))
                elif kind == END:
                    break
            capture.wait(timeout=30)
            self._finish(rt, lua)
            finished = True
        except StoreDied as e:                 # nothing more can be written, but the run's counters still reach
            store_died = e                     # --json / --stats-json (the summary below, on the exception)
            self._counts_at_death()
            self.store.close(check=False)
        except BaseException:
            if self.store is not None:
                self.store.close(check=False)      # the writer process and its pipes, not left to GC
            raise
        finally:
            cpus.unpin_thread()
            if getattr(self, "_signal_watch", None) is not None:
                self._signal_watch.stop()
            for signum in old_handlers:     # the clean-up below is not cut short by a late stop signal
                signal.signal(signum, signal.SIG_IGN)
            if capture is not None and capture.poll() is None:
                capture.kill()
                capture.wait()
            close_fds(cfg)
            if rt is not None:
                rt.close()                  # workers stopped, shared memory unlinked
            # the run's own handlers stay until the last rows are committed (below): a stop signal while the
            # writer commits them is not a start-up stop (early_stop: "before any packet was processed")
            for signum, handler in (mine if finished else old_handlers).items():
                signal.signal(signum, handler)
            if getattr(self, "filex_dir", None) and not self.cfg.filex_dir:
                shutil.rmtree(self.filex_dir, ignore_errors=True)
                segment.disown(self.filex_dir)
            elif getattr(self, "filex_dir", None) and self.cfg.shard:
                try:                       # this shard's filex_dir/shard-K, when empty: the named directory is
                    os.rmdir(self.filex_dir)   # left as a single fast path leaves it
                except OSError:
                    pass
            if ring_seg is not None:
                ring_seg.close()
        if store_died is not None:
            store_died.summary = self._summary(rt, time.monotonic() - t0)
            store_died.summary["store_death"] = {"pid": store_died.pid, "rows_lost": store_died.rows_lost,
                                                 "error": str(store_died)}
            raise store_died
        try:
            summary = self._summary(rt, time.monotonic() - t0)
            if not shard:                  # a sharded run's table holds the merged summary (engine/fastpath/shards.py)
                self.store.write("run", [(k, json.dumps(v, default=str)) for k, v in summary.items()])
            try:
                report = self.store.close()    # a stop signal now: the writer is resumed (SIGCONT) and finishes
            except StoreError as e:        # e.g. the disk filled with the last rows (flows, counters) of the run
                lost = self.store.rows_lost()
                died = StoreDied(f"the SQLite store writer (pid {self.store.pid}) failed at the end of the run: "
                                 f"{e}; {lost} rows handed to it are not in the database", lost, self.store.pid)
                died.summary = {**summary, "store_death": {"pid": died.pid, "rows_lost": lost, "error": str(died)}}
                raise died from e
        finally:
            for signum, handler in old_handlers.items():
                signal.signal(signum, handler)
        summary["store"] = {"path": os.path.join(cfg.out_dir, "luaprobe.sqlite"), **(report or {})}
        summary["closed_s"] = round(time.monotonic() - t0, 3)   # elapsed_s + the writer's last rows and close
        return summary

    def _step_input(self, ring_addr: int) -> StepInput:
        """--lua-input: the StepInput over the instance of that file's inputfilter (PluginError naming the file when
        it did not load, or its onload failed or returned false: nothing can feed the run)."""
        path = os.path.abspath(self.cfg.lua_input)
        for inst in self.instances:
            if inst.kind == "inputfilter" and self._is_lua_input(inst.vm.path):
                return StepInput(inst, int(time.time()), ring_addr)
        why = [p for p in self.plugin_problems if p.startswith(path) or p.startswith(self.cfg.lua_input)]
        raise PluginError(f"{why[0]}; --lua-input cannot run" if why else
                          f"{self.cfg.lua_input}: --lua-input: its onload returned false; nothing feeds the run")

    def _step_tick_pending(self) -> None:
        """The tick of the clock second a round of step calls reached, held while that round's frames were walked."""
        sec, self._step_sec = getattr(self, "_step_sec", None), None
        if sec is not None and (self.sec is None or sec > self.sec):
            self._tick(sec)

    def _step_round(self, steps: StepInput, rt) -> None:
        """One round of --lua-input step calls, then what a batch is followed by: the tick of a second its clock
        reached, messages, T.async results, stats."""
        if self.loop_start is None:
            self.loop_start, self.loop_cpu_start, self.loop_ru_start = \
                time.monotonic(), time.thread_time(), _thread_rusage()
        frames = int(steps.inst.vm.host.step_frames)
        sec = steps.step()
        if self._stop and steps.ended == "end of input":    # a stop signal interrupted a step's wait (EINTR)
            steps.ended = "stopped"
        if sec is not None and (self.sec is None or sec > self.sec):
            if int(steps.inst.vm.host.step_frames) != frames:   # the round's frames are walked first, in their own
                self._step_sec = sec                            # times (a frame of the second the records moved
            else:                                               # away from is not late): ticked once they are
                self._tick(sec)
        if self._posted:
            self._deliver_messages()
        rt.service()
        if time.monotonic() >= self._stats_due:
            self._maybe_stats(rt, steps)
        if self._reload or self._retiring:
            self._reload_step(rt)
        if steps.problem is not None and steps.problem not in self.plugin_problems:
            self.plugin_problems.append(steps.problem)
        if steps.disable_line is not None:     # its memory limit: kept with headroom, its outputs still written
            self._disable(steps.inst, steps.disable_line)
        self.step_input = steps
        self.loop_end, self.loop_cpu_end, self.loop_ru_end = time.monotonic(), time.thread_time(), _thread_rusage()

    def _pin(self, capture) -> None:
        """``pin_cpus`` (shm/cpus.py): the capture process and this thread (driver and plug-in VMs) on two
        CPUs of their own, just before the packet loop (children started before it keep every CPU; workers
        restarted later get theirs back in workers/pool.py).  Sharded runs are left to the scheduler (N fast
        paths and their captures); a CPU set too small or a refusal pins nothing, and never fails the run."""
        self.pinned = None
        if self.cfg.shard or not isinstance(capture, subprocess.Popen):
            return
        where, warning = cpus.plan(cpus.parse(self.cfg.pin_cpus), cpus.usable(), cpus.current_cpu())
        if warning:
            logs.log.warning("%s", warning)
        if where is None:
            return
        c, f = where
        if cpus.pin_thread(f):
            cpus.pin_process(capture.pid, c)
            self.pinned = {"capture": c, "fastpath": f}

    def _start_capture(self, ring_seg, rt) -> subprocess.Popen:
        """The capture process filling our packet ring (SIGINT, SIGTERM, SIGHUP blocked until its handlers are set)."""
        cfg = self.cfg
        self._input_sizes = {} if cfg.interface or cfg.generate else file_sizes(cfg.files)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)   # process.py unblocks them once
        fds = self.cfg.capture_fds or []                                        # its stop handler is in place
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "luaprobe.engine.capture.process", "--ring", ring_seg.name, "--bell", rt.bell.name,
                 "--ppid", str(os.getpid()), *self._capture_args()], pass_fds=fds[:1],
                stdin=None if "-" in (self.cfg.files or ()) else subprocess.DEVNULL)   # --pcap -: our stdin
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            close_fds(self.cfg)

    # ----------------------------------------------------------------- live capture (docs/live.md)
    def _capture_args(self) -> list:
        """Input arguments of the capture process: the files, or --interface IF [--bpf EXPR]."""
        cfg = self.cfg
        if cfg.generate:
            return ["--generate", cfg.generate]
        if not cfg.interface:
            return file_args(cfg)
        return ["--interface", cfg.interface, *(["--bpf", cfg.bpf] if cfg.bpf else []), *capture_socket_args(cfg, 0)]

    def _catch_stop_signals(self) -> dict:
        """Any source: SIGINT / SIGTERM ask for a graceful stop (the capture process stops reading and pushes
        END, the packet ring drains, async tasks drain up to the drain deadline, onunload, outputs written,
        summary with ``stopped_by``); a second signal is a hard stop (KeyboardInterrupt: workers and the
        capture process killed, segments unlinked, rows already handed to the store writer committed).
        Only signals nobody else handles (default disposition) are taken: the supervised child keeps its own
        SIGTERM handler and its ignored SIGINT.  Returns the previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            store = getattr(self, "store", None)
            if store is not None:          # a writer stopped with kill -STOP must run to take the stop, like
                store.resume()             # the capture process (it commits what it has and exits on EOF)
            if self._stop:
                self._stop = 3
                raise KeyboardInterrupt
            self._stop = 1
            self.stopped_by = signal.Signals(signum).name
            if self.draining:
                self.stopped_during = "drain"
        old = {}
        for s in STOP_SIGNALS:              # SIGHUP: a hangup stops like SIGTERM (exit 129)
            if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler, early_stop):
                old[s] = signal.signal(s, handler)
        if old:
            self._signal_watch = _SignalWatch(self)
            if not self._signal_watch.start():
                self._signal_watch = None
        return old

    def request_reload_backends(self) -> None:
        """Reload backend (engine_monitor) scripts live at the next batch boundary (signal-safe)."""
        self._reload = True

    def _reload_step(self, rt) -> None:
        """Between batches and while idle: a requested reload, then the replaced backends' drain."""
        if self._reload:
            self._reload_backends(rt)
        if self._retiring:
            self._retire_step(rt)

    def _reload_backends(self, rt) -> None:
        """Trisul's live backend reload: the plug-in files are probed again first; when any of them fails to
        load (syntax error, bad definition: ``file:line: message``) the reload is refused: one ERROR log line
        per problem, a ``plugin_problems`` entry, and the running backend instances keep running unchanged.
        Otherwise every backend instance stops taking T.async tasks and leaves the packet path (no more
        hooks) but keeps receiving its results between batches while the packet loop goes on, until none is
        pending or the drain deadline passes (_retire_step: the rest are cut off, then its outputs are written
        and onunload runs); new backend instances start at once in the current window (onload, then
        onbeginflush).  Frontend instances and per-flow state are untouched."""
        self._reload = False
        try:
            infos = probe_all(self.cfg.plugins, self.cfg.lua_path, self.cfg.hook_budget, lua_input=self.cfg.lua_input,
                              lua_args=self.cfg.lua_args)
            bad = [e for i in infos for e in i.errors]
        except PluginError as e:
            bad = [str(e)]
        if bad:
            for e in bad:
                msg = f"backend reload refused, the running backend instances are kept: {e}"
                logs.log.error("%s", msg)
                self.plugin_problems.append(msg)
            return
        # every kind made again below is replaced (before: engine_monitor only, so each reload added
        # backend_instances sg_monitor / flowtracker instances and kept the old ones running: VMs, workers, fds
        # without bound); monitors (MONITOR_TYPES) are not reloaded live
        old = [i for i in self.instances if i.kind in BACKEND_KINDS]
        end = time.monotonic() + self.cfg.async_config.drain_deadline
        for inst in old:
            inst.vm.stop_accepting()
            self.instances.remove(inst)
            self.flowmon.remove_vm(inst.vm)
            self._retiring.append((inst, end))
        self.flowmon.trackers.update({i.path: i.flowtracker for i in infos if i.flowtracker})
        for info in infos:
            for kind in info.runnable_types:
                if kind in BACKEND_KINDS:
                    for k in range(self.cfg.backend_instances):
                        self._instantiate(rt, info.path, kind, "backend", str(k))
        self.backend_reloads += 1
        if self.window_start is not None:
            self._backend("onbeginflush", self.window_start)
        logs.log.info("backend scripts reloaded (%d instance(s)); %d replaced instance(s) drain their T.async tasks "
                      "for up to %g s while packets go on", sum(1 for i in self.instances if i.pipeline == "backend"),
                      len(old), self.cfg.async_config.drain_deadline)
        self._retire_step(rt)

    def _retire_step(self, rt, final: bool = False) -> None:
        """Replaced backend instances whose tasks all returned, or whose drain deadline passed, or all of them
        (``final``: after the end-of-run drain, which drained them with the others): tasks still pending are
        cut off (timeout, onerror), onunload runs, their outputs are written, the VM is closed."""
        now = time.monotonic()
        unloaded = False
        for item in list(self._retiring):
            inst, end = item
            if inst.vm.pending() and now < end and not final:
                continue
            unloaded = True
            deadline = self.cfg.async_config.drain_deadline
            inst.vm.cut_off(f"still running at the reload drain deadline ({deadline:g} s): result lost")
            inst.vm.call(None, "onunload")
            inst.vm.unloaded = True
            self._collect(None, [inst])
            rt.unload(inst.vm)
            self._retiring.remove(item)
            logs.log.info("replaced backend instance %s#%s drained and unloaded", inst.vm.path, inst.vm.instance)
        if unloaded:
            # A VM's Lua state holds Python callables that refer back to it (the lazy worker starter, the budget's
            # on_disable closure): only the cyclic collector frees it, and the fast path's generation 2 runs rarely.
            # Measured with a SIGHUP every 4 s: RSS swung 118 -> 380 MB before a collection freed the replaced VMs
            # (tests/test_reload.py counts live PluginVMs with the collector off).  Once per reload, between batches.
            gc.collect()

    def _drain_stopped(self) -> str | None:
        """The reason the end-of-input drain ends early: a stop (signal) that arrived during it, else None.
        Called at every drain step: after 1 s of waiting it says once what the run waits for (a short drain,
        the usual case, says nothing)."""
        if not self._drain_said and time.monotonic() - self._drain_t0 >= 1.0 and not self.stopped_during \
                and self._drain_pending():
            self._drain_said = True
            logs.log.info("end of input: waiting up to %g s (--drain-deadline) for %d T.async task(s); a signal "
                          "ends the wait (their results are lost), a second one stops hard",
                          self.cfg.async_config.drain_deadline, self._drain_pending())
        if self.stopped_during == "drain":
            by = f" by {self.stopped_by}" if self.stopped_by in EXIT_STOPPED else " by a signal"
            return f"the run was stopped{by} during the drain"
        return None

    def request_stop(self, end_drain: bool = False) -> None:
        """Finish early and normally, any source (safe in a signal handler; the supervised child calls it on
        SIGTERM): the capture process stops reading and pushes END, then drain, onunload, flush, unlink.
        ``end_drain`` (a shard, told by its coordinator after the whole input was read): do not wait in the
        T.async drain at the end either (results not returned are ``lost_at_stop``)."""
        if end_drain:
            self._end_drain = True
            if self.draining:
                self.stopped_during = "drain"
        if not self._stop:
            self._stop = 1
            self.stopped_by = self.stopped_by or "request"
            if self.draining:
                self.stopped_during = "drain"

    def _stop_capture(self, capture) -> None:
        """Tell the capture process to stop: live, it drains the kernel ring and pushes its last STATS and END;
        files and the generator stop reading (no EOF for a file not read to its end) and push END.  A capture
        process that has not ended 15 s later is killed."""
        self._stop = 2
        if self.cfg.shard:                 # a shard's input is stopped by engine/fastpath/shards.py: END follows
            self._stop_deadline = float("inf")
            return
        self._stop_deadline = time.monotonic() + 15
        src = f"live capture on {self.cfg.interface}" if self.cfg.interface else \
            "the generator" if self.cfg.generate else "the --lua-input's step calls" if self.cfg.lua_input else \
            "reading the capture files"
        logs.log.info("stop requested (%s): stopping %s, then draining", self.stopped_by, src)
        if capture.poll() is None:
            capture.send_signal(signal.SIGTERM)
            capture.send_signal(signal.SIGCONT)     # a stopped capture (kill -STOP) must run to take the stop

    def _live_idle(self, capture) -> None:
        """Live, packet ring empty: wall-clock ticks keep metronome, buckets and flow expiry going.
        Second s is ticked once the clock is 0.25 s into it, so packets of earlier seconds are already in."""
        s = int(time.time() - 0.25)
        if self.sec is None or s > self.sec:
            self._tick(s)

    def _jit_mark(self, lua) -> None:
        """End of an input file: the trace-abort counters (LUAPROBE_JIT_ABORTS, engine/lua/jitprof.lua) of
        the driver, of every plug-in VM and of the packet store's VM start a new phase, so warm-up and steady
        state count apart."""
        if os.environ.get("LUAPROBE_JIT_ABORTS"):
            for vm_lua in [lua] + [i.vm.lua for i in self.instances] + ([self.pstore_lua] if self.pstore_lua else []):
                vm_lua.execute("require('luaprobe.engine.plugins.jitprof').mark()")

    def _max_memory(self) -> int | None:
        """Bytes of Lua memory a plug-in VM may use (--plugin-memory-mb), None = no limit."""
        return self.cfg.plugin_memory_mb * 1048576 if self.cfg.plugin_memory_mb else None

    def _headroom(self, inst) -> None:
        """Raise `inst`'s memory limit by 256 MiB over --plugin-memory-mb: the room a VM over its limit gets to
        report it, disarm its budget and still write its counters and outputs."""
        if self._max_memory() is not None:          # no limit (--plugin-memory-mb 0): nothing to raise
            inst.vm.set_memory_limit(self._max_memory() + (256 << 20))

    def _budgeted(self, inst, method: str):
        """``run(host, addr, n)``: the instance's per-batch walk, Host method `method` (engine/plugins/host.lua), in
        one lupa call per batch.  With a hook budget or a memory limit that call is ``Host:walk_budgeted``: the
        budget (engine/plugins/watchdog.lua) armed and disarmed around the walk, and a walk that hit the memory
        limit (LUA_ERRMEM caught in a hook, or raised in the walker) or whose hook was cut by the budget on
        BUDGET_STRIKES calls in a row disables the instance (its later batches are skipped, counted in its summary's
        `batches_skipped`; the line is built in host.lua `memory_hit` / `budget_strike`)."""
        lua = inst.vm.lua
        if not inst.budgeted and not self.cfg.plugin_memory_mb:
            return lua.eval(f"function(h, a, n) return h:{method}(a, n) end")
        batch = lua.eval(f"function(h, a, n) return h:walk_budgeted(h.{method}, a, n) end")
        after = lua.eval("function(h, e) return h:after_walk(e) end")
        from lupa.luajit21 import LuaError, LuaMemoryError

        def run(host, addr, n):
            if inst.disabled is not None:
                inst.batches_skipped += 1
                return 0
            try:
                res, exceeded = batch(host, addr, n)
            except LuaMemoryError:          # raised in luaprobe's code of the walk, outside a hook's xpcall
                self._headroom(inst)
                res, exceeded = 0, after(host, "not enough memory")
            except LuaError:                # the walker's own error: the budget is disarmed, the error goes on
                after(host, None)
                raise
            if exceeded is not None:
                self._disable(inst, _text(exceeded))
            return res
        return run

    def _disable(self, inst, why: str) -> None:
        """Stop calling `inst` (over its memory limit, or BUDGET_STRIKES hook calls in a row cut by the hook budget:
        engine/plugins/host.lua `budget_strike`, in a batch walk (`_budgeted`) or in a single hook call: Host:call
        calls this through its `on_disable` as the cut call returns): one ERROR line, a plug-in problem (exit 4),
        its VM kept with headroom so that its counters and outputs are still written."""
        if inst.disabled is not None:
            return
        inst.disabled = why
        self._headroom(inst)
        inst.vm.lua.execute("collectgarbage()")
        logs.log.error("%s", why)
        self.plugin_problems.append(why)

    def _packet_store(self):
        """The run's packet store (engine/plugins/packetstore.lua), created with the first packet_storage
        instance: its own LuaJIT VM, writing <out>/packets.pcapng; votes shared by address with the voters."""
        if self.pstore is None:
            self.pstore_lua = new_runtime()
            mod = self.pstore_lua.eval("require('luaprobe.engine.plugins.packetstore')")
            name = f"packets.shard-{self.shard_index}.pcapng" if self.cfg.shard else "packets.pcapng"
            self.pstore = mod.new_store(os.fsencode(os.path.join(self.cfg.out_dir, name)),
                                        self.cfg.flow_capacity)
        return self.pstore

    def _filex_dir(self, rt) -> str:
        """The extraction directory (created 0700 on first use; removed at the end of the run).  With file roots
        it joins them (docs/async.md), in the running AsyncRuntime ``rt``'s own list, the one its workers get as
        ``--file-root`` (AsyncConfig.validate gave the runtime a copy of ``cfg.async_config``'s)."""
        if getattr(self, "filex_dir", None) is None:
            d = self.cfg.filex_dir or os.path.join(segment.SHM_DIR, segment.make_name("files"))
            if self.cfg.filex_dir and self.cfg.shard:       # shards: one subdirectory each
                d = os.path.join(d, f"shard-{self.shard_index}")
            os.makedirs(d, mode=0o700, exist_ok=bool(self.cfg.filex_dir))
            if not self.cfg.filex_dir:
                segment.own(d, "d")                       # ours (a crash removes it: _crash_cleans_shm)
            self.filex_dir = d
            roots = rt.config.file_roots
            if roots and os.path.abspath(d) not in roots:
                roots.append(os.path.abspath(d))          # plug-ins copy extracted files out of it
        return self.filex_dir

    def _finish(self, rt, lua) -> None:
        """End of input: close the reassembled flows, the window and the HTTP flows, deliver async results,
        flush, onunload.  With sg_monitor / flowtracker the open flows end before the last window closes."""
        self.stage_stats = self.stage.finish(self.sec, self.sec_usec) if self.stage is not None else {}
        self._poll_alerts(self.sec)            # the inputfilters' last alerts
        self._beat()                           # between the steps of the end too: a stop is stalled only when one
        flows_done = False                     # step makes no progress for [supervise] stall_timeout
        if self.flowmon is not None and self.flowmon.active:
            # the flow backends' tags and records; counters only of buckets no pending T.async result may write in
            # (Engine:take_counters' hold, as at every tick): a bucket of a VM is written once, after its results
            # (before, all of them here, then again with the drain's results: RUNNING_COUNTER parts added twice)
            self._collect(self.sec if self.sec is not None else 0)
            self._end_flows(lua)
            flows_done = True
        if self.analysers is not None:
            # open HTTP/TLS flows end here, at the last tick's time (every shard's alike): their items join the last
            # window
            self.analysers.finish(*((self.sec, self.sec_usec) if self.sec is not None else (0, 0)))
        self.filex_stats = []
        for inst in self.instances:           # the files still open end in the last window, before its onendflush
            if inst.kind == "filex_monitor":
                st = inst.vm.lua.eval("function(h) return h:filex_finish() end")(inst.vm.host)
                shared = {k: v for k, v in self.stage_stats.items() if k.startswith("tcp_") or k == "flows_not_http"}
                self.filex_stats.append({"plugin": inst.vm.path, **{_text(k): v for k, v in st.items()}, **shared})
        if self.window_start is not None:
            # all packets are in: the last window's counter buckets close now, their cg_monitor hooks before its
            # onendflush as every window's (_monitor_flush; buckets a pending T.async result may write in stay open
            # for the drain: Engine:take_counters' hold)
            end = self.window_start + self.cfg.window
            self._backend("onendflush", end)
        self._beat()
        if self.pstore is not None:
            st = self.pstore_lua.eval("function(s) return s:close() end")(self.pstore)
            self.packet_storage = {_text(k): int(v) for k, v in st.items()}
        self.async_before = {id(i.vm): i.vm.async_stats() for i in self.instances}
        self.draining = True                   # a first signal from here on ends the drain (what is left to stop)
        if self._end_drain and not self.stopped_during:
            self.stopped_during = "drain"
        pending = rt.pending()
        self._drain_t0, self._drain_said, self._drain_pending = time.monotonic(), False, rt.pending
        rt.drain_and_stop(stop=self._drain_stopped)
        self._retire_step(rt, final=True)      # backends replaced by a reload drained with the rest: now unloaded
        self._beat()
        if self.stopped_during == "drain" and pending:
            logs.log.info("%s (the end of input): T.async tasks not yet returned are lost (lost_at_stop); onunload "
                          "runs and everything else is written", self._drain_stopped())
        self._collect(None)
        if self.monitors.scripts:              # items produced after the last window edge (drain, last bucket)
            for kind, rows in self.monitors.flush(self.window_start + self.cfg.window
                                                  if self.window_start is not None else 0).items():
                self._write(kind, rows)
        if not flows_done:
            self._end_flows(lua)
            if mm := [i for i in self.instances if i.kind == "messagemonitor"]:
                self._collect(None, mm)        # the samples of the flows that ended now (host.lua flow_metrics)
        self._beat()
        if self.flowmon is not None and self.flowmon.active:
            self.flowmon.flush(self.window_start + self.cfg.window if self.window_start is not None else 0,
                               final=True)
        self.driver_stats = {_text(k): v for k, v in method(lua, "stats")(self.driver).items()}
        method(lua, "stop_profile")(self.driver)
        for inst in self.instances:
            inst.vm.lua.eval("function(h) h.stop_profile() end")(inst.vm.host)
        rt.unload_all()                        # before the counts: an onunload error is a hook error like any other
        # what onunload made (a last counter update, an alert, a resource) is stored too; its counter updates go
        # to a bucket after every one written (Engine:take_counters), its messages reach nobody (undelivered)
        self._collect(None, deliver=False)
        self._beat()
        self.async_final = [(i, i.vm.async_stats()) for i in self.instances]
        self.hook_stats = self._hook_counts()

    def _hook_counts(self) -> list[tuple]:
        """Per plug-in instance: (instance, hook calls {hook: n}, hook errors {hook: n}, walk mode or None)."""
        counts = []
        for i in self.instances:
            calls, errors = i.vm.lua.eval("function(h) return h:hook_stats() end")(i.vm.host)
            walk = i.vm.lua.eval("function(h) return h:walk_mode() end")(i.vm.host)
            counts.append((i, {_text(k): v for k, v in calls.items()},
                           {_text(k): v for k, v in errors.items()}, walk and _text(walk)))
        return counts

    def _counts_at_death(self) -> None:
        """The counters of a run whose store writer died or failed (StoreDied) as they stand, for its summary:
        packets, hooks and T.async (tasks still out count as ``pending``: no drain and no onunload ran, since
        nothing after the death could be written).  Best effort: a failure here leaves the figure out."""
        try:
            if getattr(self, "driver", None) is not None and not getattr(self, "driver_stats", None):
                self.driver_stats = {_text(k): v for k, v in self._driver_stats(self.driver).items()}
            if not getattr(self, "async_final", None):
                self.async_final = [(i, i.vm.async_stats()) for i in self.instances]
            if not getattr(self, "hook_stats", None):
                self.hook_stats = self._hook_counts()
        except Exception:                      # noqa: BLE001 - the summary goes out without that figure
            logs.log.debug("counts at the store writer's death", exc_info=True)

    def _new_flows(self, n: int) -> list[list]:
        """Full rows of the driver's last n exported records (new flows for sg_monitor onnewflow)."""
        if not n:
            return []
        from luaprobe.engine.fastpath import flowrows
        return flowrows.full_rows(flowrows.columns(flowrows.view(self.exp_addr, n), self.driver.exp_tags))

    def _end_flows(self, lua) -> None:
        """Every flow still in the flow table (streamed, the driver's exp_cap flows at a time), and every
        script-made record not terminated, ends now."""
        flush = method(lua, "flush_flows")
        while self._exported(flush(self.driver)):
            pass
        for inst in self.instances:
            self._flows(inst.vm.lua.eval("function(h) return h.engine:take_open_flows() end")(inst.vm.host))

    # ----------------------------------------------------------------- live statistics
    def snapshot(self, rt, capture=None) -> dict:
        """Counters at this moment: packets, ring fill, per-instance hooks and async, processes."""
        d = {_text(k): v for k, v in self._driver_stats(self.driver).items()}
        recs, nbytes, cap = self._ring_fill(self.driver)
        plugins = []
        for inst in self.instances + [i for i, _end in self._retiring]:
            calls, errors = inst.vm.lua.eval("function(h) return h:hook_stats() end")(inst.vm.host)
            plugins.append({"plugin": inst.vm.path, "type": inst.kind, "instance": inst.vm.instance,
                            "hook_calls": {_text(k): v for k, v in calls.items()},
                            "hook_errors": {_text(k): v for k, v in errors.items()},
                            "async": inst.vm.async_stats(),
                            "workers": inst.vm.pool.stats() if inst.vm.pool else []})
            if inst not in self.instances:       # replaced by a reload, draining its T.async tasks
                plugins[-1]["retiring"] = True
        procs = {"fastpath": os.getpid()}
        if capture is not None and capture.poll() is None and not self.cfg.shard and not isinstance(capture, StepInput):
            procs["capture"] = capture.pid       # (--lua-input: no capture process; step runs in this one)
        if getattr(self.store, "pid", None):
            procs["store"] = self.store.pid
        return {"time": time.time(), "packet_time": self.sec, "packets": d.get("packets", 0),
                "source_kind": "live" if self.cfg.interface else "generate" if self.cfg.generate else "files",
                "bytes": d.get("bytes", 0), "flows": d.get("flows_created", 0),
                "flows_live": d.get("flows_live", 0), "late_packets": self.late_packets,
                "rings": {"packet": {"records": int(recs), "bytes": int(nbytes), "capacity": int(cap)}},
                "drops": {"capture": (self.capture_stats or [0, 0, 0])[1],
                          "kernel": (self.capture_stats or [0, 0, 0])[2], "flow_table": d.get("flow_table_full", 0)},
                "processes": procs, "plugins": plugins,
                **({"capturing": self.capture_stats is not None} if self.cfg.interface else {})}

    def _loading(self, path: str) -> None:
        """probe_all is about to load ``path``: named by a stop or a stall while it loads."""
        self.loading_file = path
        self._beat(force=True, loading=path)

    def _beat(self, force: bool = False, loading: str | None = None) -> None:
        """Heartbeat: touch cfg.heartbeat_file at most every 0.5 s.  Called between batches, while idle and
        while draining; a hook that never returns stops it, and the supervisor restarts the fast path."""
        path = self.cfg.heartbeat_file
        if not path:
            return
        now = time.monotonic()
        if loading is not None:              # the file about to load: named by a stall while loading
            from ..daemon.control import open_private
            with open_private(path, "w") as f:
                f.write(loading)
            self._last_beat = now
        elif force or now - getattr(self, "_last_beat", -1e9) >= 0.5:
            self._last_beat = now
            try:
                os.utime(path)
            except FileNotFoundError:
                from ..daemon.control import open_private
                open_private(path, "w").close()

    def _next_due(self) -> float:
        """Monotonic s of the earliest thing _maybe_stats does next (heartbeat, store check, progress, stats
        snapshot; inf when none is on).  The batch loop calls _maybe_stats only from then on: a call that is not
        due does nothing, so the times at which each one happens are those of a call per batch.  A time moved
        elsewhere (``_beat(force=True)``) only makes the next call earlier than needed, which is harmless."""
        cfg, due = self.cfg, float("inf")
        if cfg.heartbeat_file:
            due = getattr(self, "_last_beat", -1e9) + 0.5
        if self.store is not None:
            due = min(due, self._last_store_check + 0.25)
        if cfg.progress is not None:
            due = min(due, self._last_progress + 0.25)
        if cfg.stats_file:
            due = min(due, self._last_stats + cfg.stats_interval)
        return due

    def _maybe_stats(self, rt, capture) -> None:
        """Report progress (cfg.progress, every 0.25 s) and write the snapshot to cfg.stats_file every
        cfg.stats_interval seconds (atomic rename).  Every 0.25 s it also looks at the store writer: a dead one
        (killed, disk full) ends the run at once with StoreDied (exit 1; the supervisor restarts the fast path).
        Sets ``_stats_due`` (_next_due) for the batch loop."""
        try:
            self._stats_step(rt, capture)
        finally:
            self._stats_due = self._next_due()

    def _stats_step(self, rt, capture) -> None:
        """_maybe_stats' work: each of its steps that is due now."""
        self._beat()
        now = time.monotonic()
        if self.store is not None and now - self._last_store_check >= 0.25:
            self._last_store_check = now
            why = self.store.check()
            if why:
                lost = self.store.rows_lost()
                raise StoreDied(f"the SQLite {why}; {lost} rows handed to it are not in the database and the "
                                f"run ended (database {self.store.path})", lost, self.store.pid)
        if self.cfg.progress is not None and now - self._last_progress >= 0.25:
            self._last_progress = now
            self.cfg.progress(int(self.driver.packets), int(self.driver.bytes))
        path = self.cfg.stats_file
        if not path:
            return
        if now - self._last_stats < self.cfg.stats_interval:
            return
        self._last_stats = now
        try:
            write_json(path, self.snapshot(rt, capture))
        except OSError as e:             # a full run directory: the run goes on, the next interval tries again
            if not getattr(self, "_stats_error", None):
                logs.log.error("cannot write %s: %s; the run goes on, retrying every stats interval", path,
                               e.strerror or e)
            self._stats_error = str(e)
        else:
            self._stats_error = None

    def _warmup_summary(self) -> dict:
        """The first WARMUP_BATCHES batches of the packet loop: their packets and the loop's wall / thread CPU
        seconds up to their end (from the same start as packet_loop_s / packet_loop_cpu_s), so that the rest of the
        loop per packet, without the JIT warm-up, is (packet_loop_cpu_s - cpu_s) / (packets - warmup packets)
        (tools/bench/corpus_bench.py "loop CPU after warm-up").  {} when the loop had fewer batches."""
        if self.warmup is None or self.loop_start is None:
            return {}
        t, c, p = self.warmup
        return {"batches": WARMUP_BATCHES, "packets": p, "s": round(t - self.loop_start, 4),
                "cpu_s": round(c - self.loop_cpu_start, 4)}

    def _summary(self, rt, elapsed: float) -> dict:
        d = getattr(self, "driver_stats", {})
        cs = self.capture_stats or [0, 0, 0]
        plugins = []
        for (inst, calls, errors, walk), (_, stats) in zip(getattr(self, "hook_stats", []),
                                                           getattr(self, "async_final", [])):
            plugins.append({"plugin": inst.vm.path, "type": inst.kind, "instance": inst.vm.instance,
                            "hook_calls": calls, "hook_errors": errors, "async": stats, "walk": walk,
                            "disabled": inst.disabled, "batches_skipped": inst.batches_skipped})
        driver = getattr(self, "driver", None)
        not_walked = int((driver.not_walked if driver is not None else 0) or 0)
        return logs.printable({   # file names that are not UTF-8 as \xNN (shm/logs.py)
            "elapsed_s": round(elapsed, 3),
            "not_walked_at_stop": not_walked,    # packets in the ring at a stop, passed over (Driver:skip)
            "packet_loop_s": round((self.loop_end or 0) - (self.loop_start or 0), 4),
            "packet_loop_cpu_s": round((self.loop_cpu_end or 0) - (self.loop_cpu_start or 0), 4),
            "packet_loop_rusage": _rusage_delta(self.loop_ru_start, self.loop_ru_end),   # the same interval
            "packet_loop_warmup": self._warmup_summary(),
            # times a ring release woke the capture process sleeping for space (shm/ring.lua "Refill slack")
            "packet_ring_space_wakes": d.get("ring_space_wakes", 0),
            # MiB of the capture file the capture process mapped while the ring was full (capture.lua map_ahead)
            "packet_ring_mapped_ahead_mb": round(d.get("ring_mapped_ahead", 0) / 1048576, 1),
            "cpus_pinned": getattr(self, "pinned", None),   # {"capture": C, "fastpath": F} or None (shm/cpus.py)
            "flow_table_pages": getattr(self, "pages", None),   # {"setting", "huge_pages", "reason"} (hugepages.py)
            "flow_prefault": _prefault_summary(d),   # the record-page helper's work (flowtable.lua start_prefaulter)
            "files": self.cfg.files, "files_done": self.files_done, "input_errors": self.input_errors,
            "packets": d.get("packets", 0), "bytes": d.get("bytes", 0),
            "truncated_headers": d.get("truncated", 0), "non_ip": d.get("nonip", 0),
            "unknown_linktype_packets": d.get("unknown_linktype_packets", 0),
            "unknown_linktypes": {int(k): v for k, v in (d.get("unknown_linktypes") or {}).items()},
            "ip_reassembly": {k.removeprefix("ip_frag_").removeprefix("ip_"): d.get(k, 0) for k in _IPR_KEYS},
            "flows": d.get("flows_created", 0), "flow_table_full_drops": d.get("flow_table_full", 0),
            "drops": {"capture": cs[1], "kernel": cs[2], "flow_table": d.get("flow_table_full", 0)},
            **({"interface": self.cfg.interface, "bpf": self.cfg.bpf, "captured_live": cs[0],
                "kernel_packets": cs[3] if len(cs) > 3 else 0,
                "loopback_outgoing": cs[5] if len(cs) > 5 else 0} if self.cfg.interface else {}),
            "plugin_problems": self.plugin_problems, "capture_death": getattr(self, "capture_death", None),
            "plugins": plugins, "rows_written": self.rows_written,
            "declared_groups": {k: sorted(v) for k, v in self.declared.items()},
            **({"key_info_keys": sorted(self.info_keys)} if self.cfg.shard else {}),   # merged by the coordinator
            "filex": getattr(self, "filex_stats", []),
            **({"packet_storage": self.packet_storage} if self.packet_storage else {}),
            "analysers": self.analysers.stats() if self.analysers is not None else {},
            "monitors": dict(self.monitors.stats),
            "reassembly": getattr(self, "stage_stats", {}),
            "flow_backends": self.flowmon.stats if self.flowmon is not None and self.flowmon.active else {},
            "backend_reloads": self.backend_reloads, "messages_undelivered": self.messages_undelivered,
            "stopped_by": self.stopped_by, "stopped_during": self.stopped_during,
            "late_packets": self.late_packets,
            **({"lua_input": self.step_input.summary() if getattr(self, "step_input", None) else
                {"script": self.cfg.lua_input, "step_calls": 0, "step_errors": 0, "ended": None,
                 "frames": 0, "clipped": 0}}
               if self.cfg.lua_input else {}),
        })


class _Coordinator:
    """A shard's stand-in for its capture process: the coordinator (engine/fastpath/shards.py) owns the input.
    ``poll()`` returns None while the coordinator lives (it pushes END into our ring), else 1."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None and os.getppid() != self.pid:
            self.returncode = 1
        return self.returncode

    def wait(self, timeout=None):
        return self.poll()

    def kill(self):
        pass

    def send_signal(self, sig):
        pass
