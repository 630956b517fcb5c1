"""engine/fastpath: see docs/architecture.md."""
