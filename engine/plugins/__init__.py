"""engine/plugins: see docs/architecture.md."""
