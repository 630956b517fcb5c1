"""engine/gen: see docs/architecture.md."""
