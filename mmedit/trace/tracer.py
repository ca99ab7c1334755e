"""Run batches through an nnsight trace and stream per-neuron statistics into a `TraceStats`.

One traced forward per batch reads every neuron site (in execution order: vision -> projector -> LLM);
when gradients are asked, one backward pass of the answer NLL into exactly those tensors (the ones the
model really consumed) follows. Sites that no gradient reaches are dead branches: they
are reported in the result's metadata and get no gradient statistics, never zeros.

Memory: no parameter but the Fisher ones requires a gradient during a trace (the graph starts at the
input embeddings and the pixel values), so no other weight gradient is made and autograd keeps only what
the activations' gradients need; a Fisher parameter's gradient is squared into its sum and freed as soon
as autograd has made it.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch

from mmedit.errors import MmeditError
from mmedit.modelstate import preserved
from mmedit.progress import track
from mmedit.provenance import library_versions, model_identity
from mmedit.trace.stats import GROUPS, Accumulator, TraceStats

PARTS = ("vision", "projector", "llm")


def position_groups(token_masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLM token groups from ModelMap.token_masks: all, image, text, answer, last."""
    real = ~token_masks["pad"]
    answer = token_masks["answer"]
    return {
        "all": real,
        "image": token_masks["image"] & real,
        "text": token_masks["text"] & real,
        "answer": answer,
        "last": last_prompt_position(real, answer),
    }


def last_prompt_position(real: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """The position that predicts the first answer token (or the last real token without answers)."""
    positions = torch.arange(real.shape[1], device=real.device).expand_as(real)
    has_answer = answer.any(dim=1)
    first_answer = torch.where(answer, positions, real.shape[1]).min(dim=1).values - 1
    last_real = torch.where(real, positions, -1).max(dim=1).values
    index = torch.where(has_answer, first_answer, last_real)
    return positions == index.unsqueeze(1)


@contextmanager
def graph_roots(model, params: Sequence[torch.Tensor]):
    """Only `params` require a gradient; the input embeddings' output starts the LLM's graph."""
    model.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    handle = model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: output if output.requires_grad else output.requires_grad_())
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def nnsight_view(model):
    """nnsight's view of `model`; on exit the model is a plain torch module again.

    Wrapping installs a per-module `forward` controller and state that outlive the wrapper;
    removing them keeps later plain use (deepcopy, deltas, training) free of tracing machinery. A forward
    that was there before (accelerate's device hooks, which nnsight applies itself meanwhile) is put back.
    """
    import nnsight  # lazy: importing nnsight patches torch, keep it off non-tracing paths
    from nnsight.intervention.source import Controller

    own = {module: module.__dict__["forward"] for module in model.modules() if "forward" in module.__dict__}
    try:
        yield nnsight.NNsight(model)
    finally:
        for module in model.modules():
            if isinstance(module.__dict__.get("forward"), Controller):
                del module.__dict__["forward"]
            module.__dict__.pop("__nnsight__", None)
        for module, forward in own.items():
            module.__dict__["forward"] = forward


def read_sites(wrapped, sites, inputs: dict) -> tuple[list[torch.Tensor], object]:
    """One nnsight trace of `wrapped` (see nnsight_view): the neuron tensors of `sites` and the model output."""
    values: list[torch.Tensor] = []
    result: dict = {}
    with wrapped.trace(**inputs):
        for site in sites:
            envoy = wrapped.get(site.module)
            values.append((envoy.input if site.io == "input" else envoy.output).save())
        result["output"] = wrapped.output.save()
    return values, result["output"]


def active_sites(model_map, parts: Sequence[str], inputs: dict):
    """Sites of the asked parts that this batch runs: text-only batches skip the image-only sites."""
    has_image = any(key.startswith("pixel_values") for key in inputs)
    return [s for s in model_map.sites if s.part in parts and (has_image or s.name not in model_map.image_only)]


def trace_batch(wrapped, model_map, sites, inputs: dict, form: str, accumulator: Accumulator, *,
                grads: bool, groups: Sequence[str], fisher: dict[str, torch.Tensor]) -> set[str]:
    """Trace one batch into `accumulator`; returns the names of sites no gradient reached."""
    need_backward = grads or bool(fisher)
    with torch.set_grad_enabled(need_backward):
        values, output = read_sites(wrapped, sites, inputs)
    site_grads: Sequence[torch.Tensor | None] = [None] * len(sites)
    if need_backward:
        loss = output.loss
        if not torch.isfinite(loss):
            raise MmeditError(f"non-finite loss ({loss.item()}) on a {form} batch; check the model and data")
        leaves = [value for value in values if value.requires_grad]
        for value in leaves:
            value.retain_grad()
        _backward(loss, leaves, fisher, lambda name, grad: accumulator.add_fisher(form, name, grad))
        site_grads = [value.grad if value.requires_grad else None for value in values]
        if fisher:
            accumulator.count_fisher_batch(form)
    llm_groups = position_groups(model_map.token_masks(inputs, inputs.get("labels")))
    llm_groups = {name: mask for name, mask in llm_groups.items() if name in groups}
    dead = set()
    for site, value, grad in zip(sites, values, site_grads):
        if need_backward and grad is None:
            dead.add(site.name)
        if site.part == "llm":
            masks = llm_groups
        else:
            masks = {"all": torch.ones(value.shape[:-1], dtype=torch.bool, device=value.device)}
        accumulator.add(site.name, form, value, masks, grad if grads else None)
    return dead


def _backward(loss, leaves, fisher: dict[str, torch.Tensor], square) -> None:
    """loss.backward() into the site values' .grad and, one weight at a time, square(name, grad) for each
    Fisher parameter (its gradient freed at once: at most one weight gradient exists at a time)."""
    reached, kept = set(), {name: param.grad for name, param in fisher.items()}

    def take(param, name):
        square(name, param.grad)
        param.grad = None
        reached.add(name)

    hooks = [param.register_post_accumulate_grad_hook(lambda p, n=name: take(p, n)) for name, param in fisher.items()]
    try:
        for param in fisher.values():
            param.grad = None
        torch.autograd.backward(loss, inputs=[*leaves, *fisher.values()])
    finally:
        for hook in hooks:
            hook.remove()
        for name, param in fisher.items():
            param.grad = kept[name]
    missing = [name for name in fisher if name not in reached]
    if missing:
        raise MmeditError(f"no gradient reaches Fisher parameter {missing[0]}: it is off the loss path")


def trace(
    model,
    batches: Iterable,
    *,
    model_map=None,
    parts: Sequence[str] = PARTS,
    grads: bool = False,
    tau: float = 0.1,
    groups: Sequence[str] = GROUPS,
    fisher_params: Sequence[str] = (),
    meta: dict | None = None,
    progress: bool = True,
    total: int | None = None,
    description: str = "tracing",
) -> TraceStats:
    """Trace `batches` (mmedit.data.batches.Batch) and return their per-neuron statistics.

    grads: also record gradient statistics of the answer NLL at every site.
    fisher_params: parameter names whose squared batch gradients are accumulated (diagonal Fisher).
    description: the progress bar's label (the phase a caller is in).
    """
    from mmedit.arch import model_map as build_map

    model_map = model_map or build_map(model)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise MmeditError(f"unknown part(s) {', '.join(sorted(unknown))}; parts are {', '.join(PARTS)}")
    bad_groups = set(groups) - set(GROUPS)
    if bad_groups:
        raise MmeditError(f"unknown position group(s) {', '.join(sorted(bad_groups))}; groups are {', '.join(GROUPS)}")
    parameters = dict(model.named_parameters())
    missing = [name for name in fisher_params if name not in parameters or parameters[name].is_meta]
    if missing:
        raise MmeditError(f"Fisher parameter not in the model, or offloaded (on the meta device: keep it resident "
                          f"with --max-memory or the device map): {missing[0]}")
    fisher_tensors = [parameters[name] for name in fisher_params]
    need_backward = grads or bool(fisher_params)
    device = getattr(getattr(model, "_hf_hook", None), "execution_device", None)  # a dispatched model's
    device = next(model.parameters()).device if device is None else torch.device(device)

    accumulator = Accumulator(tau)
    seen_sites: dict[str, object] = {}
    dead: set[str] = set()
    batches_seen = {"multimodal": 0, "text": 0}
    with nnsight_view(model) as wrapped, preserved(model, clear_grads=False), graph_roots(model, fisher_tensors):
        for batch in track(batches, description, total=total, enabled=progress):
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
            if need_backward:  # the vision side's graph starts at the pixels
                inputs.update({k: v.detach().requires_grad_() for k, v in inputs.items()
                               if k.startswith("pixel_values") and v.is_floating_point()})
            if need_backward and "labels" not in inputs:
                raise MmeditError("gradients need answer labels: build batches with with_answer=True")
            sites = active_sites(model_map, parts, inputs)
            dead |= trace_batch(wrapped, model_map, sites, inputs, batch.form, accumulator,
                                grads=grads, groups=groups, fisher=dict(zip(fisher_params, fisher_tensors)))
            seen_sites.update((site.name, site) for site in sites)
            batches_seen[batch.form] = batches_seen.get(batch.form, 0) + 1
    if not seen_sites:
        raise MmeditError("nothing was traced: the data gave no batches")
    run_meta = {
        "sites": [
            {"name": s.name, "part": s.part, "layer": s.layer, "module": s.module, "width": s.width}
            for s in model_map.sites
            if s.name in seen_sites
        ],
        "dead_sites": sorted(dead, key=lambda name: [s.name for s in model_map.sites].index(name)),
        "expected_dead": list(model_map.expected_dead),
        "family": model_map.family,
        "model": model_identity(model),
        "options": {"parts": list(parts), "grads": grads, "tau": tau, "groups": list(groups),
                    "fisher_params": len(fisher_params)},
        "batches": batches_seen,
        "versions": library_versions(),
    }
    return accumulator.result(run_meta | (meta or {}))
