"""Load-test harness: `python -m tools.loadtest SCENARIO [--quick]` or `luaprobe loadtest SCENARIO [--quick]`.
Scenarios and what they show: tools/loadtest/scenarios.py; reports: docs/loadtest/<scenario>/report.md."""
