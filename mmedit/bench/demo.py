"""`mmedit demo`: the whole flow on the embedded model, end to end, in a few minutes on a CPU.

1. build (or reuse) the synthetic benchmark and the embedded model (mmedit.bench.model.embedded);
2. trace the model on the forget set, both forms, with gradients: statistics + heatmap;
3. run every registered plugin (forget = forget 10 %, retain = retain 90 %) with the settings of
   EMBEDDED_SETTINGS (or the papers' defaults, or the runs asked for), each giving a delta; a plugin
   that fails is reported with its one-line error and the demo goes on;
4. evaluate the base model and base + each delta on forget, test and a seeded subset of retain people
   (all forget and test people; the subset keeps the demo inside its time budget and is recorded);
5. write demo.json, demo.png (forget vs retain accuracy per form), the trace files and the deltas into
   the output folder, and return the methods x metrics summary for the table.
"""
from __future__ import annotations

import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmedit.errors import MmeditError
from mmedit.safefile import make_ordinary

FORGET_PERCENT = 10
RETAIN_PEOPLE = 10  # retain people evaluated (a seeded sample of the 45); all forget / test people are
REPORT = "demo.json"
MARKDOWN = "demo.md"  # the summary as a markdown table, for notes and BENCHMARKS.md
FORMAT = "mmedit.demo-report"
# Summary columns: the headline metric (option-likelihood accuracy) per (split, form), and the
# forgetting rate of the forget set per form. VQA = Image_Textual, QA = Pure_Text.
ACCURACY_COLUMNS = (("forget VQA", "forget", "Image_Textual"), ("forget QA", "forget", "Pure_Text"),
                    ("test VQA", "test", "Image_Textual"), ("retain VQA", "retain", "Image_Textual"),
                    ("retain QA", "retain", "Pure_Text"))
RATE_COLUMNS = (("forgot VQA", "Image_Textual"), ("forgot QA", "Pure_Text"))
# The embedded model was trained at lr 1e-3 for 1,200 steps, so the papers' lr 1e-5 over one epoch of
# the forget set (~38 steps) moves none of its answers (measured: every score stays at base). These
# settings give each method a visible effect on it (BENCHMARKS.md, "Methods on the embedded benchmark");
# plugins not listed run with their defaults. `paper_defaults=True` runs every plugin as published.
EMBEDDED_SETTINGS: dict[str, dict[str, object]] = {
    "ga": {"lr": 1e-4},
    "graddiff": {"lr": 1e-4},
    "kl_min": {"lr": 1e-4},
    "npo": {"lr": 1e-4},
    "rmu": {"lr": 1e-3, "alpha": 1.0, "c": 100.0},
    "mmunlearner": {"lr": 1e-3, "tau": 2.0},
}


@dataclass
class Method:
    """One row of the demo table: the base model, or a plugin's edit."""
    name: str
    table: dict | None = None  # harness.summarise output; None when the plugin failed
    error: str | None = None
    delta: dict = field(default_factory=dict)  # file, elements, bytes, provenance
    seconds: float = 0.0


def plugins() -> tuple[dict, object] | None:
    """(available(), apply_plugin) from mmedit.plugins, or None when no plugin API is installed yet."""
    try:
        from mmedit.plugins import apply_plugin, available
    except ImportError:
        return None
    return available(), apply_plugin


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _restore_if_changed(model, reference: dict[str, torch.Tensor]) -> bool:
    """Put `reference` back if the model's weights differ from it; True when they did."""
    changed = [name for name, tensor in model.state_dict().items() if not torch.equal(tensor, reference[name])]
    if changed:
        model.load_state_dict(reference)
    return bool(changed)


def label(name: str, overrides: dict) -> str:
    """"ga lr=0.0001": a method row's name, with the settings that differ from the plugin's defaults."""
    return " ".join([name, *(f"{key}={value}" for key, value in overrides.items())])


def default_runs(names, paper_defaults: bool) -> list[tuple[str, dict]]:
    return [(name, {} if paper_defaults else dict(EMBEDDED_SETTINGS.get(name, {}))) for name in sorted(names)]


def run(out_dir: str | Path = "mmedit-demo", *, fast: bool = False, seed: int = 0, retain_people: int = RETAIN_PEOPLE,
        device: str = "cpu", batch_size: int = 64, force: bool = False, progress: bool = True,
        runs: list[tuple[str, dict]] | None = None, paper_defaults: bool = False) -> dict:
    """Run the demo; returns the report (also written to out_dir/demo.json). See the module doc.

    runs: (plugin, options) pairs to run instead of every installed plugin (a plugin may appear several
    times with different options, e.g. to compare settings)."""
    from mmedit.bench import model as embedded_model

    out_dir = Path(out_dir)
    _check_out(out_dir, force)
    # the embedded model's ops are tiny: one thread is as fast, and far faster on a busy machine
    with embedded_model.threads(embedded_model.RECIPE["threads"]):
        return _run(out_dir, fast, seed, retain_people, device, batch_size, progress, runs, paper_defaults)


def _run(out_dir: Path, fast: bool, seed: int, retain_people: int, device: str, batch_size: int,
         progress: bool, runs: list[tuple[str, dict]] | None, paper_defaults: bool) -> dict:
    from mmedit.bench import model as embedded_model
    from mmedit.bench import profiles
    from mmedit.data.batches import make_batches
    from mmedit.eval import report
    from mmedit.eval.harness import evaluate, select_people, summarise
    from mmedit.loading import load
    from mmedit.provenance import library_versions
    from mmedit.trace import trace
    from mmedit.trace.report import heatmap

    started = time.perf_counter()
    timings = {}
    paths = embedded_model.embedded(seed=seed, fast=fast, progress=progress)
    timings["model_s"] = time.perf_counter() - started
    model, processor = load(paths.model, device=device)
    info = profiles.load(paths.data)
    forget_name, retain_name, test_name = profiles.split_names(FORGET_PERCENT)
    forget_rows, retain_rows = info.rows(forget_name), info.rows(retain_name)
    sets = {"forget": forget_rows, "test": info.rows(test_name),
            "retain": select_people(retain_rows, retain_people, seed)}

    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.resolve().parent))
    try:
        mark = time.perf_counter()
        batches = [batch for form in ("multimodal", "text")
                   for batch in make_batches(forget_rows, processor, form=form, batch_size=batch_size)]
        stats = trace(model, batches, grads=True, progress=progress, total=len(batches),
                      meta={"data": {"split": forget_name, "rows": len(forget_rows)}})
        stats.save(work / "trace-forget.safetensors")
        heatmap(stats, "multimodal", "all", work / "trace-forget.png")
        timings["trace_s"] = time.perf_counter() - mark

        # the embedded model answers in a word or two and was never taught the lettered prompt
        options = dict(batch_size=batch_size, max_new_tokens=8, letters=False, progress=progress)
        mark = time.perf_counter()
        methods = [Method(report.BASE, summarise(evaluate(model, processor, sets, description="base model", **options)),
                          seconds=time.perf_counter() - mark)]
        installed = plugins()
        if installed is not None and runs is None:
            runs = default_runs(installed[0], paper_defaults)
        memo: dict = {}  # statistics (traces, Fisher, paths) one run computed, for later runs that need the same
        for index, (name, overrides) in enumerate(runs if installed else []):
            methods.append(_run_plugin(name, overrides, index, installed[1], model, processor, forget_rows,
                                       retain_rows, sets, seed, work, options, progress, memo))
        timings["total_s"] = time.perf_counter() - started
        results = {method.name: method.table for method in methods if method.table is not None}
        record = report.build(results, {
            "format": FORMAT,
            "plugins_installed": installed is not None,
            "methods": [{"name": m.name, "error": m.error, "delta": m.delta, "seconds": round(m.seconds, 2)}
                        for m in methods],
            "model": {"path": str(paths.model), "training": embedded_model.training_record(paths.model)},
            "data": {"root": str(paths.data), "forget": forget_name, "retain": retain_name, "test": test_name,
                     "evaluated_people": {split: sorted({row.entity for row in rows}) for split, rows in sets.items()},
                     "note": f"evaluated: all forget and test people, and a seeded sample (seed {seed}) of "
                             f"{len({row.entity for row in sets['retain']})} of the "
                             f"{len({row.entity for row in retain_rows})} retain people; plugins see every retain row"},
            "settings": {"fast": fast, "seed": seed, "device": device, "batch_size": batch_size,
                         "headline_metric": report.HEADLINE, "paper_defaults": paper_defaults,
                         "runs": [{"plugin": name, "options": overrides} for name, overrides in runs or []]},
            "timings": {key: round(value, 2) for key, value in timings.items()},
            "peak_memory_mb": round(_peak_rss_mb(), 1),
            "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
            "versions": library_versions(),
        })
        report.write_json(record, work / REPORT)
        (work / MARKDOWN).write_text(markdown(record), encoding="utf-8")
        report.plot(results, work / "demo.png")
        make_ordinary(work)  # the result is an ordinary folder
        _swap_in(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return record


def _run_plugin(name, overrides, index, apply_plugin, model, processor, forget_rows, retain_rows, sets, seed, work,
                options, progress, memo) -> "Method":
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
        path = delta.save(work / f"delta-{index:02d}-{name}.safetensors")
        method.delta = {"file": path.name, "elements": delta.touched, "bytes": path.stat().st_size,
                        "provenance": delta.provenance}
        method.table = summarise(evaluate_edited(model, processor, sets, [delta], description=method.name,
                                                 **options))
    except Exception as error:  # noqa: BLE001 - a broken plugin must not take the demo down
        _restore_if_changed(model, reference)
        method.error = one_line(error)
        method.table = None
    method.seconds = time.perf_counter() - mark
    return method


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def _check_out(out_dir: Path, force: bool) -> None:
    """The demo replaces its own earlier output; anything else needs force."""
    if not out_dir.exists() or force:
        return
    if not out_dir.is_dir():
        raise MmeditError(f"{out_dir} exists and is not a folder; pass --force to replace it")
    if any(out_dir.iterdir()) and not _is_demo(out_dir / REPORT):
        raise MmeditError(f"{out_dir} exists and holds something other than a demo report; pass --force to replace it")


def _is_demo(path: Path) -> bool:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _swap_in(new: Path, target: Path) -> None:
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.resolve().parent))
        target.rename(old / "replaced")
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


def summary_rows(record: dict) -> list[dict]:
    """Methods x metrics for the printed table: headline accuracies, forgetting rates, delta size."""
    results, comparison = record["results"], record["comparison"]
    metric = record["settings"]["headline_metric"]
    rows = []
    for method in record["methods"]:
        row = {"method": method["name"], "error": method["error"], "seconds": method["seconds"]}
        table = results.get(method["name"])
        for label, split, form in ACCURACY_COLUMNS:
            row[label] = None if table is None else table.get(split, {}).get(form, {}).get(metric)
        compared = comparison.get(method["name"], {})
        for label, form in RATE_COLUMNS:
            row[label] = compared.get("forget", {}).get(form, {}).get(metric, {}).get("forgetting_rate")
        row["delta elements"] = method["delta"].get("elements")
        row["delta bytes"] = method["delta"].get("bytes")
        rows.append(row)
    return rows


def markdown(record: dict) -> str:
    """The summary as a markdown table: cells "headline / generation accuracy" in %, then the forgetting
    rates (headline metric), the delta's changed elements and the seconds of edit + evaluation."""
    metric = record["settings"]["headline_metric"]
    header = [label for label, _, _ in ACCURACY_COLUMNS] + [label for label, _ in RATE_COLUMNS]
    lines = [f"| method | {' | '.join(header)} | delta elements | s |", "|---|" + "---:|" * (len(header) + 2)]

    def percent(value) -> str:
        return "-" if value is None else f"{100 * value:.0f}"

    for row in summary_rows(record):
        table = record["results"].get(row["method"]) or {}
        if row["error"]:
            cells = ["failed"] * len(ACCURACY_COLUMNS)
        else:
            cells = [f"{percent(row[label])} / {percent(table.get(split, {}).get(form, {}).get('gen_acc'))}"
                     for label, split, form in ACCURACY_COLUMNS]
        cells += [percent(row[label]) for label, _ in RATE_COLUMNS]
        elements = row["delta elements"]
        cells += ["" if elements is None else f"{elements:,}", f"{row['seconds']:.0f}"]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join([f"Unlearning {FORGET_PERCENT} % of the people; cells: {metric} / gen_acc (%); forgot: "
                      f"forgetting rate of {metric} (%).", "", *lines]) + "\n"
