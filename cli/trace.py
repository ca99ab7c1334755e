"""`mmedit trace`: per-neuron activation (and gradient) statistics of a model over a data set."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from mmedit.cli.common import (Device, DeviceMap, Dtype, Force, IgnorePlan, ImageDir, MaxMemory, OffloadDir, Threads,
                               TrustRemoteCode, check_memory, err, load_model, out, placement, sharded,
                               user_errors)
from mmedit import distributed
from mmedit.errors import MmeditError


def all_ranks(stats):
    """Under torchrun, the statistics of every rank's batches merged in rank order (the whole data set's;
    sums equal one process's up to float64 summation order), on every rank; else `stats`."""
    from mmedit.trace import TraceStats

    if not distributed.active():
        return stats
    parts = distributed.gather(stats)
    merged = functools.reduce(TraceStats.merge, parts).tensors
    batches = {form: sum(part.meta["batches"].get(form, 0) for part in parts) for form in parts[0].meta["batches"]}
    dead = [site for site in parts[0].meta["dead_sites"] if all(site in part.meta["dead_sites"] for part in parts)]
    return TraceStats(merged, parts[0].meta | {"batches": batches, "dead_sites": dead,
                                               "distributed": distributed.describe()})


def split_list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    bad = [item for item in items if item not in allowed]
    if bad or not items:
        raise MmeditError(f"unknown {what} {', '.join(bad) or repr(value)}; choose from {', '.join(allowed)}")
    return items


@user_errors
@sharded
def trace_command(
    model: Annotated[str, typer.Argument(help="HF model directory or hub id.")],
    data: Annotated[Path, typer.Option(help="Data set: mmedit JSONL or MLLMU-Bench parquet.")],
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the statistics (.safetensors).")],
    parts: Annotated[str, typer.Option(help="Comma-separated parts to trace.")] = "vision,projector,llm",
    forms: Annotated[str, typer.Option(help="Input forms: multimodal (image+question), text (text-only twin).")] = "multimodal,text",
    grads: Annotated[bool, typer.Option("--grads", help="Also record gradient statistics of the answer NLL.")] = False,
    positions: Annotated[str, typer.Option(help="LLM token group the table and plot rank by: all, image, text, answer, last.")] = "all",
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per batch.")] = 4,
    limit: Annotated[int | None, typer.Option(min=1, help="Trace only the first N rows.")] = None,
    tau: Annotated[float, typer.Option(help="Threshold for counting a neuron as active (|z| > tau).")] = 0.1,
    top: Annotated[int, typer.Option(min=0, help="Neurons per site in the printed table (0: no table).")] = 5,
    plot: Annotated[Path | None, typer.Option(help="Also write a PNG heatmap of neuron importance here "
                                              "(an existing file needs --force).")] = None,
    image_dir: ImageDir = None,
    device: Device = "auto",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_dir: OffloadDir = None,
    dtype: Dtype = "auto",
    threads: Threads = 0,
    trust_remote_code: TrustRemoteCode = False,
    ignore_plan: IgnorePlan = False,
    force: Force = False,
) -> None:
    """Record per-neuron statistics across the vision encoder, projector and LLM.

    Example: mmedit trace tiny --data bench/retain90.jsonl --parts llm --limit 100 --out retain.safetensors
    """
    from mmedit.cli.trace_report import heatmap, top_table
    from mmedit.data import read_rows
    from mmedit.data.batches import FORMS, make_batches
    from mmedit.provenance import file_sha256
    from mmedit.safefile import check_writable
    from mmedit.trace import GROUPS, PARTS, trace

    placed = placement(device, device_map, max_memory, offload_dir)
    part_list = split_list(parts, PARTS, "part")
    form_list = split_list(forms, FORMS, "form")
    split_list(positions, GROUPS, "position group")
    for path in filter(None, (out_path, plot)):  # refused before minutes of tracing, not after
        check_writable(path, force)
    rows = read_rows(data, image_dir)[:limit]
    if any(row.image is None for row in rows) and "multimodal" in form_list:
        raise MmeditError(f"{data}: some rows have no image; trace them with --forms text")
    mine = distributed.shard(rows, batch_size)  # under torchrun: this rank's batches
    device = distributed.device(device)
    check_memory("trace", model, ignore=ignore_plan, device=device, dtype=dtype, sets={"forget": mine},
                 batch_size=batch_size, grads=grads, trust_remote_code=trust_remote_code, placed=placed)
    loaded, processor = load_model(model, device, dtype, trust_remote_code, threads, placed)

    def batches():
        for form in form_list:
            yield from make_batches(mine, processor, form=form, batch_size=batch_size, with_answer=True)

    total = len(form_list) * -(-len(mine) // batch_size)
    meta = {"data": {"path": str(data), "sha256": file_sha256(data), "rows": len(rows)}, "model_arg": model}
    stats = all_ranks(trace(loaded, batches(), parts=part_list, grads=grads, tau=tau, meta=meta, total=total,
                            progress=distributed.is_writer()))
    if not distributed.is_writer():
        distributed.barrier()  # rank 0 writes; the others wait for it
        return
    stats.save(out_path, force=force)
    distributed.barrier()
    for name in stats.meta["dead_sites"]:
        err.print(f"[yellow]note:[/] no gradient reaches {name}: it is off the loss path (dead branch), "
                  "so it has activation statistics only")
    if top:
        for form in form_list:
            out.print(top_table(stats, form, positions, top))
    if plot:
        heatmap(stats, form_list[0], positions, plot, force=force)
        out.print(f"heatmap: {plot}")
    out.print(f"statistics: {out_path} ({len(stats.sites)} sites, {len(rows)} rows x {len(form_list)} forms)")


def register(app: typer.Typer) -> None:
    app.command("trace")(trace_command)
