"""`python -m luaprobe.engine ...` is the `luaprobe` command."""
import sys

from luaprobe.engine.daemon.cli import main

sys.exit(main())
