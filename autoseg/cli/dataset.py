"""CLI commands for dataset (being written)."""
