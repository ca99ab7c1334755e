"""`mmedit plan`: the peak memory a trace, eval, merge or plugin run needs, from the model's config alone."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mmedit.cli.common import DeviceMap, Dtype, ImageDir, MaxMemory, TrustRemoteCode, out, user_errors
from mmedit.errors import MmeditError

TARGETS = ("trace", "eval", "merge")


@user_errors
def plan_command(
    target: Annotated[str, typer.Argument(help="trace, eval, merge, or a plugin name (mmedit plugins).")],
    model: Annotated[str, typer.Argument(help="HF model directory or hub id: only its config is read.")],
    forget: Annotated[Path | None, typer.Option(help="Forget set (JSONL or parquet): its sizes and lengths.")] = None,
    retain: Annotated[Path | None, typer.Option(help="Retain set: its sizes and lengths.")] = None,
    dtype: Dtype = "auto",
    device: Annotated[str, typer.Option(help="Where the run would be: cpu or cuda.")] = "cuda",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Rows per batch (default: the target's own).")] = None,
    grads: Annotated[bool, typer.Option("--grads", help="trace: with gradient statistics.")] = False,
    tokens: Annotated[int, typer.Option(min=1, help="Text tokens per row when no data is given.")] = 48,
    rows: Annotated[int, typer.Option(min=1, help="Rows per set when no data is given.")] = 40,
    memory: Annotated[str | None, typer.Option(help="The device's memory to plan for, e.g. 80GB or 24GiB (default: "
                                                    "its free memory when the device is here).")] = None,
    settings: Annotated[list[str] | None, typer.Option("--set", help="Plugin option key=value (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    image_dir: ImageDir = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Predict the peak memory of a run per device, with a breakdown (weights, gradients, optimizer state,
    original values kept for the delta, statistics, θ₀ quantities, activations), without loading weights.

    Example: mmedit plan mmunlearner tiny --forget bench/forget10.jsonl --retain bench/retain90.jsonl --device cpu
    For a 7B model, only its config is needed (a local folder, or a hub id whose config is in the HF cache):
    mmedit plan mmunlearner llava-hf/llava-1.5-7b-hf --dtype bfloat16 --device cuda --memory 80GB
    Over two GPUs (the map as accelerate would infer it from these bounds; devices need not be here):
    mmedit plan ga llava-hf/llava-1.5-7b-hf --dtype bfloat16 --device-map auto --max-memory 0=40GB,1=40GB,cpu=100GB
    """
    from mmedit import plan as planning
    from mmedit.loading import check_placement, read_device_map

    mapped = None if device_map is None else read_device_map(device_map)
    bounds = None if max_memory is None else planning.parse_max_memory(max_memory)
    check_placement("auto", mapped, bounds, here=False)
    if mapped is not None:
        device = "cuda" if bounds and any(type(key) is int for key in bounds) or isinstance(mapped, dict) and any(
            type(value) is int for value in mapped.values()) or isinstance(mapped, str) and device == "cuda" else "cpu"

    budget = planning.parse_bytes(memory) if memory is not None else _free(planning, device)
    footprint, options = None, None
    if target not in TARGETS:
        from mmedit.cli.apply import parse_overrides
        from mmedit.plugins import get

        plugin = get(target)
        overrides = parse_overrides(None, settings or [])
        if batch_size is not None and "batch_size" in {f.name for f in plugin.options()}:
            overrides.setdefault("batch_size", batch_size)
        footprint, options = plugin.footprint, plugin.configure(overrides)
    elif settings:
        raise MmeditError(f"--set is for plugin options; {target} has none")
    sets = None
    if forget is not None or retain is not None:
        from mmedit.data import read_rows

        sets = {name: read_rows(path, image_dir) for name, path in (("forget", forget), ("retain", retain)) if path is not None}
    result = planning.plan_for(target, model, dtype=dtype, device=device, footprint=footprint, options=options,
                               sets=sets, batch_size=batch_size, grads=grads, tokens=tokens, rows=rows, memory=budget,
                               trust_remote_code=trust_remote_code, device_map=mapped, max_memory=bounds)
    if mapped is not None:
        _per_device(planning, result, bounds or {}, as_json)
        return
    fits = None if budget is None else result.peak_bytes <= budget
    if as_json:
        print(json.dumps(result.to_json() | {"memory": budget, "fits": fits}))
        return
    out.print(_table(planning, result, model))
    if budget is not None:
        verdict = "fits" if fits else "does not fit"
        out.print(f"{verdict} in {planning.human(budget)} on {result.model.device}: peak "
                  f"{planning.human(result.peak_bytes)}")


def _per_device(planning, result, bounds: dict, as_json: bool) -> None:
    """A device-mapped plan: the bytes per device (weights where the map puts them, the rest on its
    execution device), the weights beside their --max-memory bound, the total beside the device's free
    memory where the device is on this machine."""
    bound = {planning.device_label(key): value for key, value in bounds.items()}
    free = {label: _free(planning, label) for label in result.per_device if label != "disk"}
    fits = {label: None if limit is None else result.per_device[label] <= limit for label, limit in free.items()}
    if as_json:
        print(json.dumps(result.to_json() | {"max_memory": bound, "memory": free, "fits": fits}))
        return
    out.print(_table(planning, result, "(device map)"))
    table = Table("device", "weights", "--max-memory", "planned", "free here", "fits",
                  title=f"per device (execution on {result.main_device})")
    for label, nbytes in result.per_device.items():
        shown = [planning.human(value) if value is not None else "-" for value in
                 (result.placement.get(label, 0), bound.get(label), nbytes, free.get(label))]
        table.add_row(label, *shown, "-" if fits.get(label) is None else "yes" if fits[label] else "[bold red]no[/]")
    out.print(table)


def _free(planning, device: str) -> int | None:
    """The device's free bytes when it is on this machine, else None."""
    try:
        return planning.available_bytes(device)
    except MmeditError:
        return None


def _table(planning, result, model: str) -> Table:
    phases = result.phases
    device = result.model.device
    table = Table(title=f"mmedit plan {result.target} {model}: {result.model.params / 1e6:,.1f}M parameters, "
                        f"{result.model.dtype} on {device}; peak {planning.human(result.peak_bytes)} "
                        f"({result.peak.name})")
    table.add_column("term")
    for phase in phases:
        table.add_column(phase.name + (" (peak)" if phase is result.peak else ""), justify="right")
    where = [device] + (["cpu"] if device != "cpu" else [])
    for place in where:
        for term in planning.TERMS:
            values = [result.on(phase, place).get(term, 0) for phase in phases]
            if any(values):
                table.add_row(f"{term} ({place})" if len(where) > 1 else term,
                              *(planning.human(value) if value else "-" for value in values))
        totals = [sum(result.on(phase, place).values()) for phase in phases]
        table.add_row(f"[bold]total ({place})[/]", *(f"[bold]{planning.human(value)}[/]" for value in totals))
    if any(phase.disk for phase in phases):
        table.add_row("temporary files", *(planning.human(phase.disk) if phase.disk else "-" for phase in phases))
    if result.assumed:
        table.caption = "assumed: " + "; ".join(result.assumed)
    return table


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)
