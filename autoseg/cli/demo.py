"""CLI commands for demo (being written)."""
