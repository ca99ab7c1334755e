"""Looking at MIP-Editor paths: a `mmedit trace`-style table and a PNG (neurons per layer, scores)."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from mmedit import safefile
from mmedit.plugins.mip_editor.paths import NeuronPaths


def path_table(paths: NeuronPaths, top: int = 5) -> Table:
    """One row per site: method, samples that chose neurons there (of the part's), neuron count, score sum,
    and the `top` best neurons with their scores; dead sites (no sample chose anything) last."""
    options = paths.meta.get("options", {})
    title = (f"MIP-Editor paths (m={options.get('steps', '?')}, top-k={options.get('top_k', '?')}, "
             f"{options.get('positions', '?')} positions)")
    table = Table(title=title)
    for column in ("site", "method", "samples", "neurons", "score sum", f"top {top} neuron:score"):
        table.add_column(column, justify="left" if column in ("site", "method", f"top {top} neuron:score") else "right")
    methods = paths.meta.get("methods", {})
    samples = paths.meta.get("samples", {})
    skipped = paths.meta.get("skipped_samples", {})
    for name in paths.neurons:
        part = name.split(".")[0]
        neurons, scores = paths.neurons[name], paths.scores[name]
        best = ", ".join(f"{int(n)}:{float(s):.3g}" for n, s in zip(neurons[:top], scores[:top]))
        choosing = f"{samples[part] - skipped.get(name, 0)}/{samples[part]}" if part in samples else ""
        table.add_row(name, methods.get(part, ""), choosing, str(neurons.numel()), f"{float(scores.sum()):.3g}", best)
    for name in paths.meta.get("dead_sites", []):
        part = name.split(".")[0]
        table.add_row(name, methods.get(part, ""), f"0/{samples.get(part, '?')}", "0", "-",
                      "dead site: all attributions equal (no answer gradient at the read positions)")
    return table


def plot_paths(paths: NeuronPaths, path: str | Path, force: bool = False) -> Path:
    """One panel per part: neuron index (x) by layer (y), dot size and colour by the neuron's score relative
    to its layer's best; the best neuron of each layer joined by a line (the strongest path). Written
    atomically; an existing file needs force."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = {site["name"]: site["width"] for site in paths.meta.get("sites", [])}
    parts = [part for part in ("vision", "llm") if paths.sites(part)]
    figure, axes = plt.subplots(len(parts), 1, figsize=(10, 1.6 + 0.45 * len(paths.neurons)), squeeze=False)
    for axis, part in zip(axes[:, 0], parts):
        names = paths.sites(part)
        best_x, best_y = [], []
        for row, name in enumerate(names):
            neurons, scores = paths.neurons[name].float(), paths.scores[name].float()
            relative = (scores / scores.abs().max().clamp_min(1e-12)).clamp(min=0)
            axis.scatter(neurons.numpy(), [row] * neurons.numel(), s=(8 + 60 * relative).numpy(),
                         c=relative.numpy(), cmap="magma_r", vmin=0, vmax=1, edgecolors="none")
            best_x.append(float(neurons[0]))
            best_y.append(row)
        axis.plot(best_x, best_y, color="tab:blue", linewidth=1, alpha=0.6)
        axis.set_yticks(range(len(names)), [f"{name} ({paths.neurons[name].numel()})" for name in names])
        axis.set_xlim(-1, max(widths.get(name, int(paths.neurons[name].max()) + 1) for name in names))
        axis.set_xlabel("neuron")
        method = paths.meta.get("methods", {}).get(part, "")
        axis.set_title(f"{part}: path neurons ({method.upper()}; size/colour = score / layer best; "
                       "line = best neuron per layer)")
    figure.tight_layout()
    return safefile.save_figure(figure, path, force=force)
