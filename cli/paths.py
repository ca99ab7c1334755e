"""`mmedit paths find | show`: find MIP-Editor's influential neuron paths once, save them, show them.

    mmedit paths find MODEL --forget forget.jsonl --out paths.safetensors --plot paths.png
    mmedit paths show paths.safetensors --plot paths.png
    mmedit apply mip_editor MODEL --forget forget.jsonl --retain retain.jsonl --stats paths=paths.safetensors ...
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmedit.cli.common import Device, Dtype, Force, ImageDir, Threads, TrustRemoteCode, load_model, out, user_errors
from mmedit.errors import MmeditError
from mmedit.safefile import check_writable

paths_app = typer.Typer(name="paths", help="MIP-Editor's influential neuron paths: find them (and save), or show a "
                        "saved file.", no_args_is_help=True)


@paths_app.command("find")
@user_errors
def find_command(
    model: Annotated[str, typer.Argument(help="HF model directory or hub id.")],
    forget: Annotated[Path, typer.Option(help="Forget set: mmedit JSONL or MLLMU-Bench parquet.")],
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the paths (.safetensors).")],
    side: Annotated[str, typer.Option(help="both, text (LLM, IGI) or vision (vision encoder, IFI).")] = "both",
    steps: Annotated[int, typer.Option(min=1, help="Interpolation steps m.")] = 4,
    top_k: Annotated[int, typer.Option(min=1, help="Path neurons per layer and sample.")] = 5,
    positions: Annotated[str, typer.Option(help="answer, all or first (LLM token positions).")] = "answer",
    batch_rows: Annotated[int, typer.Option(min=1, help="Rows (samples x steps) per traced pass.")] = 64,
    top: Annotated[int, typer.Option(min=0, help="Neurons per site in the printed table (0: no table).")] = 5,
    plot: Annotated[Path | None, typer.Option(help="Also write a PNG of the paths here.")] = None,
    image_dir: ImageDir = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = 0,
    trust_remote_code: TrustRemoteCode = False,
    force: Force = False,
) -> None:
    """Search the influential neuron paths of the forget set and save them (reuse: apply --stats paths=FILE).

    Example: mmedit paths find tiny --forget bench/forget10.jsonl --side text --out text-paths.safetensors --plot text-paths.png
    """
    from mmedit.data import read_rows
    from mmedit.plugins.mip_editor import SIDES
    from mmedit.plugins.mip_editor.interventions import POSITIONS
    from mmedit.plugins.mip_editor.report import path_table, plot_paths
    from mmedit.plugins.mip_editor.search import find_paths
    from mmedit.provenance import file_sha256

    if side not in SIDES:
        raise MmeditError(f"unknown side {side!r}; choose from {', '.join(SIDES)}")
    if positions not in POSITIONS:
        raise MmeditError(f"unknown positions {positions!r}; choose from {', '.join(POSITIONS)}")
    for target in (out_path, plot):  # refuse before the search, not after it
        if target is not None:
            check_writable(target, force)
    rows = read_rows(forget, image_dir)
    loaded, processor = load_model(model, device, dtype, trust_remote_code, threads)
    paths = find_paths(loaded, processor, rows, parts=SIDES[side], steps=steps, top_k=top_k, positions=positions,
                       batch_rows=batch_rows, progress=True)
    paths.meta["data"] = {"path": str(forget), "sha256": file_sha256(forget), "rows": len(rows)}
    paths.meta["model_arg"] = model
    paths.save(out_path, force=force)
    if top:
        out.print(path_table(paths, top))
    if plot:
        out.print(f"plot: {plot_paths(paths, plot, force=force)}")
    out.print(f"paths: {out_path} ({paths.count()} neurons over {len(paths.neurons)} sites)")


@paths_app.command("show")
@user_errors
def show_command(
    paths_file: Annotated[Path, typer.Argument(help="A paths file written by `find`.")],
    top: Annotated[int, typer.Option(min=1, help="Neurons per site in the table.")] = 5,
    plot: Annotated[Path | None, typer.Option(help="Also write a PNG of the paths here.")] = None,
    force: Force = False,
) -> None:
    """Print a saved paths file as a table (and plot it).

    Example: mmedit paths show paths.safetensors --top 10
    """
    from mmedit.plugins.mip_editor.paths import NeuronPaths
    from mmedit.plugins.mip_editor.report import path_table, plot_paths

    if plot is not None:
        check_writable(plot, force)
    paths = NeuronPaths.load(paths_file)
    out.print(path_table(paths, top))
    if plot:
        out.print(f"plot: {plot_paths(paths, plot, force=force)}")



def register(app: typer.Typer) -> None:
    app.add_typer(paths_app)
