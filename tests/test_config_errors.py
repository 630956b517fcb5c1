"""Config problems of `luaprobe start` are one line naming the file (and the line when there is one), exit 2,
nothing started (docs/operations.md "Configuration"): an out_dir / run_dir / json_lines_file that cannot be
written, a prometheus_port in use, a byte that is not UTF-8, --run-dir naming a file.  Before: a 22 s crash
loop ending in "internal error: FileExistsError", or a Python traceback."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from luaprobe.engine.daemon import config, control
from tests import helpers
from tests.test_supervisor import EXAMPLES, SAMPLE, daemon  # noqa: F401 - the fixture

BASE = f"""[run]
out_dir = "out"
run_dir = "run"
[source]
pcap = [{json.dumps(SAMPLE)}]
[plugins]
paths = [{json.dumps(EXAMPLES)}]
"""


def cli(*args):
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=helpers.REPO,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def start_refused(tmp_path, text: str | bytes) -> str:
    """`luaprobe start` of config `text` (as tmp_path/c.toml, run_dir tmp_path/run) must refuse it: one stderr line
    (returned), exit 2, nothing started; a daemon it did start (the defect some tests guard against) is stopped."""
    path = tmp_path / "c.toml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    started = None
    try:
        r = cli("start", "--config", str(path))
    finally:
        started = control.read_pid(str(tmp_path / "run"))
        if started is not None:
            cli("stop", "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert started is None                                                  # nothing started
    return r.stderr.strip()


@pytest.mark.parametrize("value, line, reason", [
    ("afile", 2, "exists and is not a directory"),
    ("/proc/x/y", 2, "the parent directory /proc/x does not exist"),
    ("/proc/luaprobe-test-dir", 2, "cannot write there: "),
])
def test_out_dir_that_cannot_be_written(tmp_path, value, line, reason):
    (tmp_path / "afile").write_text("")
    text = BASE.replace('out_dir = "out"', f"out_dir = {json.dumps(value)}")
    err = start_refused(tmp_path, text)
    assert err.startswith(f"luaprobe start: {tmp_path / 'c.toml'}:{line}: [run] out_dir = ") and reason in err, err


@pytest.mark.parametrize("section, key", [("filex", "dir"), ("plugins", "data_dir"), ("plugins", "db_root"),
                                          ("plugins", "run_state_dir")])
def test_directories_the_fast_path_writes_are_tried_at_start(tmp_path, section, key):
    """Before: [filex] dir or [plugins] data_dir on a read-only filesystem passed validation, then the fast path
    crash-looped 6 times and `start` exited 1.  Now they are tried for writing like out_dir: exit 2, one line."""
    with helpers.tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        text = BASE.replace("[plugins]\n", "[plugins]\n" + (f"{key} = {json.dumps(str(ro / 'x'))}\n"
                                                            if section == "plugins" else ""))
        if section == "filex":
            text += f"[filex]\ndir = {json.dumps(str(ro / 'x'))}\n"
        err = start_refused(tmp_path, text)
    assert err.startswith(f"luaprobe start: {tmp_path / 'c.toml'}") and \
        err.endswith(f"[{section}] {key} = {ro / 'x'}: cannot write there: Read-only file system"), err
    assert not (tmp_path / "out").exists()


def test_run_dir_naming_a_file(tmp_path):
    (tmp_path / "afile").write_text("")
    err = start_refused(tmp_path, BASE.replace('run_dir = "run"', 'run_dir = "afile"'))
    assert f":3: [run] run_dir = \"{tmp_path / 'afile'}\": exists and is not a directory" in err
    for cmd in ("status", "stats", "stop", "reload"):
        r = cli(cmd, "--run-dir", str(tmp_path / "afile"))
        assert r.returncode == 2 and r.stderr == f"luaprobe {cmd}: --run-dir {tmp_path / 'afile'}: exists and is not a " \
                                                 "directory\n", (cmd, r.stderr)


def test_json_lines_file_that_cannot_be_written_and_relative_to_the_run_dir(tmp_path):
    err = start_refused(tmp_path, BASE + '[stats]\njson_lines_file = "/proc/x.jsonl"\n')
    assert err.startswith(f"luaprobe start: {tmp_path / 'c.toml'}:9: [stats] json_lines_file = \"/proc/x.jsonl\": "
                          "cannot write there: "), err
    (tmp_path / "c.toml").write_text(BASE + '[stats]\njson_lines_file = "s.jsonl"\n')
    cfg = config.load(str(tmp_path / "c.toml"))
    assert cfg["stats"]["json_lines_file"] == str(tmp_path / "run" / "s.jsonl")


@pytest.mark.parametrize("where, what", [
    ("out/luaprobe.sqlite", "is a file the run writes in --out {out} (writing there would destroy it; give another name)"),
    ("out", "is the --out directory (give a file name)"),
    ("in.pcap", "is a --pcap input (writing there would destroy it; give another name)"),
    ("run/state.json", "is the daemon's own state.json in its run directory {run} (give another name)")])
def test_json_lines_file_naming_a_file_the_daemon_reads_or_writes_is_refused(tmp_path, where, what):
    """Before: json_lines_file = "../out/luaprobe.sqlite" started, and every stats snapshot was appended to the
    live SQLite database (its rotation at json_lines_max_mb would have renamed the database away); a --pcap input
    (a copy of the sample here: the old code appended to it) or the daemon's own state.json were appended to the
    same way.  Now exit 2 at start, one line, nothing made, the input byte for byte what it was."""
    import shutil
    (tmp_path / "out").mkdir()
    pcap = tmp_path / "in.pcap"
    shutil.copy(SAMPLE, pcap)
    path = str(tmp_path / where)
    text = BASE.replace(json.dumps(SAMPLE), json.dumps(str(pcap))) + f'[stats]\njson_lines_file = "{path}"\n'
    err = start_refused(tmp_path, text)
    assert err.endswith(f'[stats] json_lines_file = "{path}": ' + what.format(out=tmp_path / "out",
                                                                               run=tmp_path / "run")), err
    assert os.listdir(tmp_path / "out") == [] and pcap.read_bytes() == open(SAMPLE, "rb").read()


def test_a_byte_order_mark_is_named(tmp_path):
    """A config saved with a UTF-8 BOM (Notepad): before, "c.toml:1:1: not valid TOML: Invalid statement", at a
    place where the user sees nothing wrong.  Now the line names the mark and what to do; nothing started."""
    err = start_refused(tmp_path, b"\xef\xbb\xbf" + BASE.encode())
    assert err == (f"luaprobe start: {tmp_path / 'c.toml'}:1: byte offset 0: the file starts with a UTF-8 byte-order "
                   "mark (EF BB BF, written by some Windows editors), which TOML does not allow: save it without one")
    assert not (tmp_path / "out").exists()


def test_json_lines_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    """A FIFO as json_lines_file: the write check opened it for appending, which blocks until a reader
    comes, so `start` hung; the file is rotated by renaming, which a FIFO cannot take.  Now exit 2, one
    line, at once (the timeout of start_refused's subprocess would fail the test on a hang)."""
    os.mkfifo(tmp_path / "s.fifo")
    err = start_refused(tmp_path, BASE + f'[stats]\njson_lines_file = "{tmp_path / "s.fifo"}"\n')
    assert err.endswith(f'[stats] json_lines_file = "{tmp_path / "s.fifo"}": is not a regular file (a FIFO or '
                        "device cannot be rotated; give a file name)"), err
    assert not (tmp_path / "out").exists()


def test_prometheus_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = start_refused(tmp_path, BASE + f"[stats]\nprometheus_port = {port}\n")
    assert err == (f"luaprobe start: {tmp_path / 'c.toml'}: [stats] prometheus_port = {port}: cannot serve /metrics "
                   f"on 127.0.0.1:{port}: Address already in use")


def test_semantic_error_names_the_line(tmp_path):
    err = start_refused(tmp_path, BASE + "[async]\n# a comment\nworkers = 0\n")
    assert err == f"luaprobe start: {tmp_path / 'c.toml'}:10: [async] workers = 0: must be an integer between 1 and 256"


@pytest.mark.parametrize("value, shown, must", [
    ('"maybe"', '"maybe"', 'one of "auto", "on", "off"'), ('"ON"', '"ON"', 'one of "auto", "on", "off"'),
    ("true", "true", "a string"), ("1", "1", "a string")])
def test_huge_pages_value_names_the_line(tmp_path, value, shown, must):
    """[fastpath] huge_pages (engine/fastpath/hugepages.py): anything but "auto" / "on" / "off" is one line naming the
    file and the key's line, exit 2, nothing started."""
    err = start_refused(tmp_path, BASE + f"[fastpath]\nbatch = 512\nhuge_pages = {value}\n")
    assert err == f"luaprobe start: {tmp_path / 'c.toml'}:10: [fastpath] huge_pages = {shown}: must be {must}", err


def test_latin1_byte_is_named_with_its_offset_at_start_and_reload(tmp_path, daemon):  # noqa: F811
    raw = BASE.encode() + b"# caf\xe9\n"
    err = start_refused(tmp_path, raw)
    offset = raw.index(b"\xe9")
    assert err == (f"luaprobe start: {tmp_path / 'c.toml'}:8: byte offset {offset}: byte 0xE9 is not UTF-8 "
                   "(a TOML file must be UTF-8)")
    daemon.start()
    with open(daemon.config, "ab") as f:
        f.write(b"# caf\xe9\n")
    r = daemon.cli("reload")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{daemon.config}:" in r.stderr and "byte 0xE9 is not UTF-8" in r.stderr, r.stderr
    assert daemon.status()["state"] == "running"
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


def test_run_dir_flag_is_the_run_dir_config_checks_and_resolves_against(tmp_path):
    """--run-dir overrides [run] run_dir for every use: the writability check names the flag, and a relative
    json_lines_file is relative to the run directory actually used (before: to [run] run_dir even then)."""
    (tmp_path / "afile").write_text("")
    (tmp_path / "c.toml").write_text(BASE + '[stats]\njson_lines_file = "s.jsonl"\n')
    cfg = config.load(str(tmp_path / "c.toml"), run_dir=str(tmp_path / "other"))
    assert cfg.run_dir == str(tmp_path / "other") and cfg["run"]["run_dir"] == str(tmp_path / "run")
    assert cfg["stats"]["json_lines_file"] == str(tmp_path / "other" / "s.jsonl")
    with pytest.raises(config.ConfigError) as e:
        config.load(str(tmp_path / "c.toml"), run_dir=str(tmp_path / "afile"))
    assert str(e.value) == f"{tmp_path / 'c.toml'}: --run-dir {tmp_path / 'afile'}: exists and is not a directory"


# The line each problem is on is marked "#<-" in the text; the test finds it there (not in luaprobe's output).
STRAY_AND_TWICE = [
    ("[run]\nout_dir = 'o'\nbogus = 1  #<-\n", "[run] unknown key 'bogus'"),
    ("[run]\nout_dir = 'o'\n\"bogus\" = 1  #<-\n", "[run] unknown key 'bogus'"),
    ("[run]\nout_dir = 'o'\nbogus.deep = 1  #<-\n", "[run] unknown key 'bogus'"),
    ("[run]\nout_dir = 'o'\n\n[run.bogus]  #<-\nx = 1\n", "[run] unknown key 'bogus'"),
    ("\n# a comment\nbogus = 1  #<-\n[run]\nout_dir = 'o'\n", "unknown key 'bogus' before any section"),
    ("\n\nrun = { out_dir = 'o', bogus = 1 }  #<-\n", "[run] unknown key 'bogus'"),
    ("[stats]\ninterval = 1\nrun.bogus = 2  #<-\n", "[stats] unknown key 'run'"),
    ("[run]\nout_dir = 'o'\nout_dir = 'p'  #<-\n", "not valid TOML: key out_dir is given twice"),
    ("[run]\nout_dir = 'o'\n[stats]\ninterval = 1\n[run]  #<-\nshards = 2\n", "not valid TOML: table [run] is declared twice"),
    ("[log]\nverbose = true\n\n\"verbose\" = false  #<-\n", 'not valid TOML: key "verbose" is given twice'),
]


@pytest.mark.parametrize("body, what", STRAY_AND_TWICE)
def test_a_stray_or_twice_given_key_names_its_file_and_line(tmp_path, body, what):
    """A key luaprobe does not know, however it is spelled (quoted, dotted, inline table, [section.key], before
    any section), and a key or table given twice name the file and the line (before: an unknown key written
    other than `key =` and every duplicate, tomllib's "Cannot overwrite a value (at line 3, column 14)", had
    no file:line)."""
    text = body + BASE[BASE.index("[source]"):]
    line = next(n for n, t in enumerate(text.splitlines(), 1) if t.endswith("#<-"))
    err = start_refused(tmp_path, text)
    assert err.startswith(f"luaprobe start: {tmp_path / 'c.toml'}:{line}:") and what in err, (line, err)


@pytest.mark.parametrize("key", ["user", "group"])
def test_empty_user_or_group_key_is_refused(tmp_path, key):
    """`[run] user = ""` was taken for "not given": the daemon stayed root, with no word (the flag --user "" is
    refused too, tests/test_usage.py).  Now one line naming the file, line and key, exit 2, nothing started."""
    from luaprobe.engine.daemon.config import ConfigError, load
    cfg = tmp_path / "probe.toml"
    extra = 'user = "nobody"\n' if key == "group" else ""
    cfg.write_text(f'[run]\nout_dir = "out"\n{extra}{key} = ""\n')
    with pytest.raises(ConfigError) as e:
        load(str(cfg))
    assert str(e.value).endswith(f'[run] {key} = "": must be a name or a number, not empty (leave the key out for '
                                 'none)'), str(e.value)


@pytest.mark.parametrize("old, new, line, says", [
    ('out_dir = "out"', 'out_dir = ""', 2, '[run] out_dir = "": must name a directory'),
    ("pcap = [", 'pcap = ["", ', 5, '[source] pcap = ["", '),
    ("paths = [", 'paths = ["", ', 7, '[plugins] paths = ["", '),
])
def test_an_empty_path_names_its_line(tmp_path, old, new, line, says):
    """`out_dir = ""` gave "c.toml: [run] out_dir = : cannot write there: No such file or directory" (no line, no
    quotes) and an empty entry of a path list was taken as the config's own directory (`paths = [""]` ran every
    plug-in beside the config).  Now one line naming the file, line and key, exit 2, nothing started, as
    `run_dir = ""` already was."""
    err = start_refused(tmp_path, BASE.replace(old, new, 1))
    assert err.startswith(f"luaprobe start: {tmp_path / 'c.toml'}:{line}: {says}"), err
    if "out_dir" not in says:
        assert err.endswith("must be a list of non-empty strings (paths)"), err


def test_a_bpf_that_does_not_compile_is_refused_at_start(tmp_path):
    """The newcomer review (session 18): `[source] interface = "lo"` with `bpf = "tcp port"` was not compiled at
    start: "started: ...", exit 0, then the fast path exited 3 again and again ("restarting (last exit: exit
    status 3)", restarts counting up) until `stop` said "the fast path ended with exit status 3".  `run --interface
    lo --bpf "tcp port"` refuses it before anything starts, exit 2.  Now the config check compiles it as run does:
    one line naming the file, the line and the key and libpcap's reason, exit 2, nothing started.  Truths:
    run's own refusal of the same expression, and dumpcap's (libpcap's) verdict when dumpcap is installed."""
    import shutil
    if not os.path.exists("/sys/class/net/lo"):
        pytest.skip("no lo interface here")
    bad = "tcp port"
    dumpcap = shutil.which("dumpcap")
    if dumpcap:
        d = subprocess.run([dumpcap, "-i", "lo", "-d", "-f", bad], capture_output=True, text=True, timeout=60)
        assert "can't parse filter expression: syntax error" in d.stdout + d.stderr, d.stdout + d.stderr
    r = cli("run", EXAMPLES, "--interface", "lo", "--bpf", bad, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "can't parse filter expression: syntax error" in r.stderr, r.stderr
    text = BASE.replace(f"pcap = [{json.dumps(SAMPLE)}]", f'interface = "lo"\nbpf = "{bad}"')
    err = start_refused(tmp_path, text)
    assert err == (f'luaprobe start: {tmp_path / "c.toml"}:6: [source] bpf = "{bad}": cannot compile BPF filter '
                   f"'{bad}': can't parse filter expression: syntax error"), err
    ok = BASE.replace(f"pcap = [{json.dumps(SAMPLE)}]", 'interface = "lo"\nbpf = "tcp port 9"')
    (tmp_path / "ok.toml").write_text(ok)
    from luaprobe.engine.daemon.config import load
    assert load(str(tmp_path / "ok.toml")).values["source"]["bpf"] == "tcp port 9"


def test_the_ray_backend_without_ray_is_refused_at_start(tmp_path):
    """`[async] backend = "ray"` where the ray package is not installed: before, `start` started the daemon, its
    fast path exited 2 ('--async-backend ray: the ray package is not installed', naming a flag the user did not
    give) and `start` printed that line and five lines of supervisor.log.  `run --async-backend ray` refuses it
    before anything starts (tests/test_usage.py).  Now one line naming the file, the line and the key, exit 2,
    nothing started.  Truth: importlib's own look for the package."""
    import importlib.util
    if importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed here")
    text = BASE + '[async]\nbackend = "ray"\n'
    err = start_refused(tmp_path, text)
    assert err == (f'luaprobe start: {tmp_path / "c.toml"}:9: [async] backend = "ray": the ray package is not '
                   "installed (pip install 'luaprobe[ray]')"), err
