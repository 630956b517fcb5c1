"""The directories plug-ins get from ``T.env.get_config`` (Trisul: ``App>DataDirectory``, ``App>DBRoot``,
``App>RunStateDirectory``; docs/reference.md "T.env").

A run sets them once (:func:`configure`, from :func:`prepare`) before it loads plug-ins; every plug-in VM of the
process reads :func:`config` and the async worker pool passes it to its workers (``--env KEY=VALUE``), so a worker's
``T.env`` answers the same.  Trisul keeps them in different places (the data directory, the database root, the
run-state directory for sockets and pid files); luaprobe's defaults are three distinct directories under the run's
``--out`` directory, created owner-only (0700) so a script's ``bind()`` or ``io.open`` finds them.
"""
from __future__ import annotations

import os

#: T.env key -> (RunConfig field, directory under OUT/trisul when not given)
KEYS = {
    "App>DataDirectory": ("data_dir", "data"),
    "App>DBRoot": ("db_root", "dbroot"),
    "App>RunStateDirectory": ("run_state_dir", "run"),
}

_current: dict[str, str] = {}


def prepare(out_dir: str, data_dir: str | None = None, db_root: str | None = None,
            run_state_dir: str | None = None) -> dict[str, str]:
    """{T.env key: absolute directory}: the given ones (created when missing, one level: the CLI and the config
    check their parent, engine/daemon/usage.check_dir_target), else OUT/trisul/{data,dbroot,run} (created with
    OUT/trisul).  Mode 0700 for each directory made.  Raises OSError when one cannot be created."""
    given = {"data_dir": data_dir, "db_root": db_root, "run_state_dir": run_state_dir}
    out = {}
    for key, (field, sub) in KEYS.items():
        d = os.path.abspath(given[field] or os.path.join(out_dir, "trisul", sub))
        if not given[field]:
            os.makedirs(os.path.dirname(d), mode=0o700, exist_ok=True)
        if not os.path.isdir(d):
            os.mkdir(d, 0o700)
        out[key] = d
    return out


def configure(values: dict[str, str]) -> None:
    """Set what T.env.get_config answers for these keys in VMs created from now on in this process."""
    _current.clear()
    _current.update(values)


def config() -> dict[str, str]:
    """The keys set by :func:`configure` (empty: tlib.lua's Trisul defaults)."""
    return dict(_current)


def parse(pairs) -> dict[str, str]:
    """``KEY=VALUE`` strings (a worker's ``--env`` arguments) as a dict."""
    return dict(p.split("=", 1) for p in pairs)
