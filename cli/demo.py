"""`mmedit demo`: the whole flow on the embedded model, end to end, in a few minutes on a CPU.

1. build (or reuse) the synthetic benchmark and take the embedded model (mmedit.bench.model.embedded):
   the weights shipped with mmedit, checksums verified, or with `--retrain` (and for `--fast` or another
   seed) the model the recipe trains here, cached after the first run;
2. trace the model on the forget set, both forms, with gradients: statistics + heatmap;
3. run every registered plugin (forget = forget 10 %, retain = retain 90 %) with its preset for the
   embedded model, `Plugin.presets["embedded"]` (or the papers' defaults, or the runs asked for), each
   giving a delta; a plugin that fails is reported with its one-line error and the demo goes on;
4. evaluate the base model and base + each delta on forget, test and a seeded subset of retain people
   (all forget and test people; the subset keeps the demo inside its time budget and is recorded);
5. write demo.json, demo.md, demo.png (forget vs retain accuracy per form), the trace files and the
   deltas into the output folder in one swap, and print the methods x metrics table. An existing
   output folder is refused before any work unless `--force` replaces it.

The demo runs plugins, so it lives here in the CLI, above them: mmedit's core never imports a plugin.
"""
from __future__ import annotations

import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from mmedit.cli.common import Device, Force, err, out, quiet_transformers, user_errors
from mmedit.errors import MmeditError

FORGET_PERCENT = 10
RETAIN_PEOPLE = 10  # retain people evaluated (a seeded sample of the 45); all forget / test people are
PRESET = "embedded"  # the Plugin.presets entry tuned for the embedded model
REPORT = "demo.json"
MARKDOWN = "demo.md"  # the summary as a markdown table, for notes and BENCHMARKS.md
FORMAT = "mmedit.demo-report"
# Summary columns: the headline metric (option-likelihood accuracy) per (split, form), and the
# forgetting rate of the forget set per form. VQA = Image_Textual, QA = Pure_Text.
ACCURACY_COLUMNS = (("forget VQA", "forget", "Image_Textual"), ("forget QA", "forget", "Pure_Text"),
                    ("test VQA", "test", "Image_Textual"), ("retain VQA", "retain", "Image_Textual"),
                    ("retain QA", "retain", "Pure_Text"))
RATE_COLUMNS = (("forgot VQA", "Image_Textual"), ("forgot QA", "Pure_Text"))


@dataclass
class Method:
    """One row of the demo table: the base model, or a plugin's edit."""
    name: str
    table: dict | None = None  # harness.summarise output; None when the plugin failed
    error: str | None = None
    edit: object | None = None  # the plugin's Delta, saved with the other outputs at the end
    delta: dict = field(default_factory=dict)  # file, elements, bytes, provenance
    seconds: float = 0.0


def plugins() -> tuple[dict, object]:
    """(available(), apply_plugin) from mmedit.plugins: every registered plugin by name, and the runner."""
    from mmedit.plugins import apply_plugin, available

    return available(), apply_plugin


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _weights(model) -> dict:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _restore_if_changed(model, reference: dict) -> bool:
    """Put `reference` back if the model's weights differ from it; True when they did."""
    import torch

    changed = [name for name, tensor in model.state_dict().items() if not torch.equal(tensor, reference[name])]
    if changed:
        model.load_state_dict(reference)
    return bool(changed)


def label(name: str, overrides: dict) -> str:
    """"ga lr=0.0001": a method row's name, with the settings that differ from the plugin's defaults."""
    return " ".join([name, *(f"{key}={value}" for key, value in overrides.items())])


def default_runs(installed: dict, paper_defaults: bool) -> list[tuple[str, dict]]:
    """Every installed plugin once: with its embedded preset, or with no overrides (the papers' defaults)."""
    return [(name, {} if paper_defaults else dict(plugin.presets.get(PRESET, {})))
            for name, plugin in sorted(installed.items())]


def run(out_dir: str | Path = "mmedit-demo", *, fast: bool = False, seed: int = 0, retain_people: int = RETAIN_PEOPLE,
        device: str = "auto", batch_size: int = 64, force: bool = False, progress: bool = True,
        runs: list[tuple[str, dict]] | None = None, paper_defaults: bool = False, retrain: bool = False) -> dict:
    """Run the demo; returns the report (also written to out_dir/demo.json). See the module doc.

    runs: (plugin, options) pairs to run instead of every installed plugin (a plugin may appear several
    times with different options, e.g. to compare settings).
    retrain: use the model the recipe trains here instead of the shipped weights."""
    from mmedit.bench import model as embedded_model
    from mmedit.safefile import check_writable

    out_dir = check_writable(out_dir, force)  # before any work
    # the embedded model's ops are tiny: one thread is as fast, and far faster on a busy machine
    with embedded_model.threads(embedded_model.RECIPE["threads"]):
        return _run(out_dir, fast, seed, retain_people, device, batch_size, progress, runs, paper_defaults, retrain)


def _run(out_dir: Path, fast: bool, seed: int, retain_people: int, device: str, batch_size: int,
         progress: bool, runs: list[tuple[str, dict]] | None, paper_defaults: bool, retrain: bool) -> dict:
    import torch

    from mmedit.bench import model as embedded_model
    from mmedit.bench import profiles
    from mmedit.cli.trace_report import heatmap
    from mmedit.data.batches import FORMS, make_batches
    from mmedit.eval import report
    from mmedit.eval.harness import evaluate, select_people, summarise
    from mmedit.loading import load
    from mmedit.provenance import library_versions
    from mmedit.safefile import atomic_dir
    from mmedit.trace import trace

    started = time.perf_counter()
    timings = {}
    paths = embedded_model.embedded(seed=seed, fast=fast, progress=progress, retrain=retrain)
    timings["model_s"] = time.perf_counter() - started
    model, processor = load(paths.model, device=device)
    info = profiles.load(paths.data)
    forget_name, retain_name, test_name = profiles.split_names(FORGET_PERCENT)
    forget_rows, retain_rows = info.rows(forget_name), info.rows(retain_name)
    sets = {"forget": forget_rows, "test": info.rows(test_name),
            "retain": select_people(retain_rows, retain_people, seed)}

    mark = time.perf_counter()
    batches = [batch for form in FORMS
               for batch in make_batches(forget_rows, processor, form=form, batch_size=batch_size)]
    stats = trace(model, batches, grads=True, progress=progress, total=len(batches),
                  meta={"data": {"split": forget_name, "rows": len(forget_rows)}})
    timings["trace_s"] = time.perf_counter() - mark

    # the embedded model answers in a word or two and was never taught the lettered prompt
    options = dict(batch_size=batch_size, max_new_tokens=8, letters=False, progress=progress)
    mark = time.perf_counter()
    methods = [Method(report.BASE, summarise(evaluate(model, processor, sets, description="base model", **options)),
                      seconds=time.perf_counter() - mark)]
    installed, apply_plugin = plugins()
    if runs is None:
        runs = default_runs(installed, paper_defaults)
    memo: dict = {}  # statistics (traces, Fisher, paths) one run computed, for later runs that need the same
    for name, overrides in runs:
        methods.append(_run_plugin(name, overrides, apply_plugin, model, processor, forget_rows, retain_rows,
                                   sets, seed, options, progress, memo))
    timings["total_s"] = time.perf_counter() - started

    with atomic_dir(out_dir, force=True) as work:  # check_writable allowed replacing what is there
        stats.save(work / "trace-forget.safetensors")
        heatmap(stats, "multimodal", "all", work / "trace-forget.png")
        for index, method in enumerate(methods[1:]):
            if method.edit is not None:
                path = method.edit.save(work / f"delta-{index:02d}-{method.name.split()[0]}.safetensors")
                method.delta = {"file": path.name, "elements": method.edit.touched, "bytes": path.stat().st_size,
                                "provenance": method.edit.provenance}
        results = {method.name: method.table for method in methods if method.table is not None}
        record = report.build(results, {
            "format": FORMAT,
            "plugins_installed": bool(installed),
            "methods": [{"name": m.name, "error": m.error, "delta": m.delta, "seconds": round(m.seconds, 2)}
                        for m in methods],
            "model": {"path": str(paths.model), "shipped": paths.shipped,
                      "training": embedded_model.training_record(paths.model)},
            "data": {"root": str(paths.data), "forget": forget_name, "retain": retain_name, "test": test_name,
                     "evaluated_people": {split: sorted({row.entity for row in rows}) for split, rows in sets.items()},
                     "note": f"evaluated: all forget and test people, and a seeded sample (seed {seed}) of "
                             f"{len({row.entity for row in sets['retain']})} of the "
                             f"{len({row.entity for row in retain_rows})} retain people; plugins see every retain row"},
            "settings": {"fast": fast, "seed": seed, "retrain": retrain, "device": device, "batch_size": batch_size,
                         "headline_metric": report.HEADLINE, "paper_defaults": paper_defaults,
                         "runs": [{"plugin": name, "options": overrides} for name, overrides in runs]},
            "timings": {key: round(value, 2) for key, value in timings.items()},
            "peak_memory_mb": round(_peak_rss_mb(), 1),
            "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
            "versions": library_versions(),
        })
        report.write_json(record, work / REPORT)
        (work / MARKDOWN).write_text(markdown(record), encoding="utf-8")
        report.plot(results, work / "demo.png")
    return record


SEEDS_REPORT, SEEDS_MARKDOWN, SEEDS_FORMAT = "demo-seeds.json", "demo-seeds.md", "mmedit.demo-seeds-report"


def run_seeds(out_dir: str | Path, seeds: list[int], *, force: bool = False, **options) -> dict:
    """The demo once per seed (benchmark, model, plugins and retain sample all seeded), each in
    out_dir/seed-N/, then every summary cell as mean, sample standard deviation, min and max over the
    seeds that ran (a failed run is counted, not averaged): out_dir/demo-seeds.json and demo-seeds.md.
    Seeds other than 0 train their embedded model first (one to two minutes each, then cached)."""
    from mmedit.eval.report import write_json
    from mmedit.provenance import library_versions
    from mmedit.safefile import atomic_dir, check_writable

    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise MmeditError(f"--seeds needs two or more different seeds, got {','.join(map(str, seeds))}")
    out_dir = check_writable(out_dir, force)
    with atomic_dir(out_dir, force=True) as work:
        records = {seed: run(work / f"seed-{seed}", seed=seed, **options) for seed in seeds}
        record = {"format": SEEDS_FORMAT, "format_version": 1, "seeds": seeds,
                  "headline_metric": records[seeds[0]]["settings"]["headline_metric"],
                  "runs": {str(seed): f"seed-{seed}/{REPORT}" for seed in seeds},
                  "methods": aggregate(records), "versions": library_versions()}
        write_json(record, work / SEEDS_REPORT)
        (work / SEEDS_MARKDOWN).write_text(seeds_markdown(record), encoding="utf-8")
    return record


SUMMARY_COLUMNS = tuple(column for column, _, _ in ACCURACY_COLUMNS) + tuple(column for column, _ in RATE_COLUMNS)


def aggregate(records: dict[int, dict]) -> list[dict]:
    """Per method (in the first seed's order): each summary column's mean / sd / min / max / n over the
    seeds where the method ran, and the seeds where it failed."""
    import statistics

    by_method: dict[str, list[dict]] = {}
    for record in records.values():
        for row in summary_rows(record):
            by_method.setdefault(row["method"], []).append(row)
    methods = []
    for name, rows in by_method.items():
        ran = [row for row in rows if not row["error"]]
        cells = {}
        for column in SUMMARY_COLUMNS:
            values = [row[column] for row in ran if row[column] is not None]
            cells[column] = None if not values else {
                "mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
                "min": min(values), "max": max(values), "n": len(values)}
        methods.append({"method": name, "failed": len(rows) - len(ran), "cells": cells})
    return methods


def _spread(cell: dict | None) -> str:
    if cell is None:
        return "-"
    sd = "" if cell["sd"] is None else f" ± {100 * cell['sd']:.0f}"
    return f"{100 * cell['mean']:.0f}{sd}"


def seeds_markdown(record: dict) -> str:
    """Methods x columns as "mean ± sd" in % over the seeds."""
    lines = [f"| method | {' | '.join(SUMMARY_COLUMNS)} | failed |", "|---|" + "---:|" * (len(SUMMARY_COLUMNS) + 1)]
    for method in record["methods"]:
        cells = [_spread(method["cells"][column]) for column in SUMMARY_COLUMNS]
        lines.append(f"| {method['method']} | " + " | ".join(cells) + f" | {method['failed']} |")
    seeds = ", ".join(map(str, record["seeds"]))
    return "\n".join([f"Mean ± sample standard deviation over seeds {seeds} ({record['headline_metric']}, %; "
                      "forgot: forgetting rate).", "", *lines]) + "\n"


def seeds_table(record: dict) -> Table:
    grid = Table(title=f"over seeds {', '.join(map(str, record['seeds']))}: {record['headline_metric']} (%), "
                 "mean ± sd", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    grid.add_column("method", no_wrap=True)
    for column in SUMMARY_COLUMNS:
        grid.add_column(column.replace(" ", "\n"), justify="right", no_wrap=True)
    grid.add_column("failed", justify="right")
    for method in record["methods"]:
        grid.add_row(method["method"].replace(" ", "\n"), *[_spread(method["cells"][c]) for c in SUMMARY_COLUMNS],
                     str(method["failed"]))
    return grid


def _run_plugin(name, overrides, apply_plugin, model, processor, forget_rows, retain_rows, sets, seed, options,
                progress, memo) -> Method:
    """Edit with one plugin and evaluate the edit; any failure becomes the method's one-line error."""
    from mmedit.eval.harness import evaluate_edited, summarise

    method = Method(label(name, overrides))
    reference = _weights(model)
    mark = time.perf_counter()
    try:
        delta = apply_plugin(name, model, processor, forget_rows, retain_rows, overrides, seed=seed,
                             progress=progress, memo=memo)
        if _restore_if_changed(model, reference):
            raise MmeditError("the plugin modified the model it was given (weights restored)")
        method.table = summarise(evaluate_edited(model, processor, sets, [delta], description=method.name,
                                                 **options))
        method.edit = delta
    except Exception as error:  # noqa: BLE001 - a broken plugin must not take the demo down
        _restore_if_changed(model, reference)
        method.error = one_line(error)
        method.table = None
    method.seconds = time.perf_counter() - mark
    return method


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def summary_rows(record: dict) -> list[dict]:
    """Methods x metrics for the printed table: headline accuracies, forgetting rates, delta size."""
    results, comparison = record["results"], record["comparison"]
    metric = record["settings"]["headline_metric"]
    rows = []
    for method in record["methods"]:
        row = {"method": method["name"], "error": method["error"], "seconds": method["seconds"]}
        table = results.get(method["name"])
        for column, split, form in ACCURACY_COLUMNS:
            row[column] = None if table is None else table.get(split, {}).get(form, {}).get(metric)
        compared = comparison.get(method["name"], {})
        for column, form in RATE_COLUMNS:
            row[column] = compared.get("forget", {}).get(form, {}).get(metric, {}).get("forgetting_rate")
        row["delta elements"] = method["delta"].get("elements")
        row["delta bytes"] = method["delta"].get("bytes")
        rows.append(row)
    return rows


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


def markdown(record: dict) -> str:
    """The summary as a markdown table: cells "headline / generation accuracy" in %, then the forgetting
    rates (headline metric), the delta's changed elements and the seconds of edit + evaluation."""
    metric = record["settings"]["headline_metric"]
    header = [column for column, _, _ in ACCURACY_COLUMNS] + [column for column, _ in RATE_COLUMNS]
    lines = [f"| method | {' | '.join(header)} | delta elements | s |", "|---|" + "---:|" * (len(header) + 2)]
    for row in summary_rows(record):
        table = record["results"].get(row["method"]) or {}
        if row["error"]:
            cells = ["failed"] * len(ACCURACY_COLUMNS)
        else:
            cells = [f"{_percent(row[column])} / {_percent(table.get(split, {}).get(form, {}).get('gen_acc'))}"
                     for column, split, form in ACCURACY_COLUMNS]
        cells += [_percent(row[column]) for column, _ in RATE_COLUMNS]
        elements = row["delta elements"]
        cells += ["" if elements is None else f"{elements:,}", f"{row['seconds']:.0f}"]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join([f"Unlearning {FORGET_PERCENT} % of the people; cells: {metric} / gen_acc (%); forgot: "
                      f"forgetting rate of {metric} (%).", "", *lines]) + "\n"


def _count(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def summary_table(record: dict) -> Table:
    """Methods x metrics, narrow enough for an 80-column terminal."""
    metric = record["settings"]["headline_metric"]
    grid = Table(title=f"unlearning {FORGET_PERCENT} % of the people: {metric} (%)", box=box.SIMPLE_HEAD,
                 collapse_padding=True, pad_edge=False,
                 caption="forgot = forgetting rate, 1 - edited/base; delta = weights changed")
    grid.add_column("method", no_wrap=True)
    for column in [column for column, _, _ in ACCURACY_COLUMNS] + [column for column, _ in RATE_COLUMNS]:
        grid.add_column(column.replace(" ", "\n"), justify="right", no_wrap=True)
    grid.add_column("delta", justify="right", no_wrap=True)
    grid.add_column("s", justify="right", no_wrap=True)
    for row in summary_rows(record):
        failed = "[red]failed[/]" if row["error"] else None
        cells = [failed or _percent(row[column]) for column, _, _ in ACCURACY_COLUMNS]
        cells += [_percent(row[column]) for column, _ in RATE_COLUMNS]
        grid.add_row(row["method"].replace(" ", "\n"), *cells, _count(row["delta elements"]), f"{row['seconds']:.0f}")
    return grid


def failures(record: dict) -> list[str]:
    return [f"[red]{method['name']} failed:[/] {escape(method['error'])}" for method in record["methods"]
            if method["error"]]


@user_errors
def demo_command(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the report, plots, trace and deltas.")] = Path("mmedit-demo"),
    fast: Annotated[bool, typer.Option("--fast", help="Tiny run: a few people, a few hundred training steps (smoke test).")] = False,
    seed: Annotated[int | None, typer.Option(help=(
        "Seed for the benchmark, the model, the plugins and the retain sample (default 0)."))] = None,
    seeds: Annotated[str | None, typer.Option(help=(
        "Comma-separated seeds (e.g. 0,1,2): the demo once per seed into OUT/seed-N/, then every cell as mean "
        "± standard deviation over them (OUT/demo-seeds.md). Seeds other than 0 train their model first."))] = None,
    retain_people: Annotated[int, typer.Option(min=1, help="Retain people evaluated (a seeded sample; plugins see all).")] = RETAIN_PEOPLE,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward / generate call in evaluation.")] = 64,
    run_specs: Annotated[list[str] | None, typer.Option("--run", help='Run only this: "PLUGIN key=value ..." '
                                                        "(repeatable; a plugin may appear with several settings).")] = None,
    paper_defaults: Annotated[bool, typer.Option("--paper-defaults", help="Run every plugin with the papers' "
                                                 "defaults instead of its preset for the tiny model.")] = False,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train the tiny MLLM from mmedit's recipe here "
                                          "(one to two minutes of CPU, cached after the first run) instead of using "
                                          "the weights shipped with mmedit.")] = False,
    device: Device = "auto",
    force: Force = False,
) -> None:
    """Run the whole flow on the built-in tiny MLLM, a LLaVA that knows 50 synthetic people: trace it on the
    forget set, unlearn 10 % of the people with every installed plugin, and compare base vs each edit.

    By default the model is the one mmedit ships, trained by its own recipe at
    seed 0 (every file's checksum is verified first): every machine starts from
    the same weights and nothing is trained. --retrain trains it from the recipe
    here instead, as --fast and other seeds do. An existing --out needs --force.

    Example: mmedit demo --out mmedit-demo
    Example: mmedit demo --seeds 0,1,2 --out demo-seeds
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
    quiet_transformers()
    if seeds is not None:
        if seed is not None:
            raise MmeditError("give --seed or --seeds, not both")
        chosen = _seed_list(seeds)
        record = run_seeds(out_dir, chosen, fast=fast, retain_people=retain_people, device=device,
                           batch_size=batch_size, force=force, runs=runs, paper_defaults=paper_defaults,
                           retrain=retrain)
        out.print(seeds_table(record))
        out.print(f"report: {out_dir / SEEDS_REPORT} (table: {SEEDS_MARKDOWN}); each seed's demo: "
                  f"{out_dir}/seed-N/", highlight=False, soft_wrap=True)
        return
    record = run(out_dir, fast=fast, seed=seed or 0, retain_people=retain_people, device=device,
                 batch_size=batch_size, force=force, runs=runs, paper_defaults=paper_defaults, retrain=retrain)
    if not record["plugins_installed"]:
        err.print("[yellow]note:[/] no plugins are installed (none is registered under the mmedit.plugins "
                  "entry points): evaluated the base model only")
    out.print(summary_table(record))
    for line in failures(record):
        out.print(line, soft_wrap=True)
    people = record["data"]["evaluated_people"]
    out.print(f"evaluated {len(people['forget'])} forget, {len(people['test'])} test (other pictures) and "
              f"{len(people['retain'])} of the retain people; wall {record['timings']['total_s']:.0f} s, "
              f"peak memory {record['peak_memory_mb']:.0f} MB", highlight=False)
    model = record["model"]
    out.print(f"model: {model['path']} ({'shipped with mmedit' if model['shipped'] else 'trained from the recipe'})",
              highlight=False, soft_wrap=True)
    out.print(f"report: {out_dir / REPORT} (table: {MARKDOWN}), plot: {out_dir / 'demo.png'}, "
              f"trace: {out_dir / 'trace-forget.png'}", highlight=False, soft_wrap=True)


def _seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MmeditError(f"--seeds takes comma-separated integers, got {text!r}") from None


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
