"""Evaluation reports: base vs edited model(s) as JSON, a rich table and a PNG.

`results` maps a model's name to its table {split: {form: {metric: mean}}} (harness.summarise); "base"
is the unedited model and comes first. Forget-side splits (forget, test) get a forgetting rate
(1 - edited/base), the retain split a retention (edited/base), as metrics.py defines them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from rich.table import Table

from mmedit.errors import MmeditError
from mmedit.eval import metrics
from mmedit.safefile import atomic_file, save_figure

BASE = "base"
HEADLINE = "choice_acc"  # the metric the plot puts on its axes


def is_retain(split: str) -> bool:
    return split.startswith("retain")


def compare(base: dict, edited: dict) -> dict:
    """{split: {form: {metric: {"base", "edited", "forgetting_rate" | "retention"}}}} (None where base is 0)."""
    out: dict = {}
    for split, forms in base.items():
        for form, values in forms.items():
            for metric, before in values.items():
                after = edited.get(split, {}).get(form, {}).get(metric)
                if after is None:
                    continue
                change = (("retention", metrics.retention(before, after)) if is_retain(split)
                          else ("forgetting_rate", metrics.forgetting_rate(before, after)))
                out.setdefault(split, {}).setdefault(form, {})[metric] = {"base": before, "edited": after,
                                                                          change[0]: change[1]}
    return out


def build(results: dict[str, dict], provenance: dict) -> dict:
    """The JSON report: provenance, every model's table, and each edited model against the base."""
    if BASE not in results:
        raise MmeditError("a report needs the base model's results")
    return {
        "format": "mmedit.eval-report", "format_version": 1, **provenance, "results": results,
        "comparison": {name: compare(results[BASE], table) for name, table in results.items() if name != BASE},
    }


def write_json(report: dict, path: str | Path, force: bool = False) -> Path:
    """Write atomically (safefile.atomic_file); an existing `path` needs force."""
    with atomic_file(path, force=force) as temp:
        temp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return Path(path)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


UNITS = ("every value in %: *_acc = questions answered right, answer_prob = mean probability of the right "
         "option, rougeL = mean ROUGE-L F1 x 100")


def table(results: dict[str, dict], title: str = "evaluation") -> Table:
    """Rows: split / form / metric; columns: each model, then for one edited model its forgetting rate or
    retention (with several edited models the JSON holds those). The caption says what the numbers are."""
    names = list(results)
    single = len(names) == 2
    rate = "; rate: forgetting rate (1 - edited/base) on forget and test, retention (edited/base) on retain"
    grid = Table(title=title, caption=UNITS + (rate if single else ""))
    for column in ("split", "form", "metric", *names, *(["rate"] if single else [])):
        grid.add_column(column, justify="left" if column in ("split", "form", "metric") else "right")
    for split, forms in results[BASE].items():
        for form, values in forms.items():
            for metric, before in values.items():
                cells = [_percent(results[name].get(split, {}).get(form, {}).get(metric)) for name in names]
                if single:
                    after = results[names[1]].get(split, {}).get(form, {}).get(metric)
                    change = None if after is None else (
                        metrics.retention(before, after) if is_retain(split) else metrics.forgetting_rate(before, after))
                    cells.append(_percent(change))
                grid.add_row(split, form, metric, *cells)
            grid.add_section()
    return grid


def plot(results: dict[str, dict], path: str | Path, metric: str = HEADLINE, forget: str = "forget",
         retain: str = "retain", force: bool = False) -> Path:
    """One panel per form: each model as a point at (forget accuracy, retain accuracy). Good unlearning
    sits top left: forgotten, yet the retain set kept. Models are told apart by colour and marker in one
    legend below the panels (names with settings are too long to write beside crowded points).
    Written atomically as a PNG; an existing `path` needs force."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forms = [form for form in metrics.FORMS if form in results[BASE].get(forget, {})]
    if not forms:
        raise MmeditError(f"nothing to plot: no {forget!r} results")
    figure, axes = plt.subplots(1, len(forms), figsize=(5.2 * len(forms), 5.2), squeeze=False)
    markers = "osD^vP<>Xph"
    for axis, form in zip(axes[0], forms):
        for index, (name, result) in enumerate(results.items()):
            x = result.get(forget, {}).get(form, {}).get(metric)
            y = result.get(retain, {}).get(form, {}).get(metric)
            if x is None or y is None:
                continue
            style = dict(marker="*", s=160, color="black") if name == BASE else dict(
                marker=markers[(index - 1) % len(markers)], s=55, color=plt.cm.tab10((index - 1) % 10), alpha=0.85)
            axis.scatter([100 * x], [100 * y], label=name, zorder=3 if name == BASE else 4, **style)
        axis.set_xlim(-5, 105)
        axis.set_ylim(-5, 105)
        axis.grid(alpha=0.3)
        axis.set_xlabel(f"{forget}: {metric} (%), lower = more forgotten")
        axis.set_ylabel(f"{retain}: {metric} (%), higher = better kept")
        axis.set_title(form)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.06 + 0.035 * math.ceil(len(labels) / 3), 1, 1))
    return save_figure(figure, path, force=force, dpi=110)
