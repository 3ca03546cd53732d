"""Rich byte progress bars for the converter and ``verify --deep`` (or a silent stand-in)."""

from __future__ import annotations

from typing import Any


class NullProgress:
    """The progress-bar interface, doing nothing (``--quiet``, library use, tests)."""

    def __enter__(self) -> "NullProgress":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def add_task(self, *a, **k) -> int:
        return 0

    def update(self, *a, **k) -> None:
        pass

    def advance(self, *a, **k) -> None:
        pass


def byte_progress(enabled: bool, *, stderr: bool = False) -> Any:
    """A Rich progress bar counting bytes (size, speed, time left), or :class:`NullProgress`."""
    if not enabled:
        return NullProgress()
    from rich.console import Console
    from rich.progress import (
        BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=Console(stderr=stderr),
    )
