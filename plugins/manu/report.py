"""What MANU selected: a JSON-able summary (stored in the delta's provenance), a rich table and a PNG
of how many neurons were selected per layer and part."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from rich.table import Table

from mmedit.safefile import save_figure


def summary(scores: Mapping, selection) -> dict:
    """{"selected": {part: {neurons, of, threshold, forms, skipped, layers: [{layer, site, selected, width,
    max_score, skipped}]}}}.

    threshold: the smallest score S among the part's selected neurons; max_score: the layer's largest S;
    forms: the forms whose statistics the part's scores read; skipped: why the part (or, with
    within=layer, the layer) had nothing selected (all its scores equal, or tied above the cut), else None;
    ties: how many neurons tied across the cut were left out, else None."""
    parts: dict[str, dict] = {}
    for name, entry in scores.items():
        picked = selection.chosen.get(name, torch.empty(0, dtype=torch.int64))
        part = parts.setdefault(entry.part, {"neurons": 0, "of": 0, "threshold": None, "forms": list(entry.forms),
                                             "skipped": selection.skipped.get(entry.part),
                                             "ties": selection.ties.get(entry.part), "layers": []})
        part["neurons"] += picked.numel()
        part["of"] += entry.score.numel()
        if picked.numel():
            low = float(entry.score[picked].min())
            part["threshold"] = low if part["threshold"] is None else min(part["threshold"], low)
        part["layers"].append({"layer": entry.layer, "site": name, "selected": picked.numel(),
                               "width": entry.score.numel(), "max_score": float(entry.score.max()),
                               "skipped": selection.skipped.get(name), "ties": selection.ties.get(name)})
    return {"selected": parts}


def table(summary: Mapping) -> Table:
    table = Table(title="MANU: neurons selected per layer (S: the preset's forget-vs-retain score)")
    for column in ("part", "site", "selected", "of", "%", "max S"):
        table.add_column(column, justify="left" if column in ("part", "site") else "right")
    skipped, tied = [], []
    for part, info in summary["selected"].items():
        for index, layer in enumerate(info["layers"]):
            table.add_row(part if index == 0 else "", layer["site"],
                          "skipped" if layer["skipped"] else str(layer["selected"]), str(layer["width"]),
                          f"{100 * layer['selected'] / layer['width']:.1f}", f"{layer['max_score']:.3g}")
            if layer["skipped"]:
                skipped.append(f"{layer['site']} ({layer['skipped']})")
            if layer.get("ties"):
                tied.append(f"{layer['site']}: {layer['ties']}")
        threshold = "-" if info["threshold"] is None else f"S >= {info['threshold']:.3g}"
        table.add_row("", f"[bold]{part} total[/]", f"[bold]{info['neurons']}[/]", str(info["of"]),
                      f"{100 * info['neurons'] / info['of']:.1f}", "skipped" if info["skipped"] else threshold,
                      end_section=True)
        if info["skipped"]:
            skipped.append(f"{part} ({info['skipped']})")
        if info.get("ties"):
            tied.append(f"{part}: {info['ties']}")
    notes = (["skipped, nothing selected: " + "; ".join(skipped)] if skipped else []) + \
        (["not cut by index: " + "; ".join(tied)] if tied else [])
    table.caption = "\n".join(notes) or None
    return table


def plot(summary: Mapping, path: str | Path) -> Path:
    """One bar panel per part: selected neurons per layer; a skipped part says so in its title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = summary["selected"]
    figure, axes = plt.subplots(1, len(parts), figsize=(3 + 3.2 * len(parts), 3.4), squeeze=False)
    try:
        _draw(axes, parts)
    except BaseException:
        plt.close(figure)
        raise
    figure.suptitle("MANU selection per layer")
    figure.tight_layout()
    return save_figure(figure, path)


def _draw(axes, parts: Mapping) -> None:
    for axis, (part, info) in zip(axes[0], parts.items()):
        layers = [layer["layer"] for layer in info["layers"]]
        counts = [layer["selected"] for layer in info["layers"]]
        axis.bar(layers, counts, color={"vision": "tab:blue", "projector": "tab:orange"}.get(part, "tab:green"))
        axis.set_xlabel("layer")
        axis.set_ylabel("selected neurons")
        share = f"{info['neurons']} of {info['of']} ({100 * info['neurons'] / info['of']:.1f} %)"
        axis.set_title(f"{part}: {'skipped' if info['skipped'] else share}")
        axis.set_xticks(layers if len(layers) <= 16 else layers[:: max(1, len(layers) // 8)])
