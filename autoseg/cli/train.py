"""CLI commands for train (being written)."""
