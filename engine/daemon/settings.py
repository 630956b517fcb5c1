"""Settings an operator tunes: one table gives each its `luaprobe run` flag, its TOML key and its range.

Each row: RunConfig field, CLI flag, (TOML section, key), kind, default (in the flag's unit), lower and upper
bound, the factor from the flag's unit to RunConfig's, and the help text.  ``kind`` is "int", "float",
"pow2" (an integer power of two), "path", "name" (a user or group name, or a number), "cpus" (shm/cpus.py:
"auto", "off" or "C,F") or "pages" (engine/fastpath/hugepages.py: "auto", "on" or "off").  docs/operations.md
lists the same table for operators.
"""
from __future__ import annotations

MIB = 1 << 20

SETTINGS = [
    ("backend_instances", "--backend-instances", ("plugins", "backend_instances"), "int", 2, 1, 64, 1,
     "backend instances (Trisul flushers) of engine_monitor, sg_monitor, flowtracker and monitor scripts"),
    ("packet_ring_size", "--packet-ring-mb", ("fastpath", "packet_ring_mb"), "pow2", 32, 1, 4096, MIB,
     "packet ring between the capture process and the fast path, MiB (a power of two); larger rides out "
     "longer stalls of a live capture (docs/live.md)"),
    ("flow_capacity", "--flow-capacity", ("fastpath", "flow_capacity"), "pow2", 1 << 20, 1024, 1 << 26, 1,
     "flows tracked at once (a power of two); a full table counts drops.flow_table"),
    ("idle_timeout", "--idle-timeout", ("fastpath", "idle_timeout"), "float", 120.0, 1, 86400, 1,
     "seconds of packet time without packets before a flow is expired"),
    ("active_timeout", "--active-timeout", ("fastpath", "active_timeout"), "float", 1800.0, 1, 604800, 1,
     "seconds after which a long flow's record is written (and continued)"),
    ("window", "--window", ("fastpath", "window"), "int", 60, 1, 3600, 1,
     "backend window, seconds (Trisul StreamingWindowMSecs / 1000)"),
    ("batch", "--batch", ("fastpath", "batch"), "int", 1024, 1, 65536, 1, "packets per fast-path batch"),
    ("pin_cpus", "--pin-cpus", ("fastpath", "pin_cpus"), "cpus", "auto", None, None, 1,
     "CPU pinning: 'auto' puts the capture process and the fast path on two different CPUs when >= 2 are usable, "
     "'off' pins nothing, 'C,F' puts capture on CPU C and the fast path on CPU F (shm/cpus.py)"),
    ("huge_pages", "--huge-pages", ("fastpath", "huge_pages"), "pages", "auto", None, None, 1,
     "flow table pages: 'on' (transparent huge pages, MADV_HUGEPAGE), 'off' (4 KiB pages, MADV_NOHUGEPAGE) or "
     "'auto': 'off' on a virtual machine whose virtio balloon reports free memory to its host (the first write to "
     "a fresh huge page then costs 0.07-1.8 ms), else 'on' (engine/fastpath/hugepages.py; the summary's "
     "flow_table_pages says what was done)"),
    ("prefault_ahead", "--prefault-ahead", ("fastpath", "prefault_ahead"), "int", 16384, 0, 1 << 24, 1,
     "flow records whose fresh pages a helper thread maps ahead of the fast path (engine/fastpath/flowtable.lua "
     "start_prefaulter, shm/_lpsync.c: the kernel's zeroing of the pages of new flows' records moves off the "
     "packet loop's thread; RSS at most ~200 bytes x this beyond the flows seen); 0: no helper, the fast path "
     "maps them itself, 1 024 records at a time"),
    ("frag_timeout", "--frag-timeout", ("fastpath", "frag_timeout"), "float", 30.0, 0.1, 3600, 1,
     "seconds of packet time an IP datagram waits for its fragments"),
    ("frag_max_mb", "--frag-max-mb", ("fastpath", "frag_max_mb"), "float", 16.0, 0.1, 4096, 1,
     "MiB of IP fragments held over all datagrams (the oldest is dropped above)"),
    ("hook_budget", "--hook-budget", ("fastpath", "hook_budget"), "float", 10.0, 0, 86400, 1,
     "seconds a plug-in hook may run before it is interrupted with a Lua error (0 = off; a compiled endless loop "
     "cannot be interrupted: `run` then stops hard with exit 4, the daemon restarts; docs/operations.md)"),
    ("plugin_memory_mb", "--plugin-memory-mb", ("plugins", "memory_mb"), "int", 4096, 0, 1 << 20, 1,
     "MiB of Lua memory each plug-in VM may use (0 = no limit); a hook that goes above gets a Lua error and the "
     "instance is disabled with one line naming it (exit 4; docs/operations.md); each T.async worker VM has the "
     "same limit: an onexecute above it fails as a task error"),
    ("http_max_header", "--http-max-header", ("filex", "http_max_header"), "int", 65536, 1024, 1 << 24, 1,
     "longest HTTP start line + header block kept, bytes (more is counted; docs/filex.md)"),
    ("http_bomb_ratio", "--http-bomb-ratio", ("filex", "http_bomb_ratio"), "int", 100, 0, 1 << 20, 1,
     "decompression bomb rule: decoding of a gzip/deflate HTTP body stops (file flagged decompression_bomb, "
     "counted) once it decoded more than --http-bomb-min-mb and more than this many times the compressed bytes "
     "received (libhtp's compression-bomb-limit rule; 0 = no limit; docs/filex.md)"),
    ("http_bomb_min_mb", "--http-bomb-min-mb", ("filex", "http_bomb_min_mb"), "float", 1.0, 0, 1 << 20, 1,
     "decoded MiB a compressed HTTP body may always reach before --http-bomb-ratio applies (Suricata's "
     "compression-bomb-limit, default 1 MiB)"),
    ("filex_dir", "--filex-dir", ("filex", "dir"), "path", None, None, None, 1,
     "directory for extracted files, created when missing (its parent must exist); files are removed after their "
     "hooks (default: a private one under /dev/shm, removed at the end)"),
    ("filex_chunk_mb", "--filex-chunk-mb", ("filex", "chunk_mb"), "float", 5.0, 0.001, 4096, 1,
     "onfile_http chunk size, MiB (Trisul ChunkSizeMB)"),
    ("filex_dir_cap_mb", "--filex-dir-cap-mb", ("filex", "dir_cap_mb"), "float", 256.0, 1, 1 << 20, 1,
     "extraction stops (counted) above this many MiB in the directory"),
    ("data_dir", "--data-dir", ("plugins", "data_dir"), "path", None, None, None, 1,
     "T.env.get_config(\"App>DataDirectory\") and T.host:get_datapath() of plug-ins (default: OUT/trisul/data, "
     "created 0700; docs/reference.md \"T.env\")"),
    ("db_root", "--db-root", ("plugins", "db_root"), "path", None, None, None, 1,
     "T.env.get_config(\"App>DBRoot\") (default: OUT/trisul/dbroot, created 0700)"),
    ("run_state_dir", "--run-state-dir", ("plugins", "run_state_dir"), "path", None, None, None, 1,
     "T.env.get_config(\"App>RunStateDirectory\"), where scripts put sockets and state files (default: "
     "OUT/trisul/run, created 0700)"),
    ("user", "--user", ("run", "user"), "name", None, None, None, 1,
     "after opening the capture socket(s) as root, run everything (capture, fast path, workers, store writer) as "
     "this user with no capability (default: stay root, with a warning for live capture; docs/live.md)"),
    ("group", "--group", ("run", "group"), "name", None, None, None, 1,
     "with --user: run with this group only (default: the user's primary and supplementary groups)"),
]


class SettingError(ValueError):
    """A setting's value out of its rule: ``[section] key = value: ...``; ``section`` and ``key`` say where."""

    def __init__(self, message: str, section: str, key: str):
        super().__init__(message)
        self.section, self.key = section, key


def dirs() -> list[tuple[str, str, tuple[str, str]]]:
    """(RunConfig field, flag, (TOML section, key)) of every "path" row: the directories a run creates when
    missing (--filex-dir, the T.env directories of engine/plugins/tenv.py), checked by the CLI and the config
    (usage.check_dir_target) and made absolute before a privilege drop (privileges.py)."""
    return [(field, flag, toml) for field, flag, toml, kind, *_rest in SETTINGS if kind == "path"]


def add_flags(parser) -> None:
    """Add every setting's flag to a `run`-like parser (range-checked by the converters of usage.py)."""
    from .usage import cpu_pins, float_in, huge_pages, int_in, nonempty, number, power_of_two
    for field, flag, _toml, kind, default, lo, hi, _scale, text in SETTINGS:
        conv = {"int": lambda: int_in(lo, hi), "float": lambda: float_in(lo, hi),
                "pow2": lambda: power_of_two(lo, hi), "path": lambda: nonempty("a directory"),
                "name": lambda: nonempty("a name or a number"),
                "cpus": lambda: cpu_pins, "pages": lambda: huge_pages}[kind]()
        rng = f" (default {default})" if kind in ("cpus", "pages") else "" if kind in ("path", "name") else f" ({number(lo)}..{number(hi)}, default {number(default)})"
        parser.add_argument(flag, dest=field, type=conv, default=default, help=text + rng)


def from_args(args) -> dict:
    """RunConfig keyword arguments from parsed flags (units converted)."""
    return {field: _scaled(getattr(args, field), scale) for field, _f, _t, _k, _d, _lo, _hi, scale, _x in SETTINGS}


def toml_schema() -> dict:
    """{section: {key: (type, default, check)}} in engine/daemon/config.py's SCHEMA form."""
    out: dict = {}
    for _field, _flag, (section, key), kind, default, lo, hi, _scale, _text in SETTINGS:
        t = {"int": int, "pow2": int, "float": (int, float), "path": "path", "name": str, "cpus": str, "pages": str}[kind]
        check = None if kind in ("path", "cpus") else "nonempty" if kind == "name" else \
            ("auto", "on", "off") if kind == "pages" else (lo, hi)
        out.setdefault(section, {})[key] = (t, default, check)
    return out


def from_toml(values: dict) -> dict:
    """RunConfig keyword arguments from a validated configuration (raises SettingError, a ValueError, for a non power
    of two or a bad CPU pinning)."""
    kw = {}
    for field, _flag, (section, key), kind, _d, lo, hi, scale, _x in SETTINGS:
        v = values[section][key]
        if kind == "pow2" and v & (v - 1):
            raise SettingError(f"[{section}] {key} = {v}: must be a power of two between {lo} and {hi}", section, key)
        if kind == "cpus":
            from luaprobe.shm import cpus
            try:
                cpus.parse(v)
            except ValueError as e:
                raise SettingError(f"[{section}] {key} = {e}", section, key) from None
        kw[field] = _scaled(v, scale)
    return kw


def _scaled(v, scale):
    if v is None or scale == 1:
        return v
    return int(v * scale)
