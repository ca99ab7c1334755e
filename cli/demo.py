"""`mmedit demo`: train the embedded tiny MLLM (once), unlearn with every plugin, evaluate, compare."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from mmedit.cli.common import Device, Force, err, out, user_errors
from mmedit.errors import MmeditError


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


def _count(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def summary_table(record: dict) -> Table:
    """Methods x metrics, narrow enough for an 80-column terminal."""
    from mmedit.bench.demo import ACCURACY_COLUMNS, RATE_COLUMNS, summary_rows

    metric = record["settings"]["headline_metric"]
    grid = Table(title=f"unlearning 10 % of the people: {metric} (%)", box=box.SIMPLE_HEAD, collapse_padding=True,
                 pad_edge=False, caption="forgot = forgetting rate, 1 - edited/base; delta = weights changed")
    grid.add_column("method", no_wrap=True)
    for label in [label for label, _, _ in ACCURACY_COLUMNS] + [label for label, _ in RATE_COLUMNS]:
        grid.add_column(label.replace(" ", "\n"), justify="right", no_wrap=True)
    grid.add_column("delta", justify="right", no_wrap=True)
    grid.add_column("s", justify="right", no_wrap=True)
    for row in summary_rows(record):
        failed = "[red]failed[/]" if row["error"] else None
        cells = [failed or _percent(row[label]) for label, _, _ in ACCURACY_COLUMNS]
        cells += [_percent(row[label]) for label, _ in RATE_COLUMNS]
        grid.add_row(row["method"].replace(" ", "\n"), *cells, _count(row["delta elements"]), f"{row['seconds']:.0f}")
    return grid


def failures(record: dict) -> list[str]:
    return [f"[red]{method['name']} failed:[/] {escape(method['error'])}" for method in record["methods"]
            if method["error"]]


@user_errors
def demo_command(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the report, plots, trace and deltas.")] = Path("mmedit-demo"),
    fast: Annotated[bool, typer.Option("--fast", help="Tiny run: a few people, a few hundred training steps (smoke test).")] = False,
    seed: Annotated[int, typer.Option(help="Seed for the benchmark, the model, the plugins and the retain sample.")] = 0,
    retain_people: Annotated[int, typer.Option(min=1, help="Retain people evaluated (a seeded sample; plugins see all).")] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward / generate call in evaluation.")] = 64,
    run_specs: Annotated[list[str] | None, typer.Option("--run", help='Run only this: "PLUGIN key=value ..." '
                                                        "(repeatable; a plugin may appear with several settings).")] = None,
    paper_defaults: Annotated[bool, typer.Option("--paper-defaults", help="Run every plugin with the papers' "
                                                 "defaults instead of the settings tuned for the tiny model.")] = False,
    device: Device = "cpu",
    force: Force = False,
) -> None:
    """Train the built-in tiny MLLM on synthetic profiles (cached after the first run), trace it on the
    forget set, unlearn 10 % of the people with every installed plugin, and compare base vs each edit.

    Example: mmedit demo --out mmedit-demo
    Example: mmedit demo --run "manu alpha=5" --run "manu alpha=10" --run "npo lr=1e-4"
    """
    from mmedit.cli.apply import parse_overrides
    from mmedit.plugins import get

    runs = None
    if run_specs:
        runs = []
        for spec in run_specs:
            if not spec.split():
                raise MmeditError('--run needs "PLUGIN key=value ...", got an empty string')
            name, *settings = spec.split()
            get(name).configure(parse_overrides(None, settings))  # bad names/options fail before any work
            runs.append((name, parse_overrides(None, settings)))
    from transformers.utils import logging

    from mmedit.bench import demo

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    record = demo.run(out_dir, fast=fast, seed=seed, retain_people=retain_people, device=device,
                      batch_size=batch_size, force=force, runs=runs, paper_defaults=paper_defaults)
    if not record["plugins_installed"]:
        err.print("[yellow]note:[/] no plugins are installed (mmedit.plugins has no apply_plugin yet): "
                  "evaluated the base model only")
    out.print(summary_table(record))
    for line in failures(record):
        out.print(line, soft_wrap=True)
    people = record["data"]["evaluated_people"]
    out.print(f"evaluated {len(people['forget'])} forget, {len(people['test'])} test (other pictures) and "
              f"{len(people['retain'])} of the retain people; wall {record['timings']['total_s']:.0f} s, "
              f"peak memory {record['peak_memory_mb']:.0f} MB", highlight=False)
    out.print(f"report: {out_dir / demo.REPORT} (table: {demo.MARKDOWN}), plot: {out_dir / 'demo.png'}, "
              f"trace: {out_dir / 'trace-forget.png'}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
