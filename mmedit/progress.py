"""Progress for long work, on stderr, silent when disabled: `track` (a bar over a loop) and `phase` (one
named step of unknown length: loading or writing a checkpoint, with a spinner and the time it took)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total if total is not None else _length(items))
        for item in items:
            yield item
            progress.advance(task)


def _length(items: Iterable) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


@contextlib.contextmanager
def phase(description: str, enabled: bool = True) -> Iterator[None]:
    """Show `description` with a spinner and the elapsed time while the block runs, on a terminal; it
    goes when the block ends (what is left is the command's result or its one error line), and is never
    written to a log or pipe."""
    console = Console(stderr=True)
    if not enabled or not console.is_interactive:
        yield
        return
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        progress.add_task(description, total=None)
        yield
