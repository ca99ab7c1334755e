"""Runs on several processes through torch.distributed (torchrun, `accelerate launch`), never an engine of
mmedit's own: which process this is, its share of the rows, and the shares combined.

    torchrun --nproc-per-node 2 -m mmedit trace MODEL --data forget.jsonl --out forget.safetensors

`session()` joins the process group torchrun describes in the environment (WORLD_SIZE, RANK,
MASTER_ADDR...; gloo on the CPU, nccl with CUDA) unless the caller already did, and leaves it on exit. Each
rank takes whole batches of the rows, dealt round robin (`shard`): a batch holds the same rows as in one
process, so per-batch quantities (a batch's squared gradient for the Fisher, its padding) are the same,
and sums over ranks equal one process's up to float64 summation order. `combine` gathers every rank's
result and folds them in rank order, the same on every rank. Only rank 0 writes files (`is_writer`); the
others wait for it at `barrier`, so nothing is read before it exists.

Faults: an error on one rank ends that process (its one error line on stderr); torchrun then stops the
others and exits non-zero, and since files are written only after every rank's share has been combined,
a failed or killed rank leaves no output. A rank that waits longer than `timeout` for the others fails.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from mmedit.errors import MmeditError

T = TypeVar("T")
TIMEOUT = datetime.timedelta(minutes=30)  # a collective that waits longer fails instead of hanging


def _dist():
    import torch.distributed as dist  # torch loads when a command runs, not when the CLI starts

    return dist


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def launched() -> bool:
    """Whether torchrun (or accelerate launch) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def session(timeout: datetime.timedelta = TIMEOUT) -> Iterator[None]:
    """Inside: the process group of a torchrun launch (joined here unless the caller already did, and
    left on exit); outside a launch, nothing (one process)."""
    dist = _dist()
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    if not dist.is_available():
        raise MmeditError("this torch has no torch.distributed; run one process")
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def device(requested: str) -> str:
    """A command's --device under a launch with CUDA: auto and cuda mean this rank's GPU (LOCAL_RANK)."""
    import torch

    if active() and requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return requested


def shard(rows: Sequence[T], batch_size: int, what: str = "rows") -> list[T]:
    """This rank's rows: batches of `batch_size` consecutive rows, batch i to rank i mod world size, so
    that make_batches(shard(rows)) yields exactly the batches of one process that are this rank's.
    Refused when some rank would get no batch."""
    size = world_size()
    if size == 1:
        return list(rows)
    batches = -(-len(rows) // batch_size)
    if batches < size:
        raise MmeditError(f"{size} processes, but the {len(rows)} {what} make only {batches} batch(es) of "
                          f"{batch_size}: run fewer processes or lower --batch-size")
    mine = range(rank(), batches, size)
    return [row for index in mine for row in rows[index * batch_size:(index + 1) * batch_size]]


def gather(value: T) -> list[T]:
    """Every rank's `value` (any picklable object; tensors travel through the CPU), in rank order."""
    if not active():
        return [value]
    gathered: list = [None] * world_size()
    _dist().all_gather_object(gathered, value)
    return gathered


def combine(value: T, merge: Callable[[T, T], T]) -> T:
    """All ranks' values folded in rank order with `merge` (e.g. TraceStats.merge); the same on every rank."""
    return functools.reduce(merge, gather(value))


def is_writer() -> bool:
    """Whether this process writes the outputs (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank is here (e.g. the others, until rank 0 has written)."""
    if active():
        _dist().barrier()


def describe() -> dict:
    """For an artifact's provenance: how many processes made it."""
    return {"world_size": world_size(), "backend": _dist().get_backend() if active() else None}
