"""CLI commands for preprocess (being written)."""
