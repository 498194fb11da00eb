"""autoseg.evaluate stage (see docs/architecture.md)."""
