"""CLI commands for schedule (being written)."""
