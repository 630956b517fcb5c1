"""The directories plug-ins get from ``T.env.get_config`` (Trisul: ``App>DataDirectory``, ``App>DBRoot``,
``App>RunStateDirectory``; docs/reference.md "T.env").

A run prepares them once (:func:`prepare`) before it loads plug-ins and carries the answer in its AsyncConfig's
``env`` (workers/pool.py): every plug-in VM made by its AsyncRuntime reads it there, and the worker pool passes it to
its workers (``--env KEY=VALUE``), so a worker's ``T.env`` answers the same (no module state here, and the workers
import nothing of the engine).  Trisul keeps them in different places (the data directory, the database root, the
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

def prepare(cfg) -> dict[str, str]:
    """{T.env key: absolute directory} for a RunConfig ``cfg`` (its ``out_dir`` and the fields of :data:`KEYS`):
    the given ones (created when missing, one level: the CLI and the config check their parent,
    engine/daemon/usage.check_dir_target), else OUT/trisul/{data,dbroot,run} (created with OUT/trisul), and the
    database root's ``config`` subdirectory, as Trisul's.  Mode 0700 for each directory made.  Raises OSError when one cannot be created."""
    out = {}
    for key, (field, sub) in KEYS.items():
        given = getattr(cfg, field)
        d = os.path.abspath(given or os.path.join(cfg.out_dir, "trisul", sub))
        if not given:
            os.makedirs(os.path.dirname(d), mode=0o700, exist_ok=True)
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:                  # made before, or just now by another shard of the run
            if not os.path.isdir(d):
                raise
        out[key] = d
    # Trisul's DBRoot is the context directory (.../context0), whose config/ subdirectory always exists (the
    # context's configuration, local-lua): scripts keep their own files there (passive-dns-creator.lua's
    # <DBRoot>/config/PassiveDNSDB.level, which LevelDB creates only one level deep; save_exe_streaming.lua's
    # <DBRoot>/config/trisulnsm_save_exe.config.lua)
    try:
        os.mkdir(os.path.join(out["App>DBRoot"], "config"), 0o700)
    except FileExistsError:
        if not os.path.isdir(os.path.join(out["App>DBRoot"], "config")):
            raise
    return out
