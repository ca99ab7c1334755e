"""The shared training loop: a gradient method is a loss on this base, in the style of open-unlearning.

    class GA(TrainingPlugin):
        name, version, description = "ga", "1.0", "Gradient ascent on the forget set."
        Config = BaselineConfig
        def loss(self, trainer, step):
            return -trainer.forward(step.forget).nll
        def objectives(self, config):           # what it moves, checked by the conformance suite
            return [Objective("forget answer NLL", forget_nll(config.forms), "up", 0.05)]

The Trainer does everything else. What may change is a `Selection` per step kind: whole parameters,
rows of parameters (e.g. the producers of chosen neurons) or element masks; everything else is frozen,
and each selection has its own AdamW so that one kind of step never moves another kind's elements
through optimizer momentum. The schedule pairs forget and retain batches (the shorter set cycled) or
interleaves them; rows are shuffled with the job's seed. Losses read logits, answer NLLs and hidden
states at decoder layers (ModelMap.residual) on the edited model (`forward`); what they need of θ₀ the
method computes in `references(trainer, batch, which)`, once per batch of the schedule before the first
step (`trainer.reference` there runs θ₀ or a separately loaded reference model), and reads back as
`step.reference(which)`. A non-finite loss, gradient or weight stops the run with an MmeditError,
before any delta exists.

Memory: a selected parameter's original values are kept (job.original.keep) just before training, only
where it may change (rows or elements for a partial selection); a partial selection trains a compact
tensor of its selected values: the parameter's full gradient lives only until autograd has produced it
(a post-accumulate hook gathers the selected part and frees it), its values are gathered for its own
AdamW step only (one AdamW per trainable), and AdamW's state is as small as the selection. The results are those of masking full-tensor gradients (elementwise the same AdamW update;
outside a selection a masked gradient is +0.0 and leaves the element bit-identical). θ₀'s quantities are
stored off the GPU between steps; `checkpointing=on` recomputes activations in the backward (HF gradient
checkpointing) for less activation memory at the same result, and `auto` (the default) turns it on when
mmedit.plan predicts the training step would not fit in FIT of the device's free memory otherwise.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from mmedit.data.batches import FORMS as BATCH_FORMS
from mmedit.errors import MmeditError
from mmedit import logs
from mmedit.loading import input_device
from mmedit.modelstate import preserved
from mmedit.plugins import losses
from mmedit.plugins.base import Job, Plugin, option, require
from mmedit.plugins.originals import resident
from mmedit.progress import track

TERM_NAMES = ("forget", "retain")  # a loss's terms, in the order Plugin.loss yields them


def _log_step(kinds: int, step: Step, terms: list[float], norm: float, lr: float) -> None:
    """A training step's TensorBoard scalars (mmedit.logs; apply --log-dir): loss/total and, for a loss in
    terms, loss/forget and loss/retain (or loss/<step kind> where a schedule has several kinds of one-term
    step), lr and grad_norm (before clipping)."""
    values = {"loss/total": sum(terms)}
    if len(terms) > 1:
        values.update((f"loss/{TERM_NAMES[i] if i < len(TERM_NAMES) else f'term{i + 1}'}", value)
                      for i, value in enumerate(terms))
    elif kinds > 1:
        values[f"loss/{step.kind}"] = terms[0]
    logs.scalars(values | {"lr": lr, "grad_norm": norm})


FORMS = {"multimodal": BATCH_FORMS[:1], "text": BATCH_FORMS[1:], "both": BATCH_FORMS}  # option value -> forms


def steered_layer(job: Job, config) -> int:
    """config.layer, clamped to the model's last decoder layer (RMU, MIP-Editor's RMisU)."""
    return min(config.layer, len(job.model_map.residual) - 1)


def split_parts(text: str) -> tuple[str, ...]:
    from mmedit.arch import PARTS

    parts = tuple(part.strip() for part in text.split(",") if part.strip())
    require(bool(parts) and set(parts) <= set(PARTS), "parts", f"be a comma-separated subset of {', '.join(PARTS)}")
    return parts


@dataclass
class TrainConfig:
    lr: float = option(1e-5, "AdamW learning rate (no weight decay).")
    lr_decay: str = option("linear", "Learning-rate schedule: linear (to 0 over the run, as HF Trainer) or constant.",
                           choices=("linear", "constant"))
    epochs: int = option(1, "Passes over the schedule's anchor set.")
    batch_size: int = option(4, "Rows per batch.")
    grad_clip: float = option(1.0, "Clip the gradient norm of each step to this (0: no clipping).")
    max_steps: int = option(0, "Stop after this many optimisation steps (0: run the whole schedule).")
    checkpointing: str = option("auto", "Recompute activations in the backward pass (HF gradient checkpointing): "
                                "less activation memory, the same result, about a third more compute. auto: on "
                                "when the memory plan says the training step would not fit otherwise.",
                                choices=("auto", "on", "off"))

    def __post_init__(self):
        require(0 < self.lr <= torch.finfo(torch.float32).max, "lr", "be a positive number")
        require(self.epochs >= 1, "epochs", "be at least 1")
        require(self.batch_size >= 1, "batch_size", "be at least 1")
        require(self.grad_clip >= 0, "grad_clip", "be >= 0")
        require(self.max_steps >= 0, "max_steps", "be >= 0")


def forms_option():
    return option("multimodal", "Form of the training rows: multimodal (image + question), text (the text-only "
                  "twin) or both.", choices=tuple(FORMS))


@dataclass
class BaselineConfig(TrainConfig):
    parts: str = option("vision,projector,llm", "Comma-separated parts to train; everything else stays frozen.")
    forms: str = forms_option()

    def __post_init__(self):
        super().__post_init__()
        split_parts(self.parts)


@dataclass(frozen=True)
class Selection:
    """What a training step may change: parameter name -> None (the whole tensor) or a bool mask that
    broadcasts to it (rows: size 1 on every axis but the row axis; elements: the tensor's own shape)."""

    masks: Mapping[str, torch.Tensor | None]

    @classmethod
    def whole(cls, names) -> Selection:
        return cls({name: None for name in names})

    @classmethod
    def rows(cls, model: torch.nn.Module, rows: Mapping[str, tuple[int, Sequence[int]]]) -> Selection:
        """{parameter: (axis, indices)}: only those slices train — e.g. a Producer's param/axis and neurons."""
        params, masks = dict(model.named_parameters()), {}
        for name, (axis, indices) in rows.items():
            if name not in params:
                raise MmeditError(f"row selection: parameter {name} is not in the model")
            if not -params[name].dim() <= axis < params[name].dim():
                raise MmeditError(f"row selection: {name} has no axis {axis} (shape {list(params[name].shape)})")
            axis %= params[name].dim()
            bad = [int(i) for i in indices if not 0 <= int(i) < params[name].shape[axis]]
            if bad:
                raise MmeditError(f"row selection: index {bad[0]} is out of range for axis {axis} of {name} "
                                  f"(size {params[name].shape[axis]})")
            shape = [1] * params[name].dim()
            shape[axis] = params[name].shape[axis]
            mask = torch.zeros(shape, dtype=torch.bool, device=params[name].device)
            mask.view(-1)[torch.as_tensor(indices, dtype=torch.long, device=mask.device)] = True
            masks[name] = mask
        return cls(masks)

    def size(self, params: Mapping[str, torch.Tensor]) -> int:
        """How many elements may change."""
        return sum(self.sizes(params).values())

    def sizes(self, params: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """How many elements of each parameter may change."""
        return {n: params[n].numel() if m is None else int(m.expand(params[n].shape).sum()) for n, m in self.masks.items()}

    def check(self, params: Mapping[str, torch.Tensor], what: str) -> None:
        for name, mask in self.masks.items():
            if name not in params:
                raise MmeditError(f"{what}: parameter {name} is not in the model")
            shape = params[name].shape
            if mask is not None and (mask.dtype != torch.bool or mask.dim() != len(shape)
                                     or any(m not in (1, s) for m, s in zip(mask.shape, shape))):
                raise MmeditError(f"{what}: the mask of {name} is {mask.dtype}{list(mask.shape)}, "
                                  f"not a bool mask for {list(shape)}")
        if not self.masks or self.size(params) == 0:
            raise MmeditError(f"{what}: the selection matches no parameter element")

    def where(self, name: str) -> tuple[int | None, torch.Tensor | None, torch.Tensor | None]:
        """(axis, index, mask) of `name`'s selected part: (None, None, None) for the whole tensor, an axis
        and its indices for rows (a mask of size 1 on every other axis), else the element mask."""
        mask = self.masks[name]
        if mask is None:
            return None, None, None
        axes = [axis for axis, size in enumerate(mask.shape) if size != 1]
        if len(axes) <= 1:
            return (axes or [0])[0], mask.flatten().nonzero().flatten(), None
        return None, None, mask


class Output:
    """A forward pass: logits, labels, the non-pad mask and hidden states {layer: [B, T, D]}; the loss
    terms are those of mmedit.plugins.losses."""

    def __init__(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, hidden: dict):
        self.logits, self.labels, self.mask, self.hidden = logits, labels, mask, hidden

    @property
    def nll(self) -> torch.Tensor:
        """Token-mean NLL over the answer tokens of the batch (what HF's .loss computes)."""
        return losses.answer_nll(self.logits, self.labels)

    @property
    def sequence_nll(self) -> torch.Tensor:
        """[B]: each row's mean NLL over its own answer tokens."""
        return losses.sequence_nll(self.logits, self.labels)

    @property
    def answer_logits(self) -> torch.Tensor:
        """[N, V] float32: the logits that predict the N answer tokens of the batch."""
        return losses.answer_logits(self.logits, self.labels)

    def states(self, layer: int) -> torch.Tensor:
        """[N, D] float32: the hidden states after decoder layer `layer` at the N non-pad positions."""
        return self.held_states(layer).float()

    def held_states(self, layer: int) -> torch.Tensor:
        """The same in the model's dtype (what a reference keeps: states() is its exact float32 view)."""
        return self.hidden[layer][self.mask]


def run_model(model: torch.nn.Module, residual: Sequence[str], batch, layers: Sequence[int] = ()) -> Output:
    """model(batch) with the outputs of decoder layers `layers` (indices into `residual`) kept."""
    hidden, handles = {}, []
    for layer in layers:
        def keep(module, args, output, layer=layer):
            hidden[layer] = output[0] if isinstance(output, tuple) else output
        handles.append(model.get_submodule(residual[layer]).register_forward_hook(keep))
    inputs = {key: value for key, value in batch.inputs.items() if key != "labels"}
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return Output(logits, batch.inputs["labels"], batch.inputs["attention_mask"].bool(), hidden)


Chunk = tuple[tuple, str]  # (rows, form)


class Step:
    """One optimisation step: its kind (which Selection applies) and its batches, encoded on first use, and
    θ₀'s quantities for them (`reference(which)`: what the method's references() returned for that batch)."""

    def __init__(self, kind: str, forget: Chunk | None, retain: Chunk | None, encode, references=None):
        self.kind, self._chunks, self._encode = kind, {"forget": forget, "retain": retain}, encode
        self._references = references or (lambda which, chunk: {})

    def _batch(self, which: str):
        chunk = self._chunks[which]
        if chunk is None:
            raise MmeditError(f"this {self.kind} step has no {which} batch (a plugin bug: check its schedule)")
        return self._encode(*chunk)

    @cached_property
    def forget(self):
        return self._batch("forget")

    @cached_property
    def retain(self):
        return self._batch("retain")

    def reference(self, which: str) -> dict:
        """θ₀'s quantities for this step's `which` batch ("forget" or "retain"), on the model's device."""
        if self._chunks[which] is None:
            raise MmeditError(f"this {self.kind} step has no {which} batch (a plugin bug: check its schedule)")
        return self._references(which, self._chunks[which])


def paired(trainer: Trainer, forms: str, anchor: str = "forget") -> list[tuple[str, Chunk | None, Chunk | None]]:
    """One "train" step per anchor batch, each with a batch of the other set (cycled: oversampled or cut)."""
    plan = []
    for epoch in range(trainer.config.epochs):
        chunks = {which: trainer.chunks(which, forms, epoch) for which in ("forget", "retain")}
        other = "retain" if anchor == "forget" else "forget"
        for index, chunk in enumerate(chunks[anchor]):
            partner = chunks[other][index % len(chunks[other])] if chunks[other] else None
            plan.append(("train", *((chunk, partner) if anchor == "forget" else (partner, chunk))))
    return plan


def interleaved(trainer: Trainer, forms: str) -> list[tuple[str, Chunk | None, Chunk | None]]:
    """A "retain" step per retain batch; after every ⌊|R|/|F|⌋ of them a "forget" step (MMUnlearner)."""
    plan = []
    for epoch in range(trainer.config.epochs):
        forget, retain = trainer.chunks("forget", forms, epoch), trainer.chunks("retain", forms, epoch)
        every, done = max(1, len(retain) // len(forget)), 0
        for index, chunk in enumerate(retain):
            plan.append(("retain", None, chunk))
            if (index + 1) % every == 0:
                plan.append(("forget", forget[done % len(forget)], None))
                done += 1
    return plan


class Passes:
    """Forward passes of a job's model: on its current weights (`forward`) and on θ₀ (`reference`: θ₀'s
    values swapped in for the parameters that have moved since they were kept, no second model in
    memory; or a separately loaded reference model)."""

    def __init__(self, job: Job, reference_model: torch.nn.Module | None = None):
        self.job, self.model = job, job.model
        self.params = dict(self.model.named_parameters())
        self.device = input_device(self.model)  # a dispatched model's execution device
        self.reference_model = reference_model
        self.reference_residual = None
        if reference_model is not None:
            from mmedit.arch import model_map

            self.reference_residual = model_map(reference_model).residual

    def encode(self, rows: Sequence, form: str):
        from mmedit.data.batches import make_batches

        return next(make_batches(rows, self.job.processor, form, batch_size=len(rows), device=self.device))

    def forward(self, batch, layers: Sequence[int] = ()) -> Output:
        return run_model(self.model, self.job.model_map.residual, batch, layers)

    def reference(self, batch, layers: Sequence[int] = ()) -> Output:
        """The same pass on θ₀ (or the reference model), without gradients, in eval mode."""
        with torch.no_grad():
            if self.reference_model is not None:
                return run_model(self.reference_model, self.reference_residual, batch, layers)
            with self._theta0():
                return run_model(self.model, self.job.model_map.residual, batch, layers)

    @contextlib.contextmanager
    def _theta0(self):
        """θ₀ in eval mode for one pass: the original values of every parameter that has moved since it was
        kept swapped in (storage pointers; those values are made from what was kept), the rest as they are."""
        current = {name: self.params[name].data for name in self.job.original.changed()}
        for name in current:
            self.params[name].data = self.job.original[name]
        try:
            with preserved(self.model, clear_grads=False):
                self.model.train(False)
                yield
        finally:
            for name, tensor in current.items():
                self.params[name].data = tensor


@dataclass
class Trainable:
    """A selected parameter as its step kind's AdamW sees it: the parameter itself (whole), or a compact
    tensor of its selected rows or elements (`leaf`), filled before each step and written back after it."""

    name: str
    param: torch.Tensor
    axis: int | None
    index: torch.Tensor | None
    mask: torch.Tensor | None

    def __post_init__(self):
        self.leaf = self.param if self.whole else torch.empty(0, dtype=self.param.dtype, device=self.param.device)

    @property
    def whole(self) -> bool:
        return self.index is None and self.mask is None

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return tensor.index_select(self.axis, self.index.to(tensor.device))
        return tensor.masked_select(self.mask.to(tensor.device))  # a mask may be kept in CPU memory

    def scatter(self, values: torch.Tensor) -> None:
        target = self.param.detach()
        if self.mask is None:
            target.index_copy_(self.axis, self.index.to(target.device), values)
        else:
            target.masked_scatter_(self.mask.to(target.device), values)


class Trainer(Passes):
    """Runs a TrainingPlugin on a Job: its selections, its schedule, its loss; see the module doc."""

    def __init__(self, job: Job, config: TrainConfig, method: TrainingPlugin,
                 reference_model: torch.nn.Module | None = None):
        super().__init__(job, reference_model)
        self.config, self.method = config, method
        self.losses: list[float] = []
        self.selections: dict[str, Selection] = dict(method.selections(self, config))
        for kind, selection in self.selections.items():
            selection.check(self.params, f"{method.name}: {kind} selection")
            resident(method.name, {name: self.params[name] for name in selection.masks})
        self.trainables = {kind: [Trainable(name, self.params[name], *selection.where(name)) for name in selection.masks]
                           for kind, selection in self.selections.items()}
        self._compact: dict[int, Trainable] = {}  # the running step's compact trainables, by id(parameter)
        self._grads: dict[int, torch.Tensor] = {}  # their gathered gradients
        self._references: dict = {}

    # ---- data -----------------------------------------------------------------------------------
    def chunks(self, which: str, forms: str, epoch: int) -> list[Chunk]:
        """The `which` set ("forget" or "retain") shuffled for this epoch and cut into batches per form."""
        rows = list(getattr(self.job, which))
        rng = random.Random(f"{self.job.seed}/{which}/{epoch}")
        rng.shuffle(rows)
        size = self.config.batch_size
        chunks = [(tuple(rows[i:i + size]), form) for form in FORMS[forms] for i in range(0, len(rows), size)]
        rng.shuffle(chunks)
        return chunks

    def plan(self) -> list:
        """The method's schedule, cut at max_steps."""
        plan = self.method.schedule(self, self.config)
        return plan[: self.config.max_steps] if self.config.max_steps else plan

    def prepare(self, plan: list | None = None) -> None:
        """θ₀'s quantities of every batch of the schedule, from the method's references() on θ₀ (or the
        reference model, dropped afterwards), kept off the GPU. run() calls it; a method that changes the
        model before training (MIP-Editor's pruning) calls it first, while the model still is θ₀."""
        offload = "cpu" if self.device.type == "cuda" else self.device
        with torch.no_grad(), preserved(self.model, clear_grads=False):
            self.model.train(False)
            for _, forget, retain in self.plan() if plan is None else plan:
                for which, chunk in (("forget", forget), ("retain", retain)):
                    if chunk is not None and (which, chunk) not in self._references:
                        found = self.method.references(self, self.encode(*chunk), which) or {}
                        self._references[which, chunk] = {key: value.detach().to(offload) for key, value in found.items()}
        self.reference_model = None

    def step_for(self, kind: str, forget: Chunk | None, retain: Chunk | None) -> Step:
        """The Step of one schedule entry, with the θ₀ quantities prepare() computed for its batches."""
        def reference(which: str, chunk: Chunk) -> dict:
            found = self._references.get((which, chunk), {})
            return {key: value.to(self.device) for key, value in found.items()}

        return Step(kind, forget, retain, self.encode, reference)

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        plan = self.plan()
        if not plan:
            raise MmeditError(f"{self.method.name}: the schedule has no steps (empty data?)")
        self._keep_originals()
        self.prepare(plan)
        checkpointing = self.checkpointing(plan)
        # One AdamW per trainable (the same update as one over all of them: AdamW is elementwise), so that
        # a compact one's values are gathered just for its own step.
        optimizers = {kind: [torch.optim.AdamW([t.leaf], lr=self.config.lr, weight_decay=0.0) for t in trainables]
                      for kind, trainables in self.trainables.items()}
        hooks = [self.params[name].register_post_accumulate_grad_hook(self._gather)
                 for name in {t.name for ts in self.trainables.values() for t in ts if not t.whole}]
        try:
            with preserved(self.model):
                for param in self.model.parameters():
                    param.requires_grad_(False)
                self.model.train()
                if checkpointing:
                    self.model.activation_checkpointing_enable({"use_reentrant": False})
                for index, (kind, forget, retain) in enumerate(
                        track(plan, f"{self.method.name}: training", enabled=self.job.progress)):
                    if kind not in self.selections:
                        raise MmeditError(f"{self.method.name}: the schedule has a {kind!r} step but no {kind!r} "
                                          "selection")
                    decay = 1 - index / len(plan) if self.config.lr_decay == "linear" else 1.0
                    self._step(index, self.step_for(kind, forget, retain), optimizers[kind], self.config.lr * decay)
        finally:
            for hook in hooks:
                hook.remove()
            if checkpointing:
                self.model.activation_checkpointing_disable()
        for selection in self.selections.values():
            bad = [n for n in selection.masks if not bool(torch.isfinite(self.params[n]).all())]
            if bad:
                raise MmeditError(f"{self.method.name}: training put NaN/inf into {bad[0]}; nothing written "
                                  "(try a lower lr)")
        return {"steps": len(plan), "loss": {"first": self.losses[0], "last": self.losses[-1]},
                "trainable": {kind: s.size(self.params) for kind, s in self.selections.items()}}

    def checkpointing(self, plan: list) -> bool:
        """Whether to recompute activations: checkpointing=on/off, or (auto) whether the memory plan of this
        run's training step (its selections, the first step's batches, measured on the rows) exceeds FIT
        of the device's free memory without it."""
        supported = getattr(self.model, "supports_gradient_checkpointing", False)
        if self.config.checkpointing == "on" and not supported:
            raise MmeditError(f"{self.method.name}: checkpointing=on, but {type(self.model).__name__} does not support "
                              "gradient checkpointing")
        if self.config.checkpointing != "auto" or not supported:
            return self.config.checkpointing == "on"
        from mmedit import plan as planning

        weight = next(self.model.parameters())
        model = planning.Sized(self.model.config, str(weight.dtype).removeprefix("torch."), self.device.type)
        sample = {which: list(getattr(self.job, which))[: 4 * self.config.batch_size] for which in ("forget", "retain")}
        shapes = planning.shapes_from_rows(model, self.job.processor, {k: v for k, v in sample.items() if v},
                                           self.config.batch_size)
        kinds = {kind: selection.sizes(self.params) for kind, selection in self.selections.items()}
        _, forget, retain = plan[0]
        steps = [(which, chunk[1]) for which, chunk in (("forget", forget), ("retain", retain))
                 if chunk is not None and (which == "forget" or self.method.needs_retain or forget is None)]
        off = dataclasses.replace(self.config, checkpointing="off")
        phases = training_phases(model, shapes, off, kinds, steps, head=self.method.head,
                                 one_at_a_time=self.method.loss_terms)
        peak = max(sum(phase.terms.values()) for phase in phases)
        return peak > planning.FIT * planning.available_bytes(str(self.device))

    def _keep_originals(self) -> None:
        """job.original.keep() of what the selections may change: whole, or the union of their masks."""
        for name in dict.fromkeys(name for selection in self.selections.values() for name in selection.masks):
            masks = [selection.masks[name] for selection in self.selections.values() if name in selection.masks]
            if any(mask is None for mask in masks):
                self.job.original.keep(name)
                continue
            union = masks[0]
            for mask in masks[1:]:
                union = union | mask
            axis, index, mask = Selection({name: union}).where(name)
            self.job.original.keep(name, axis=axis, index=index, mask=mask)

    def _gather(self, param: torch.Tensor) -> None:
        """Post-accumulate hook: a compact trainable's part of the gradient is kept, the full one freed."""
        trainable = self._compact.get(id(param))
        if trainable is not None and param.grad is not None:
            part = trainable.gather(param.grad)
            self._grads[id(param)] = part if id(param) not in self._grads else self._grads[id(param)].add_(part)
            param.grad = None

    def _step(self, index: int, step: Step, optimizers: list[torch.optim.Optimizer], lr: float) -> None:
        trainables = self.trainables[step.kind]
        for others in self.trainables.values():
            for trainable in others:
                trainable.param.requires_grad_(False)
        for trainable in trainables:
            trainable.param.requires_grad_(True)
        self._compact = {id(t.param): t for t in trainables if not t.whole}
        terms = self.method.loss(self, step)
        loss, values = None, []
        for term in [terms] if torch.is_tensor(terms) else terms:  # each term backpropagated before the next runs
            if not bool(torch.isfinite(term)):
                raise MmeditError(f"{self.method.name}: the loss is {term.item()} at step {index + 1} ({step.kind}); "
                                  "stopped, nothing written (try a lower lr)")
            term.backward()
            loss = term.detach() if loss is None else loss + term.detach()
            values.append(term.item())
        grads = [t.param.grad if t.whole else self._grads.pop(id(t.param), None) for t in trainables]
        present = [grad for grad in grads if grad is not None]
        norm = torch.nn.utils.get_total_norm(present)  # then scaled as clip_grad_norm_ does
        if not bool(torch.isfinite(norm)):
            raise MmeditError(f"{self.method.name}: the gradient norm is {norm.item()} at step {index + 1} "
                              f"({step.kind}); stopped, nothing written (try a lower lr)")
        with torch.no_grad():
            scale = torch.clamp((self.config.grad_clip or math.inf) / (norm + 1e-6), max=1.0)
            for grad in present:
                grad.mul_(scale.to(grad.device))
            for trainable, optimizer, grad in zip(trainables, optimizers, grads):
                if not trainable.whole:  # its values, for its own step only
                    trainable.leaf.data = trainable.gather(trainable.param.detach())
                    trainable.leaf.grad = grad
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if not trainable.whole:
                    trainable.scatter(trainable.leaf.detach())
                    trainable.leaf.data = trainable.leaf.new_empty(0)
        self._compact = {}
        self.losses.append(loss.item())
        _log_step(len(self.selections), step, values, norm.item(), lr)


def training_phases(model, shapes, config, kinds: Mapping[str, Mapping[str, int]], steps: Sequence[tuple[str, str]],
                    head: str = "train", one_at_a_time: bool = False) -> list:
    """A plan's training (mmedit.plan): two phases of a step after the first, "forward" (the activations;
    with a loss in terms, the next term's while the earlier terms' gradients are held) and "update" (the
    gradients and AdamW's step); autograd turns activations into gradients as the backward runs, so the
    two peak apart. `kinds` step kind -> {parameter: selected elements} (all of them: trained whole),
    `steps` the (set, form) batches one step's loss backpropagates through, `head` what the loss keeps of
    the logits (Sized.activations), `one_at_a_time` whether the loss yields a term per batch. AdamW keeps
    two values per selected element in the parameter's dtype (and makes two temporaries of a parameter in
    its step); a step's gradients are the whole-trained parameters' own, or a compact selection's gathered
    gradient and values plus one full gradient at a time; the originals of every selected element are kept."""
    from mmedit.plan import base_phase, graph_modes
    from mmedit.plugins.originals import footprint

    kept = {}
    for selected in kinds.values():
        for param, elements in selected.items():
            kept[param] = max(kept.get(param, 0), elements)
    gradients = 0
    for selected in kinds.values():
        whole = sum(n for param, n in selected.items() if n == model.numel[param])
        compact = {param: n for param, n in selected.items() if n != model.numel[param]}
        largest = max((model.numel[param] for param in compact), default=0)
        gradients = max(gradients, (whole + 2 * sum(compact.values()) + largest) * model.element)
    trained = {model.map.part_of(param)[0] for selected in kinds.values() for param in selected}
    batches = [model.activations(shapes.batch(which, form, config.batch_size), graph_modes(trained, form), head,
                                 checkpointing=config.checkpointing == "on") for which, form in steps]
    phases = [base_phase(model, "training: forward"), base_phase(model, "training: update")]
    for phase in phases:
        footprint(phase, model, kept)
        phase.add("optimizer", 2 * model.element * sum(sum(selected.values()) for selected in kinds.values()))
    if not one_at_a_time:
        phases[0].add("activations", sum(batches))
    elif len(batches) > 1 and gradients + max(batches[1:]) > batches[0]:
        phases[0].add("activations", max(batches[1:])).add("gradients", gradients)
    else:
        phases[0].add("activations", batches[0])
    largest = max(model.numel[param] for selected in kinds.values() for param in selected)
    phases[1].add("gradients", gradients).add("optimizer", 2 * largest * model.element)
    return phases


def reference_rows(shapes, config, which: str, anchor: str = "forget") -> int:
    """Rows of set `which` whose θ₀ quantities a paired schedule keeps: every anchor row, and of the other
    set one batch per anchor batch (per form and epoch)."""
    other = "retain" if anchor == "forget" else "forget"
    batches = {name: -(-shapes.rows.get(name, 0) // config.batch_size) for name in (anchor, other)}
    if which == anchor or batches[anchor] >= batches[other]:  # every batch of it (the other one cycled)
        rows = shapes.rows.get(which, 0)
    else:  # the other set cut after as many batches as the anchor has
        rows = batches[anchor] * config.batch_size
    return rows * len(FORMS[config.forms]) * config.epochs


def largest_form(forms: str) -> str:
    """The form of a forms option whose batches are longest (the image form, when there is one)."""
    return FORMS[forms][0]


class TrainingPlugin(Plugin):
    """A gradient method: override `loss`; `selections`, `schedule` and `references` when the defaults do
    not fit."""

    Config = BaselineConfig
    keeps_originals = True  # the Trainer keeps what its selections may change

    def parts(self, config) -> tuple[str, ...]:
        return split_parts(config.parts)

    def selections(self, trainer: Trainer, config) -> Mapping[str, Selection]:
        """Step kind -> what it may change. Default: the declared parts, whole, for "train" steps."""
        return {"train": Selection.whole(trainer.job.original)}

    def schedule(self, trainer: Trainer, config) -> list:
        """(kind, forget chunk, retain chunk) per step. Default: forget batches, each paired with a retain batch."""
        return paired(trainer, config.forms)

    def references(self, trainer: Trainer, batch, which: str) -> dict[str, torch.Tensor]:
        """θ₀'s quantities the loss needs of a `which` ("forget" or "retain") batch, e.g.
        {"nll": trainer.reference(batch).sequence_nll}: computed once per batch of the schedule before the
        first step, read in the loss as step.reference(which). Default: none."""
        return {}

    def loss(self, trainer: Trainer, step: Step):
        """The step's loss: a tensor, or an iterator of terms whose sum it is (yield the forget term, then the
        retain one: each is backpropagated before the next batch runs, so only one batch's activations are
        kept at a time; the gradients add up to those of the sum)."""
        raise NotImplementedError

    def edit(self, job: Job, config) -> dict:
        return Trainer(job, config, self).run()

    head = "train"  # what the loss keeps of the logits, for the memory plan ("logits": a loss on hidden states)
    loss_terms = False  # True: loss() yields one term per batch, so one batch's activations are kept at a time

    def footprint(self, model, shapes, config) -> list:
        """One training phase from the selections, made on the plan's meta model (whole parameters; a
        method whose selections depend on data, or hold masks, overrides this), and one forget batch per
        step, plus a retain batch for a method that needs the retain set."""
        from types import SimpleNamespace

        names = dict.fromkeys(model.names(self.parts(config)))
        job = SimpleNamespace(model=model.model, model_map=model.map, original=names, seed=0)
        sizer = SimpleNamespace(job=job, model=model.model, params=dict(model.model.named_parameters()), config=config)
        kinds = {}
        for kind, selection in self.selections(sizer, config).items():
            if any(mask is not None for mask in selection.masks.values()):
                raise MmeditError(f"{self.name}: selections with masks need a footprint() of their own")
            kinds[kind] = {name: model.numel[name] for name in selection.masks}
        form = largest_form(config.forms)
        steps = [("forget", form)] + ([("retain", form)] if self.needs_retain else [])
        return training_phases(model, shapes, config, kinds, steps, head=self.head, one_at_a_time=self.loss_terms)
