"""The luaprobe command line.

    luaprobe run PLUGIN... --pcap FILE... [--speed X] [--out DIR] [--workers N] [--lua-path DIR] [--stats-json FILE]
    luaprobe run PLUGIN... --interface IF [--bpf EXPR] [...]   live capture until Ctrl-C / SIGTERM (docs/live.md)
    luaprobe check PLUGIN...    list detected script types and problems (like Trisul's `list lua`)
    luaprobe query alerts|resources|fts|counters|flows|keyinfo|groups|decls|edges|toppers|run [--out DIR] [--json]
    luaprobe demo               run the bundled example plug-ins on the bundled sample capture
    luaprobe shm clean|list     remove / list shared-memory segments (clean: those whose owner died)

Exit codes (docs/operations.md): 0 ok, 2 usage error, 3 input error (status/stop/reload/stats: no daemon running),
4 plug-in error, 1 internal error or a hard stop (a second
SIGINT/SIGTERM), 130 / 143 / 129 a file or --generate run stopped early by SIGINT / SIGTERM / SIGHUP (graceful: everything up
to the stop was processed and written; a live run's normal end is a signal, so it exits 0).
"""
from __future__ import annotations

import argparse
import io
import os
import sys

from luaprobe.shm.exits import EXIT_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_PLUGIN, EXIT_STOPPED, EXIT_USAGE  # noqa: F401
from luaprobe.shm.exits import STOP_SIGNALS, StartupStop, decided, early_stop, install_early_stop

_pending_stop: list[int] = []      #: stop signals that came between this module's import and main() (_defer_stop)


def _defer_stop(signum, _frame):
    """The console script's SIGINT / SIGTERM handler from this module's import until main() runs: the signal is
    kept (main() reports it as one line, 130 / 143).  Raising here, as :func:`early_stop` does, would escape
    the console script's own lines around main() (``sys.argv[0] = re.sub(...)``) as a traceback, exit 1."""
    _pending_stop.append(signum)


if os.path.basename(sys.argv[0]) == "luaprobe":    # the console script: a stop signal from now on is one line
    import signal as _signal
    from luaprobe.shm.exits import STOP_SIGNALS as _STOP_SIGNALS
    for _s in _STOP_SIGNALS:
        if _signal.getsignal(_s) in (_signal.SIG_DFL, _signal.default_int_handler):
            _signal.signal(_s, _defer_stop)


def _version() -> str:
    """The installed distribution's version (pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("luaprobe")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _VersionAction(argparse.Action):
    """``--version``: argparse's "version" action, with the version looked up only when asked (importlib.metadata
    and the distribution lookup were ~15-40 ms of every command's start-up, issue 10)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "show program's version number and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(f"luaprobe {_version()}\n", sys.stdout)
        parser.exit()


def cmd_shm(args) -> int:
    """`luaprobe shm clean|list`."""
    from luaprobe.shm import segment
    if args.action == "clean":
        removed = segment.sweep()
        for name in removed:
            print(f"removed {name}")
        print(f"{len(removed)} stale segment(s) removed")
    else:
        for name in segment.list_segments():
            print(name)
    return EXIT_OK


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _async_config(args):
    from luaprobe.workers.pool import AsyncConfig
    cfg = AsyncConfig(workers=args.workers, overflow_limit=args.overflow_limit, task_timeout=args.task_timeout,
                      max_tasks=args.worker_max_tasks, max_rss_mb=args.worker_max_rss_mb, ring_size=args.ring_size,
                      drain_deadline=args.drain_deadline, worker_spin_us=args.worker_spin_us,
                      file_roots=args.file_root, backend=args.async_backend, ray_address=args.ray_address,
                      ray_actor_cpus=args.ray_actor_cpus)
    cfg.validate()
    return cfg


def _print_summary(s: dict) -> None:
    """The run summary on stdout: a rich table on a terminal, plain lines otherwise (scripts parse those).  The
    problems' lines (stderr) are _print_problems'."""
    if sys.stdout.isatty():
        try:
            return _rich_summary(s)
        except ImportError:
            pass
    _plain_summary(s)


def _rich_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    d = s["drops"]
    t = Table(title=f"luaprobe: {s['packets']:,} packets, {s['bytes']:,} bytes, {s['flows']:,} flows "
                    f"in {s['elapsed_s']} s", title_justify="left")
    for col in ("plug-in", "type#instance", "hook calls", "errors", "async sched", "ok", "nil", "error",
                "timeout", "dropped", "pending", "onresult errors"):
        t.add_column(col, justify="left" if col in ("plug-in", "type#instance") else "right")
    for name, label, calls, errs, a in plugin_rows(s):
        t.add_row(name, label, f"{calls:,}", f"{errs} ({a['cut']} cut)" if a["cut"] else str(errs),
                  *(str(a[k]) for k in ASYNC_COLUMNS + ASYNC_ERRORS))
    con = Console()
    con.print(t)
    con.print(f"drops: packet ring full {d['capture']}  kernel {d.get('kernel', 0)}  flow table {d['flow_table']}")
    for line in _traffic_lines(s):
        con.print(line)
    con.print(_written_line(s), markup=False)


def _print_problems(s: dict, me: str = "luaprobe run") -> None:
    """Plug-in problems and input errors on stderr, one line each (the only place a capture error is printed:
    ``luaprobe run: input error: FILE: byte offset N: ...``; ``me``: the command's name, ``luaprobe demo``)."""
    from luaprobe.shm.logs import one_line
    for e in s["plugin_problems"]:
        print(f"plug-in problem: {one_line(e)}", file=sys.stderr)
    for e in s["input_errors"]:
        print(f"{me}: input error: {one_line(e)}", file=sys.stderr)


ASYNC_COLUMNS = ("scheduled", "ok", "nil_result", "error", "timeout", "dropped", "pending")
ASYNC_ERRORS = ("onresult_errors",)     # errors raised by onresult (the task itself counts as ok/nil_result)

DROP_REASONS = (("dropped_overflow", "overflow queue full"), ("dropped_stopping", "engine stopping"),
                ("dropped_start", "workers' start interrupted"), ("dropped_no_workers", "no workers"))
ASYNC_DROPS = tuple(k for k, _ in DROP_REASONS)


def plugin_rows(s: dict) -> list[tuple]:
    """(file name, "type#instance" label, hook calls, hook errors, {async counter: n, "cut": n}) per row of the text
    summary; "cut": how many of the hook errors were hooks interrupted by --hook-budget or by the stop signal
    (the summary's ``hook_errors["hook_budget"]``).

    A sharded run (``shards`` in the summary) has one VM per plug-in type in every shard; its rows are merged
    per plug-in so that the operator reads totals: a frontend type once (``simplecounter, 2 shards``; its
    instance ids differ per shard), a backend instance once per instance (``engine_monitor#0, shard 0``).
    The per-shard rows stay in ``--json`` / ``--stats-json`` (``plugins``, each with its ``shard``)."""
    def totals(p):
        # hook_errors["hook_budget"] counts those of the hooks' errors that were budget interrupts: not added twice
        return sum(p["hook_calls"].values()), sum(v for k, v in p["hook_errors"].items() if k != "hook_budget"), \
            {**{k: p["async"].get(k, 0) for k in ASYNC_COLUMNS + ASYNC_ERRORS + ASYNC_DROPS},
             "cut": p["hook_errors"].get("hook_budget", 0)}
    from luaprobe.shm.logs import tag_text         # a plug-in file named "x\ny" stays on its row
    if not s.get("shards"):
        return [(tag_text(os.path.basename(p["plugin"])), f"{p['type']}#{p['instance']}", *totals(p))
                for p in s["plugins"]]
    from luaprobe.engine.plugins.discovery import BACKEND_TYPES
    merged: dict = {}
    for p in s["plugins"]:
        key = (p["plugin"], p["type"], p["instance"] if p["type"] in BACKEND_TYPES else None)
        calls, errs, a = totals(p)
        m = merged.setdefault(key, [set(), 0, 0, dict.fromkeys(a, 0)])
        m[0].add(p.get("shard"))
        m[1] += calls
        m[2] += errs
        for k in a:
            m[3][k] += a[k]
    rows = []
    for (plugin, kind, inst), (shards, calls, errs, a) in merged.items():
        where = f"shard {min(shards)}" if len(shards) == 1 else f"{len(shards)} shards"
        label = f"{kind}{'' if inst is None else '#' + inst}, {where}"
        rows.append((tag_text(os.path.basename(plugin)), label, calls, errs, a))
    return rows


def _traffic_lines(s: dict) -> list[str]:
    """Lines for what the input held that needed a policy: late packets, IP fragments, unknown link types,
    incomplete files."""
    out = []
    if s.get("late_packets"):           # e.g. --pcap files given newest first: a whole file restamped
        out.append(f"late packets {s['late_packets']:,}: older than the packet time already reached (reordered or "
                   "merged input, --pcap files not in time order): counted in the current bucket, not their own "
                   "(docs/plugins.md \"Time never goes backwards\")")
    ipr = s.get("ip_reassembly") or {}
    if ipr.get("fragments"):
        out.append("ip reassembly: " + "  ".join(f"{k} {v}" for k, v in ipr.items()))
    for lt, n in (s.get("unknown_linktypes") or {}).items():
        out.append(f"link type {lt} not decoded: {n} packets")
    incomplete: dict = {}                # per plug-in, summed over the shards of a sharded run
    for fx in s.get("filex") or []:
        inc = incomplete.setdefault(fx["plugin"], {})
        for k, v in fx.items():
            if k.startswith("incomplete_") and v:
                inc[k[len("incomplete_"):]] = inc.get(k[len("incomplete_"):], 0) + v
    for plugin, inc in incomplete.items():
        if inc:
            out.append(f"{os.path.basename(plugin)}: incomplete files "
                       + "  ".join(f"{k} {v}" for k, v in sorted(inc.items())))
    return out


def _written_line(s: dict) -> str:
    """'written: counters N, alerts N, ...  -> DB': the rows the database got, as one fast path counts them.  Sharded:
    the counters figure also says how many updates the shards wrote (``shards[k].rows_written``), which the store
    combined by meter type into those rows (one per (group, bucket, key, meter))."""
    rw = dict(s["rows_written"])
    parts = [f"{k} {v}" for k, v in rw.items()]
    shards = s.get("shards") or ()
    if len(shards) > 1 and "counters" in rw:
        updates = sum((sh.get("rows_written") or {}).get("counters", 0) for sh in shards)
        parts[list(rw).index("counters")] = (f"counters {rw['counters']} (combined from {updates} updates by "
                                             f"{len(shards)} shards)")
    return "written: " + ", ".join(parts) + f"  -> {s['store']['path']}"


def logs_path(p) -> str:
    from luaprobe.shm import logs
    return logs.one_line(logs.path_text(p) if isinstance(p, bytes) else str(p))


def _plain_summary(s: dict) -> None:
    li = s.get("lua_input")
    if li:                                   # --lua-input: the step calls; the packet lines only when it gave frames
        clipped = f" (clipped {li['clipped']:,})" if li.get("clipped") else ""
        print(f"lua-input {logs_path(li['script'])}: step calls {li['step_calls']:,} errors {li['step_errors']}  "
              f"frames {li.get('frames', 0):,}{clipped}  ended: {li['ended'] or 'not started'}  "
              f"elapsed {s['elapsed_s']} s")
    if not li or li.get("frames"):
        print(f"packets {s['packets']:,}  bytes {s['bytes']:,}  flows {s['flows']:,}  elapsed {s['elapsed_s']} s")
        d = s["drops"]
        print(f"drops: packet ring full {d['capture']}  kernel {d.get('kernel', 0)}  flow table {d['flow_table']}")
    for line in _traffic_lines(s):
        print(line)
    for name, label, calls, errs, a in plugin_rows(s):
        print(f"{name} [{label}] hook calls {calls:,} errors {errs}{_cut(a['cut'], s)}"
              + (f"  async scheduled {a['scheduled']} ok {a['ok']} nil {a['nil_result']} error {a['error']}"
                 f" timeout {a['timeout']} dropped {a['dropped']}{_drop_reasons(a)} pending {a['pending']}"
                 if a["scheduled"] else "")
              + (f" onresult_errors {a['onresult_errors']}" if a["onresult_errors"] else ""))
    print(_written_line(s))


def _cut(n: int, s: dict) -> str:
    """' (3 of them cut by the hook budget or the stop signal)' for the summary line when `n` of a plug-in's hook
    errors were hooks interrupted (docs/operations.md "Faults"), else ''.  A run not stopped early was cut by the
    budget only."""
    if not n:
        return ""
    why = "the hook budget (--hook-budget)" + (" or the stop signal" if s.get("stopped_by") else "")
    return f" ({n} of them cut by {why})"


def _drop_reasons(a: dict) -> str:
    """Why T.async tasks were dropped, for the summary line: ' (overflow queue full 3, engine stopping 1)', or ''
    when none was (engine/plugins/async.lua DROP_KEY; the counters sum to `dropped`)."""
    parts = [f"{label} {a[k]}" for k, label in DROP_REASONS if a.get(k)]
    return f" ({', '.join(parts)})" if parts else ""


class _progress_bar:
    """A rich progress bar on stderr for file runs (only when stderr is a terminal)."""

    def __new__(cls, cfg):
        if not cfg.files or not sys.stderr.isatty():
            return None
        try:
            import rich.progress  # noqa: F401
        except ImportError:
            return None
        return super().__new__(cls)

    def __init__(self, cfg):
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
        # progress in capture-file bytes: wire bytes + 16-byte record headers approximate the file offset
        self.total = sum(os.path.getsize(f) for f in cfg.files if os.path.isfile(f))
        self.p = Progress(TextColumn("[bold]luaprobe"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[pk]}"),
                          TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.task = self.p.add_task("run", total=self.total or None, pk="")
        self.p.start()

    def update(self, packets: int, nbytes: int) -> None:
        self.p.update(self.task, completed=min(self.total, nbytes + 16 * packets), pk=f"{packets:,} packets")

    def close(self) -> None:
        self.p.stop()


class _stdout_to_stderr:
    """With --json, stdout carries the JSON document only: while the run goes, file descriptor 1 (plug-in
    `print`, Lua and worker output, anything a library writes) points at stderr; it is restored after."""

    def __init__(self, active: bool):
        self.active, self.saved = active, None

    def __enter__(self):
        if self.active:
            sys.stdout.flush()
            self.saved = os.dup(1)
            os.dup2(2, 1)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            sys.stdout.flush()
            os.dup2(self.saved, 1)
            os.close(self.saved)


def _despite_reader_gone(step) -> None:
    """Run one printing step of `run`'s report.  A reader that left (`luaprobe run ... | head -1`, `| true`, a
    closed stdout or stderr) ends that step only: the stream that broke is pointed at /dev/null and the report
    goes on (the other stream's lines, --stats-json, the exit code).  Before, the BrokenPipeError of the first
    summary line ended the command with exit 0: a damaged capture's input-error line never printed, no
    --stats-json file, exit 0 instead of 3 (tests/test_report_reader_gone.py)."""
    try:
        step()
    except BrokenPipeError:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()              # the broken one raises again (its buffer still holds the line)
            except (OSError, ValueError):
                try:
                    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
                    stream.flush()          # the buffered bytes go to /dev/null
                except (OSError, ValueError):
                    pass


def cmd_run(args) -> int:
    """`luaprobe run`: plug-ins over capture files, to completion.  The ``--out`` directory is claimed (locked,
    usage.check_out_dir) for the whole run and released at the end, however the run ends."""
    args.out_claim = None
    try:
        return _run(args)
    finally:
        if args.out_claim is not None:
            args.out_claim.release()


def _run(args) -> int:
    import json
    cmd = getattr(args, "command", None) or "run"
    me = f"luaprobe {cmd}"                  # each line names the command: `luaprobe demo: ...` in a demo

    from luaprobe.shm import logs
    from luaprobe.engine.fastpath.run import RunConfig

    from .settings import from_args
    from luaprobe.engine.fastpath.shards import make_run
    from luaprobe.engine.plugins.vm import PluginError
    from luaprobe.engine.analysers import parse_names as parse_analysers
    logs.setup(verbose=args.verbose)
    if args.quiet or args.verbose:          # the same level in every process of the run (shards, workers)
        logs.set_level("WARNING" if args.quiet else "DEBUG")
    interface, bpf = getattr(args, "interface", None), getattr(args, "bpf", None)
    generate = getattr(args, "generate", None)
    lua_input, lua_args = getattr(args, "lua_input", None), getattr(args, "lua_args", None)
    if lua_args is not None and lua_input is None:
        print(f"{me}: --args needs --lua-input (they are the input script's arguments)", file=sys.stderr)
        return EXIT_USAGE
    if lua_input is not None and getattr(args, "shards", 1) > 1:
        print(f"{me}: --shards needs packet input (--pcap, --interface or --generate); a --lua-input runs in one "
              "fast path", file=sys.stderr)
        return EXIT_USAGE
    if generate is not None:
        from luaprobe.engine.gen.traffic import UsageError
        from luaprobe.engine.gen.stream import parse_spec
        try:
            parse_spec(generate)
        except UsageError as e:
            print(f"{me}: {e}", file=sys.stderr)
            return EXIT_USAGE
    from .usage import InputProblem, UsageError, check_captures, check_dir_target, check_lua_paths, \
        check_new_file, check_not_an_input_or_output, check_out_dir, check_plugins, check_private_dir, \
        replace_earlier_run
    from .settings import dirs
    if not args.plugins and not _analysers_asked(args.analysers) and lua_input is None:
        print(f"{me}: give a PLUGIN file or directory (or --analysers LIST to store only the built-in "
              "analysers' output; docs/plugins.md)", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_plugins(args.plugins + ([lua_input] if lua_input else []))
        if lua_input is not None and os.path.isdir(lua_input):
            raise UsageError(f"--lua-input {lua_input}: a directory; give the inputfilter script's file")
        check_lua_paths(args.lua_path)
        for field, flag, _toml in dirs():        # --filex-dir, T.env directories: beneath --out is fine
            if getattr(args, field):             # (the run creates --out first)
                check_dir_target(flag, getattr(args, field), creating=[args.out], write=True)
                if field == "filex_dir":
                    check_private_dir(flag, getattr(args, field), getattr(args, "user", None))
        if args.stats_json:
            check_not_an_input_or_output("--stats-json", args.stats_json, args.out, args.pcap or [], args.plugins)
            check_new_file("--stats-json", args.stats_json, creating=[args.out], rename=True)
        check_captures(args.pcap or [])
        # last: claims (creates and locks) --out, checked against an earlier run's database under the lock
        args.out_claim = check_out_dir(args.out, "append" if args.append else "overwrite" if args.overwrite else "new",
                                       private=bool(getattr(args, "user", None) or getattr(args, "group", None)))
    except (UsageError, InputProblem) as e:
        print(f"{me}: {e}", file=sys.stderr)
        return e.exit_code
    if bpf is not None and not interface:
        print(f"{me}: --bpf needs --interface (capture files are not filtered)", file=sys.stderr)
        return EXIT_USAGE
    speed = getattr(args, "speed", 0.0)
    if speed and not args.pcap:
        print(f"{me}: --speed needs --pcap (a live interface or --generate comes at its own pace)",
              file=sys.stderr)
        return EXIT_USAGE
    bpf_program = None
    if interface:
        import socket

        from luaprobe.engine.capture.process import BpfError, compile_bpf, link_type
        try:
            socket.if_nametoindex(interface)
            if bpf is not None:         # compiled once, here: the capture process takes the program (--bpf-program)
                bpf_program = compile_bpf(bpf, link_type(interface), interface)   # instead of opening a second
                #                         libpcap handle, a packet socket bound to the interface, while it starts
        except OSError:
            print(f"{me}: --interface {interface}: no such network interface", file=sys.stderr)
            return EXIT_USAGE
        except BpfError as e:
            print(f"{me}: --bpf: {e}", file=sys.stderr)
            return EXIT_USAGE
    try:
        cfg = RunConfig(plugins=args.plugins, files=args.pcap or [], out_dir=args.out, lua_path=args.lua_path,
                        async_config=_async_config(args),
                        interface=interface, bpf=bpf, bpf_program=bpf_program, generate=generate, speed=speed,
                        lua_input=lua_input, lua_args=lua_args,
                        shards=getattr(args, "shards", 1), out_lock_fd=args.out_claim.fd,
                        **from_args(args), analysers=args.analysers)
        parse_analysers(args.analysers)
        if not 1 <= cfg.shards <= 64:
            raise ValueError(f"--shards {cfg.shards}: must be between 1 and 64")
    except ValueError as e:
        print(f"{me}: {e}", file=sys.stderr)
        return EXIT_USAGE
    from .privileges import enter_run
    try:
        enter_run(cfg, stats_json=args.stats_json)         # --user: sockets opened, then root dropped
    except (UsageError, InputProblem) as e:
        print(f"{me}: {e}", file=sys.stderr)
        return e.exit_code
    from luaprobe.engine.fastpath.run import preflight
    from luaprobe.engine.store.writer import StoreError
    bar = None
    try:
        preflight(cfg)                                     # here, not in each shard (which would crash-loop)
        if args.overwrite:                                 # only now: a run refused above keeps the earlier results
            replace_earlier_run(args.out)
        bar = None if args.quiet or args.json else _progress_bar(cfg)
        if bar is not None:
            cfg.progress = bar.update
        with _stdout_to_stderr(args.json):
            summary = make_run(cfg).run()
    except PluginError as e:
        print(f"{me}: plug-in error: {e}", file=sys.stderr)
        return EXIT_PLUGIN
    except UsageError as e:
        print(f"{me}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as e:                            # died, or failed: disk full, read-only, I/O (names the file)
        print(f"{me}: exit 1: {e}", file=sys.stderr)
        summary = getattr(e, "summary", None)          # StoreDied: the counters up to the death (not in the database)
        if summary is not None:
            summary["exit"] = {"code": EXIT_INTERNAL, "reasons": [str(e)]}
            if args.json:
                print(json.dumps(summary, indent=2, default=str))
            if args.stats_json:
                try:
                    from .usage import write_file_atomic
                    write_file_atomic(args.stats_json, json.dumps(summary, indent=2, default=str).encode())
                except OSError as oe:                  # e.g. the same full disk: the line above already says why
                    print(f"{me}: --stats-json {args.stats_json}: {oe.strerror}", file=sys.stderr)
        return EXIT_INTERNAL
    except StartupStop as e:
        return _startup_stop([cmd], e)
    except KeyboardInterrupt:
        print(f"{me}: stopped hard by a second signal (workers and capture killed; rows already handed "
              "to the store writer are committed, the rest is lost)", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as e:  # noqa: BLE001 - a user sees one line, the log has the traceback
        logs.log.debug("internal error", exc_info=True)
        from luaprobe.engine.plugins.errors import text
        print(f"{me}: internal error: {type(e).__name__}: {text(e)}", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if bar is not None:
            bar.close()
    code, reasons = run_exit_code(summary)
    summary["exit"] = {"code": code, "reasons": reasons}

    def on_stdout():
        if args.json:
            print(json.dumps(summary, indent=2, default=str))
        elif not args.quiet:
            _print_summary(summary)
        sys.stdout.flush()

    def on_stderr():
        if args.json:
            for e in summary["input_errors"]:      # stdout stays pure JSON; the one line goes to stderr as ever
                print(f"{me}: input error: {e}", file=sys.stderr)
            if summary.get("capture_death"):
                print(f"{me}: exit {code}: {reasons[0]}", file=sys.stderr)
        else:
            _print_problems(summary, me)

    def closing_lines():
        from luaprobe.shm.logs import one_line     # a plug-in file named "x\ny" stays on its line
        for r in reasons:                  # plug-in problems and input errors were printed above
            if r.startswith("stopped early"):
                print(f"{me}: {one_line(r)}", file=sys.stderr)
            elif not r.startswith(("plug-in problem:", "input error")) and not args.json:
                print(f"{me}: exit {code}: {one_line(r)}", file=sys.stderr)

    _despite_reader_gone(on_stdout)
    _despite_reader_gone(on_stderr)
    if args.stats_json:
        try:
            from .usage import write_file_atomic      # never a truncated file (a full disk: the old one stays)
            write_file_atomic(args.stats_json, json.dumps(summary, indent=2, default=str).encode())
        except OSError as e:
            _despite_reader_gone(lambda: print(f"{me}: --stats-json {args.stats_json}: {e.strerror}",
                                               file=sys.stderr))
            return code or EXIT_INTERNAL
    _despite_reader_gone(closing_lines)
    return code


def shard_loss_line(summary: dict) -> str:
    """The one line that states what dead shard processes cost (docs/scale.md "Faults"): who died, that the rows a
    dead one had sent to its store writer are in the database though not in "written", and for files and
    --generate the capture side's count split exactly into packets walked by the shard processes that finished,
    packets passed over at a stop (``not_walked_at_stop``, named when non-zero) and packets lost with the dead ones
    (``packets_read`` == ``packets`` + ``not_walked_at_stop`` + ``packets_lost``)."""
    deaths = summary["shard_deaths"]
    who = "; ".join(f"shard {d['shard']} (pid {d['pid']}) died (status {d['status']}) after {d['packets']} packets"
                    + (f" (its SQLite store writer died: {d['store_rows_lost']} rows handed to it are not in the "
                       "database)" if d.get("error") else "") for d in deaths)
    one = len(deaths) == 1
    # a dead shard's store writer is a process of its own: it commits the rows it was sent when its pipe ends
    # (docs/operations.md "Exit codes", 139), which the finished shards' "written" counts do not include
    what = ("rows sent to the store writer are committed (not counted in \"written\"); results not yet sent (open "
            "counter buckets, live flows, in-flight T.async tasks) are lost")
    if "packets_read" in summary:
        skipped = summary.get("not_walked_at_stop") or 0
        passed = f", {skipped} were not walked at the stop" if skipped else ""
        return (f"{who} and {'was' if one else 'were'} restarted: of {summary['packets_read']} packets read, "
                f"{summary['packets']} were walked by the shard processes that finished{passed} and "
                f"{summary['packets_lost']} by the dead {'one' if one else 'ones'}: {'its' if one else 'their'} "
                f"{what}")
    return f"{who} and {'was' if one else 'were'} restarted: {'its' if one else 'their'} {what}"


def run_exit_code(summary: dict, stop_is_early: bool = True) -> tuple[int, list[str]]:
    """The exit code a finished run owes its caller, and why (docs/operations.md "Exit codes").

    1 when a shard process of a sharded run died (``shard_deaths``: it was restarted, and what it had not
    yet written is lost); else 3 when a capture file had an error; else 4 when any plug-in failed to load
    (a syntax error, a bad definition, an error in onload), a hook failed on every one of its calls (calls the stop
    signal cut do not make it so), or T.async results were lost
    at the drain deadline; else 130/143 when a file or --generate run was stopped early by SIGINT/SIGTERM (also
    during the T.async drain at the end of input: the drain ends there, results not returned are ``lost_at_stop``)
    (``stop_is_early``; the daemon's child is stopped that way normally); else 0.  Script types luaprobe does
    not support yet are listed, not failures, unless no plug-in instance of the run can run at all (4)."""
    deaths = summary.get("shard_deaths") or []
    if deaths:
        return EXIT_INTERNAL, [shard_loss_line(summary)]
    dead = summary.get("capture_death")
    if dead:                               # like a dead shard: a process of the run died (docs/operations.md)
        how = ("was " if dead["status"] < 0 else "ended with ") + dead["how"]
        rings = "the packet ring" if not summary.get("shards") else \
            "its shard's packet ring" if summary.get("interface") else "the shards' packet rings"
        return EXIT_INTERNAL, [f"the capture process (pid {dead['pid']}) {how} "
                               f"after {dead['packets']} packets: every packet it had put in {rings} was "
                               f"walked ({dead['packets']}), the rest of the input was not read"]
    if summary["input_errors"]:
        return EXIT_INPUT, [f"input error: {e}" for e in summary["input_errors"]]
    reasons = [f"plug-in problem: {p}" for p in summary["plugin_problems"] if "not supported" not in p]
    unsupported = [p for p in summary["plugin_problems"] if "not supported" in p]
    if unsupported and not summary["plugins"]:     # nothing asked for can run: a failure, not a listing
        from luaprobe.engine.fastpath.run import NOTHING_RUNS
        reasons.append(NOTHING_RUNS.format(n=len(unsupported), where="listed above"))
    at_stop = []
    for p in summary["plugins"]:
        name = f"{os.path.basename(p['plugin'])}#{p['instance']}"
        # a run stopped early: the stop signal cut the hooks of the batch under way (counted under hook_budget);
        # a hook whose only calls were those (the signal came in the first batch) did not fail (CI, 1.2 s SIGINT)
        cut = p["hook_errors"].get("hook_budget", 0) if summary.get("stopped_by") else 0
        for hook, n in p["hook_errors"].items():
            if n and n == p["hook_calls"].get(hook) and n > cut:
                reasons.append(f"{name}: {hook} failed on every call ({n})")
        lost = p["async"].get("lost_at_deadline", 0)
        if lost:
            reasons.append(f"{name}: {lost} T.async result(s) lost at the drain deadline")
        if p["async"].get("lost_at_stop", 0):
            at_stop.append(f"{name}: {p['async']['lost_at_stop']}")
    if reasons:
        return EXIT_PLUGIN, reasons
    sig = summary.get("stopped_by")
    if stop_is_early and sig in EXIT_STOPPED and not summary.get("interface"):
        if summary.get("stopped_during") == "drain":
            lost = f"T.async results not yet returned were lost ({', '.join(at_stop)})" if at_stop else \
                "no T.async result was lost"
            return EXIT_STOPPED[sig], [f"stopped early by {sig} during the T.async drain at the end of input: the "
                                       f"whole input was processed and written; {lost}"]
        return EXIT_STOPPED[sig], [f"stopped early by {sig}: the input up to the stop was processed and written"]
    return EXIT_OK, []


def cmd_check(args) -> int:
    """`luaprobe check`: probe plug-ins and list their types and problems."""
    from luaprobe.engine.plugins.vm import PluginError
    from luaprobe.engine.plugins.discovery import describe, probe_all
    from luaprobe.shm.logs import one_line
    from .usage import UsageError, check_lua_paths, check_plugins
    lua_input = getattr(args, "lua_input", None)
    if not args.plugins and lua_input is None:
        print("luaprobe check: give a PLUGIN file or directory, or --lua-input FILE", file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "lua_args", None) is not None and lua_input is None:
        print("luaprobe check: --args needs --lua-input (they are the input script's arguments)", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_plugins(args.plugins + ([lua_input] if lua_input else []))
        if lua_input is not None and os.path.isdir(lua_input):
            raise UsageError(f"--lua-input {lua_input}: a directory; give the inputfilter script's file")
        check_lua_paths(args.lua_path)
    except UsageError as e:
        print(f"luaprobe check: {e}", file=sys.stderr)
        return e.exit_code
    try:
        from luaprobe.engine.plugins.loadwatch import LoadWatch
        with LoadWatch("luaprobe check", EXIT_PLUGIN):      # a top level stuck in a compiled loop: exit 4
            infos = probe_all(args.plugins, args.lua_path, args.hook_budget, lua_input=lua_input,
                              lua_args=getattr(args, "lua_args", None))
    except PluginError as e:
        print(f"luaprobe check: {e}", file=sys.stderr)
        return EXIT_PLUGIN
    if not infos:                          # as `luaprobe run` says of the same directories (fastpath/run.py preflight)
        print("luaprobe check: no plug-in files found in " + ", ".join(args.plugins), file=sys.stderr)
        return EXIT_PLUGIN
    listing = describe(infos)
    if listing:
        print(listing)
    for i in infos:                        # did not load: the error alone (file:line: message), no listing
        if not i.loaded:
            for e in i.errors:
                print(f"luaprobe check: {one_line(e)}", file=sys.stderr)
    bad = [p for i in infos for p in i.errors + i.setup_problems]   # setup problems: `run` refuses those too
    # only unsupported types: nothing runs (as `run` decides); a file of declarations alone (custom_alerts/
    # my-alerts.lua, an alertgroup) has no unsupported type and is not a problem: `run` stores it, exit 0
    if not bad and not any(i.runnable_types for i in infos) and any(i.unsupported for i in infos):
        print("luaprobe check: no plug-in here can run (" + "; ".join(p for i in infos for p in i.problems) + ")",
              file=sys.stderr)
        return EXIT_PLUGIN
    return EXIT_PLUGIN if bad else EXIT_OK


def cmd_query(args) -> int:
    """`luaprobe query ...`: delegated to luaprobe.engine.store.query."""
    from luaprobe.engine.store import query
    return query.main(args.rest)


def cmd_gen(args) -> int:
    """`luaprobe gen ...`: delegated to luaprobe.engine.gen.traffic (synthetic traffic to pcap/pcapng)."""
    from luaprobe.engine.gen import traffic as gen
    return gen.main(args.rest)


def cmd_loadtest(args) -> int:
    """`luaprobe loadtest SCENARIO [--quick]`: delegated to luaprobe.engine.loadtest."""
    from luaprobe.engine.loadtest.__main__ import main
    return main(args.rest)


def cmd_demo(args) -> int:
    """`luaprobe demo`: the bundled example plug-ins on the bundled sample capture."""
    args.plugins = [EXAMPLES]
    args.pcap = [os.path.join(EXAMPLES, "sample.pcap")]
    args.overwrite = not args.append        # the demo replaces its own earlier output
    return cmd_run(args)


def _run_options(p) -> None:
    """Options shared by `run` and `demo`; every number is range-checked here (docs/operations.md)."""
    from .usage import float_in, int_in, nonempty, number, power_of_two
    p.add_argument("--out", default="out", type=nonempty("a directory"),
                   help="output directory (SQLite database); default ./out")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--append", action="store_true", help="add this run to the database already in --out")
    again.add_argument("--overwrite", action="store_true", help="replace the database already in --out")
    p.add_argument("--lua-path", action="append", default=[], metavar="DIR", type=nonempty("a directory"),
                   help="extra Lua search directory (repeatable)")
    p.add_argument("--stats-json", metavar="FILE", type=nonempty("a file name"), help="write the run summary as JSON")
    from .config import SCHEMA
    a = {k: v[2] for k, v in SCHEMA["async"].items()}      # [async] key -> (lo, hi): one range for flag and key

    def rng(key):
        return f"{number(a[key][0])}..{number(a[key][1])}"
    p.add_argument("--workers", type=int_in(*a["workers"]), default=None, help="async workers per plug-in (overrides "
                   f"TrisulPlugin.request_async_workers), {rng('workers')}")
    p.add_argument("--overflow-limit", type=int_in(*a["overflow_limit"]), default=100_000,
                   help=f"tasks queued beyond the rings per plug-in, {rng('overflow_limit')}")
    p.add_argument("--task-timeout", type=float_in(*a["task_timeout"]), default=60.0,
                   help=f"seconds one onexecute may run, {rng('task_timeout')}")
    p.add_argument("--worker-max-tasks", type=int_in(*a["max_tasks"]), default=0,
                   help=f"recycle a worker after N tasks (0 = never), {rng('max_tasks')}")
    p.add_argument("--worker-max-rss-mb", type=float_in(*a["max_rss_mb"]), default=0.0,
                   help=f"recycle a worker above this RSS in MiB (0 = never), {rng('max_rss_mb')}")
    p.add_argument("--worker-spin-us", type=float_in(*a["worker_spin_us"]), default=1500.0,
                   help="polling window after a task of the first max(1, CPUs-2) workers of a pool, "
                        f"microseconds, {rng('worker_spin_us')}")
    p.add_argument("--async-backend", choices=("local", "ray"), default="local",
                   help="where schedule tasks run: local worker processes, or Ray actors (docs/async.md)")
    p.add_argument("--ray-address", help="Ray cluster address (host:port); default: ray.init() for the run")
    p.add_argument("--ray-actor-cpus", type=float_in(*a["ray_actor_cpus"]), default=1.0,
                   help=f"CPUs Ray reserves per actor, {rng('ray_actor_cpus')}")
    p.add_argument("--ring-size", type=power_of_two(*a["ring_size"]), default=4 << 20,
                   help="bytes per async ring (a power of two, 4096..1 GiB)")
    p.add_argument("--drain-deadline", type=float_in(*a["drain_deadline"]), default=10.0,
                   help=f"seconds to finish async tasks at the end, {rng('drain_deadline')}")
    p.add_argument("--file-root", action="append", default=[], metavar="DIR", type=nonempty("a directory"),
                   help="confine T.async copy/cat/rm/copybuffer names beneath DIR (repeatable; docs/async.md)")
    from .settings import add_flags
    add_flags(p)                        # fast-path settings (engine/daemon/settings.py)
    p.add_argument("--shards", type=int_in(1, 64), default=1, metavar="N",
                   help="N fast-path processes sharing the input by a symmetric flow hash, 1..64 (docs/scale.md)")
    p.add_argument("--analysers", default="", metavar="LIST",
                   help="built-in analysers whose outputs are stored even when no monitor script asks for them: "
                        "all, none (default) or a comma list of counters,dns,http,tls (docs/plugins.md)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (T.logdebug lines too)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary (errors only)")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON instead of text")


def _daemon_command(args) -> int:
    """start / stop / status / reload -> luaprobe.engine.daemon.supervisor.cmd_*, stats -> luaprobe.engine.daemon.statsview.cmd_stats."""
    import importlib

    from .control import Ambiguous, ControlError
    mod = importlib.import_module("luaprobe.engine.daemon.statsview" if args.command == "stats"
                                  else "luaprobe.engine.daemon.supervisor")
    rd = getattr(args, "run_dir", None)
    if rd and os.path.exists(rd) and not os.path.isdir(rd):
        print(f"luaprobe {args.command}: --run-dir {rd}: exists and is not a directory", file=sys.stderr)
        return EXIT_USAGE
    try:
        return getattr(mod, "cmd_" + args.command)(args)
    except StartupStop as e:            # ^C / SIGTERM to a client waiting for the supervisor (stop: up to its
        if args.command == "start":     # stop_deadline + 15 s): not "while starting, before any packet"
            raise
        return _client_stopped(args, e)
    except Ambiguous as e:
        print(f"luaprobe {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ControlError as e:           # a supervisor that did not answer in time (control.NoAnswer), or a socket
        print(f"luaprobe {args.command}: {e}", file=sys.stderr)    # we may not use: one line, never a traceback
        return EXIT_INTERNAL


def _client_stopped(args, e: StartupStop) -> int:
    """SIGINT / SIGTERM to `stop`, `reload`, `status` or `stats` while it waits for the supervisor: one line naming
    what the supervisor is doing now (its pid and the state it last saved: a stop or reload it was asked goes on
    without this client), 130 / 143.  Before, the line was `run`'s "stopped by SIGINT while starting, before any
    packet was processed (processes started so far were stopped, ...)", untrue of a daemon going on stopping."""
    import signal

    from . import control
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)          # the one line is the last word, whatever comes next
    cmd = args.command
    try:
        run_dir = control.find_run_dir(getattr(args, "run_dir", None))[0]
        pid = control.read_pid(run_dir)
        state = (control.read_state(run_dir) or {}).get("state", "unknown")
    except (control.ControlError, control.Ambiguous, OSError):
        run_dir, pid, state = None, None, "unknown"
    if pid is None:
        now = f"no supervisor runs in {run_dir} now (last state: {state})" if run_dir else "no supervisor found"
    elif cmd == "stop" and state == "stopping":
        now = f"the supervisor (pid {pid}) goes on stopping (luaprobe status --run-dir {run_dir})"
    elif cmd == "stop":
        now = f"the supervisor (pid {pid}) is {state}: the stop may not have reached it (luaprobe stop again)"
    else:
        now = (f"the supervisor (pid {pid}) is {state}" + ("; a reload it was sent goes on (luaprobe status "
                                                          f"--run-dir {run_dir})" if cmd == "reload" else ""))
    print(f"luaprobe {cmd}: stopped waiting by {e.name}: {now}", file=sys.stderr)
    return 128 + e.signum


def _analysers_asked(spec) -> bool:
    """--analysers names at least one analyser (a bad name is reported later, with the other run options)."""
    from luaprobe.engine.analysers import parse_names
    try:
        return bool(parse_names(spec))
    except ValueError:
        return True


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    from .usage import Parser, int_in, nonempty
    p = Parser(prog="luaprobe", description="Run Trisul-style Lua plug-ins over network traffic.")
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", required=True)
    shm = sub.add_parser("shm", help="inspect or clean luaprobe shared-memory segments")
    shm.add_argument("action", choices=["clean", "list"])
    shm.set_defaults(func=cmd_shm)
    run = sub.add_parser("run", help="run plug-ins over capture files")
    run.add_argument("plugins", nargs="*", metavar="PLUGIN",
                     help="plug-in files or directories (none: only the --analysers' output is stored)")
    src = run.add_mutually_exclusive_group(required=True)
    src.add_argument("--pcap", nargs="+", action="extend", metavar="FILE",
                     help="pcap or pcapng files, read in the order given (--pcap may be repeated)")
    src.add_argument("--interface", metavar="IF", type=nonempty("an interface name"),
                     help="capture live from this interface (root; stop with Ctrl-C)")
    src.add_argument("--generate", metavar="SPEC", help="generated traffic at full speed, nothing lost: gen options "
                     "as KEY=VALUE,... with ':' inside lists, e.g. 'packets=2000000,flows=1000,mix=tcp=60:udp=40,"
                     "seed=1' (docs/gen.md)")
    src.add_argument("--lua-input", metavar="FILE", type=nonempty("a file name"),
                     help="an inputfilter script whose step(packet, engine) is the input: the flow records and "
                          "counters it imports, the frames it gives (Trisul's -in; docs/plugins.md \"inputfilter\")")
    run.add_argument("--args", dest="lua_args", metavar="TEXT",
                     help="T.args of the --lua-input script (Trisul's -args), e.g. the file it reads")
    run.add_argument("--bpf", metavar="EXPR", help="pcap-filter expression for --interface (compiled by libpcap)")
    from .usage import MAX_SPEED, float_in
    run.add_argument("--speed", metavar="X", type=float_in(0, MAX_SPEED), default=0.0,
                     help="with --pcap: replay at X seconds of packet time per second (1: as captured, 60: a minute "
                          f"a second; 0..{MAX_SPEED}, default 0: as fast as the fast path reads; docs/operations.md "
                          "\"Paced replay\")")
    _run_options(run)
    run.set_defaults(func=cmd_run)
    demo = sub.add_parser("demo", help="run the bundled example plug-ins on the bundled sample capture")
    _run_options(demo)
    demo.set_defaults(func=cmd_demo)
    check = sub.add_parser("check", help="list plug-ins, their script types and problems")
    check.add_argument("plugins", nargs="*", metavar="PLUGIN")
    check.add_argument("--lua-input", metavar="FILE", type=nonempty("a file name"),
                       help="check FILE as run --lua-input takes it: an inputfilter whose step is the input")
    check.add_argument("--args", dest="lua_args", metavar="TEXT",
                       help="T.args of the --lua-input script, as run's (its top level runs when it is checked)")
    check.add_argument("--lua-path", action="append", default=[], metavar="DIR", type=nonempty("a directory"),
                       help="extra Lua search directory (repeatable), as run's")
    check.add_argument("--hook-budget", type=float, default=10.0, metavar="S",
                       help="seconds a plug-in's top level may run while it loads (default 10, as run's; 0 = off)")
    check.set_defaults(func=cmd_check)
    # daemon mode (docs/operations.md): luaprobe.engine.daemon.supervisor, luaprobe.engine.daemon.statsview
    for name, what in (("start", "validate a TOML config and start the supervisor (daemon)"),
                       ("stop", "stop gracefully (drain, onunload, flush outputs)"),
                       ("status", "state, pids, uptime, restarts, last stats line"),
                       ("reload", "re-read the config and scripts: graceful restart of the fast path"),
                       ("stats", "top-like live statistics (--json: one snapshot)")):
        d = sub.add_parser(name, help=what)
        d.add_argument("--run-dir", metavar="DIR", type=nonempty("a directory"),
                       help="run directory (default: [run] run_dir, else ./run)")
        if name == "start":
            d.add_argument("--config", required=True, metavar="FILE", type=nonempty("a file name"))
            d.add_argument("--foreground", action="store_true", help="do not daemonize")
        if name in ("status", "stats"):
            d.add_argument("--json", action="store_true")
        if name == "stats":
            d.add_argument("--plain", action="store_true", help="plain text even when rich is installed")
            d.add_argument("--count", type=int_in(0), default=0, metavar="N", help="stop after N refreshes")
        d.set_defaults(func=_daemon_command)
    from luaprobe.engine.store.query import WHAT
    query = sub.add_parser("query", help="print outputs: " + "|".join(WHAT), add_help=False)
    query.add_argument("rest", nargs=argparse.REMAINDER)
    query.set_defaults(func=cmd_query)
    # prefix_chars: every token after `gen` (even "--out") goes to luaprobe.engine.gen.traffic's own parser
    gen = sub.add_parser("gen", help="write deterministic synthetic traffic to a pcap/pcapng file", add_help=False,
                         prefix_chars="\x00")
    gen.add_argument("rest", nargs=argparse.REMAINDER)
    gen.set_defaults(func=cmd_gen)
    lt = sub.add_parser("loadtest", help="load-test scenarios with Markdown reports and plots (tools/loadtest)",
                        add_help=False, prefix_chars="\x00")
    lt.add_argument("rest", nargs=argparse.REMAINDER)
    lt.set_defaults(func=cmd_loadtest)
    return p


#: sub-commands with their own parser: everything after the name goes to it (`luaprobe query --help` too)
DELEGATED = {"query": cmd_query, "gen": cmd_gen, "loadtest": cmd_loadtest}


def _startup_stop(argv, e: StartupStop) -> int:
    """One line for a SIGINT / SIGTERM that arrived while the command was starting; exit 130 / 143."""
    import signal
    from luaprobe.shm.exits import STOP_SIGNALS
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)          # the one line is the last word, whatever comes next
    cmd = argv[0] if argv and not argv[0].startswith("-") else ""
    print(f"luaprobe{' ' + cmd if cmd else ''}: stopped by {e.name} while starting, before any packet was "
          "processed (processes started so far were stopped, shared memory removed)", file=sys.stderr)
    return 128 + e.signum


REBUILT_FIRST = ("run", "demo", "check", "start", "loadtest")   #: commands that load the compiled modules


def _open_standard_fds() -> None:
    """Descriptors 0, 1 and 2 open before anything else is: one that is closed (`luaprobe run ... <&-`, `>&-`,
    `2>&-`, a supervisor that closed them) is opened on /dev/null, and Python's stream for it (None then) is
    made.  Otherwise the first file the run opens takes that number -- the --out directory's lock -- and a
    child started with its standard streams redirected (the store writer) has it replaced: "the output
    directory's lock (descriptor 1) is not a directory", exit 1, every row of the run lost
    (tests/test_closed_std_fds.py).  OpenSSH's sanitise_stdfd() does the same."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        got = os.open(os.devnull, os.O_RDWR)
        if got != fd:                        # the lower ones are open (made above), so this is rare
            os.dup2(got, fd)
            os.close(got)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))


class _ReaderGoneIO(io.FileIO):
    """A standard stream's descriptor whose reader may leave (`luaprobe check plugins/ | head -1`, `| true`): the
    first write that fails with EPIPE points the descriptor at /dev/null and the rest of the output is dropped, so
    the command goes on and ends with its own exit code.  Before, the BrokenPipeError ended any command with exit 0
    (main's last resort), also `check` of a plug-in that fails to load (4) and `status` of a stopped daemon (3), and
    the lines still to come on the other stream were lost (tests/test_report_reader_gone.py)."""

    def write(self, b):
        try:
            return super().write(b)
        except BrokenPipeError:
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self.fileno())
            finally:
                os.close(null)
            return memoryview(b).nbytes


def _quiet_when_reader_gone() -> None:
    """sys.stdout and sys.stderr rebuilt on :class:`_ReaderGoneIO` (same descriptor, encoding, errors and
    buffering), for the console script only: an in-process main() (tests) keeps the streams it was given.
    Not for `stats`, which prints until stopped: for it the reader leaving is the end (main's BrokenPipeError)."""
    for name in ("stdout", "stderr"):
        old = getattr(sys, name)
        try:
            fd = old.fileno()
            old.flush()
        except (AttributeError, OSError, ValueError):
            continue                         # not a real descriptor (a test's capture), or one already broken
        new = io.TextIOWrapper(io.BufferedWriter(_ReaderGoneIO(fd, "w", closefd=False)), encoding=old.encoding,
                               errors=old.errors, line_buffering=old.line_buffering,
                               write_through=getattr(old, "write_through", False))
        setattr(sys, name, new)


def console() -> None:
    """The `luaprobe` command (console script, ``python -m luaprobe.engine``): :func:`main`, then the process ends
    in :func:`_exit_now` with its code."""
    _exit_now(main())


def _exit_now(code) -> None:
    """End the `luaprobe` process with ``code`` without the interpreter's teardown of every module (numpy's,
    lupa's, ...): 20-40 ms of a `luaprobe run` on an idle machine, 40-300 ms at load 8-10 (docs/benchmarks.md
    "Fixed cost of a run").  What that teardown did that anyone sees is done first: the garbage collector frees the
    run's objects (its LuaJIT VMs are closed: a plug-in's __gc runs, the files its io library left open are
    flushed and closed), the atexit functions run (logging's flush and close, weakref finalizers), Python's
    standard streams and C's stdio buffers are flushed.  Any other thread still running, or a stream that cannot
    be flushed, takes the interpreter's usual exit (which waits for the thread, reports the stream)."""
    import atexit
    import gc
    import threading
    if threading.active_count() > 1 or not isinstance(code, int) or isinstance(code, bool):
        sys.exit(code)
    gc.collect()
    atexit._run_exitfuncs()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        sys.exit(code)
    import ctypes
    ctypes.CDLL(None).fflush(None)
    os._exit(code & 0xFF)


def main(argv=None) -> int:
    """The `luaprobe` command's exit code (``argv``: sys.argv[1:] when None); :func:`console` ends the process with it."""
    in_process = argv is not None        # main() called in-process (tests), not as the console script
    _open_standard_fds()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not in_process and argv[:1] != ["stats"]:   # `stats` refreshes until --count: a reader that left ends it
        _quiet_when_reader_gone()                  # (the BrokenPipeError below), as before
    import signal
    previous = {}                        # given back at the end when in-process
    try:                                 # (early_stop may raise as soon as it is installed: inside the try)
        for s in STOP_SIGNALS:           # the console script's handler since import: from now on, raise
            if signal.getsignal(s) is _defer_stop:
                previous[s] = signal.SIG_DFL
                signal.signal(s, early_stop)
        install_early_stop(previous)
        if _pending_stop:                # a stop signal between the import and now
            raise StartupStop(_pending_stop[0])
        from luaprobe.shm import logs
        logs.install_escapes()           # file names that are not UTF-8 print as \xNN
        if argv and argv[0] in DELEGATED:
            return DELEGATED[argv[0]](argparse.Namespace(rest=argv[1:]))
        args = build_parser().parse_args(argv)
        if getattr(args, "command", None) in REBUILT_FIRST:
            try:
                from luaprobe.shm.luajit import stale_extensions
                stale = stale_extensions()
            except OSError:              # no descriptor for the import (EMFILE): the check is skipped, and the
                stale = []               # command names what it cannot open (`start`: its config, exit 1)
            if stale:                    # one line, before anything starts (exit 1: the installation, not the input)
                print(f"luaprobe {args.command}: {stale[0]}{' (and more)' if len(stale) > 1 else ''}: the source "
                      "tree changed after the build; rebuild with `pip install -e .` (in the repository)",
                      file=sys.stderr)
                return EXIT_INTERNAL
        return args.func(args)
    except StartupStop as e:             # before the command took over its signals: nothing was processed
        return _startup_stop(argv, e)
    except BrokenPipeError:              # `luaprobe ... | head`: the reader left; quiet, like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        import signal
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)   # early_stop must not raise in here
        try:
            for s, h in previous.items():
                if signal.getsignal(s) in (early_stop, decided):
                    # the console script's exit code is decided: a stop signal while the interpreter exits is
                    # ignored (with the default disposition it killed the process, status -15, after a clean run)
                    signal.signal(s, h if in_process else signal.SIG_IGN)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


if __name__ == "__main__":
    console()
