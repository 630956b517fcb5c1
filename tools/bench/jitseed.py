"""Diagnostic: run a process with LuaJIT's per-process randomness fixed, to tell it apart from the machine (issue 10).

    python tools/bench/jitseed.py [--fixed] --traces PREFIX CAPTURE PLUGDIR     # one walk, trace trees to PREFIX.*

LuaJIT 2.1 (lupa's bundle) seeds one PRNG per VM from the kernel (``lj_state.c``: ``lj_prng_seed_secure``, the
``getrandom`` system call through libc's ``syscall()``).  The seed picks the string hash seed (``lj_str.c``: table
layout and ``pairs()`` order of string keys), string ids, the random part of a trace's penalty after an abort
(``lj_trace.c`` ``penalty_pc``) and the address hints of the allocator and of the machine-code area
(``lj_alloc.c``, ``lj_mcode.c``); with address-space randomisation, the addresses of bytecode, and so which hot
counter (``lj_dispatch.h``: 64 of them, indexed by bytecode address) each loop and function shares, change too.
:func:`wrap` gives a command prefix and environment that fix all of them for one process tree: a preloaded
``syscall()`` that answers ``getrandom`` with fixed bytes and ``setarch -R`` (no address randomisation).  Python's hash seed is left
random: with those two fixed the trees were identical whatever it was (docs/benchmarks.md), so a difference it makes
is ours (a set iterated in the batch loop).  **A diagnostic only**: a fixed string hash seed lets packet data chosen by an attacker collide
in every table keyed by strings (hash flooding), which is why LuaJIT seeds from the kernel; never for a real run.

The walk (``main``) is tools/bench/hookwalk.py's: every packet of CAPTURE decoded and put through the real flow
table in one VM, then the plug-ins of PLUGDIR (tools/bench/shapes.py) walked over it batch by batch in fresh plug-in
VMs, once; LuaJIT's trace log (``LUAPROBE_JIT_TRACES``, engine/plugins/jitprof.lua) of the decode/flow-table VM goes
to ``PREFIX.build.traces.txt``, each plug-in VM's to ``PREFIX.<plug-in>-<instance>.traces.txt``.  Two runs under
:func:`wrap` write identical files unless our own code does something that differs between processes (iterates a
hash table keyed by strings or addresses, reads the clock or a random source in the packet path): the test
tests/test_jit_repeatable.py.  Needs a C compiler (cc) and setarch (util-linux).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: the preload: libc's syscall() with getrandom answered by fixed bytes, every other call passed on
SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <sys/syscall.h>
long syscall(long n, ...) {
  va_list ap; long a[6]; int i;
  va_start(ap, n);
  for (i = 0; i < 6; i++) a[i] = va_arg(ap, long);
  va_end(ap);
  if (n == SYS_getrandom) {
    unsigned char *b = (unsigned char *)a[0]; unsigned long len = (unsigned long)a[1], k;
    for (k = 0; k < len; k++) b[k] = (unsigned char)(k * 37 + 11);
    return (long)len;
  }
  static long (*real)(long, ...) = 0;
  if (!real) real = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
  return real(n, a[0], a[1], a[2], a[3], a[4], a[5]);
}
"""


def shim(cache: str | None = None) -> str:
    """Path of the compiled preload (built once per source text into `cache`, default the system temp dir).
    Raises FileNotFoundError without a C compiler, subprocess.CalledProcessError when it fails."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise FileNotFoundError("jitseed: no C compiler (cc) to build the getrandom preload")
    tag = hashlib.sha256(SHIM_C.encode()).hexdigest()[:12]
    d = cache or os.path.join(tempfile.gettempdir(), f"luaprobe-jitseed-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    so = os.path.join(d, f"jitseed-{tag}.so")
    if not os.path.exists(so):
        src = os.path.join(d, f"jitseed-{tag}.c")
        with open(src, "w") as f:
            f.write(SHIM_C)
        tmp = so + f".{os.getpid()}"
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, src, "-ldl"], check=True, capture_output=True)
        os.replace(tmp, so)
    return so


def wrap(env: dict | None = None) -> tuple[list, dict]:
    """(command prefix, environment) running a command with LuaJIT's seed and the address layout fixed.  Raises FileNotFoundError without setarch or a C compiler."""
    setarch = shutil.which("setarch")
    if setarch is None:
        raise FileNotFoundError("jitseed: no setarch (util-linux) to turn off address randomisation")
    e = dict(os.environ if env is None else env)
    e["LD_PRELOAD"] = shim() + (" " + e["LD_PRELOAD"] if e.get("LD_PRELOAD") else "")
    return [setarch, os.uname().machine, "-R"], e


def walk(capture: str, plugdir: str, traces: str) -> int:
    """Decode CAPTURE, run the flow table over it and walk PLUGDIR's plug-ins over it once, with LuaJIT's trace log
    (LUAPROBE_JIT_TRACES=traces) in every VM; returns the number of packets."""
    sys.path.insert(0, REPO)
    os.environ["LUAPROBE_JIT_TRACES"] = traces
    from luaprobe.engine.capture.pcapfile import open_capture
    from luaprobe.shm.luajit import new_runtime
    from tools.bench.hookwalk import BUILD, load_walks
    lua = new_runtime()
    stop = lua.eval("function() return require('luaprobe.engine.plugins.jitprof').start('build') end")()
    with open_capture(capture) as cap:
        keep, addr, n, size, hot, stage = lua.eval(BUILD)(cap.address, cap.size, 262144)
        vms = []
        try:
            walks = load_walks(plugdir, vms)
            for k in range(0, n, 1024):
                m = min(1024, n - k)
                stage(k, m)
                for host, w in walks:
                    w(host, hot, m)
            for vm in vms:
                vm.lua.eval("function(h) h.stop_profile() end")(vm.host)
        finally:
            for vm in vms:
                vm.close()
        del keep
    stop()
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixed", action="store_true", help="re-run this command under wrap() (fixed seeds)")
    ap.add_argument("--traces", required=True, help="prefix of the trace-log files")
    ap.add_argument("capture")
    ap.add_argument("plugdir")
    a = ap.parse_args(argv)
    if a.fixed:
        pre, env = wrap()
        args = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--fixed"]
        return subprocess.run([*pre, sys.executable, os.path.abspath(__file__), *args], env=env).returncode
    print(walk(a.capture, a.plugdir, a.traces))
    return 0


if __name__ == "__main__":
    sys.exit(main())
