"""`python -m luaprobe.engine ...` is the `luaprobe` command."""
from luaprobe.engine.daemon.cli import console

console()
