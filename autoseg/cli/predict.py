"""CLI commands for predict (being written)."""
