"""autoseg.schedule stage: job graph, state store, executors, runner (see docs/scheduler.md)."""
