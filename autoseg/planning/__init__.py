"""autoseg.planning stage (see docs/architecture.md)."""
