"""autoseg.dataset stage (see docs/architecture.md)."""
