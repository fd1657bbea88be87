"""`python -m qrelay ...` is the `qrelay` command."""

from qrelay.cli import app

app()
