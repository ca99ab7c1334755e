"""MIP-Editor (Li et al., AAAI'26, arXiv 2511.06793): influential neuron paths + representation misdirection.

1. Paths (mip_editor.search): IGI over LLM neurons on the text-only forget rows, IFI over vision-encoder
   neurons on the image forget rows; m interpolation steps, top-k per layer and sample by the signed
   score that lowers the answer NLL, united over samples with summed scores; never chosen among ties
   (zero attributions skipped, a layer where no sample has one is a dead site). Precomputed paths:
   apply_plugin(..., stats={"paths": NeuronPaths or a paths file}) / `mmedit apply mip_editor ... --stats
   paths=FILE`; `mmedit paths find|show` finds, saves, tabulates and plots them.
2. Prune: the path neurons are silenced by zeroing, per neuron, the rows of its last weight producer
   and that producer's bias (fc1 weight + bias; up_proj of a gated MLP), so the neuron is exactly 0 at
   every position (checked on a forget batch).
3. RMisU on the rows of the path neurons only (every weight producer: gate + up, or fc1; biases frozen),
   at LLM layer l (clamped to the depth), paired retain/forget batches with the forget set cycled to the
   retain length:
       L = beta * MSE(h^l(x_f), c*u) + alpha * MSE(h^l(x_r), h_theta0^l(x_r))
   (adaptive target: lam * ||h_theta0^l(x_f)|| * u per position). theta0 is the unpruned model.

Pruning and training the same rows (see docs/mip-editor.md). The paper zeroes the path neurons'
activations and trains the rows that produce them; its code does the zeroing with forward hooks at
sequence position 0 only, left on through training and evaluation, and trains rows that start from their
original values. A weight delta carries no hooks, and zeroing a neuron at every position while training
its producers would make that training void. mmedit zeroes rows (every position), then trains: rows
the loss cannot reach (LLM layers above l, vision rows under text-only batches) stay exactly zero; rows
it reaches start from the pruned point, so the original weights (the forget knowledge) are gone and what
grows back is trained only to misdirect forget inputs and to give retain inputs back their theta0
states. Zeroing one producer, not all: a gated neuron with both gate and up rows at zero is a
stationary point (both gradients vanish), so RMisU could never move it; with only up zeroed the neuron
is still exactly 0 and up gets a gradient. `prune=false` trains from the original rows (the code's
behaviour without the hooks), `rmisu=false` stops after pruning, `restrict=false` trains every MLP
producer row of the searched parts instead of the path rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from mmedit.errors import MmeditError
from mmedit.loading import input_device
from mmedit.plugins.base import Choice, Range, option, require
from mmedit.plugins.training import (Selection, TrainConfig, TrainingPlugin, forms_option, largest_form, paired,
                                     reference_rows, steered_layer, training_phases)
from mmedit.plugins.mip_editor.interventions import POSITIONS, model_inputs
from mmedit.plugins.mip_editor.paths import NeuronPaths
from mmedit.plugins.mip_editor.search import METHODS, find_paths, search_sites
from mmedit.plugins import losses
from mmedit.plugins.objectives import Objective, retain_state_distance, steered_distance

SIDES = {"both": ("vision", "llm"), "text": ("llm",), "vision": ("vision",)}
TARGETS = ("fixed", "adaptive")


@dataclass
class MIPEditorConfig(TrainConfig):
    lr: float = option(5e-4, "AdamW learning rate (no weight decay), decayed linearly.", space=Range(1e-5, 1e-2, log=True))
    batch_size: int = option(6, "Rows per training batch.")
    grad_clip: float = option(0.0, "Clip each step's gradient norm to this (0: no clipping, as the paper).")
    side: str = option("both", "Paths to find and edit: text (IGI over LLM neurons, text-only forget rows), "
                       "vision (IFI over vision-encoder neurons, image forget rows) or both.", choices=tuple(SIDES))
    steps: int = option(4, "Interpolation steps m (alpha = k/m, k = 0..m-1) of the path attribution.")
    # each top_k searches its paths once per sweep (the paths depend on it), so a few are searched
    top_k: int = option(5, "Path neurons per layer and forget sample; the union over samples is edited.",
                        space=Choice((3, 5, 10)))
    positions: str = option("answer", "Token positions scaled and read in the LLM: answer (those predicting the "
                            "answer: last prompt token and answer tokens), all (non-pad), first (position 0, as "
                            "the reference code).", choices=POSITIONS)
    search_batch: int = option(0, "Rows (samples x steps) per traced pass of the path search (0: sized from the "
                               "memory plan, so that the search holds no more activations than a training step: "
                               "at least one sample's steps, at most 64). Any size finds the same paths.")
    prune: bool = option(True, "Zero the path neurons (their last producer's rows and bias) before training.")
    rmisu: bool = option(True, "Train with RMisU after pruning (false: prune only).")
    restrict: bool = option(True, "Train only the rows of path neurons (false: every MLP producer weight row of the "
                            "searched parts, LLM layers <= l).")
    layer: int = option(7, "LLM decoder layer l whose output is misdirected (clamped to the last layer).")
    alpha: float = option(0.5, "Weight of the retain term MSE(h^l(x_r), h_theta0^l(x_r)).",
                          space=Range(0.05, 5.0, log=True))
    beta: float = option(0.5, "Weight of the forget term MSE(h^l(x_f), target).", space=Range(0.05, 5.0, log=True))
    c: float = option(10.0, "Fixed target c*u: its norm (u: a seeded random unit vector).",
                      space=Range(1.0, 100.0, log=True))
    target: str = option("fixed", "Forget target: fixed (c*u) or adaptive (lam*||h_theta0^l(x_f)||*u per position).",
                         choices=TARGETS)
    lam: float = option(1.0, "lam of the adaptive target.")
    forms: str = forms_option()

    def __post_init__(self):
        super().__post_init__()
        require(self.steps >= 1, "steps", "be at least 1")
        require(self.top_k >= 1, "top_k", "be at least 1")
        require(self.search_batch >= 0, "search_batch", "be >= 0 (0: sized from the memory plan)")
        require(self.layer >= 0, "layer", "be >= 0")
        require(self.alpha >= 0 and self.beta >= 0, "alpha/beta", "be >= 0")
        require(self.lam > 0, "lam", "be > 0")
        require(self.prune or self.rmisu, "prune/rmisu", "not both be false (nothing would change)")


def reaches(site, layer: int, forms: str) -> bool:
    """Whether the RMisU loss at LLM layer `layer` on `forms` rows depends on this site at all: LLM layers
    up to `layer`; vision layers when the training rows have images."""
    if site.part == "llm":
        return site.layer <= layer
    return forms != "text"


def weight_producers(site) -> list:
    return [producer for producer in site.producers if not producer.param.endswith("bias")]


def prune_producers(site) -> list:
    """The producers whose rows silence a neuron: its last weight producer and that module's bias."""
    last = weight_producers(site)[-1]
    bias = last.param.rsplit(".", 1)[0] + ".bias"
    return [producer for producer in site.producers if producer.param in (last.param, bias)]


def get_paths(job, config) -> NeuronPaths:
    """Precomputed paths (stats["paths"]: a NeuronPaths or a paths file) or a fresh search on job.forget."""
    parts = tuple(part for part in SIDES[config.side])
    rows = config.search_batch or search_rows(job, config)

    def compute():
        return find_paths(job.model, job.processor, job.forget, model_map=job.model_map, parts=parts,
                          steps=config.steps, top_k=config.top_k, positions=config.positions,
                          batch_rows=rows, progress=job.progress)

    paths = job.statistics("paths", compute, {"parts": parts, "steps": config.steps, "top_k": config.top_k,
                                              "positions": config.positions, "batch": rows})
    if isinstance(paths, (str, Path)):
        paths = NeuronPaths.load(paths)
    elif not isinstance(paths, NeuronPaths):
        raise MmeditError(f"statistics 'paths': expected a paths file (mmedit paths find), "
                          f"got {type(paths).__name__}")
    paths.check(job.model_map)
    paths = NeuronPaths({n: i for n, i in paths.neurons.items() if n.split(".")[0] in parts},
                        {n: s for n, s in paths.scores.items() if n.split(".")[0] in parts}, paths.meta)
    if not paths.neurons:
        raise MmeditError(f"mip_editor: the paths hold no neuron of the {config.side} side")
    return paths


MAX_SEARCH_ROWS = 64


def search_rows(job, config) -> int:
    """search_batch=0: the rows per path-search pass whose activations are at most a training step's
    (mmedit.plan on the job's model and forget rows), at least one sample's m steps, at most MAX_SEARCH_ROWS."""
    from mmedit.plan import Sized, shapes_from_rows

    weight = next(job.model.parameters())
    model = Sized(job.model.config, str(weight.dtype).removeprefix("torch."), input_device(job.model).type)
    sample = {"forget": job.forget, "retain": job.retain[: 4 * config.batch_size] or job.forget}
    shapes = shapes_from_rows(model, job.processor, sample, config.batch_size)
    return plan_search_rows(model, shapes, config)


def plan_search_rows(model, shapes, config) -> int:
    if config.search_batch:
        return config.search_batch
    budget = max(phase.terms.get("activations", 0) for phase in rmisu_phases(model, shapes, config))
    one = max(search_phase(model, shapes, config, part, 1).terms["activations"] for part in SIDES[config.side])
    return min(MAX_SEARCH_ROWS, max(config.steps, budget // one))


def search_phase(model, shapes, config, part: str, rows: int):
    """A plan's path search of `part`: passes of `rows` rows (samples x steps) through the frozen model,
    gradients from the answer to the scaled site values (which are kept, with their gradients)."""
    from mmedit.arch import PARTS
    from mmedit.plan import base_phase, site_bytes

    batch = shapes.batch("forget", METHODS[part][1], rows)
    modes = {later: "inputs" for later in PARTS[PARTS.index(part):]}
    phase = base_phase(model, f"path search ({part})")
    return phase.add("activations", model.activations(batch, modes) + 2 * site_bytes(model, batch, [part]))


def rmisu_phases(model, shapes, config) -> list:
    """A plan's RMisU phases: the path rows (at most top_k per forget row and layer) of the sites the loss
    reaches, or every producer row (restrict=false); θ₀'s states at layer l kept for the retain batches."""
    from mmedit.plugins.originals import footprint

    layer = steered_layer(SimpleNamespace(model_map=model.map), config)
    kinds, pruned = {"train": {}}, {}
    for part in SIDES[config.side]:
        for site in search_sites(model.map, part, METHODS[part][1]):
            neurons = min(site.width, config.top_k * shapes.rows.get("forget", 1))
            if config.prune:
                for producer in prune_producers(site):
                    pruned[producer.param] = neurons * model.numel[producer.param] // site.width
            if reaches(site, layer, config.forms):
                for producer in weight_producers(site):
                    whole = model.numel[producer.param]
                    kinds["train"][producer.param] = whole if not config.restrict else neurons * whole // site.width
    form = largest_form(config.forms)
    phases = training_phases(model, shapes, config, kinds, [("forget", form), ("retain", form)], head="logits",
                             one_at_a_time=True)
    tokens = shapes.batch("retain", form, 1).tokens
    states = reference_rows(shapes, config, "retain", anchor="retain")
    if config.target == "adaptive":
        states += reference_rows(shapes, config, "forget", anchor="retain")
    for phase in phases:
        footprint(phase, model, pruned)
        phase.add("references", states * tokens * model.hidden("llm") * model.element, off_device=model.device != "cpu")
    return phases


def prune(job, paths: NeuronPaths) -> int:
    """Zero the path neurons' prune_producers rows in place (kept first); returns the number of zeroed elements."""
    params = dict(job.model.named_parameters())
    zeroed = 0
    with torch.no_grad():
        for name, index in paths.neurons.items():
            site = job.model_map.site(name)
            for producer in prune_producers(site):
                tensor = params[producer.param]
                job.original.keep(producer.param, axis=producer.axis, index=index)
                tensor.index_fill_(producer.axis, index.to(tensor.device), 0)
                zeroed += index.numel() * (tensor.numel() // tensor.shape[producer.axis])
    return zeroed


def check_silent(job, paths: NeuronPaths) -> None:
    """After pruning, every path neuron must read exactly 0 on a forget batch of its side's form."""
    from mmedit.data.batches import make_batches
    from mmedit.trace import nnsight_view, read_sites

    device = input_device(job.model)
    with nnsight_view(job.model) as wrapped, torch.no_grad():
        for part in {name.split(".")[0] for name in paths.neurons}:
            form = METHODS[part][1]
            rows = [row for row in job.forget if form == "text" or row.image is not None][:2]
            batch = next(make_batches(rows, job.processor, form, batch_size=len(rows), device=device))
            sites = [job.model_map.site(name) for name in paths.sites(part)]
            values, _ = read_sites(wrapped, sites, model_inputs(batch.inputs))
            for site, value in zip(sites, values):
                loudest = value[..., paths.neurons[site.name].to(value.device)].abs().max().item()
                if loudest != 0:
                    raise MmeditError(f"mip_editor: zeroing {', '.join(p.param for p in prune_producers(site))} "
                                      f"does not silence the path neurons of {site.name} (|a| up to {loudest:.3g})")


class RMisU(TrainingPlugin):
    """The training half, for one job: which rows train, the schedule and the loss."""

    head = "logits"  # a loss on hidden states

    def __init__(self, name: str, rows: dict | None, names: list[str] | None):
        self.name, self._rows, self._names = name, rows, names

    def selections(self, trainer, config):
        if self._rows is not None:
            return {"train": Selection.rows(trainer.model, self._rows)}
        return {"train": Selection.whole(self._names)}

    def schedule(self, trainer, config):
        return paired(trainer, config.forms, anchor="retain")  # forget batches cycled to the retain length

    def references(self, trainer, batch, which):
        """θ₀'s (the unpruned model's) states at layer l: of the retain batches, and of the forget batches
        for the adaptive target."""
        if which == "forget" and trainer.config.target != "adaptive":
            return {}
        layer = steered_layer(trainer.job, trainer.config)
        return {"states": trainer.reference(batch, [layer]).held_states(layer)}

    loss_terms = True

    def loss(self, trainer, step):
        config, layer = trainer.config, steered_layer(trainer.job, trainer.config)
        forget = trainer.forward(step.forget, [layer]).states(layer)
        goal = target(trainer, config, step.forget, forget, step.reference("forget").get("states"))
        yield config.beta * losses.misdirection(forget, goal)
        retain = trainer.forward(step.retain, [layer]).states(layer)
        yield config.alpha * losses.retain_state(retain, step.reference("retain")["states"])


def target(passes, config, batch, states, reference_states=None):
    """The forget target at each of the batch's non-pad positions: c*u (fixed) or lam*||h_theta0||*u, with
    θ₀'s states at layer l given (`reference_states`) or from a θ₀ pass."""
    u = losses.random_direction(states.shape[-1], passes.job.seed, states.device)
    if config.target == "adaptive":
        if reference_states is None:
            layer = steered_layer(passes.job, config)
            reference_states = passes.reference(batch, [layer]).held_states(layer)
        return losses.adaptive_target(reference_states, u, config.lam)
    return losses.fixed_target(u, config.c, states)


class MIPEditor(TrainingPlugin):
    name, version = "mip_editor", "1.0"
    description = "Influential neuron paths (IG text side, Fisher vision side) pruned, then RMisU on their rows."
    Config = MIPEditorConfig
    stats_keys = ("paths",)
    presets = {"conformance": {"lr": 5e-3, "epochs": 5}}
    search_space = {"forms": Choice(("multimodal", "text", "both"))}  # forms_option() is shared: its space is declared here

    def parts(self, config):
        return SIDES[config.side]

    def footprint(self, model, shapes, config):
        """The path search of each side (passes of search_batch rows, or as many as a training step's
        activations allow), then RMisU on the path rows."""
        rows = plan_search_rows(model, shapes, config)
        phases = [search_phase(model, shapes, config, part, rows) for part in SIDES[config.side]]
        return phases + (rmisu_phases(model, shapes, config) if config.rmisu else [])

    def objectives(self, config):
        """RMisU's two terms (after pruning, from the pruned point)."""
        if not config.rmisu:
            return []
        return [Objective("forget states' distance to the target", steered_distance(steered_layer, target, config.forms),
                          "down", 2e-3),
                Objective("retain states' distance to base", retain_state_distance(steered_layer, config.forms),
                          "kept", 1e-3)]

    def edit(self, job, config):
        paths = get_paths(job, config)
        layer = steered_layer(job, config)
        report = {"paths": paths.summary(), "path_neurons": paths.count(), "layer": layer,
                  "path_search": dict(sorted(paths.meta.get("options", {}).items())),
                  "dead_sites": paths.meta.get("dead_sites", [])}
        reachable = [name for name in paths.neurons if reaches(job.model_map.site(name), layer, config.forms)]
        trainer = self._trainer(job, config, paths, reachable, layer) if config.rmisu else None
        if trainer is not None:
            trainer.prepare()  # θ₀'s states, while the model is still unpruned
        if config.prune:
            report["pruned_elements"] = prune(job, paths)
            check_silent(job, paths)
        if trainer is None:
            return report
        report |= trainer.run()
        report["pruned_only"] = sorted(set(paths.neurons) - set(reachable)) if config.prune else []
        return report

    def _trainer(self, job, config, paths, reachable, layer):
        """RMisU's Trainer: the rows of the path neurons the loss reaches (restrict), or every producer row."""
        from mmedit.plugins.training import Trainer

        if config.restrict:
            rows = {}
            for name in reachable:
                site = job.model_map.site(name)
                for producer in weight_producers(site):
                    rows[producer.param] = (producer.axis, paths.neurons[name].tolist())
            if not rows:
                raise MmeditError(f"mip_editor: no path neuron that RMisU at LLM layer {layer} on {config.forms} "
                                  "rows can train (lower layers, or image rows for the vision side)")
            method = RMisU(self.name, rows, None)
        else:
            names = [producer.param for part in SIDES[config.side] for site in job.model_map.sites_of(part)
                     if site.name not in job.model_map.expected_dead and reaches(site, layer, config.forms)
                     for producer in weight_producers(site)]
            if not names:
                raise MmeditError(f"mip_editor: RMisU on {config.forms} rows cannot train the {config.side} side")
            method = RMisU(self.name, None, names)
        return Trainer(job, config, method)


plugin = MIPEditor()
