"""`luaprobe stats`: the plug-ins table shows every instance name whole (newcomer review, session 18).

Before: the file name was cut to 16 characters, so docs/operations.md's own session showed
``window_report.lu#0``, and two plug-ins whose file names share their first 16 characters read the same.
The snapshot is built here (the shape of ``stats.json``'s ``plugins``); the truth is the names spelled out below.
"""
from __future__ import annotations

from rich.console import Console

from luaprobe.engine.daemon import statsview


def _plugin(path: str, instance: str, kind: str, calls: int = 12_345_678, **extra) -> dict:
    return {"plugin": path, "type": kind, "instance": instance, "hook_calls": {f"{kind}.onpacket": calls},
            "hook_errors": {f"{kind}.onpacket": 0}, "async": {"worker_deaths": 0}, **extra}


PLUGINS = [_plugin("/p/window_report.lua", "0", "engine_monitor"),
           _plugin("/p/window_report.lua", "1", "engine_monitor"),
           _plugin("/p/a_very_long_plug_in_file_name_one.lua", "6619A80", "simplecounter",
                   **{"async": {"scheduled": 5, "ok": 5}}),
           _plugin("/p/a_very_long_plug_in_file_name_two.lua", "6619A80", "simplecounter"),
           _plugin("/p/tcp_ports.lua", "B6DD06D", "simplecounter", shard=1)]
NAMES = ["window_report.lua#0", "window_report.lua#1", "a_very_long_plug_in_file_name_one.lua#6619A80",
         "a_very_long_plug_in_file_name_two.lua#6619A80", "tcp_ports.lua#B6DD06D@1"]
SNAPSHOT = {"time": 1.0, "status": {"state": "running"}, "plugins": PLUGINS}


def _section(text: str, title: str) -> list[str]:
    """The rows (header excluded) of one ``== title`` section of render_text's output."""
    lines = text.splitlines()
    start = lines.index(f"== {title}") + 2
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def test_plain_table_shows_every_instance_name_whole():
    text = statsview.render_text(SNAPSHOT, None)
    rows = _section(text, "plug-ins")
    assert [r.split("  ")[0] for r in rows] == NAMES, text
    assert [r.split("  ")[0] for r in _section(text, "T.async")] == [NAMES[2]], text


def test_rich_table_on_a_narrow_terminal_folds_names_and_never_cuts_them():
    """On a terminal narrower than the table rich shrinks the columns; the instance column folds a name onto
    more lines of its cell: read in order, its lines are the names, character for character, with no ellipsis."""
    console = Console(width=50, record=True, color_system=None, file=open("/dev/null", "w"))
    console.print(statsview.render_rich(SNAPSHOT, None))
    console.file.close()
    text = console.export_text()
    table = text.split("plug-ins", 1)[1].split("T.async", 1)[0]
    cells = [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")]
    assert "…" not in "".join(cells), text
    assert "".join(cells) == "".join(NAMES), text
    wide = Console(width=200, record=True, color_system=None, file=open("/dev/null", "w"))
    wide.print(statsview.render_rich(SNAPSHOT, None))
    wide.file.close()
    text = wide.export_text()
    for name in NAMES:
        assert f"│ {name} " in text, text
