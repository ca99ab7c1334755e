"""`mmedit plan`: the peak memory a trace, eval, merge or plugin run needs, from the model's config alone."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mmedit.cli.common import Dtype, ImageDir, TrustRemoteCode, out, user_errors
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
    """
    from mmedit import plan as planning

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
                               trust_remote_code=trust_remote_code)
    fits = None if budget is None else result.peak_bytes <= budget
    if as_json:
        print(json.dumps(result.to_json() | {"memory": budget, "fits": fits}))
        return
    out.print(_table(planning, result, model))
    if budget is not None:
        verdict = "fits" if fits else "does not fit"
        out.print(f"{verdict} in {planning.human(budget)} on {result.model.device}: peak "
                  f"{planning.human(result.peak_bytes)}")


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
