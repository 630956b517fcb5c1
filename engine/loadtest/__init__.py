"""Load-test harness: `python -m luaprobe.engine.loadtest SCENARIO [--quick]` or `luaprobe loadtest SCENARIO [--quick]`.
Scenarios and what they show: engine/loadtest/scenarios.py; reports: docs/loadtest/<scenario>/report.md."""
