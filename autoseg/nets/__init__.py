"""autoseg.nets stage (see docs/architecture.md)."""
