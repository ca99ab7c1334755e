"""Influential neuron paths (MIP-Editor steps 1-3), searched in batched traced passes.

For each forget sample a path grows layer by layer from the input side of a part. At layer n the sample
is run at m interpolation points alpha_k = k/m (k = 0..m-1): at the chosen positions every neuron of layer n,
and the sample's path neurons of layers < n, are replaced by alpha_k times their original value a (read in
one clean pass); the gradient g_k of the answer log-likelihood F (summed over answer tokens) is read at
all of them with one torch.autograd.grad. Per neuron, summed over the chosen positions p:

    IGI (text side: LLM neurons, text-only inputs)          own_c = sum_p a_cp * (1/m) sum_k g_kcp
    IFI (vision side: vision-encoder neurons, image inputs)  own_c = sum_p a_cp * (1/m) sum_k z_kcp^2,
        z = g standardised over the layer's neurons at each (step, position): a Fisher proxy.

score_c = own_c + sum of own_j over the sample's path neurons j of layers < n (the joint attribution of
path + candidate; the path term is the same for every candidate of the sample, so it shifts the scores
but never the ranking). The sample's top-k neurons by score join its path: the largest signed scores,
i.e. the neurons that most raise the answer's likelihood (lower its NLL). Only neurons with an
attribution compete: a neuron whose own attribution is exactly 0 is never chosen, and a sample whose
attributions at a layer are all equal (no gradient of the answer reaches the read positions, as at
position 0 of the last LLM layer) chooses nothing there; a layer where no sample chooses anything is a
dead site (reported in meta["dead_sites"]), and a search where every layer is dead is an error.
Per layer the paths of all samples are united, a neuron's score being the sum of its scores over the
samples that chose it. IGI is integrated gradients on the straight line from "those neurons at 0" to
"at a", so own summed over a layer approaches F(x) - F(baseline) as m grows (completeness; tested).

Batching: the m steps and the samples are stacked along the batch (rows sample-major, alpha per row), so
one layer costs one traced forward + backward over samples x m rows (split by `batch_rows`), with
`envoy.input = live + mask * (alpha*a - live)` as the nnsight intervention (mip_editor.interventions).
One pass per layer *is* needed for the exact method: layer n's pass scales the path neurons chosen at
layers < n, which are only known after layer n-1's gradients are in; merging layers into one pass would
turn the path search into independent per-layer IG. Neither the forward below layer n (the path neurons
there are scaled) nor the backward down to layer 0 (the path term needs their gradients) can be shared
between layers either. Every pass of a part is right-padded to its longest forget row, so that passes
share their shapes (CPU kernel libraries cache per shape: in bfloat16 a search over rows of many lengths
kept ~100 MB more). docs/mip-editor.md lists where the reference code differs, and why.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmedit.data.batches import IGNORE, make_batches
from mmedit.errors import MmeditError
from mmedit.loading import input_device
from mmedit.modelstate import preserved
from mmedit.plugins import losses
from mmedit.plugins.mip_editor.interventions import (POSITIONS, model_inputs, position_mask, prefix_cache,
                                                     repeat_cache, scaled_logits, suffix, unit_rows)
from mmedit.plugins.mip_editor.paths import NeuronPaths
from mmedit.trace import nnsight_view, read_sites

METHODS = {"llm": ("igi", "text"), "vision": ("ifi", "multimodal")}  # part -> (method, input form)


def answer_loglik(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[rows]: the log-likelihood of each row's answer tokens (summed), in float32."""
    return -losses.token_nll(logits, labels)[0].sum(dim=1)


def top_neurons(scores: torch.Tensor, own: torch.Tensor, k: int) -> torch.Tensor:
    """[n, N] bool: each sample's (row's) top-k neurons by signed score, among those with an attribution:
    own != 0, in a row whose own attributions are not all equal. A row of ties only chooses nothing
    (a stable sort would otherwise pick neurons 0..k-1, by index)."""
    usable = (own != 0) & (own.amax(dim=1, keepdim=True) != own.amin(dim=1, keepdim=True))
    ranked = scores.masked_fill(~usable, -torch.inf)
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(usable).scatter_(1, order, True) & usable


@dataclass
class _Site:
    """A site's clean activations for one chunk of samples."""

    site: object  # mmedit.arch.Site
    values: torch.Tensor  # [U, *positions, N], detached
    rows: torch.Tensor  # [U] sample of each unit
    mask: torch.Tensor  # [U, *positions] bool
    units: list[torch.Tensor]  # per sample: indices of its units

    def expand(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a batch whose rows are `samples` (sample index per row): unit indices into the clean
        tensors, and the row of each unit."""
        parts = [self.units[int(s)] for s in samples]
        index = torch.cat(parts)
        rows = torch.arange(len(parts), device=index.device).repeat_interleave(
            torch.tensor([p.numel() for p in parts], device=index.device))
        return index, rows


def _encode(rows, processor, form: str, device, length: int | None = None) -> dict:
    """The rows' inputs, right-padded to `length` positions when given (padding, attention 0, labels IGNORE:
    so that every pass of a search has the same shape, and the CPU's per-shape kernel caches stay small)."""
    inputs = next(make_batches(rows, processor, form, batch_size=len(rows), with_answer=True, device=device)).inputs
    width = inputs["input_ids"].shape[1]
    if length is None or length == width:
        return inputs
    return {key: torch.nn.functional.pad(value, (0, 0) * (value.dim() - 2) + (0, length - width),
                                         value=IGNORE if key == "labels" else 0)
            if value.dim() >= 2 and value.shape[1] == width and not key.startswith(("pixel", "image")) else value
            for key, value in inputs.items()}


def _clean(wrapped, sites, part: str, positions: str, inputs: dict, samples: int) -> tuple[list[_Site], torch.Tensor]:
    with torch.no_grad():
        values, output = read_sites(wrapped, sites, model_inputs(inputs))
    clean = []
    for site, value in zip(sites, values):
        value = value.detach()
        rows = unit_rows(value.shape[0], inputs, samples)
        mask = position_mask(part, positions, value.shape[:-1], inputs, rows)
        units = [torch.nonzero(rows == s).flatten() for s in range(samples)]
        clean.append(_Site(site, value, rows, mask, units))
    if part == "llm" and not bool(clean[0].mask.any(dim=1).all()):
        raise MmeditError(f"a forget row has no {positions!r} position to attribute (no answer tokens?)")
    return clean, output.logits.detach()


def _contribution(method: str, grad: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[U, N]: sum over positions of a * g (IGI) or a * z^2 (IFI), at the masked positions."""
    grad = grad.float()
    if method == "ifi":
        grad = ((grad - grad.mean(dim=-1, keepdim=True)) / (grad.std(dim=-1, keepdim=True) + 1e-12)) ** 2
    term = value.float() * grad * mask.unsqueeze(-1)
    return term.reshape(term.shape[0], -1, term.shape[-1]).sum(dim=1)


def _search_chunk(wrapped, processor, rows, part: str, sites, *, steps: int, top_k: int, positions: str,
                  steps_per_pass: int, device, share_prefix: bool = False, tick=None, length: int | None = None):
    """Paths of one chunk of samples: {site name: (chosen [n, N] bool, scores [n, N])} for the sites
    where some sample chose neurons, the own attributions {site name: [n, N]} of every site, and how many
    leading positions were shared through a key/value cache (0: none). `length`: pad every pass to it."""
    method, form = METHODS[part]
    n = len(rows)
    clean_inputs = _encode(rows, processor, form, device, length)
    clean, clean_logits = _clean(wrapped, sites, part, positions, clean_inputs, n)
    start, cache = 0, None
    if share_prefix and part == "llm":
        # Positions before the first scaled one are the same in every pass of this chunk.
        start = int(torch.where(clean[0].mask.any(dim=0))[0][0])
        cache = prefix_cache(wrapped, clean_inputs, start, clean_logits) if start > 0 else None
        if cache is None:
            start = 0
        else:
            clean = [_Site(item.site, item.values[:, start:], item.rows, item.mask[:, start:], item.units)
                     for item in clean]
    groups = [list(range(first, min(first + steps_per_pass, steps))) for first in range(0, steps, steps_per_pass)]
    batches = []  # per group: inputs, sample of each row, alpha of each row
    for group in groups:
        inputs = _encode([row for row in rows for _ in group], processor, form, device, length)
        if inputs["input_ids"].shape != (n * len(group), clean_inputs["input_ids"].shape[1]):
            raise MmeditError("the repeated forget rows do not encode like the originals (processor padding?)")
        if start:
            inputs = suffix(inputs, start)
        samples = torch.arange(n, device=device).repeat_interleave(len(group))
        alphas = torch.tensor([k / steps for k in group], device=device).repeat(n)
        batches.append((inputs, samples, alphas))

    chosen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    own: dict[str, torch.Tensor] = {}
    masks: list[torch.Tensor] = []  # per path layer: [n, N] bool path neurons of each sample
    live: list[_Site] = []  # the layers where some sample chose neurons
    for layer in clean:
        layers = live + [layer]
        totals = [torch.zeros(n, item.values.shape[-1], device=device) for item in layers]
        for inputs, samples, alphas in batches:
            replacements, leaves, geometry = [], [], []
            for position, item in enumerate(layers):
                index, unit_row = item.expand(samples)
                value = item.values[index]
                shape = (-1,) + (1,) * (value.dim() - 1)
                leaf = (alphas[unit_row].view(shape) * value.float()).to(value.dtype).requires_grad_()
                mask = item.mask[index].unsqueeze(-1)
                if position < len(live):
                    mask = mask & masks[position][samples[unit_row]].view(value.shape[0], *[1] * (value.dim() - 2), -1)
                replacements.append((item.site, leaf, mask.to(value.dtype)))
                leaves.append(leaf)
                geometry.append((value, item.mask[index], samples[unit_row]))
            with torch.enable_grad():
                logits = scaled_logits(wrapped, inputs, replacements,
                                       None if cache is None else repeat_cache(cache, int(samples.numel()) // n))
                objective = answer_loglik(logits, inputs["labels"]).sum()
                grads = torch.autograd.grad(objective, leaves, allow_unused=True)
            for position, (grad, (value, mask, unit_sample)) in enumerate(zip(grads, geometry)):
                if grad is not None:  # None: no gradient reaches the site at all (its attribution stays 0)
                    totals[position].index_add_(0, unit_sample, _contribution(method, grad, value, mask))
        if tick is not None:
            tick()
        totals = [total / steps for total in totals]
        own[layer.site.name] = totals[-1]
        path_term = sum(((total * mask).sum(dim=1) for total, mask in zip(totals[:-1], masks)),
                        torch.zeros(n, device=device))
        scores = totals[-1] + path_term.unsqueeze(1)
        picked = top_neurons(scores, totals[-1], top_k)
        if not bool(picked.any()):
            continue
        chosen[layer.site.name] = (picked, scores)
        masks.append(picked)
        live.append(layer)
    return chosen, own, start


def search_sites(model_map, part: str, form: str) -> list:
    """The sites of `part` a path can run through: alive (not past LLaVA's feature layer), and run by
    inputs of `form` (text-only inputs skip image-only LLM layers)."""
    dead = set(model_map.expected_dead)
    skip = set(model_map.image_only) if form == "text" else set()
    return [site for site in model_map.sites_of(part) if site.name not in dead and site.name not in skip]


def find_paths(model, processor, rows: Sequence, *, model_map=None, parts: Sequence[str] = ("llm", "vision"),
               steps: int = 4, top_k: int = 5, positions: str = "answer", batch_rows: int = 64,
               loop: bool = False, share_prefix: bool = True, sites: Sequence[str] | None = None,
               progress: bool = False) -> NeuronPaths:
    """Search the paths of `rows` (the forget set) in `parts`: "llm" (IGI on the text-only form) and/or
    "vision" (IFI on the image form, rows with an image only). batch_rows caps the rows (samples x steps)
    of one traced pass; loop=True runs one sample, one step and one layer per pass instead (the
    straightforward reference the benchmark and tests compare against). share_prefix (batched text side):
    the token positions before the first scaled one are computed once per chunk of samples and reused as
    a key/value cache by every pass, where the model continues from a cache exactly (checked per chunk;
    otherwise whole sequences run). `sites`: search only these site names. The model is
    left as it was (modes, requires_grad, no nnsight state)."""
    from mmedit.arch import model_map as build_map
    from mmedit.progress import track
    from mmedit.provenance import library_versions, model_identity

    if steps < 1 or top_k < 1 or batch_rows < 1:
        raise MmeditError("path search: steps, top_k and batch_rows must be at least 1")
    if positions not in POSITIONS:
        raise MmeditError(f"unknown positions {positions!r}; choose from {', '.join(POSITIONS)}")
    model_map = model_map or build_map(model)
    device = input_device(model)
    if loop:
        samples_per_pass, steps_per_pass = 1, 1
    else:
        samples_per_pass, steps_per_pass = max(1, batch_rows // steps), min(steps, batch_rows)

    plans = []
    for part in parts:
        if part not in METHODS:
            raise MmeditError(f"path search: unknown part {part!r}; parts are {', '.join(METHODS)}")
        method, form = METHODS[part]
        part_rows = [row for row in rows if form == "text" or row.image is not None]
        if not part_rows:
            raise MmeditError(f"path search: no forget row has an image, so no {part} path (use side=text)")
        part_sites = search_sites(model_map, part, form)
        if sites is not None:
            part_sites = [site for site in part_sites if site.name in sites]
        if part_sites:
            plans.append((part, part_rows, part_sites))
    if not plans:
        raise MmeditError("path search: no site to search")

    found: dict[str, dict[int, float]] = {}
    choosing: dict[str, int] = {}  # site -> samples that chose neurons there
    samples, prefixes = {}, {}
    with preserved(model, clear_grads=False), nnsight_view(model) as wrapped:
        model.eval()
        model.requires_grad_(False)
        total = sum(len(part_sites) * -(-len(part_rows) // samples_per_pass) for _, part_rows, part_sites in plans)
        bar = iter(track(range(total), "MIP-Editor: path search", total=total, enabled=progress))
        for part, part_rows, part_sites in plans:
            samples[part] = len(part_rows)
            length = _encode(part_rows, processor, METHODS[part][1], device)["input_ids"].shape[1]  # the longest
            for start in range(0, len(part_rows), samples_per_pass):
                chunk = part_rows[start:start + samples_per_pass]
                chosen, _, shared = _search_chunk(
                    wrapped, processor, chunk, part, part_sites, steps=steps, top_k=top_k, positions=positions,
                    steps_per_pass=steps_per_pass, device=device, share_prefix=share_prefix and not loop,
                    tick=lambda: next(bar, None), length=length)
                prefixes.setdefault(part, []).append(shared)
                for name, (picked, score) in chosen.items():
                    union = found.setdefault(name, {})
                    choosing[name] = choosing.get(name, 0) + int(picked.any(dim=1).sum())
                    for sample, neuron in picked.nonzero().tolist():
                        union[neuron] = union.get(neuron, 0.0) + float(score[sample, neuron].double())
        for _ in bar:  # finish the bar
            pass

    searched = {site.name for _, _, part_sites in plans for site in part_sites}
    dead = [site.name for site in model_map.sites if site.name in searched and site.name not in found]
    if not found:
        raise MmeditError(f"path search: no site has a usable attribution at the {positions!r} positions (every "
                          f"neuron's attribution is equal, e.g. 0: no gradient of the answer reaches them) in "
                          f"{', '.join(dead)}; try positions=answer")
    order = [site.name for site in model_map.sites if site.name in found]
    neurons, scores = {}, {}
    for name in order:
        ranked = sorted(found[name].items(), key=lambda item: (-item[1], item[0]))
        neurons[name] = torch.tensor([neuron for neuron, _ in ranked], dtype=torch.int64)
        scores[name] = torch.tensor([value for _, value in ranked], dtype=torch.float64)
    meta = {
        "family": model_map.family,
        "model": model_identity(model),
        "methods": {part: METHODS[part][0] for part, _, _ in plans},
        "samples": samples,
        "options": {"steps": steps, "top_k": top_k, "positions": positions},
        "sites": [{"name": s.name, "part": s.part, "layer": s.layer, "width": s.width}
                  for s in model_map.sites if s.name in found],
        "dead_sites": dead,
        "skipped_samples": {name: samples[name.split(".")[0]] - choosing[name] for name in order
                            if choosing[name] < samples[name.split(".")[0]]},
        "shared_prefix": {part: {"chunks": len(starts), "cached": sum(1 for s in starts if s),
                                 "positions": sum(starts)} for part, starts in prefixes.items()},
        "versions": library_versions(),
    }
    return NeuronPaths(neurons, scores, meta)


def layer_attributions(model, processor, rows: Sequence, site: str, *, steps: int, positions: str = "answer",
                       model_map=None) -> torch.Tensor:
    """[samples, N]: IGI (LLM site) or IFI (vision site) attributions of one layer on its own (no path),
    one sample per row of `rows`, all samples and steps in one pass (all 0 where no gradient reaches)."""
    from mmedit.arch import model_map as build_map

    model_map = model_map or build_map(model)
    target = model_map.site(site)
    device = input_device(model)
    with preserved(model, clear_grads=False), nnsight_view(model) as wrapped:
        model.eval()
        model.requires_grad_(False)
        _, own, _ = _search_chunk(wrapped, processor, list(rows), target.part, [target], steps=steps, top_k=1,
                                  positions=positions, steps_per_pass=steps, device=device)
    return own[site]
