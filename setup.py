"""Build hook for the one C file (shm/_lpsync.c); all metadata lives in pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("luaprobe.shm._lpsync", ["shm/_lpsync.c"], extra_compile_args=["-O2"])])
