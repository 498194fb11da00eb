"""Command-line interface: `autoseg <command>`. Parsing and rendering only; logic lives in the API."""

from autoseg.cli.app import cli, main

# Each module registers its commands on `cli` when imported.
from autoseg.cli import commands  # noqa: E402,F401

__all__ = ["cli", "main"]
