"""Logging for the engine and for Lua code (T.log*, print), tagged with plug-in and VM instance."""
from __future__ import annotations

import codecs
import logging
import os
import re
import sys

#: characters that end or rewrite a line somewhere: C0 controls and DEL, the C1 controls U+0080-U+009F (U+0085 NEL
#: is a newline for xterm and str.splitlines, U+009B a CSI), U+2028 / U+2029 (line / paragraph separators)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _esc(m) -> str:
    """``\\xNN`` for a C0 control or DEL, ``\\uNNNN`` for the others (``\\xNN`` stays the notation of a byte that is
    not UTF-8, _text)."""
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x80 else f"\\u{c:04x}"

LEVELS = ["EMERG", "FATAL", "ALERT", "CRIT", "ERROR", "WARN", "NOTICE", "INFO", "DEBUG"]
_PY_LEVEL = {0: 50, 1: 50, 2: 50, 3: 50, 4: 40, 5: 30, 6: 20, 7: 20, 8: 10}

log = logging.getLogger("luaprobe")

#: the log level and format a run's child processes start with (shards, workers): `luaprobe run -q` / `-v` and the
#: daemon's `[log]` set them in the environment the children inherit, so a sharded run logs like a single fast path
LEVEL_ENV = "LUAPROBE_LOG_LEVEL"
FORMAT_ENV = "LUAPROBE_LOG_FORMAT"


def _text(x) -> str:
    """A Lua string (bytes) as log text: bytes that are not UTF-8 become ``\\xNN`` escapes (not U+FFFD:
    the original bytes stay readable in the log)."""
    return x.decode("utf-8", "backslashreplace") if isinstance(x, (bytes, bytearray)) else str(x)


def path_text(path) -> str:
    """A file name (str from argv or the OS, possibly holding surrogate escapes; or bytes) as printable text:
    bytes that are not UTF-8 become ``\\xNN`` escapes, so ``/tmp/x\\xff.pcap`` prints and fits in JSON/SQLite.
    The name to open stays the original (``os.fsencode`` gives the bytes back)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _escape_name_bytes(err):
    """Codec error handler ``luaprobe-escape``: a surrogate escape (an undecodable byte of a file name) as
    ``\\xNN``, any other unencodable character as ``\\uNNNN``."""
    chunk = err.object[err.start:err.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else c.encode("ascii", "backslashreplace").decode() for c in chunk), err.end


codecs.register_error("luaprobe-escape", _escape_name_bytes)


def printable(obj):
    """``obj`` (a summary: dicts, lists, str) with every str that holds surrogate escapes (file names from argv
    or the OS that are not UTF-8) shown as :func:`path_text` shows them, so JSON, SQLite and terminals get
    valid text."""
    if isinstance(obj, str):
        return obj.encode("utf-8", "luaprobe-escape").decode("utf-8")
    if isinstance(obj, dict):
        return {printable(k): printable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(printable(x) for x in obj)
    return obj


def install_escapes() -> None:
    """Make the process's stdout and stderr print undecodable file-name bytes as ``\\xNN`` (never a traceback,
    never raw bytes that could be terminal controls)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="luaprobe-escape")


_CONTROL_NL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_SEARCHED = "\n    searched: "


def one_line(msg: str) -> str:
    """A problem or error line for the terminal that stays one line whatever file names it holds (a plug-in
    directory named "x\\nplug-in problem: ..." must not print a second, forged problem line): control characters,
    newline included, escaped (``\\x0a``); only the documented second line of a failed ``require``
    ("\\n    searched: DIRS", engine/plugins/errors.py load_error) is kept as a line."""
    head, sep, tail = msg.partition(_SEARCHED)
    esc = lambda t: _CONTROL_NL.sub(_esc, t)   # noqa: E731
    return esc(head) + (sep + esc(tail) if sep else "")


def safe_text(msg: str) -> str:
    """A log message that cannot forge log lines: control characters other than tab and newline escaped
    (``\\x1b``), continuation lines indented with ``  | ``."""
    msg = _CONTROL.sub(_esc, msg)
    return msg.replace("\n", "\n  | ")


def tag_text(text: str) -> str:
    """A plug-in's file name or instance inside a ``[name#instance]`` tag or a summary row: every control character,
    newline included, escaped (``\\x0a``), so a file named "x\\nERROR ..." cannot start a line of its own."""
    return _CONTROL_NL.sub(_esc, text)


#: Trisul levels whose name the line's own level already says (logging's ERROR, WARNING, INFO, DEBUG): not repeated
_SAME_NAME = {4, 5, 7, 8}


def lua_log(level, script, instance, msg) -> None:
    """Sink for T.log* in any VM: one line tagged with script file name and instance (see safe_text, tag_text), e.g.
    ``... ERROR [x.lua#1] simplecounter.onpacket error: ...``; Trisul's level name follows the tag only when the
    line's own level does not say it (EMERG, FATAL, ALERT, CRIT: CRITICAL lines; NOTICE: an INFO line)."""
    level = int(level) if level is not None else 8
    name = tag_text(os.path.basename(_text(script))) if script else "lua"
    if level in _SAME_NAME:
        log.log(_PY_LEVEL[level], "[%s#%s] %s", name, tag_text(_text(instance)), safe_text(_text(msg)))
        return
    log.log(_PY_LEVEL.get(level, 10), "[%s#%s] %s: %s", name, tag_text(_text(instance)),
            LEVELS[level] if 0 <= level < len(LEVELS) else level, safe_text(_text(msg)))


def lua_print(script, instance, line) -> None:
    """Sink for Lua print() in plug-in VMs and workers: stdout, each line tagged ``[script#instance]`` (every line
    of a print whose text holds newlines: Trisul tags each line of a script's output); the printed bytes go out
    unchanged (a Lua string need not be UTF-8, as with print() in any Lua).

    The whole line goes out in one write(2) (not through Python's buffer), so lines printed at the same time by
    the fast path and by several worker processes sharing stdout never interleave within a line (a pipe keeps a
    write of up to PIPE_BUF = 4096 bytes whole; a file or terminal keeps any single write whole)."""
    name = tag_text(os.path.basename(_text(script))) if script else "lua"
    body = bytes(line) if isinstance(line, (bytes, bytearray)) else str(line).encode("utf-8", "surrogateescape")
    tag = f"[{name}#{tag_text(_text(instance))}] ".encode("utf-8", "backslashreplace")
    data = b"".join(tag + ln + b"\n" for ln in body.split(b"\n"))   # every line of a multi-line print tagged
    try:
        sys.stdout.flush()                   # keep order with anything Python printed before
        while data:
            data = data[os.write(sys.stdout.fileno(), data):]
    except BrokenPipeError:
        # the reader left (`luaprobe run plugins/ | head`): the rest of stdout is dropped, as for luaprobe's own lines
        # (docs/operations.md; cli._despite_reader_gone), by /dev/null on the descriptor.  Before, every later print
        # raised EPIPE as a Lua error in the hook: hook errors, and exit 4 when a hook printed on every call
        _stdout_to_devnull()


def _stdout_to_devnull() -> None:
    """Point standard output (the descriptor, and Python's buffer flushed into it) at /dev/null."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def set_level(name: str) -> None:
    """Set this process's level ("WARNING", "DEBUG", ...) and the level its children start with (LEVEL_ENV)."""
    log.setLevel(name)
    os.environ[LEVEL_ENV] = name


def setup(verbose: bool = False, json_lines: bool | None = None) -> None:
    """Configure the root luaprobe logger on stderr, text or JSON lines (``json_lines`` None: the format the parent
    asked for in FORMAT_ENV); the level is DEBUG with ``verbose``, else the parent's LEVEL_ENV, else INFO."""
    if log.handlers:
        return
    handler = logging.StreamHandler()
    if json_lines is None:
        json_lines = os.environ.get(FORMAT_ENV) == "json"
    os.environ[FORMAT_ENV] = "json" if json_lines else "text"
    if json_lines:
        import json

        class _Json(logging.Formatter):
            def format(self, r):
                return json.dumps({"ts": r.created, "level": r.levelname, "pid": r.process, "msg": r.getMessage()})

        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s luaprobe[%(process)d] %(levelname)s %(message)s"))
    log.addHandler(handler)
    inherited = os.environ.get(LEVEL_ENV, "")
    log.setLevel(logging.DEBUG if verbose else inherited if inherited in ("DEBUG", "INFO", "WARNING", "ERROR")
                 else logging.INFO)
    if verbose:
        os.environ[LEVEL_ENV] = "DEBUG"
