"""The `azdistill` command line: one module per command group, sharing `options`."""

from azdistill.cli.app import cli, main

__all__ = ["cli", "main"]
