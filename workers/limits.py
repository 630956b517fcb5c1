"""Limits of the async worker pool shared by the pool, the plug-in VM, the CLI and the config check.

A light module (no LuaJIT, no lupa): the CLI and the TOML config import it before anything starts
(tests/test_stop_startup.py: lupa is not loaded at a start-up stop).
"""
from __future__ import annotations

#: async workers per plug-in: the range of --workers / [async] workers (1..MAX_WORKERS), and a larger
#: TrisulPlugin.request_async_workers is clamped to it (one warning, engine/plugins/vm.py)
MAX_WORKERS = 256
