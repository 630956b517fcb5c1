"""The luaprobe command line.

    luaprobe shm clean          remove shared-memory segments whose owner died

Exit codes: 0 ok, 2 usage error, 3 input error, 4 plug-in error, 1 internal error.
"""
from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INPUT, EXIT_PLUGIN = 0, 1, 2, 3, 4


def cmd_shm(args) -> int:
    """`luaprobe shm clean|list`."""
    from shm import segment
    if args.action == "clean":
        removed = segment.sweep()
        for name in removed:
            print(f"removed {name}")
        print(f"{len(removed)} stale segment(s) removed")
    else:
        for name in segment.list_segments():
            print(name)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    p = argparse.ArgumentParser(prog="luaprobe", description="Run Trisul-style Lua plug-ins over network traffic.")
    sub = p.add_subparsers(dest="command", required=True)
    shm = sub.add_parser("shm", help="inspect or clean luaprobe shared-memory segments")
    shm.add_argument("action", choices=["clean", "list"])
    shm.set_defaults(func=cmd_shm)
    return p


def main(argv=None) -> int:
    """Entry point of the `luaprobe` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
