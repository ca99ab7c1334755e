"""Pieces every command shares: error handling, consoles, and the common options."""
from __future__ import annotations

import functools
from typing import Annotated, Callable

import typer
from rich.console import Console

from mmedit.errors import MmeditError

# Tables go to stdout; progress bars and errors to stderr so that stdout stays pipeable.
out = Console()
err = Console(stderr=True)


def user_errors(command: Callable) -> Callable:
    """Turn an MmeditError into one red line on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MmeditError as error:
            err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto (cuda when available).")]
Dtype = Annotated[str, typer.Option(help="auto (as saved), float32, bfloat16 or float16.")]
TrustRemoteCode = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow a model's own Python code to run (off by default).")
]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
AllowNonfinite = Annotated[
    bool, typer.Option("--allow-nonfinite", help="Accept deltas that put NaN/inf where the base is finite.")
]
Threads = Annotated[int, typer.Option(min=0, help=(
    "CPU threads for torch (0: torch's default, one per core). Small models on a busy machine run faster "
    "on 1."))]


def quiet_transformers() -> None:
    """No transformers progress bars or warnings: the CLI shows its own progress."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_model(model: str, device: str, dtype: str, trust_remote_code: bool, threads: int = 0):
    """(model, processor) for a command, after setting torch's CPU thread count (0 leaves torch's)."""
    import torch

    from mmedit.loading import load

    if threads:
        torch.set_num_threads(threads)
    return load(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
