"""CLI commands for evaluate (being written)."""
