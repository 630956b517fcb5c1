"""The TOML configuration of `luaprobe start` (docs/operations.md): load and validate completely.

Everything is checked before any process starts; each error names the file, the key, the bad value
and what is valid, e.g. ``f.toml: [async] workers = 0: must be an integer between 1 and 256``.
Relative paths are resolved against the directory of the configuration file, except ``[stats]
json_lines_file``, which is resolved against the run directory actually used (``--run-dir``, else ``[run] run_dir``:
:attr:`Config.run_dir`, the one resolution every command and the supervisor use).  Directories and files
the daemon writes (out_dir, run_dir, json_lines_file) are tried for writing here, so that a bad one is one
line at ``start`` (exit 2), not a crash loop.  Errors name the line of the key when the file has one.
"""
from __future__ import annotations

import dataclasses
import os
import re
import stat
import tomllib

from luaprobe.workers.limits import MAX_WORKERS

from . import settings as _settings
from .control import MAX_SOCKET_PATH, SOCKET
from .usage import MAX_SPEED, RESOURCE_ERRNOS, OneLineError, file_problem, number, writable_dir


class ConfigError(OneLineError):
    """A configuration problem; the message names the key, the value and the valid range.  ``section`` and
    ``key`` locate it (``key`` None: the section header): :func:`load` names their line."""

    def __init__(self, message: str, section: str | None = None, key: str | None = None, resource: bool = False):
        super().__init__(message)
        self.section, self.key = section, key
        #: True when the cause was the process's own resources (EMFILE, ENFILE, ENOMEM while the file was read or a
        #: directory probed), not the configuration: the caller exits 1 (internal), not 2 (usage)
        self.resource = resource


def _bad(name: str, section: str, key: str, rest: str, problem=None) -> ConfigError:
    """``name: [section] key<rest>``, located at that key; ``problem``: the usage.Problem it reports, if any (its
    ``resource`` flag is carried over)."""
    return ConfigError(f"{name}: [{section}] {key}{rest}", section, key, getattr(problem, "resource", False))


_NUM = (int, float)
# section -> key -> (type, default, check) ; check: (lo, hi) inclusive for numbers, a tuple of choices for str,
# None for no check.  Type "path"/"paths" are strings / lists of strings resolved against the config dir.
SCHEMA: dict = {
    "run": {"out_dir": ("path", "out", None), "run_dir": ("path", "run", None), "shards": (int, 1, (1, 64))},
    "source": {"pcap": ("paths", None, None), "interface": (str, None, None), "bpf": (str, None, None),
               "loop": (bool, False, None), "speed": (_NUM, 0.0, (0, MAX_SPEED))},
    "plugins": {"paths": ("paths", None, None), "lua_path": ("paths", [], None)},   # + backend_instances
    "async": {"workers": (int, None, (1, MAX_WORKERS)), "overflow_limit": (int, 100_000, (0, 100_000_000)),
              "task_timeout": (_NUM, 60.0, (0.001, 86400)), "drain_deadline": (_NUM, 10.0, (0, 3600)),
              "max_tasks": (int, 0, (0, 1 << 40)), "max_rss_mb": (_NUM, 0.0, (0, 1 << 20)),
              "file_roots": ("paths", [], None), "ring_size": (int, 4 << 20, (4096, 1 << 30)),
              "worker_spin_us": (_NUM, 1500.0, (0, 1_000_000)),
              "backend": (str, "local", ("local", "ray")), "ray_address": (str, "", None),
              "ray_actor_cpus": (_NUM, 1.0, (0, 1024))},
    **{"fastpath": {}, "filex": {}},
    "supervise": {"restart_backoff_initial": (_NUM, 0.5, (0.01, 3600)),
                  "restart_backoff_max": (_NUM, 30.0, (0.01, 86400)),
                  "crash_loop_restarts": (int, 5, (1, 1000)), "crash_loop_window": (_NUM, 60.0, (1, 86400)),
                  "stop_deadline": (_NUM, 20.0, (1, 3600)), "stall_timeout": (_NUM, 60.0, (0, 86400))},
    "stats": {"interval": (_NUM, 1.0, (0.1, 3600)), "json_lines_file": ("path", "", None),
              "json_lines_max_mb": (_NUM, 64.0, (0.001, 1 << 20)), "json_lines_backups": (int, 3, (1, 1000)),
              "prometheus_port": (int, 0, (0, 65535))},
    "log": {"format": (str, "text", ("text", "json")), "verbose": (bool, False, None),
            "max_mb": (_NUM, 64.0, (0.001, 1 << 20)), "backups": (int, 3, (1, 1000))},
}
for _section, _keys in _settings.toml_schema().items():      # [fastpath], [filex], ...: engine/daemon/settings.py
    SCHEMA[_section].update(_keys)


@dataclasses.dataclass
class Config:
    """A validated configuration: ``section[key]`` values with defaults filled in, paths absolute."""

    path: str
    values: dict
    run_dir_given: str | None = None     #: ``--run-dir`` (absolute), which overrides ``[run] run_dir``

    def __getitem__(self, section: str) -> dict:
        return self.values[section]

    @property
    def run_dir(self) -> str:
        """The run directory used: ``--run-dir`` when given, else ``[run] run_dir`` (absolute)."""
        return self.run_dir_given or self.values["run"]["run_dir"]

    def source_text(self) -> str:
        """One line naming the input, for status and stats."""
        s = self.values["source"]
        if s["interface"]:
            return f"interface {s['interface']}" + (f" (bpf {s['bpf']!r})" if s["bpf"] else "")
        how = ["loop"] * bool(s["loop"]) + [f"speed {number(s['speed'])}"] * bool(s["speed"])
        return ", ".join(os.path.basename(p) for p in s["pcap"]) + (f" ({', '.join(how)})" if how else "")

    def run_config(self, stats_file: str | None = None, heartbeat_file: str | None = None, on_loaded=None):
        """The fast path's RunConfig for this configuration."""
        from luaprobe.workers.pool import AsyncConfig

        from luaprobe.engine.fastpath.run import RunConfig
        a, s, p = self["async"], self["source"], self["plugins"]
        acfg = AsyncConfig(workers=a["workers"], overflow_limit=a["overflow_limit"],
                           task_timeout=float(a["task_timeout"]), drain_deadline=float(a["drain_deadline"]),
                           max_tasks=a["max_tasks"], max_rss_mb=float(a["max_rss_mb"]), file_roots=a["file_roots"],
                           ring_size=a["ring_size"], worker_spin_us=float(a["worker_spin_us"]),
                           backend=a["backend"], ray_address=a["ray_address"] or None,
                           ray_actor_cpus=float(a["ray_actor_cpus"]))
        kw = dict(plugins=p["paths"], files=s["pcap"] or [], out_dir=self["run"]["out_dir"], lua_path=p["lua_path"],
                  async_config=acfg, stats_file=stats_file,
                  heartbeat_file=heartbeat_file,
                  stats_interval=float(self["stats"]["interval"]), loop=s["loop"], speed=float(s["speed"]),
                  shards=self["run"]["shards"],
                  on_loaded=on_loaded, **_settings.from_toml(self.values))
        if s["interface"]:
            kw.update(interface=s["interface"], bpf=s["bpf"])
        return RunConfig(**kw)


def _type_name(t) -> str:
    return {"path": "a string (path)", "paths": "a list of strings (paths)", str: "a string", bool: "true or false",
            int: "an integer", _NUM: "a number"}[t]


def _check_value(name: str, section: str, key: str, value, t, check):
    """Type and range check of one value; returns it (paths are resolved later)."""
    def bad(rest: str) -> ConfigError:
        return _bad(name, section, key, f" = {_show(value)}: must be {rest}")

    if t == "path":
        ok = isinstance(value, str)
    elif t == "paths":
        if isinstance(value, str):
            value = [value]
        ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
        if ok and "" in value:                  # "" would be the config's own directory (paths = [""]: every
            raise bad("a list of non-empty strings (paths)")     # plug-in beside the config ran)
    elif t is bool:
        ok = isinstance(value, bool)
    elif t is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t is _NUM:
        ok = isinstance(value, _NUM) and not isinstance(value, bool)
    else:
        ok = isinstance(value, t)
    if not ok:
        numeric = isinstance(check, tuple) and t in (int, _NUM)
        rng = f" between {number(check[0])} and {number(check[1])}" if numeric else ""
        raise bad(_type_name(t) + rng)
    if check == "nonempty":                     # [run] user / group: "" was taken for "not given" (stay root)
        if value == "":
            raise bad("a name or a number, not empty (leave the key out for none)")
        return value
    if check is not None and t in (int, _NUM) and not check[0] <= value <= check[1]:
        raise bad(f"{'an integer' if t is int else 'a number'} between {number(check[0])} and {number(check[1])}")
    if check is not None and t is str and value not in check:
        raise bad("one of " + ", ".join(f'"{c}"' for c in check))
    return value


def _show(v) -> str:
    if isinstance(v, str):
        return '"' + v + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{...}"
    return str(v)


def validate(raw: dict, path: str = "<config>", run_dir: str | None = None) -> Config:
    """Check a parsed TOML document completely; raise ConfigError with ``path: [section] key = value: ...``.
    ``run_dir``: ``--run-dir``, overriding ``[run] run_dir`` (json_lines_file is relative to the one used)."""
    name = path
    base = os.path.dirname(os.path.abspath(path)) if path != "<config>" else os.getcwd()
    for section in raw:
        sections = ", ".join(f"[{s}]" for s in SCHEMA)
        if section not in SCHEMA and isinstance(raw[section], dict):
            raise ConfigError(f"{name}: unknown section [{section}] (valid: {sections})", section)
        if section not in SCHEMA:
            raise ConfigError(f"{name}: unknown key {section!r} before any section (valid: {sections})", section)
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{name}: {section} = {_show(raw[section])}: must be a table [{section}]", section)
    values: dict = {}
    given_rd = os.path.abspath(run_dir) if run_dir else None
    for section, keys in SCHEMA.items():
        given = raw.get(section, {})
        for key in given:
            if key not in keys:
                raise ConfigError(f"{name}: [{section}] unknown key {key!r} (valid: {', '.join(keys)})", section, key)
        out = values[section] = {}
        for key, (t, default, check) in keys.items():
            v = _check_value(name, section, key, given[key], t, check) if key in given else default
            if t == "path" and v:
                rel = base if (section, key) != ("stats", "json_lines_file") else given_rd or values["run"]["run_dir"]
                v = os.path.normpath(os.path.join(rel, os.path.expanduser(v)))
            elif t == "paths" and v is not None:
                v = [os.path.normpath(os.path.join(base, os.path.expanduser(x))) for x in v]
            out[key] = v
    cfg = Config(os.path.abspath(path) if path != "<config>" else path, values, given_rd)
    _cross_checks(cfg, name)
    return cfg


def _cross_checks(cfg: Config, name: str) -> None:
    v = cfg.values
    try:
        _settings.from_toml(v)                       # powers of two
    except _settings.SettingError as e:
        raise ConfigError(f"{name}: {e}", e.section, e.key) from None
    rs = v["async"]["ring_size"]
    if rs & (rs - 1):
        raise _bad(name, "async", "ring_size", f" = {rs}: must be a power of two between 4096 and 1073741824")
    s = v["source"]
    if s["pcap"] is not None and s["interface"] is not None:
        raise ConfigError(f"{name}: [source] give exactly one of pcap or interface, not both")
    if s["pcap"] is None and s["interface"] is None:
        raise ConfigError(f"{name}: [source] missing: give pcap = [\"file.pcap\", ...] or interface = \"eth0\"")
    if s["pcap"] is not None:
        if not s["pcap"]:
            raise _bad(name, "source", "pcap", " = []: must name at least one file")
        for f in s["pcap"]:
            if not os.path.isfile(f) or not os.access(f, os.R_OK):
                raise _bad(name, "source", "pcap", f": {f!r}: not a readable file")
        from .usage import InputProblem, check_captures
        try:
            check_captures(s["pcap"])
        except InputProblem as e:
            raise _bad(name, "source", "pcap", ": " + str(e).replace("--pcap ", "", 1)) from None
        if s["bpf"] is not None:
            raise _bad(name, "source", "bpf", f" = {_show(s['bpf'])}: only valid with interface")
    else:
        if not s["interface"] or "/" in s["interface"]:
            raise _bad(name, "source", "interface", f" = {_show(s['interface'])}: must be an interface name")
        if not os.path.exists(f"/sys/class/net/{s['interface']}"):
            have = sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else []
            raise _bad(name, "source", "interface", f" = {_show(s['interface'])}: no such interface "
                       f"(have: {', '.join(have)})")
        if s["loop"]:
            raise _bad(name, "source", "loop", " = true: only valid with pcap")
        if s["speed"]:                           # a live source comes at its own pace
            raise _bad(name, "source", "speed", f" = {_show(s['speed'])}: only valid with pcap")
        if s["bpf"] is not None:                 # compiled as `run --bpf` does before it starts (a dead handle of
            from luaprobe.engine.capture.bpf import BpfError, compile_bpf     # the interface's link type: syntax
            from luaprobe.engine.capture.process import link_type           # only, no privileges); before, a
            try:                                                            # daemon "started" and crash-looped
                compile_bpf(s["bpf"], link_type(s["interface"]))            # on exit 3
            except BpfError as e:
                raise _bad(name, "source", "bpf", f" = {_show(s['bpf'])}: {e}") from None
        import dataclasses as dc

        from luaprobe.engine.fastpath.run import RunConfig
        if "interface" not in {f.name for f in dc.fields(RunConfig)}:
            raise _bad(name, "source", "interface", ": live capture is not available in this build")
    p = v["plugins"]
    if not p["paths"]:
        raise _bad(name, "plugins", "paths", ": missing: give the plug-in files or directories")
    for d in p["paths"]:
        if not os.path.exists(d):
            raise _bad(name, "plugins", "paths", f": {d!r}: no such file or directory")
    for d in p["lua_path"]:
        if not os.path.isdir(d):
            raise _bad(name, "plugins", "lua_path", f": {d!r}: not a directory")
    from .usage import UsageError, check_dirs
    from luaprobe.shm.searchpath import env_dirs
    try:
        check_dirs("TRISUL_LUA_PATHS", env_dirs())        # the daemon's plug-ins search them too
    except UsageError as e:
        raise ConfigError(f"{name}: {e} (environment)") from None
    from .usage import check_dir_target, check_private_dir
    for _field, _flag, (section, key) in _settings.dirs():   # [filex] dir, the T.env directories
        if v[section][key]:
            try:
                check_dir_target(key + " =", v[section][key], creating=[v["run"]["out_dir"]], write=True)
                if _field == "filex_dir":
                    check_private_dir(key + " =", v[section][key], v["run"]["user"])
            except UsageError as e:
                raise ConfigError(f"{name}: [{section}] {e}", section, key) from None
    if v["async"]["backend"] == "ray":          # as run's preflight does for --async-backend ray; before, the daemon
        import importlib.util                   # started and its fast path exited 2 naming a flag not given
        if importlib.util.find_spec("ray") is None:
            raise _bad(name, "async", "backend", ' = "ray": the ray package is not installed (pip install '
                       "'luaprobe[ray]')")
    for d in v["async"]["file_roots"]:
        if not os.path.isdir(d):
            raise _bad(name, "async", "file_roots", f": {d!r}: not a directory")
    sv = v["supervise"]
    if sv["restart_backoff_max"] < sv["restart_backoff_initial"]:
        raise _bad(name, "supervise", "restart_backoff_max", f" = {number(sv['restart_backoff_max'])}: must be >= "
                   f"restart_backoff_initial ({number(sv['restart_backoff_initial'])})")
    if not cfg.run_dir:
        raise _bad(name, "run", "run_dir", ' = "": must name a directory')
    if not v["run"]["out_dir"]:                  # before: 'c.toml: [run] out_dir = : cannot write there: ...'
        raise _bad(name, "run", "out_dir", ' = "": must name a directory')
    problem = writable_dir(v["run"]["out_dir"])
    if problem:
        raise _bad(name, "run", "out_dir", f" = {_show(v['run']['out_dir'])}: {problem}", problem)
    problem = writable_dir(cfg.run_dir) or _socket_problem(cfg.run_dir)
    if problem:
        if cfg.run_dir_given:
            raise ConfigError(f"{name}: --run-dir {cfg.run_dir}: {problem}", resource=getattr(problem, "resource", False))
        raise _bad(name, "run", "run_dir", f" = {_show(cfg.run_dir)}: {problem}", problem)
    jl = v["stats"]["json_lines_file"]
    if jl:
        from .usage import own_file_problem
        problem = own_file_problem(jl, v["run"]["out_dir"], v["source"]["pcap"] or [], p["paths"], cfg.run_dir) or \
            file_problem(jl, creating=[cfg.run_dir], append=True)
        if problem:
            raise _bad(name, "stats", "json_lines_file", f" = {_show(jl)}: {problem}", problem)


def _socket_problem(run_dir: str) -> str | None:
    """Why the supervisor could not listen in ``run_dir``: its control.sock path longer than a Unix socket's path
    may be (control.MAX_SOCKET_PATH bytes; bind() would fail with "AF_UNIX path too long"), or None."""
    sock = os.path.join(os.path.abspath(run_dir), SOCKET)
    n = len(os.fsencode(sock))
    if n <= MAX_SOCKET_PATH:
        return None
    return (f"its control socket {sock} would be {n} bytes long, a Unix socket path holds at most {MAX_SOCKET_PATH} "
            "(give a shorter run directory)")


def load(path: str, run_dir: str | None = None) -> Config:
    """Read and validate a TOML file (ConfigError on any problem, including TOML syntax and bytes that are
    not UTF-8, which TOML requires: the byte offset and line are named); ``run_dir``: ``--run-dir``.  Only a
    regular file is read: a FIFO (planted at the path, or `--config <(...)`'s pipe) is refused without waiting for
    a writer, which held `start`, the reload client and the supervisor's loop (SIGHUP) for ever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)    # a FIFO: never wait for its writer
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if stat.S_ISDIR(mode):
                raise ConfigError(f"{path}: cannot read: Is a directory")
            if not stat.S_ISREG(mode):
                raise ConfigError(f"{path}: not a regular file (a FIFO, pipe or device; the daemon reads its "
                                  "configuration again at each start and reload: give a file)")
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}", resource=e.errno in RESOURCE_ERRNOS) from None
    if data.startswith(b"\xef\xbb\xbf"):       # before: "1:1: not valid TOML: Invalid statement", at a byte no editor shows
        raise ConfigError(f"{path}:1: byte offset 0: the file starts with a UTF-8 byte-order mark (EF BB BF, written "
                          "by some Windows editors), which TOML does not allow: save it without one")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: byte offset {e.start}: byte 0x{data[e.start]:02X} is not UTF-8 "
                          "(a TOML file must be UTF-8)") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(_toml_problem(path, text, str(e))) from None
    try:
        return validate(raw, path, run_dir)
    except ConfigError as e:
        n = e.section and _line_of(text, e.section, e.key)        # validate's messages start "path: "
        raise ConfigError(f"{path}:{n}:{str(e)[len(path) + 1:]}" if n else str(e), e.section, e.key) from None


def _toml_problem(path: str, text: str, message: str) -> str:
    """One line for a tomllib error ``message`` (Python 3.11's TOMLDecodeError has its place only in the text:
    "... (at line L, column C)"): ``path:L:C: not valid TOML: ...``; a key or table given twice names the key."""
    m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.S)
    if not m:
        return f"{path}: not valid TOML: {message}"
    what, line, col = m[1], int(m[2]), int(m[3])
    lines = text.splitlines()
    src = lines[line - 1].strip() if 0 < line <= len(lines) else ""
    twice = re.fullmatch(r"Cannot declare \((.*)\) twice", what)
    if what == "Cannot overwrite a value":           # tomllib's words for a key given twice (TOML 1.0 "Keys")
        k = re.match(r"([^=\[]+?)\s*=", src)
        what = (f"key {k[1]} is given twice" if k else
                f"{src} names a key given before" if src.startswith("[") else "a key is given twice")
    elif twice:                                      # "Cannot declare ('run',) twice"
        what = "table [" + ".".join(re.findall(r"'([^']*)'", twice[1])) + "] is declared twice"
    return f"{path}:{line}:{col}: not valid TOML: {what}"


def line_of_key(path: str, section: str, key: str | None) -> int | None:
    """The line of ``key`` in ``[section]`` of the config file ``path`` (see :func:`_line_of`), or None (also when
    the file cannot be read any more)."""
    try:
        with open(path, encoding="utf-8") as f:
            return _line_of(f.read(), section, key)
    except (OSError, UnicodeDecodeError):
        return None


def _line_of(text: str, section: str, key: str | None) -> int | None:
    """The line of ``key = ...`` in ``[section]`` of the TOML ``text`` (``key`` None: of the header, or of a
    top-level key ``section``), or None.  A plain ``key =`` line or ``[section]`` header is found as written;
    any other spelling (a quoted or dotted key, an inline table, ``[section.key]``, a top-level key) is found by
    parsing ever longer prefixes of the text: the first that holds the key ends on its line."""
    current = None
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        t = line.strip()
        h = re.match(r"\[\s*([\w-]+)\s*\]", t)
        if h:
            current = h[1]
            if key is None and current == section:
                return n
        elif current == section and key and re.match(re.escape(key) + r"\s*=", t):
            return n
    for n in range(1, len(lines) + 1):
        try:
            d = tomllib.loads("\n".join(lines[:n]))
        except tomllib.TOMLDecodeError:
            continue                                  # a prefix ending inside a multi-line value
        if section in d and (key is None or isinstance(d[section], dict) and key in d[section]):
            return n
    return None
