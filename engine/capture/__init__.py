"""engine/capture: see docs/architecture.md."""
