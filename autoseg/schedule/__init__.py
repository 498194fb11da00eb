"""autoseg.schedule stage (see docs/architecture.md)."""
