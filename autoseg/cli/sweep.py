"""CLI commands for sweep (being written)."""
