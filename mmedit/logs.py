"""TensorBoard event files of training runs (`--log-dir` on apply, attack and sweep), through
torch.utils.tensorboard; tensorboard itself is an optional extra.

    with logging_to("runs/ga", header={"plugin": "ga", ...}):
        ...
        scalars({"loss/total": 0.3, "lr": 1e-4})           # step 1, 2, ... of the prefix "" run
        scalars({"loss": 0.8}, prefix="relearn/edited")   # its own steps: relearn/edited/loss

Each `logging_to` folder is one TensorBoard run; inside it, `scalars` with the same prefix count their
own steps from 1. Nested `logging_to` (a sweep's folder, then each trial's) write to the innermost.
Outside any `logging_to`, `scalars` does nothing, so code that trains logs unconditionally.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from mmedit import DISTRIBUTION
from mmedit.errors import MmeditError

_LOG: contextvars.ContextVar = contextvars.ContextVar("mmedit_log", default=None)


def check_log_dir(log_dir: str | Path) -> None:
    """Refuse early what `logging_to` would refuse after the model loads: no tensorboard, or a folder that
    cannot be written."""
    from mmedit.safefile import check_writable

    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
    except ImportError:
        raise MmeditError("--log-dir writes TensorBoard event files and needs tensorboard: "
                          f"pip install '{DISTRIBUTION}[tensorboard]'") from None
    if Path(log_dir).exists() and not Path(log_dir).is_dir():
        raise MmeditError(f"--log-dir {log_dir} is a file, not a folder")
    check_writable(Path(log_dir) / "events.out.tfevents", force=True)  # its folder can be made and written


@contextlib.contextmanager
def logging_to(log_dir: str | Path | None, header: Mapping | None = None) -> Iterator[None]:
    """Inside, `scalars` writes to an event file in `log_dir`; `header` (what made the run: plugin,
    options, seed, data hashes) as its text mmedit/run. None: nothing is written."""
    if log_dir is None:
        yield
        return
    check_log_dir(log_dir)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    if header:
        writer.add_text("mmedit/run", "```\n" + json.dumps(header, indent=1, default=str) + "\n```", 0)
    token = _LOG.set({"writer": writer, "steps": {}})
    try:
        yield
    finally:
        _LOG.reset(token)
        writer.close()


def scalars(values: Mapping[str, float], prefix: str = "", step: int | None = None) -> None:
    """One step of the `prefix` series (the next one, or `step`): each value under the tag prefix/name."""
    log = _LOG.get()
    if log is None:
        return
    if step is None:
        step = log["steps"][prefix] = log["steps"].get(prefix, 0) + 1
    for name, value in values.items():
        log["writer"].add_scalar(f"{prefix}/{name}" if prefix else name, float(value), step)
