"""engine/streams: see docs/architecture.md."""
