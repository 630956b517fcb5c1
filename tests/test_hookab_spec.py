"""tools/bench/hookab.py's variant specs (docs/benchmarks.md, issue 10).

``NAME=ENGINE_DIR|PRELUDE|BODY`` runs a simplecounter with that prelude and body, ``NAME=ENGINE_DIR`` the flowstate
shape.  An empty body (``-||``: the empty hook, the baseline every hook cost is read against) ran the flowstate shape
before 2026-12-01 (session 17), so an "empty" variant silently measured flowstate.  Deterministic: parses, runs
nothing.
"""
from __future__ import annotations

import pytest

from tools.bench import hookab


def test_an_empty_body_is_a_hook_not_the_flowstate_shape():
    assert hookab.parse("-||") == ("-", "body", "", "")
    assert hookab.parse("-|local s = {}|") == ("-", "body", "local s = {}", "")


def test_a_bare_engine_dir_is_the_flowstate_shape(tmp_path):
    assert hookab.parse("-") == ("-", "flowstate", "", "")
    assert hookab.parse(str(tmp_path)) == (str(tmp_path), "flowstate", "", "")


def test_a_body_keeps_its_bars():
    assert hookab.parse("-|local a|x = 1 | 2") == ("-", "body", "local a", "x = 1 | 2")


@pytest.mark.parametrize("spec", ["-|only-prelude", "/nonexistent-engine-dir"])
def test_bad_specs_say_why(spec):
    with pytest.raises(SystemExit, match="hookab: "):
        hookab.parse(spec)
