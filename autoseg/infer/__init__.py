"""autoseg.infer stage (see docs/architecture.md)."""
