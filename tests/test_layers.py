"""docs/architecture.md "Layers": `shm` imports nothing of luaprobe but itself, `workers` only `shm` (and itself).
Read from the sources with Python's own parser (ast), every import statement, at module level or inside a
function (workers/pool.py once imported engine.plugins.tenv inside a method)."""
from __future__ import annotations

import ast
import os

import pytest

from tests import helpers

ALLOWED = {"shm": ("luaprobe.shm",), "workers": ("luaprobe.shm", "luaprobe.workers")}


def _imports(path: str) -> list[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_lower_rooms_import_nothing_above_them(room):
    folder = os.path.join(helpers.REPO, room)
    bad = [f"{room}/{name}:{line}: {mod}" for name in sorted(os.listdir(folder)) if name.endswith(".py")
           for line, mod in _imports(os.path.join(folder, name))
           if (mod == "luaprobe" or mod.startswith("luaprobe.")) and not mod.startswith(ALLOWED[room])]
    assert not bad, bad
