#!/usr/bin/env bash
# One command for a newcomer: set up .venv (first time only) and run the bundled example
# plug-ins on the bundled sample capture, then show what they wrote.
set -euo pipefail
cd "$(dirname "$0")/.."
# set up (first time), or rebuild the compiled modules after a `git pull` changed their C sources (before, the run
# failed with "undefined symbol" blamed on the sample capture: shm/luajit.py stale_extensions)
if ! .venv/bin/python -c "import luaprobe.engine.daemon.cli" 2>/dev/null ||
   .venv/bin/python -c "import sys; from luaprobe.shm.luajit import stale_extensions; sys.exit(0 if stale_extensions() else 1)" 2>/dev/null; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # -qq: errors only (a site's pip.conf may add index locations that do not exist here; pip warns about each)
  echo "setting up .venv (pip install -e '.[test]': the first time, and after an update of the C sources)"
  .venv/bin/pip install -qq --upgrade pip
  .venv/bin/pip install -qq -e '.[test]'
fi
.venv/bin/luaprobe demo --out out
echo
echo "== alerts (luaprobe query alerts --out out)"
.venv/bin/luaprobe query alerts --out out
echo
echo "== counters (luaprobe query counters --out out --limit 10)"
.venv/bin/luaprobe query counters --out out --limit 10
