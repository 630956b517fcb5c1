"""engine/store: see docs/architecture.md."""
