"""The Ray async backend (``[async] backend = "ray"``, docs/async.md "Workers on Ray").

With backend ``ray`` the pool (:mod:`luaprobe.workers.pool`) starts, for each worker slot, this bridge
process instead of a local worker: ``python -m luaprobe.workers.raybridge`` with the worker's arguments
plus ``--ray-address``.  The bridge runs the local worker's loop (workers/worker.lua ``M.loop``) over the
slot's channel, so the fast path, its rings, the overflow queue, the task timeout (the bridge publishes
the running task in the channel's control block like a worker) and every restart rule are unchanged.
The loop hands two request kinds to :meth:`Bridge.call`:

* DEFINE (onexecute bytecode, once per function): kept, and sent to the slot's actor;
* EXEC: run on the actor (:class:`LuaActor`: one LuaJIT VM with the same ``T`` and ``package.path`` as a
  local worker), one task at a time, the result pushed back into the return ring in order.

File helpers (``copy``, ``cat``, ``rm``, ``copybuffer``) never leave the probe: the bridge runs them
itself, like a local worker.  An actor that dies (its process, or its node) fails the one task it was
running with ``worker died (ray actor lost: ...)`` (onerror runs; counted as ``error``): never lost,
never twice, since a slot has exactly one task on its actor at a time.  The next task gets a new actor,
to which the bridge first replays every definition.  Actors are owned by their bridge, so when the
pool kills a bridge (task timeout) or the bridge dies, Ray removes its actor too.
"""
from __future__ import annotations

import argparse
import os
import sys

OK, NIL, ERROR = 1, 2, 3          # workers/protocol.lua result statuses


class LuaActor:
    """A Ray actor holding one worker VM (workers/worker.lua ``executor``).  Sets LUAPROBE_RAY_NODE to its
    node id, so onexecute can tell where it ran (``os.getenv``)."""

    def __init__(self, script: str, lua_path: list, slot: int, env=()):
        import ray
        os.environ["LUAPROBE_RAY_NODE"] = ray.get_runtime_context().get_node_id()
        from luaprobe.workers.worker import build_vm
        self.lua = build_vm(script, lua_path, slot, env)
        self.ex = self.lua.eval("function() return require('luaprobe.workers.worker').executor() end")()
        self._define = self.lua.eval("function(e, fid, b, n) e:define(fid, b, n) end")
        self._run = self.lua.eval("function(e, fid, d, a) return e:run(fid, d, a) end")

    def node(self) -> str:
        return os.environ["LUAPROBE_RAY_NODE"]

    def define(self, fid: int, bytecode: bytes, name: bytes) -> None:
        self._define(self.ex, fid, bytecode, name)

    def run(self, fid: int, data: bytes, aux: bytes) -> bytes:
        """One task: a status byte (workers/protocol.lua) followed by the payload."""
        status, payload = self._run(self.ex, fid, data, aux)
        return bytes([int(status)]) + (payload or b"")


class Bridge:
    """One slot's link to its actor."""

    def __init__(self, args):
        import ray
        self.ray = ray
        self.args = args
        self.defines: dict[int, tuple[bytes, bytes]] = {}
        self.actor = None
        self.remote_cls = ray.remote(max_restarts=0, max_concurrency=1)(LuaActor)

    def _actor(self):
        if self.actor is None:
            self.actor = self.remote_cls.options(num_cpus=self.args.ray_actor_cpus,
                                                 scheduling_strategy="SPREAD").remote(
                self.args.script, self.args.lua_path, self.args.slot, self.args.env)
            for fid, (code, name) in sorted(self.defines.items()):
                self.actor.define.remote(fid, code, name)
        return self.actor

    def call(self, op: bytes, fid: int, data: bytes, aux: bytes):
        """From worker.lua: DEFINE (no result) or EXEC (status byte + payload)."""
        if op == b"define":
            self.defines[int(fid)] = (bytes(data), bytes(aux))
            if self.actor is not None:
                self.actor.define.remote(int(fid), bytes(data), bytes(aux))
            return None
        try:
            return self.ray.get(self._actor().run.remote(int(fid), bytes(data), bytes(aux)))
        except self.ray.exceptions.RayError as e:
            self.actor = None                 # replaced (definitions replayed) on the next task
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return bytes([ERROR]) + f"worker died (ray actor lost: {type(e).__name__}: {first[:200]})".encode()


def main(argv=None) -> int:
    """The local worker's main (workers/worker.py) with DEFINE / EXEC handed to the slot's actor."""
    p = argparse.ArgumentParser(prog="luaprobe-raybridge", add_help=False)
    p.add_argument("--ray-address", default=None)
    p.add_argument("--ray-actor-cpus", type=float, default=1.0)
    ours, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)

    def remote(args):
        import ray
        ray.init(address=ours.ray_address, namespace="luaprobe", log_to_driver=False, logging_level="ERROR",
                 configure_logging=False)
        args.ray_actor_cpus = ours.ray_actor_cpus
        return Bridge(args).call
    from luaprobe.workers.worker import main as worker_main
    return worker_main(rest, remote=remote)


if __name__ == "__main__":
    sys.exit(main())
