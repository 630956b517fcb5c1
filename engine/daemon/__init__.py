"""engine/daemon: see docs/architecture.md."""
