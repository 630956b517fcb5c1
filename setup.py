"""Build hook for the C/C++ shims; all metadata lives in pyproject.toml.

* shm/_lpsync.c: atomics and futex doorbells for LuaJIT (always built).
* engine/plugins/_lpwatch.c: the hook watchdog, a Lua C module (always built).
* engine/plugins/_lpre2.cc: Google RE2 for T.re2 and HTTPHeader:match_value, built when the RE2 headers are
  installed (Debian: libre2-dev, which .ci/run installs); without them T.re2 raises a Lua error saying so.
"""
import os

from setuptools import Extension, setup

exts = [Extension("luaprobe.shm._lpsync", ["shm/_lpsync.c"], extra_compile_args=["-O2"]),
        # the hook watchdog, a Lua C module (its lua_* symbols resolve against lupa's LuaJIT at load time)
        Extension("luaprobe.engine.plugins._lpwatch", ["engine/plugins/_lpwatch.c"], extra_compile_args=["-O2"],
                  libraries=["rt"])]
if any(os.path.exists(os.path.join(d, "re2", "re2.h")) for d in ("/usr/include", "/usr/local/include")):
    exts.append(Extension("luaprobe.engine.plugins._lpre2", ["engine/plugins/_lpre2.cc"], libraries=["re2"],
                          language="c++", extra_compile_args=["-O2", "-std=c++17"]))
setup(ext_modules=exts)
