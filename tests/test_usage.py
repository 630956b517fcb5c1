"""Every user mistake: one clear line on stderr, the documented exit code, nothing started, no traceback.

The documented codes (README, docs/operations.md): 2 usage error, 3 input error, 4 plug-in error.  Each case
below is a real `luaprobe` process; "nothing started" is checked on the file system (no --out directory,
no database) and by the leak guard in conftest.py (no child process, no shared-memory segment left).
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys

import pytest

from tests import helpers

EX = os.path.join(helpers.REPO, "engine", "examples")
PLUGIN = os.path.join(EX, "tcp_ports.lua")
SAMPLE = os.path.join(EX, "sample.pcap")


def luaprobe(*args, cwd=None, timeout=60, env=None):
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=cwd or helpers.REPO,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=None if env is None else {**os.environ, **env})


# (flag, a value out of range) for every numeric option of `luaprobe run` (docs/operations.md lists the ranges)
OUT_OF_RANGE = [
    ("--batch", "0"), ("--batch", "-5"), ("--batch", "1000000"), ("--batch", "abc"),
    ("--workers", "0"), ("--workers", "257"), ("--overflow-limit", "-1"), ("--task-timeout", "0"),
    ("--task-timeout", "-2"), ("--task-timeout", "nan"), ("--worker-max-tasks", "-1"),
    ("--worker-max-rss-mb", "-1"), ("--worker-spin-us", "-1"), ("--worker-spin-us", "1e9"),
    ("--ring-size", "1000"), ("--ring-size", "5000"), ("--ring-size", str(1 << 31)), ("--drain-deadline", "-1"),
    ("--backend-instances", "-1"), ("--backend-instances", "65"), ("--packet-ring-mb", "3"), ("--packet-ring-mb", "0"),
    ("--flow-capacity", "1000"), ("--idle-timeout", "0"), ("--active-timeout", "-1"), ("--window", "0"),
    ("--frag-timeout", "0"), ("--frag-max-mb", "0"), ("--http-max-header", "10"), ("--filex-chunk-mb", "0"),
    ("--filex-dir-cap-mb", "0"), ("--shards", "0"), ("--backend-instances", "0"),
    ("--pin-cpus", "1"), ("--pin-cpus", "1,1"), ("--pin-cpus", "x,2"), ("--pin-cpus", "on"),
    ("--huge-pages", "maybe"), ("--huge-pages", "1"), ("--huge-pages", ""),
    ("--speed", "-1"), ("--speed", "nan"), ("--speed", "2e6"),
]


def one_line(r, code: int, *fragments: str) -> None:
    """Exit `code`, exactly one line on stderr holding every fragment, no traceback."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert r.stderr.endswith("\n") and r.stderr.count("\n") == 1, r.stderr
    for f in fragments:
        assert f in r.stderr, (f, r.stderr)


@pytest.mark.parametrize("flag,value", OUT_OF_RANGE)
def test_numeric_flag_out_of_range(tmp_path, flag, value):
    out = tmp_path / "out"
    r = luaprobe("run", PLUGIN, "--pcap", SAMPLE, "--out", str(out), flag, value)
    one_line(r, 2, f"luaprobe run: argument {flag}: ", "(luaprobe run --help)")
    assert not out.exists()


def _fifo(tmp_path):
    p = tmp_path / "fifo.pcap"
    os.mkfifo(p)
    return str(p)


# (name, argv builder, exit code, fragments of the one line)
MISTAKES = [
    ("pcap missing", lambda t: ["run", PLUGIN, "--pcap", str(t / "nope.pcap")], 3,
     ["luaprobe run: --pcap ", "nope.pcap: no such file"]),
    ("pcap is a directory", lambda t: ["run", PLUGIN, "--pcap", str(t)], 3, ["is a directory, not a capture file"]),
    ("pcap is not a capture", lambda t: ["run", PLUGIN, "--pcap", PLUGIN], 3,
     ["tcp_ports.lua: byte offset 0: not a pcap or pcapng file"]),
    ("pcap is a device", lambda t: ["run", PLUGIN, "--pcap", "/dev/null"], 3,
     ["luaprobe run: --pcap /dev/null: not a regular file (nor a FIFO or -)"]),   # FIFOs: test_pcap_stream.py
    ("second pcap missing", lambda t: ["run", PLUGIN, "--pcap", SAMPLE, str(t / "b.pcap")], 3, ["b.pcap: no such"]),
    ("out is a file", lambda t: ["run", PLUGIN, "--pcap", SAMPLE, "--out", PLUGIN], 2,
     ["--out ", "exists and is not a directory"]),
    ("out parent missing", lambda t: ["run", PLUGIN, "--pcap", SAMPLE, "--out", str(t / "a" / "b")], 2,
     ["does not exist"]),
    ("stats-json dir missing", lambda t: ["run", PLUGIN, "--pcap", SAMPLE, "--stats-json", str(t / "no" / "s.json")],
     2, ["--stats-json ", "does not exist"]),
    ("stats-json is a dir", lambda t: ["run", PLUGIN, "--pcap", SAMPLE, "--stats-json", str(t)], 2,
     ["is a directory"]),
    ("misspelled flag", lambda t: ["run", PLUGIN, "--pcpa", SAMPLE], 2, ["unknown option --pcpa (did you mean --pcap?)"]),
    ("misspelled flag, = form", lambda t: ["run", PLUGIN, "--pcap", SAMPLE, "--wokers=2"], 2,
     ["unknown option --wokers (did you mean --workers?)"]),
    ("no source", lambda t: ["run", PLUGIN], 2,
     ["one of the arguments --pcap --interface --generate --lua-input is required"]),
    ("bpf without interface", lambda t: ["run", PLUGIN, "--pcap", SAMPLE, "--bpf", "tcp"], 2, ["--bpf needs"]),
    ("both append and overwrite", lambda t: ["run", PLUGIN, "--pcap", SAMPLE, "--append", "--overwrite"], 2,
     ["not allowed with argument"]),
    # one rule for the flag and the TOML key (engine/daemon/settings.py), checked before any shard starts
    ("backend instances 0", lambda t: ["run", EX, "--pcap", SAMPLE, "--backend-instances", "0"],
     2, ["luaprobe run: argument --backend-instances: 0 is out of range: must be between 1 and 64"]),
    ("backend instances 0, 2 shards",
     lambda t: ["run", EX, "--pcap", SAMPLE, "--backend-instances", "0", "--shards", "2"],
     2, ["luaprobe run: argument --backend-instances: 0 is out of range: must be between 1 and 64"]),
    ("lua-path missing", lambda t: ["run", PLUGIN, "--pcap", SAMPLE, "--lua-path", "/nonexistent"], 2,
     ["luaprobe run: --lua-path /nonexistent: no such directory"]),
    ("lua-path missing, 2 shards", lambda t: ["run", PLUGIN, "--pcap", SAMPLE, "--lua-path", "/nonexistent",
                                              "--shards", "2"], 2,
     ["luaprobe run: --lua-path /nonexistent: no such directory"]),
    ("lua-path is a file", lambda t: ["run", PLUGIN, "--pcap", SAMPLE, "--lua-path", PLUGIN], 2,
     [f"luaprobe run: --lua-path {PLUGIN}: not a directory"]),
    ("filex-dir under a missing path", lambda t: ["run", EX, "--pcap", SAMPLE, "--filex-dir", str(t / "a" / "fx")],
     2, ["luaprobe run: --filex-dir ", "fx: the parent directory ", "a does not exist"]),
    ("filex-dir under a missing path, 2 shards",
     lambda t: ["run", EX, "--pcap", SAMPLE, "--filex-dir", str(t / "a" / "fx"), "--shards", "2"],
     2, ["luaprobe run: --filex-dir ", "fx: the parent directory ", "a does not exist"]),
    ("filex-dir is a file", lambda t: ["run", EX, "--pcap", SAMPLE, "--filex-dir", PLUGIN], 2,
     [f"luaprobe run: --filex-dir {PLUGIN}: exists and is not a directory"]),
    ("check lua-path missing", lambda t: ["check", PLUGIN, "--lua-path", "/nonexistent"], 2,
     ["luaprobe check: --lua-path /nonexistent: no such directory"]),
    ("no plug-in files, 2 shards", lambda t: ["run", str(t), "--pcap", SAMPLE, "--shards", "2"], 4,
     ["no plug-in files found"]),
    ("unknown command", lambda t: ["runn"], 2, ["invalid choice: 'runn'"]),
    ("no plug-in files", lambda t: ["run", str(t), "--pcap", SAMPLE], 4, ["no plug-in files found"]),
    ("gen out is a directory", lambda t: ["gen", "--out", str(t), "--flows", "3"], 2,
     ["luaprobe gen: --out ", "is a directory"]),
    ("gen out dir missing", lambda t: ["gen", "--out", str(t / "no" / "x.pcap")], 2, ["does not exist"]),
    ("gen misspelled flag", lambda t: ["gen", "--out", str(t / "x.pcap"), "--flws", "3"], 2,
     ["unknown option --flws (did you mean --flows?)"]),
    ("gen flows out of range", lambda t: ["gen", "--out", str(t / "x.pcap"), "--flows", "0"], 2, ["--flows"]),
    ("query limit negative", lambda t: ["query", "alerts", "--out", str(t), "--limit", "-1"], 2, ["--limit"]),
    ("query no database", lambda t: ["query", "alerts", "--out", str(t)], 3, ["luaprobe query: ", "work"]),
    ("query unknown kind", lambda t: ["query", "alert"], 2, ["invalid choice: 'alert'"]),
    # a PLUGIN path on the command line is what the user typed: usage error 2, not a plug-in error 4
    ("check missing file", lambda t: ["check", str(t / "nope.lua")], 2,
     ["luaprobe check: ", "nope.lua: no such plug-in file or directory"]),
    ("run missing plug-in file", lambda t: ["run", "/nonexistent.lua", "--pcap", SAMPLE], 2,
     ["luaprobe run: /nonexistent.lua: no such plug-in file or directory"]),
    ("run missing plug-in file, 2 shards", lambda t: ["run", PLUGIN, str(t / "nope.lua"), "--pcap", SAMPLE,
                                                      "--shards", "2"], 2,
     ["luaprobe run: ", "nope.lua: no such plug-in file or directory"]),
    ("run plug-in is a fifo", lambda t: ["run", _fifo(t), "--pcap", SAMPLE], 2,
     ["luaprobe run: ", "fifo.pcap: not a regular file or a directory"]),
    ("shm bad action", lambda t: ["shm", "cleen"], 2, ["invalid choice: 'cleen'"]),
    ("stats count negative", lambda t: ["stats", "--count", "-1", "--run-dir", str(t)], 2, ["--count"]),
    ("start config missing", lambda t: ["start", "--config", str(t / "nope.toml")], 2, ["nope.toml"]),
]


@pytest.mark.parametrize("cmd", ["run", "check"])
@pytest.mark.parametrize("entry,says", [("/nonexistent", "no such directory"), (PLUGIN, "not a directory")])
def test_trisul_lua_paths_checked_like_lua_path(tmp_path, cmd, entry, says):
    """A TRISUL_LUA_PATHS entry gets --lua-path's rule and message, naming the variable (it was ignored and
    surfaced later as a `require` failing inside a plug-in); good entries beside it are fine."""
    argv = [cmd, PLUGIN] + (["--pcap", SAMPLE] if cmd == "run" else [])
    r = luaprobe(*argv, cwd=str(tmp_path), env={"TRISUL_LUA_PATHS": f"{EX}:{entry}"})
    one_line(r, 2, f"luaprobe {cmd}: TRISUL_LUA_PATHS {entry}: {says}")
    assert not (tmp_path / "out").exists()
    r = luaprobe(*argv, cwd=str(tmp_path), env={"TRISUL_LUA_PATHS": f"{EX};{tmp_path}"})
    assert r.returncode == 0, r.stderr


def test_plugin_search_dirs_each_once_in_order(tmp_path, monkeypatch):
    """package.path's directories (shm/searchpath.py plugin_dirs): the script's own directory, its parent search
    directory, --lua-path, TRISUL_LUA_PATHS, the helpers; a directory named twice (the script's own directory also
    given as --lua-path and in TRISUL_LUA_PATHS) comes once, where it first comes.  Truth: the directories made here."""
    from luaprobe.shm.searchpath import HELPERS_DIR, plugin_dirs
    root, extra = tmp_path / "root", tmp_path / "extra"
    (root / "sub").mkdir(parents=True)
    extra.mkdir()
    script = root / "sub" / "p.lua"
    script.write_text("")
    monkeypatch.setenv("TRISUL_LUA_PATHS", f"{root / 'sub'}:{extra}:{root}")
    dirs = plugin_dirs(str(script), [str(root / "sub"), str(root), str(extra)])
    assert dirs == [str(root / "sub"), str(root), str(extra), HELPERS_DIR]


def test_trisul_lua_paths_checked_by_start(tmp_path):
    """The daemon's config check applies the same rule (exit 2, one line, nothing started)."""
    cfg = tmp_path / "probe.toml"
    cfg.write_text(f'[run]\nout_dir = "{tmp_path / "out"}"\nrun_dir = "{tmp_path / "run"}"\n'
                   f'[source]\npcap = ["{SAMPLE}"]\n[plugins]\npaths = ["{PLUGIN}"]\n')
    r = luaprobe("start", "--config", str(cfg), cwd=str(tmp_path), env={"TRISUL_LUA_PATHS": "/nonexistent"})
    one_line(r, 2, "TRISUL_LUA_PATHS /nonexistent: no such directory")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed here")
@pytest.mark.parametrize("shards", ["1", "2"])
def test_ray_backend_without_ray_is_a_usage_line(tmp_path, shards):
    """A missing optional dependency is the user's to install: one line naming it, exit 2, nothing started
    (it was 'internal error' exit 1, and with shards a crash loop of every shard with tracebacks)."""
    r = luaprobe("run", EX, "--pcap", SAMPLE, "--async-backend", "ray", "--shards", shards, cwd=str(tmp_path))
    one_line(r, 2, "--async-backend ray: the ray package is not installed", "luaprobe[ray]")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,argv,code,fragments", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistake(tmp_path, name, argv, code, fragments):
    work = tmp_path / "work"
    work.mkdir()
    r = luaprobe(*argv(work), cwd=str(tmp_path))
    one_line(r, code, *fragments)
    assert not (tmp_path / "out").exists()                 # nothing started: the default --out is not created


def test_earlier_results_are_refused_appended_or_overwritten(tmp_path):
    """A second run into the same --out neither merges silently nor loses the first run by accident."""
    out = str(tmp_path / "out")
    assert luaprobe("run", PLUGIN, "--pcap", SAMPLE, "--out", out, "-q").returncode == 0
    r = luaprobe("run", PLUGIN, "--pcap", SAMPLE, "--out", out, "-q")
    one_line(r, 2, f"--out {out}: already holds the results of an earlier run", "--overwrite", "--append")
    import sqlite3

    def total():
        with sqlite3.connect(os.path.join(out, "luaprobe.sqlite")) as db:
            return db.execute("SELECT sum(value) FROM counters").fetchone()[0]
    first = total()
    assert first > 0
    assert luaprobe("run", PLUGIN, "--pcap", SAMPLE, "--out", out, "-q", "--append").returncode == 0
    assert total() == 2 * first                            # deliberately accumulated
    assert luaprobe("run", PLUGIN, "--pcap", SAMPLE, "--out", out, "-q", "--overwrite").returncode == 0
    assert total() == first                                # replaced
    for _ in range(2):                                     # the demo replaces its own output every time
        assert luaprobe("demo", "--out", out, "-q").returncode == 0


@pytest.mark.parametrize("cmd", ["run", "demo"])
@pytest.mark.parametrize("extra, fragment", [([], "--out {f}: exists and is not a directory"),
                                             (["--analysers", "bogus"], "--analysers: unknown analyser 'bogus'")])
def test_a_demo_s_errors_say_demo(tmp_path, cmd, extra, fragment):
    """`luaprobe demo` runs `run`'s code: its one line named `luaprobe run:` (`luaprobe demo --out /etc/passwd`:
    "luaprobe run: --out /etc/passwd: exists and is not a directory"); each line now names the command typed."""
    f = tmp_path / "a_file"
    f.write_text("")
    args = ["--out", str(f)] if not extra else ["--out", str(tmp_path / "out"), *extra]
    r = luaprobe(cmd, *([PLUGIN, "--pcap", SAMPLE] if cmd == "run" else []), *args)
    one_line(r, 2, f"luaprobe {cmd}: " + fragment.format(f=f))
    assert r.stderr.startswith(f"luaprobe {cmd}: "), r.stderr


@pytest.mark.parametrize("cmd", ["run", "demo", "check", "query", "gen", "start", "stop", "status", "reload", "stats",
                                 "shm", "loadtest"])
def test_help_of_every_command(cmd):
    r = luaprobe(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: luaprobe " + cmd) and r.stderr == ""


# Bad invocations built from pieces: whatever the combination, the answer is a usage/input/plug-in code and no
# traceback (a traceback is what a user must never see).
PIECES = [["--batch", "-1"], ["--pcap"], ["--pcap", "/nonexistent"], ["--out"], ["--interface", "nosuchif0"],
          ["--generate", "packets=x"], ["--generate", "flows=0"], ["--ring-size", "3"], ["--json", "--quiet"],
          ["--lua-path"], ["--stats-json", "/proc/nope/x"], ["--=x"], ["-"], ["--"], ["\u00e9\u00e8"], ["-x"]]


@pytest.mark.parametrize("a,b", list(itertools.combinations(range(len(PIECES)), 2))[::3])
def test_no_traceback_for_combined_mistakes(tmp_path, a, b):
    argv = ["run", PLUGIN, *PIECES[a], *PIECES[b]]
    r = luaprobe(*argv, cwd=str(tmp_path), timeout=120)
    assert "Traceback" not in r.stderr + r.stdout, (argv, r.stderr)
    assert r.returncode in (0, 2, 3, 4), (argv, r.returncode, r.stderr)


def test_quick_loadtest_never_writes_into_docs(tmp_path):
    docs = os.path.join(helpers.REPO, "docs", "loadtest")
    before = {f: os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(docs) for f in fs}
    r = luaprobe("loadtest", "overflow", "--quick", "--out", docs)
    one_line(r, 2, "quick smoke runs never write into docs/")
    assert {f: os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(docs) for f in fs} == before
    r = luaprobe("loadtest", "--help")                  # the default report directory is not docs/
    assert r.returncode == 0 and "default ./loadtest-reports" in r.stdout


def test_run_and_query_defaults_agree(tmp_path):
    """`luaprobe run` writes ./out by default and `luaprobe query` reads ./out by default."""
    assert luaprobe("run", PLUGIN, "--pcap", SAMPLE, "-q", cwd=str(tmp_path)).returncode == 0
    assert (tmp_path / "out" / "luaprobe.sqlite").exists()
    r = luaprobe("query", "counters", "--json", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    import json
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    import sqlite3
    with sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite") as db:
        assert len(rows) == db.execute("SELECT count(*) FROM counters").fetchone()[0] > 0


def test_every_fast_path_setting_has_a_flag_and_a_toml_key(tmp_path):
    """engine/daemon/settings.py: each setting reaches RunConfig the same way from a flag and from TOML."""
    from luaprobe.engine.daemon import cli, config, settings
    flags, raw = [], {"source": {"pcap": [SAMPLE]}, "plugins": {"paths": [EX]}}
    for field, flag, (section, key), kind, default, lo, hi, scale, _ in settings.SETTINGS:
        v = (str(tmp_path) if kind == "path" else "nobody" if kind == "name" else "1,0" if kind == "cpus"
             else "off" if kind == "pages" else hi)                                     # legal, not the default
        flags += [flag, str(v)]
        raw.setdefault(section, {})[key] = v
    args = cli.build_parser().parse_args(["run", PLUGIN, "--pcap", SAMPLE, *flags])
    from_flags = settings.from_args(args)
    from_toml = config.validate(raw, str(tmp_path / "c.toml")).run_config()
    assert set(from_flags) == {s[0] for s in settings.SETTINGS}
    for field, value in from_flags.items():
        assert getattr(from_toml, field) == value, field
    assert from_toml.packet_ring_size == 4096 << 20 and from_toml.flow_capacity == 1 << 26
    ac = config.validate({**raw, "async": {"ring_size": 1 << 16, "worker_spin_us": 7}}, "c.toml").run_config()
    assert (ac.async_config.ring_size, ac.async_config.worker_spin_us) == (1 << 16, 7.0)


@pytest.mark.parametrize("value", [0, 65])
def test_backend_instances_same_rule_in_toml(tmp_path, value):
    """`[plugins] backend_instances` and `--backend-instances` come from one row of the settings table: the TOML
    key refuses what the flag refuses, with the same bounds (the flag took 0, the key did not)."""
    conf = tmp_path / "probe.toml"
    conf.write_text(f'[source]\npcap = ["{SAMPLE}"]\n[plugins]\npaths = ["{EX}"]\nbackend_instances = {value}\n')
    r = luaprobe("start", "--config", str(conf), "--run-dir", str(tmp_path / "run"))
    one_line(r, 2, f"[plugins] backend_instances = {value}: must be an integer between 1 and 64")
    r = luaprobe("run", EX, "--pcap", SAMPLE, "--backend-instances", str(value), "--out", str(tmp_path / "out"))
    one_line(r, 2, f"argument --backend-instances: {value} is out of range: must be between 1 and 64")


def test_run_help_shows_plain_numbers():
    """Ranges and defaults in `run --help` are integers and decimals a person reads, never e-notation."""
    import re
    r = luaprobe("run", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())                  # undo argparse's wrapping
    text = text[text.index(" options: "):]             # the option list, not the usage line
    assert not re.search(r"\de[+-]\d", text), re.findall(r"\S*\de[+-]\d\S*", text)
    for flag, rng in [("--flow-capacity", "(1024..67108864, default 1048576)"),
                      ("--http-max-header", "(1024..16777216, default 65536)"),
                      ("--filex-dir-cap-mb", "(1..1048576, default 256)"), ("--filex-chunk-mb", "(0.001..4096, default 5)"),
                      ("--backend-instances", "(1..64, default 2)")]:
        part = text[text.index(flag + " "):]
        assert rng in part[:part.index(" --", 3)], (flag, part[:300])


def test_readme_lists_every_query_subcommand():
    """README's `luaprobe query` line names exactly the kinds `luaprobe query` accepts (its usage line)."""
    import re
    r = luaprobe("query", "--help")
    kinds = re.search(r"\{([a-z,]+)\}", r.stdout).group(1).split(",")
    line = next(x for x in open(os.path.join(helpers.REPO, "README.md"))       # the command line, not prose naming
                if x.lstrip().startswith(".venv/bin/luaprobe query "))        # one kind ("luaprobe query resources")
    listed = [w.strip() for w in line.split("#", 1)[1].split(",")[0].split("|")]
    assert listed == kinds, (listed, kinds)
    top = luaprobe("--help").stdout
    assert "printoutputs:" + "|".join(kinds) in "".join(top.split())      # argparse may wrap inside the list


@pytest.mark.parametrize("cmd,says", [("stop", "not running"), ("reload", "not running"),
                                      ("stats", "no daemon is running")])
def test_daemon_commands_without_a_daemon_exit_3(tmp_path, cmd, says):
    """No daemon in the run directory: `stop` answers like `status`, `reload` and `stats` (exit 3, one line
    naming where it looked); it exited 0 before."""
    run = tmp_path / "run"
    r = luaprobe(cmd, "--run-dir", str(run), cwd=str(tmp_path))
    one_line(r, 3, f"luaprobe {cmd}: {says}", str(run))
    assert luaprobe("status", "--run-dir", str(run), cwd=str(tmp_path)).returncode == 3


HTTP = os.path.join(helpers.PCAPS, "http-get-text.pcap")


@pytest.mark.parametrize("shards", ["1", "2"])
def test_filex_dir_is_created_once_and_left_as_named(tmp_path, shards):
    """--filex-dir naming a missing directory whose parent exists: created by the run, files extracted there and
    removed after their hooks, the directory itself left empty, the same with and without shards (each shard
    used to leave an empty shard-K subdirectory); nothing is created above it (see the mistakes above)."""
    fx = tmp_path / "fx"
    r = luaprobe("run", EX, "--pcap", HTTP, "--filex-dir", str(fx), "--out", str(tmp_path / "out"), "--shards",
                 shards, "--json", cwd=str(tmp_path))         # file_sha256.lua copies files to ./extracted
    assert r.returncode == 0, r.stderr
    import json
    files = sum(x["files"] for x in json.loads(r.stdout)["filex"])
    assert files >= 1                                      # file_sha256.lua's onfile_http had a file there
    assert fx.is_dir() and os.listdir(fx) == []


def test_filex_dir_in_toml_under_a_missing_path(tmp_path):
    conf = tmp_path / "probe.toml"
    conf.write_text(f'[source]\npcap = ["{SAMPLE}"]\n[plugins]\npaths = ["{EX}"]\n[filex]\ndir = "a/fx"\n')
    r = luaprobe("start", "--config", str(conf), "--run-dir", str(tmp_path / "run"))
    one_line(r, 2, f"[filex] dir = {tmp_path / 'a' / 'fx'}: the parent directory {tmp_path / 'a'} does not exist")


@pytest.mark.parametrize("section,key,flag,value,cli_says,toml_says", [
    ("fastpath", "flow_capacity", "--flow-capacity", 3, "must be between 1024 and 67108864",
     "must be an integer between 1024 and 67108864"),
    ("filex", "dir_cap_mb", "--filex-dir-cap-mb", 0, "must be >= 1 and <= 1048576", "must be a number between 1 and 1048576"),
    ("filex", "chunk_mb", "--filex-chunk-mb", 0, "must be >= 0.001 and <= 4096", "must be a number between 0.001 and 4096"),
])
def test_range_errors_show_plain_numbers(tmp_path, section, key, flag, value, cli_says, toml_says):
    """The one-line range errors of the flag and of its TOML key name the bounds as plain numbers (they said
    1.04858e+06 and 6.71089e+07)."""
    r = luaprobe("run", PLUGIN, "--pcap", SAMPLE, flag, str(value), "--out", str(tmp_path / "out"))
    one_line(r, 2, f"argument {flag}: {value} is out of range: {cli_says} (")
    conf = tmp_path / "probe.toml"
    conf.write_text(f'[source]\npcap = ["{SAMPLE}"]\n[plugins]\npaths = ["{EX}"]\n[{section}]\n{key} = {value}\n')
    r = luaprobe("start", "--config", str(conf), "--run-dir", str(tmp_path / "run"))
    one_line(r, 2, f"[{section}] {key} = {value}: {toml_says}")


#: every numeric flag of `luaprobe run` and its TOML key: [async] keys by name, the settings table by its rows
_ASYNC_FLAGS = {"--workers": "workers", "--overflow-limit": "overflow_limit", "--task-timeout": "task_timeout",
                "--worker-max-tasks": "max_tasks", "--worker-max-rss-mb": "max_rss_mb",
                "--worker-spin-us": "worker_spin_us", "--ray-actor-cpus": "ray_actor_cpus",
                "--drain-deadline": "drain_deadline"}


def _numeric_pairs():
    from luaprobe.engine.daemon.settings import SETTINGS
    pairs = [(flag, ("async", key)) for flag, key in _ASYNC_FLAGS.items()]
    pairs += [(flag, toml) for _f, flag, toml, kind, *_ in SETTINGS if kind in ("int", "float")]
    return pairs + [("--speed", ("source", "speed"))]


@pytest.mark.parametrize("flag, toml", _numeric_pairs())
def test_flag_and_toml_key_take_the_same_values(tmp_path, flag, toml):
    """Before: `--task-timeout inf` was accepted while `task_timeout = inf` was refused (0.001..86400), and other
    async flags had no upper bound.  Each flag and its TOML key now accept and refuse the same values: both bounds,
    just outside them, inf, -inf and nan (docs/operations.md "Exit codes": the same ranges as the TOML keys)."""
    import math

    from luaprobe.engine.daemon import config as config_mod
    from luaprobe.engine.daemon.cli import build_parser
    section, key = toml
    t, _default, (lo, hi) = config_mod.SCHEMA[section][key]
    is_int = t is int

    def flag_ok(v) -> bool:
        try:
            build_parser().parse_args(["run", "p.lua", "--pcap", "x.pcap", flag, repr(v) if not is_int else str(v)])
            return True
        except SystemExit as e:
            assert e.code == 2
            return False

    def toml_ok(v) -> bool:
        raw = {"source": {"pcap": [SAMPLE]}, "plugins": {"paths": [EX]}}
        raw.setdefault(section, {})[key] = v
        try:
            config_mod.validate(raw, str(tmp_path / "c.toml"))
            return True
        except config_mod.ConfigError as e:
            assert f"{key} = " in str(e)
            return False
    below = lo - 1 if is_int else math.nextafter(lo, -math.inf)
    above = hi + 1 if is_int else math.nextafter(hi, math.inf)
    values = [lo, hi, below, above] + ([] if is_int else [math.inf, -math.inf, math.nan])
    seen = {repr(v): (flag_ok(v), toml_ok(v)) for v in values}
    assert all(f == k for f, k in seen.values()), seen
    assert seen[repr(lo)] == seen[repr(hi)] == (True, True) and seen[repr(below)] == seen[repr(above)] == (False, False)
    assert is_int or not any(seen[repr(v)][0] for v in (math.inf, -math.inf, math.nan))


@pytest.mark.parametrize("packer,tool", [("gzip", "zcat"), ("xz", "xzcat"), ("bzip2", "bzcat")])
def test_a_compressed_capture_is_named_with_the_command_that_reads_it(tmp_path, packer, tool):
    """A .pcap.gz (Wireshark reads those itself; libpcap and luaprobe do not) was "not a pcap or pcapng file (file
    magic 0x1f8b0800)" and nothing more. Now the line says which compression it is and how to stream it, and that
    command reads it: the same packets as tshark counts in the file. Truth: Python's own compressors (gzip, lzma,
    bz2) and tshark's packet count; the stream form names it too (with the bytes in file order, as the file form)."""
    import bz2
    import gzip
    import lzma
    raw = open(SAMPLE, "rb").read()
    comp = {"gzip": gzip.compress, "xz": lzma.compress, "bzip2": bz2.compress}[packer](raw)
    f = tmp_path / f"sample.pcap.{packer}"
    f.write_bytes(comp)
    out = tmp_path / "out"
    r = luaprobe("run", PLUGIN, "--pcap", str(f), "--out", str(out))
    one_line(r, 3, f"luaprobe run: --pcap {f}: byte offset 0: not a pcap or pcapng file (file magic 0x{comp[:4].hex()})"
                   f"; it is {packer}-compressed: decompress it first, or stream it: {tool} {f} | luaprobe run ... "
                   "--pcap -")
    assert not out.exists()
    exe = os.path.join(os.path.dirname(sys.executable), "luaprobe")
    ok = subprocess.run(f"{tool} {f} | {exe} run {PLUGIN} --pcap - --out {out} --json", shell=True, cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    tshark = subprocess.run(["tshark", "-r", SAMPLE, "-T", "fields", "-e", "frame.number"], capture_output=True,
                            text=True, check=True).stdout.split()
    import json
    assert json.loads(ok.stdout)["packets"] == len(tshark)
    bad = subprocess.run([exe, "run", PLUGIN, "--pcap", "-", "--out", str(tmp_path / "o2")], input=comp,
                         capture_output=True, timeout=120)
    assert bad.returncode == 3
    assert (f"luaprobe run: input error: -: byte offset 0: unknown file magic 0x{comp[:4].hex()} (not pcap or pcapng)"
            + f"; it is {packer}-compressed: decompress it first").encode() \
        in bad.stderr, bad.stderr


@pytest.mark.parametrize("flag,give", [("--stats-json", "a file name"), ("--filex-dir", "a directory"),
                                       ("--data-dir", "a directory"), ("--db-root", "a directory"),
                                       ("--run-state-dir", "a directory"), ("--user", "a name or a number"),
                                       ("--out", "a directory"), ("--lua-path", "a directory"),
                                       ("--file-root", "a directory")])
def test_empty_path_or_name_is_a_usage_line(tmp_path, flag, give):
    """`--stats-json "$STATS"` with the variable unset: the empty value was taken for "not given", so the run wrote
    no summary file (or kept the default directory, or stayed root for `--user ""`) with exit 0 and no word.
    Now exit 2, one line, nothing started."""
    r = luaprobe("run", PLUGIN, "--pcap", SAMPLE, flag, "", cwd=str(tmp_path))
    one_line(r, 2, f"luaprobe run: argument {flag}: empty: give {give}")
    assert not (tmp_path / "out").exists()


def test_empty_interface_is_a_usage_line(tmp_path):
    """`--interface ""`: before, the capture process's own argument parser printed its usage text
    ("usage: luaprobe-capture [-h] --ring RING ...") and the run ended with exit 1."""
    r = luaprobe("run", PLUGIN, "--interface", "", cwd=str(tmp_path))
    one_line(r, 2, "luaprobe run: argument --interface: empty: give an interface name")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, says", [
    (("check", PLUGIN, "--lua-path", ""), "luaprobe check: argument --lua-path: empty: give a directory"),
    (("query", "alerts", "--out", ""), "luaprobe query: argument --out: empty: give a directory"),
    (("status", "--run-dir", ""), "luaprobe status: argument --run-dir: empty: give a directory"),
    (("stop", "--run-dir", ""), "luaprobe stop: argument --run-dir: empty: give a directory"),
    (("start", "--config", ""), "luaprobe start: argument --config: empty: give a file name"),
    (("loadtest", "overflow", "--quick", "--out", ""), "luaprobe loadtest: argument --out: empty: give a directory"),
    (("loadtest", "overflow", "--quick", "--work", ""), "luaprobe loadtest: argument --work: empty: give a directory"),
])
def test_empty_path_of_other_commands_is_a_usage_line(tmp_path, argv, says):
    """The newcomer review (session 18): an empty path (a shell variable not set) given to these options was taken
    as the current directory (`query --out ""` read ./luaprobe.sqlite, `status --run-dir ""` looked for a daemon
    elsewhere and reported one) or named nothing (`--lua-path : no such directory`, `start: : cannot read`).
    Now one usage line naming the option, exit 2, as `run --stats-json ""` (`loadtest --out ""` wrote its report
    into ./overflow)."""
    r = luaprobe(*argv, cwd=str(tmp_path))
    one_line(r, 2, says)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, code, says", [
    (("run", PLUGIN, "--pcap", "{d}/no\nsuch.pcap"), 3, "luaprobe run: --pcap {d}/no\\x0asuch.pcap: no such file"),
    (("run", PLUGIN, "--pcap", "{d}/e\nluaprobe run: fake.pcap"), 3,
     "luaprobe run: --pcap {d}/e\\x0aluaprobe run: fake.pcap: empty file (no capture header)"),
    (("run", "{d}/p\nx.lua", "--pcap", SAMPLE), 2, "luaprobe run: {d}/p\\x0ax.lua: no such plug-in file or directory"),
    (("run", PLUGIN, "--pcap", SAMPLE, "--out", "{d}/no/o\nx"), 2, "luaprobe run: --out {d}/no/o\\x0ax: "),
    (("check", "{d}/p\rx.lua"), 2, "luaprobe check: {d}/p\\x0dx.lua: no such plug-in file or directory"),
    (("start", "--config", "{d}/c\nx.toml"), 2, "luaprobe start: {d}/c\\x0ax.toml: cannot read: "),
    (("gen", "--out", "{d}/no/g\nx.pcap"), 2, "luaprobe gen: --out {d}/no/g\\x0ax.pcap: the directory "),
])
def test_a_path_with_a_control_character_stays_on_one_line(tmp_path, argv, code, says):
    """Bad input gives ONE line (README "Exit codes"): a path holding a newline, named in a usage or input line
    printed before the run starts, printed as two lines, the second one forged ("luaprobe run: fake.pcap: empty
    file ..."), while the lines printed during the run escape it (`input error: evil\\x0a...: byte offset ...`,
    logs.one_line).  Now every UsageError, InputProblem and ConfigError text escapes control characters the same
    way."""
    d = str(tmp_path)
    (tmp_path / "e\nluaprobe run: fake.pcap").write_bytes(b"")
    r = luaprobe(*(a.replace("{d}", d) for a in argv), cwd=d)
    one_line(r, code, says.replace("{d}", d))
