"""autoseg.data stage (see docs/architecture.md)."""
