"""Exceptions shared by the loader and the checkpoint-format readers."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint on disk does not match what the config says it should hold."""
