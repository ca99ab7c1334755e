"""`mmedit trace`: per-neuron activation (and gradient) statistics of a model over a data set."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmedit.cli.common import (Device, Dtype, Force, IgnorePlan, ImageDir, Threads, TrustRemoteCode, check_memory, err,
                               load_model, out, user_errors)
from mmedit.errors import MmeditError


def split_list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    bad = [item for item in items if item not in allowed]
    if bad or not items:
        raise MmeditError(f"unknown {what} {', '.join(bad) or repr(value)}; choose from {', '.join(allowed)}")
    return items


@user_errors
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

    part_list = split_list(parts, PARTS, "part")
    form_list = split_list(forms, FORMS, "form")
    split_list(positions, GROUPS, "position group")
    for path in filter(None, (out_path, plot)):  # refused before minutes of tracing, not after
        check_writable(path, force)
    rows = read_rows(data, image_dir)[:limit]
    if any(row.image is None for row in rows) and "multimodal" in form_list:
        raise MmeditError(f"{data}: some rows have no image; trace them with --forms text")
    check_memory("trace", model, ignore=ignore_plan, device=device, dtype=dtype, sets={"forget": rows},
                 batch_size=batch_size, grads=grads, trust_remote_code=trust_remote_code)
    loaded, processor = load_model(model, device, dtype, trust_remote_code, threads)

    def batches():
        for form in form_list:
            yield from make_batches(rows, processor, form=form, batch_size=batch_size, with_answer=True)

    total = len(form_list) * -(-len(rows) // batch_size)
    meta = {"data": {"path": str(data), "sha256": file_sha256(data), "rows": len(rows)}, "model_arg": model}
    stats = trace(loaded, batches(), parts=part_list, grads=grads, tau=tau, meta=meta, total=total)
    stats.save(out_path, force=force)
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
