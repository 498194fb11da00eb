"""CLI commands for planning (being written)."""
