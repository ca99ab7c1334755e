"""The neuron atlas: per part and layer, the traced importance of each neuron and what each delta touches.

A delta's tensors are placed in parts and layers by the delta itself (its `where`). Inside a traced site,
a touched element belongs to neuron n when it lies in slice n of one of the site's producer parameters
(the family entry of mmedit.arch names them, relative to the layer) or, for a site that is a module's
input, in column n of that module's weight (the consumer). Counts are touched elements, as the delta's
own counts() counts them, so the atlas's per-layer totals equal the delta's."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmedit.arch import PARTS, family
from mmedit.delta import Delta
from mmedit.errors import MmeditError
from mmedit.trace import TraceStats

NO_LAYER = "-"  # tensors of a part that sit in no layer (embeddings, norms, heads)
OTHER = "other"  # tensors the model map put in no part (Delta.counts' name)


def importance(stats: TraceStats, site: str, form: str) -> torch.Tensor | None:
    """|mean(g*z)| (first-order effect on the loss) where gradients were traced, else mean |z|; over all
    positions. None where the site has no statistics for `form`."""
    if f"{site}/{form}/all/n" not in stats.tensors:
        return None
    return stats.importance(site, form, "all").float()


def uses_gradients(stats: TraceStats, site: str, form: str) -> bool:
    return f"{site}/{form}/all/grad_sum_z" in stats.tensors


def neuron_slices(stats: TraceStats) -> dict[str, dict[str, int]]:
    """Traced site name -> {parameter name: the axis along which its slice n belongs to neuron n}."""
    try:
        entry = family(stats.meta.get("family"))
    except MmeditError:
        return {}  # a family this mmedit does not know: layers are still counted, neurons are not
    found = {}
    for site in stats.sites:
        neuron = entry["parts"][site["part"]]["neuron"]
        module, inner = site["module"], neuron["module"]
        if inner and not module.endswith("." + inner):
            continue
        layer = module[: -len(inner) - 1] if inner else module
        slices = {".".join(p for p in (layer, path) if p): axis for path, axis in neuron["producers"]}
        if neuron["io"] == "input" and inner:
            slices.setdefault(module + ".weight", 1)  # the consumer: column n reads neuron n
        found[site["name"]] = slices
    return found


def touched_mask(change) -> torch.Tensor:
    """Bool tensor of the change's shape: True where the delta writes (its touched elements)."""
    if change.kind == "dense":
        return torch.ones(change.shape, dtype=torch.bool)
    mask = torch.zeros(change.shape, dtype=torch.bool)
    if change.kind == "elements":
        mask.view(-1)[change.index] = True
    else:
        mask.index_fill_(change.axis, change.index, True)
    return mask


def per_neuron(change, axis: int, width: int) -> torch.Tensor | None:
    """Touched elements of `change` per neuron (slice along `axis`); None when the shape does not fit."""
    if axis >= len(change.shape) or change.shape[axis] != width:
        return None
    if change.kind in ("rows", "zeroed_rows") and change.axis == axis:  # the common case, without a mask
        counts = torch.zeros(width, dtype=torch.int64)
        counts[change.index] = change.touched // max(1, change.index.numel())
        return counts
    mask = touched_mask(change)
    others = [d for d in range(mask.dim()) if d != axis]
    return mask.sum(dim=others).to(torch.int64) if others else mask.to(torch.int64)


@dataclass
class Layer:
    """One row of the atlas: a (part, layer) the trace saw or a delta touched."""

    part: str
    layer: str  # "0", "1", ... or NO_LAYER
    site: dict | None = None  # the traced site, if any
    importance: torch.Tensor | None = None
    gradients: bool = False  # importance is |mean(g*z)| (else mean |z|: no gradients traced or reached it)
    elements: dict[int, int] = field(default_factory=dict)  # delta index -> touched elements in this layer
    tensors: dict[int, int] = field(default_factory=dict)  # delta index -> touched tensors
    neurons: dict[int, torch.Tensor] = field(default_factory=dict)  # delta index -> touched elements per neuron


def layer_sort_key(layer: str) -> tuple[int, int]:
    return (0, int(layer)) if layer.isdigit() else (1, 0)


def build(stats: TraceStats | None, deltas: list[Delta], form: str = "multimodal") -> tuple[list[Layer], list[str]]:
    """(atlas rows in part then layer order, notes on what could not be placed)."""
    rows: dict[tuple[str, str], Layer] = {}
    notes: list[str] = []
    slices = neuron_slices(stats) if stats is not None else {}
    for site in stats.sites if stats is not None else []:
        rows[(site["part"], str(site["layer"]))] = Layer(site["part"], str(site["layer"]), site,
                                                         importance(stats, site["name"], form),
                                                         uses_gradients(stats, site["name"], form))
    for index, delta in enumerate(deltas):
        unplaced = 0
        for name, change in delta.changes.items():
            if name not in delta.where:  # as Delta.counts: unplaced tensors are in no part
                unplaced += 1
                continue
            part, layer = delta.where[name] or (OTHER, None)
            layer = NO_LAYER if layer is None else str(layer)
            row = rows.setdefault((part, layer), Layer(part, layer))
            row.elements[index] = row.elements.get(index, 0) + change.touched
            row.tensors[index] = row.tensors.get(index, 0) + 1
            if row.site is None or row.site["name"] not in slices:
                continue
            zeros = torch.zeros(row.site["width"], dtype=torch.int64)
            row.neurons.setdefault(index, zeros)  # a traced layer: 0 neurons touched is a count too
            if name not in slices[row.site["name"]]:
                continue
            counts = per_neuron(change, slices[row.site["name"]][name], row.site["width"])
            if counts is None:
                notes.append(f"{delta.source}: {name} {list(change.shape)} does not fit the traced width "
                             f"{row.site['width']} of {row.site['name']}; its neurons are not shown")
                continue
            row.neurons[index] = row.neurons[index] + counts
        if unplaced:
            notes.append(f"{delta.source}: {unplaced} tensor(s) the delta does not place (not in the atlas)")
    order = {part: i for i, part in enumerate(PARTS)}
    ordered = sorted(rows.values(), key=lambda r: (order.get(r.part, len(order)), r.part, layer_sort_key(r.layer)))
    return ordered, notes


def rank_percentile(scores: torch.Tensor, neurons: torch.Tensor) -> float | None:
    """Median importance percentile of the given neurons among all neurons of the site (100 = the most
    important neuron); None when there are none."""
    if neurons.numel() == 0:
        return None
    ranks = scores.argsort().argsort().float()  # 0 = least important
    percent = 100 * ranks[neurons] / max(1, scores.numel() - 1)
    return float(percent.median())
