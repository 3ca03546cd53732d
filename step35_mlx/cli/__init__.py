"""The command-line front ends: one module per command, the shared loader in ``loading``."""

from .app import app

__all__ = ["app"]
