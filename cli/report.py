"""`mmedit report`: one self-contained HTML file from a trace, deltas, eval and attack reports
(mmedit.eval.html; docs/report.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mmedit.cli.common import Force, out, user_errors


@user_errors
def report_command(
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the HTML file.")],
    trace: Annotated[Path | None, typer.Option(help="A trace file (mmedit trace --out): the neuron importance per layer.")] = None,
    deltas: Annotated[list[Path] | None, typer.Option("--delta", help="A delta file (repeat): what it touches per part, layer and neuron.")] = None,
    evals: Annotated[list[Path] | None, typer.Option("--eval", help="An eval report (mmedit eval --out; repeat): forget/retain per method.")] = None,
    attacks: Annotated[list[Path] | None, typer.Option("--attack", help="An attack report (mmedit attack --out; repeat): what comes back.")] = None,
    form: Annotated[str, typer.Option(help="Which traced inputs the importance is of: multimodal (image + question) or text.")] = "multimodal",
    title: Annotated[str, typer.Option(help="The page's title.")] = "mmedit report",
    force: Force = False,
) -> None:
    """Write one HTML file (inline CSS and SVG: no scripts, nothing fetched) with a neuron atlas per part and
    layer (traced importance; what each delta touches), forget/retain charts per method, attack recovery,
    and the provenance of every input (its sha256 and what it records itself). Any subset of inputs, at
    least one; a bad input is one error line and nothing is written.

    Example: mmedit report --trace forget.safetensors --delta mmu.safetensors --delta mip.safetensors --eval report.json --eval mip.json --attack attack.json --out report.html
    """
    from mmedit.eval import html
    from mmedit.safefile import check_writable

    check_writable(out_path, force)  # refused before any work, not after
    inputs = html.read_inputs(trace, deltas or [], evals or [], attacks or [])
    html.write(html.render(inputs, form=form, title=title), out_path, force=force)
    table = Table("kind", "file", "sha256", title="report inputs")
    for found in inputs:
        table.add_row(found.kind, str(found.path), found.sha256[:16] + "…")
    out.print(table)
    out.print(f"report: {out_path} ({out_path.stat().st_size / 1024:.0f} KiB)")


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)
