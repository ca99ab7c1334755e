"""Pieces every command shares: error handling, consoles, and the common options."""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Annotated, Callable

import typer
from rich.console import Console
from rich.markup import escape

from mmedit.errors import MmeditError

# Tables go to stdout; progress bars and errors to stderr so that stdout stays pipeable.
out = Console()
err = Console(stderr=True)


def sharded(command: Callable) -> Callable:
    """Mark a command that shares its work among torchrun's ranks (docs/distributed.md); under a launch,
    user_errors refuses every other command rather than run it once per rank."""
    command.sharded = True
    return command


def user_errors(command: Callable) -> Callable:
    """Turn an MmeditError into one red line on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            if not getattr(command, "sharded", False):
                from mmedit import distributed

                if distributed.active():
                    name = command.__name__.removesuffix("_command").replace("_", " ")
                    raise MmeditError(f"mmedit {name} runs on one process; under torchrun only trace shares its "
                                      "work among the ranks (docs/distributed.md)")
            return command(*args, **kwargs)
        except MmeditError as error:
            err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


Device = Annotated[str, typer.Option(help="Where the model runs: cpu, cuda, cuda:N or auto (cuda when available).")]
# merge, revert and diff only add or subtract stored values (no forward pass), the same bit for bit on any
# device: they work on the CPU unless told otherwise, so that no GPU memory is taken for a file operation.
WeightsDevice = Annotated[str, typer.Option(help=(
    "Where the weights are added: cpu (default: no model runs, the result is the same bit for bit on any "
    "device), cuda, cuda:N or auto."))]
Dtype = Annotated[str, typer.Option(help="auto (as saved), float32, bfloat16 or float16.")]
TrustRemoteCode = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow a model's own Python code to run (off by default).")
]
ImageDir = Annotated[Path | None, typer.Option(
    help="Where to extract the images embedded in parquet files (default: <file stem>.images/ beside each file; "
         "set it when that folder is read-only).")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
AllowNonfinite = Annotated[
    bool, typer.Option("--allow-nonfinite", help="Accept deltas that put NaN/inf where the base is finite.")
]
Threads = Annotated[int, typer.Option(min=0, help=(
    "CPU threads for torch. 0 (default): one thread for a model under 20M parameters on the CPU (tiny models "
    "run fastest so: their ops are too small to split), torch's default (one per core) otherwise."))]
LogDir = Annotated[Path | None, typer.Option(help=(
    "Write TensorBoard event files of the training steps here (loss and its terms, lr, gradient norm per step; "
    "`tensorboard --logdir DIR` shows them). Needs tensorboard: pip install 'mmedit-unlearn[tensorboard]'."))]
IgnorePlan = Annotated[bool, typer.Option("--ignore-plan", help=(
    "Run even when the memory plan (`mmedit plan`) says the run cannot fit this device's free memory."))]
DeviceMap = Annotated[str | None, typer.Option(help=(
    "Dispatch the model over several devices (transformers/accelerate): auto, balanced or sequential (placed "
    "from the devices' free memory, bounded by --max-memory), or a JSON file {module name: device} with devices "
    "cpu, disk, N or cuda:N. Offloaded modules (cpu beside a GPU, disk) come to the execution device for each "
    "forward; --device stays auto or agrees with the map. docs/memory.md, Several devices and offload."))]
MaxMemory = Annotated[str | None, typer.Option(help=(
    "With --device-map auto|balanced|sequential: the most weight to place per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB "
    "(devices: a GPU index N or cuda:N, cpu, disk)."))]
OffloadDir = Annotated[Path | None, typer.Option(help=(
    "With --device-map: where disk-offloaded weights that the checkpoint's own safetensors files cannot serve "
    "are written (default: a temporary folder, removed when the run ends)."))]
SMALL_MODEL = 20_000_000  # parameters below which one CPU thread beats several (BENCHMARKS.md "CPU threads")


def placement(device: str, device_map: str | None, max_memory: str | None, offload_dir: Path | None = None) -> dict:
    """--device-map, --max-memory and --offload-dir read and checked against --device (one line each), before
    anything is read or loaded: the keyword arguments of mmedit.loading.load (empty without a device map)."""
    from mmedit.loading import check_placement, read_device_map
    from mmedit.plan import parse_max_memory

    if device_map is None and offload_dir is not None:
        raise MmeditError("--offload-dir is where --device-map offloads to disk; give a --device-map")
    mapped = None if device_map is None else read_device_map(device_map)
    budget = None if max_memory is None else parse_max_memory(max_memory)
    check_placement(device, mapped, budget)
    if mapped is None:
        return {}
    return {"device_map": mapped, "max_memory": budget, "offload_dir": offload_dir}


def placement_note(model) -> str:
    """One line: how many of the dispatched model's modules went to each device (offloaded ones marked)."""
    placed = getattr(model, "hf_device_map", None) or {}
    gpus = any(type(device) is int or str(device).startswith("cuda") for device in placed.values())
    counts: dict[str, int] = {}
    for device in placed.values():
        label = f"cuda:{device}" if type(device) is int else str(device)
        label += " (offloaded)" if device == "disk" or device == "cpu" and gpus else ""
        counts[label] = counts.get(label, 0) + 1
    return "device map: " + ", ".join(f"{count} module(s) on {label}" for label, count in counts.items())


def check_memory(target: str, model: str, *, ignore: bool, device: str, dtype: str = "auto",
                 placed: dict | None = None, **options) -> None:
    """Refuse, before any weights load, a run whose memory plan (mmedit.plan.preflight: the config only)
    exceeds the device's free memory (with a device map: any device's; `placed` as `placement` returns
    it): one line with the predicted and available bytes and what to change. --ignore-plan (`ignore`)
    skips the plan."""
    if ignore:
        return
    from mmedit.plan import preflight

    mapped = {key: (placed or {}).get(key) for key in ("device_map", "max_memory")}
    preflight(target, model, device=device, dtype=dtype, **mapped, **options)


def quiet_transformers() -> None:
    """No transformers progress bars or warnings: the CLI shows its own progress."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_model(model: str, device: str, dtype: str, trust_remote_code: bool, threads: int = 0,
               placed: dict | None = None):
    """(model, processor) for a command, with torch's CPU thread count set as `Threads` says; `placed`:
    the device map options (`placement`)."""
    import torch

    from mmedit.loading import input_device, load

    if threads:
        torch.set_num_threads(threads)
    if placed:  # accelerate's "some parameters are on the meta device" warning: the note below says where
        logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)
    loaded, processor = load(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **(placed or {}))
    if placed:
        err.print(placement_note(loaded), highlight=False, markup=False)
    if not threads and input_device(loaded).type == "cpu" and \
            sum(p.numel() for p in loaded.parameters()) < SMALL_MODEL:
        torch.set_num_threads(1)
    return loaded, processor
