"""Looking at TraceStats (presentation, for `mmedit trace` and `mmedit demo`): neuron importance, top-K
tables and a layers x neurons heatmap per part."""
from __future__ import annotations

from pathlib import Path

import torch
from rich.table import Table

from mmedit.safefile import save_figure
from mmedit.trace import TraceStats


def site_group(site: dict, group: str) -> str:
    """Vision and projector sites only have the 'all' group."""
    return group if site["part"] == "llm" else "all"


def top_table(stats: TraceStats, form: str, group: str, k: int) -> Table:
    table = Table(title=f"top {k} neurons per site ({form} inputs, {group} positions)")
    for column in ("site", "neuron", "score", "mean", "|z|", "var", "act%"):
        table.add_column(column, justify="left" if column == "site" else "right")
    if any(stats.has_gradients(s["name"]) for s in stats.sites):
        table.add_column("|g|", justify="right")
    for site in stats.sites:
        name, used_group = site["name"], site_group(site, group)
        if f"{name}/{form}/{used_group}/n" not in stats.tensors or stats.count(name, form, used_group) == 0:
            continue
        score = stats.importance(name, form, used_group)
        mean = stats.mean(name, form, used_group)
        mean_abs = stats.mean_abs(name, form, used_group)
        var = stats.var(name, form, used_group)
        active = stats.active(name, form, used_group) / stats.count(name, form, used_group) * 100
        grad = stats.grad_mean_abs(name, form, used_group) if stats.has_gradients(name) else None
        for rank, neuron in enumerate(score.topk(min(k, score.numel())).indices.tolist()):
            cells = [
                name if rank == 0 else "",
                str(neuron),
                f"{score[neuron]:.2g}",
                f"{mean[neuron]:.2g}",
                f"{mean_abs[neuron]:.2g}",
                f"{var[neuron]:.2g}",
                f"{active[neuron]:.0f}",
            ]
            if table.columns[-1].header == "|g|":
                cells.append("-" if grad is None else f"{grad[neuron]:.2g}")
            table.add_row(*cells)
    return table


def heatmap(stats: TraceStats, form: str, group: str, path: str | Path, force: bool = False) -> Path:
    """One panel per part: layers (rows) x neurons (columns), importance scaled to each layer's max.
    Written atomically as a PNG; an existing `path` needs force."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts: dict[str, list[dict]] = {}
    for site in stats.sites:
        if f"{site['name']}/{form}/{site_group(site, group)}/n" in stats.tensors:
            parts.setdefault(site["part"], []).append(site)
    figure, axes = plt.subplots(len(parts), 1, figsize=(10, 1.2 + 1.1 * sum(len(s) for s in parts.values())),
                                squeeze=False)
    for axis, (part, sites) in zip(axes[:, 0], parts.items()):
        width = max(site["width"] for site in sites)
        grid = torch.full((len(sites), width), float("nan"))
        for row, site in enumerate(sites):
            score = stats.importance(site["name"], form, site_group(site, group)).float()
            grid[row, : score.numel()] = score / score.max().clamp_min(1e-12)
        image = axis.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=1)
        axis.set_yticks(range(len(sites)), [site["name"] for site in sites])
        axis.set_xlabel("neuron")
        axis.set_title(f"{part}: neuron importance ({form}, {site_group(sites[0], group)} positions; 1 = layer max)")
        figure.colorbar(image, ax=axis, fraction=0.02)
    figure.tight_layout()
    return save_figure(figure, path, force=force)
