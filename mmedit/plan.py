"""Memory plans: the peak bytes a run needs per device, predicted from the model's config alone.

    config = read_config("llava-hf/llava-1.5-7b-hf")             # config.json only, no weights
    model = Sized(config, "bfloat16", "cuda")                     # built on the meta device
    plan = plan_trace(model, shapes_from_config(model, 4), grads=True)
    plan.peak_bytes, plan.breakdown, plan.per_device
    check_fits(plan, available_bytes("cuda"))                      # one MmeditError line if it cannot fit

A plan is a list of phases (tracing, Fisher, training, ...), each a breakdown of the bytes it holds at its
peak: weights, gradients, optimizer state, original values kept for the delta, statistics (Fisher...),
θ₀ quantities (references), activations and the runtime's own (CUDA context, kernels' workspaces); the
peak is the largest phase. Bytes held off the model's device (originals and references kept in CPU
memory beside a GPU) are listed per device; on a CPU everything is the same memory. What a plugin holds
it declares itself (Plugin.footprint, which builds the phases from these pieces); this module never
imports a plugin.

Activations are what autograd keeps for the backward pass (plus the logits and the loss's float32
copies), per token and decoder layer: a (hidden width) + b (MLP width) bytes, with a and b measured with
torch.autograd.graph.saved_tensors_hooks on Llama-style (gated MLP) and CLIP-style layers in torch 2.13 /
transformers 5.23 with SDPA attention (no T^2 term): ACTIVATION below. A layer whose weights train keeps
more than one that only passes gradients on ("inputs"), and a pass without gradients keeps none.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mmedit.errors import MmeditError

ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2}
TERMS = ("weights", "gradients", "optimizer", "originals", "statistics", "references", "activations", "runtime")
# bytes per token and layer: (per hidden unit, per MLP unit), by layer kind, what needs gradients, element size
ACTIVATION = {
    ("gated", "weights", 4): (40, 16), ("gated", "weights", 2): (24, 8),
    ("gated", "inputs", 4): (24, 12), ("gated", "inputs", 2): (16, 6),
    ("plain", "weights", 4): (32, 12), ("plain", "weights", 2): (16, 6),
    ("plain", "inputs", 4): (24, 8), ("plain", "inputs", 2): (12, 4),
}
RUNTIME = {"cpu": 24 << 20, "cuda": 1 << 30}  # CPU: measured (BENCHMARKS.md, Memory); a CUDA context (estimate)
HALF_KERNELS = 20 << 20  # CPU, 2-byte dtypes: the half-precision (oneDNN) kernels' own memory, measured
FIT = 0.9  # a run whose plan exceeds this share of the free memory does not fit (the plan is an estimate)
TEXT_TOKENS = 48  # config-only plans: a question + short answer with the chat template, per row
QWEN_STYLE_IMAGE = 448  # config-only plans: the side of an image where the vision tower takes any size


def read_config(model: str, trust_remote_code: bool = False):
    """The transformers config of a local model directory or hub id (config.json only)."""
    from mmedit.loading import _config

    return _config(model, trust_remote_code)[2]


@dataclass(frozen=True)
class Batch:
    """The geometry of one batch: rows, LLM positions per row, images and vision positions per image."""

    rows: int
    tokens: int
    images: int
    patches: int


class Sized:
    """A model's shapes without its weights: built from the config on the meta device, with its ModelMap."""

    def __init__(self, config, dtype: str = "float32", device: str = "cpu"):
        from transformers import AutoModelForImageTextToText

        from mmedit.arch import model_map

        if dtype not in ELEMENT:
            raise MmeditError(f"unknown dtype {dtype!r}; use {', '.join(ELEMENT)}")
        if device.split(":")[0] not in RUNTIME:
            raise MmeditError(f"unknown device {device!r}; use cpu or cuda")
        self.config, self.dtype, self.device = config, dtype, device.split(":")[0]
        self.element = ELEMENT[dtype]
        with torch.device("meta"):
            self.model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
        self.map = model_map(self.model)
        self.numel = {name: p.numel() for name, p in self.model.named_parameters()}
        self.params = sum(self.numel.values())
        self.cls = int(any(name.endswith("class_embedding") for name in self.numel))  # CLIP's extra position

    def bytes(self, names) -> int:
        return sum(self.numel[name] for name in names) * self.element

    def names(self, parts: Sequence[str]) -> list[str]:
        return [name for part in parts for name in self.map.parameters(part)]

    @property
    def vocab(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def hidden(self, part: str) -> int:
        """The hidden width of a part's layers (the input width of its first neuron site's producer)."""
        site = self.map.sites_of(part)[0]
        weight = next(p for p in site.producers if not p.param.endswith("bias"))
        return self.numel[weight.param] // site.width

    def positions(self, part: str, batch: Batch) -> int:
        return batch.rows * batch.tokens if part == "llm" else batch.images * (batch.patches + self.cls)

    def activations(self, batch: Batch, modes: Mapping[str, str], head: str = "train",
                    checkpointing: bool = False) -> int:
        """Bytes one forward (+ backward) of `batch` keeps: modes part -> "weights" (its layers train),
        "inputs" (gradients pass through) or "none"; head: "train" (logits, the loss's float32 log-softmax
        and their gradients), "loss" (the same without a backward), "logits" (the logits only: a loss on
        hidden states), "none". checkpointing: each layer
        keeps its input only, and one layer at a time its activations (recomputed in the backward)."""
        total, largest = 0, 0
        for site in self.map.sites:
            mode = modes.get(site.part, "none")
            if mode == "none":
                continue
            weights = [p for p in site.producers if not p.param.endswith("bias")]
            width = self.numel[weights[0].param] // site.width  # the layer's input width
            kind = "gated" if len(weights) > 1 else "plain"
            per_width, per_mlp = ACTIVATION[kind, mode, self.element]
            layer = self.positions(site.part, batch) * (per_width * width + per_mlp * site.width + 4 * (width // 64 + 2))
            if checkpointing:
                layer, largest = self.positions(site.part, batch) * width * self.element, max(largest, layer)
            total += layer
        total += largest
        logits = batch.rows * batch.tokens * self.vocab
        if head == "train":
            total += logits * (2 * self.element + 8)
        elif head == "loss":
            total += logits * (self.element + 8)
        elif head == "logits":
            total += logits * self.element
        return total


@dataclass
class Shapes:
    """The data's geometry: rows per set; per (set, form) the longest padded LLM length of a batch; vision
    positions per image; answer tokens per row (the longest); `assumed`: what was not measured on data."""

    rows: dict[str, int]
    tokens: dict[tuple[str, str], int]
    patches: int
    answers: int
    assumed: list[str] = field(default_factory=list)

    def batch(self, which: str, form: str, rows: int) -> Batch:
        """A batch of `rows` rows of set `which` in `form` (at most the set's size)."""
        rows = max(1, min(rows, self.rows.get(which) or rows))
        tokens = self.tokens.get((which, form)) or self.tokens.get(("forget", form)) or max(self.tokens.values())
        return Batch(rows, tokens, rows if form == "multimodal" else 0, self.patches)


def shapes_from_config(model: Sized, rows: Mapping[str, int], text_tokens: int = TEXT_TOKENS,
                       answers: int = 16) -> Shapes:
    """Shapes without data: `text_tokens` per row (`answers` of them answer tokens) plus the image tokens
    the config implies."""
    config, assumed = model.config, [f"{text_tokens} text tokens per row, {answers} of them the answer (no data)"]
    vision = getattr(config, "vision_config", None)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if not (isinstance(size, int) and isinstance(patch, int)):
        size, patch = QWEN_STYLE_IMAGE, patch if isinstance(patch, int) else 14
        assumed.append(f"{size} px images (the vision tower takes any size)")
    patches = (size // patch) ** 2
    merge = getattr(vision, "spatial_merge_size", 1) or 1
    image_tokens = next((value for value in (getattr(config, key, None) for key in
                                             ("image_seq_length", "mm_tokens_per_image")) if isinstance(value, int)),
                        patches // merge ** 2)
    tokens = {(which, form): text_tokens + (image_tokens if form == "multimodal" else 0)
              for which in rows for form in ("multimodal", "text")}
    return Shapes(dict(rows), tokens, patches, answers, assumed)


def shapes_from_rows(model: Sized, processor, sets: Mapping[str, Sequence], batch_size: int) -> Shapes:
    """Shapes measured on the data: every set encoded in both forms at `batch_size` rows per batch."""
    from mmedit.data.batches import FORMS, IGNORE, make_batches

    tokens, patches, answers = {}, 0, 0
    patch = getattr(getattr(model.config, "vision_config", None), "patch_size", 14)
    for which, rows in sets.items():
        for form in FORMS:
            usable = longest([row for row in rows if form == "text" or row.image is not None], form, batch_size)
            for batch in make_batches(usable, processor, form, batch_size=batch_size):
                tokens[which, form] = max(tokens.get((which, form), 0), batch.inputs["input_ids"].shape[1])
                answers = max(answers, int((batch.inputs["labels"] != IGNORE).sum(dim=1).max()))
                pixels = batch.inputs.get("pixel_values")
                if pixels is not None:  # [rows, (crops,) 3, H, W], or Qwen's flattened patches
                    grid = pixels.shape[0] // len(batch.rows) if pixels.dim() == 2 else \
                        math.prod(pixels.shape[1:-3]) * (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
                    patches = max(patches, grid)
    if not tokens:
        raise MmeditError("the plan's data sets are empty")
    return Shapes({which: len(rows) for which, rows in sets.items()}, tokens, patches, answers)


CANDIDATES = 2  # batches' worth of rows kept per length key by `longest`


def longest(rows: Sequence, form: str, batch_size: int) -> list:
    """The rows that make a set's longest batches in `form`: the CANDIDATES x batch_size longest by
    question, by answer, by both and (image form) by image area. A batch is padded to its longest row, so
    the largest batch is the largest row's; encoding these instead of every row keeps the plan a fraction of
    a second on thousands of rows (the processor's image work is most of its cost)."""
    keep = CANDIDATES * batch_size
    if len(rows) <= 4 * keep:
        return list(rows)
    question = (lambda row: len(row.text_question)) if form == "text" else (lambda row: len(row.question))
    keys = [question, lambda row: len(row.answer), lambda row: question(row) + len(row.answer)]
    if form != "text":
        keys.append(_image_area)
    chosen = {}
    for key in keys:
        chosen.update((row.id, row) for row in sorted(rows, key=key, reverse=True)[:keep])
    return list(chosen.values())


def _image_area(row) -> int:
    """Width x height from the image file's header (no decoding)."""
    from PIL import Image

    try:
        with Image.open(row.image) as image:
            return image.width * image.height
    except OSError:
        return 0  # an unreadable image fails where the run reads it, with its own message


@dataclass
class Phase:
    """One phase of a run and the bytes it holds at its peak: `terms` on the model's device, `host` in CPU
    memory beside a GPU (the same memory on a CPU run), `disk` in temporary files."""

    name: str
    terms: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    disk: int = 0

    def add(self, term: str, nbytes: int, *, off_device: bool = False) -> Phase:
        if term not in TERMS:
            raise MmeditError(f"unknown memory term {term!r}; terms are {', '.join(TERMS)}")
        where = self.host if off_device else self.terms
        where[term] = where.get(term, 0) + int(nbytes)
        return self


@dataclass
class Plan:
    target: str
    model: Sized
    phases: list[Phase]
    assumed: list[str] = field(default_factory=list)
    placement: dict[str, int] = field(default_factory=dict)  # with a device map: weight bytes per device
    backward: bool = False  # with a device map: a backward passes offloaded layers (their weights held meanwhile)

    def on(self, phase: Phase, device: str) -> dict[str, int]:
        """The phase's bytes on `device` ("cpu" or the model's device), by term."""
        if self.model.device == "cpu":
            merged = dict(phase.terms)
            for term, value in phase.host.items():
                merged[term] = merged.get(term, 0) + value
            return merged
        return dict(phase.terms if device == self.model.device else phase.host)

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda phase: sum(self.on(phase, self.model.device).values()))

    @property
    def peak_bytes(self) -> int:
        return sum(self.breakdown.values())

    @property
    def breakdown(self) -> dict[str, int]:
        on = self.on(self.peak, self.model.device)
        return {term: on.get(term, 0) for term in TERMS}

    @property
    def per_device(self) -> dict[str, int]:
        devices = {self.model.device: max(sum(self.on(p, self.model.device).values()) for p in self.phases)}
        if self.model.device != "cpu":
            devices["cpu"] = max(sum(self.on(p, "cpu").values()) for p in self.phases)
        devices["disk"] = max(phase.disk for phase in self.phases)
        return self._placed(devices) if self.placement else devices

    @property
    def main_device(self) -> str:
        """Where the run computes: a device map's first GPU (its execution device), else the model's device."""
        if not self.placement:
            return self.model.device
        return next((label for label in self.placement if label.startswith("cuda")), "cpu")

    def _placed(self, devices: dict[str, int]) -> dict[str, int]:
        """per_device with a device map: the weights where the map puts them, everything else the model's
        device holds (gradients, optimizer, activations, statistics, runtime) on the execution device."""
        placed = dict(self.placement)
        rest = devices.pop(self.model.device) - self.model.bytes(self.model.numel)
        if self.backward:  # autograd keeps each onloaded layer's weights until the backward has passed it
            rest += sum(nbytes for label, nbytes in placed.items()
                        if label == "disk" or label == "cpu" and self.main_device != "cpu")
        placed[self.main_device] = placed.get(self.main_device, 0) + rest
        for label, nbytes in devices.items():
            placed[label] = placed.get(label, 0) + nbytes
        return placed

    def to_json(self) -> dict:
        return {"target": self.target, "model_type": self.model.config.model_type, "params": self.model.params,
                "dtype": self.model.dtype, "device": self.model.device, "peak_bytes": self.peak_bytes,
                "peak_phase": self.peak.name, "breakdown": self.breakdown, "per_device": self.per_device,
                **({"device_map": dict(self.placement)} if self.placement else {}),
                "phases": [{"name": p.name, self.model.device: self.on(p, self.model.device),
                            **({"cpu": self.on(p, "cpu")} if self.model.device != "cpu" else {}), "disk": p.disk}
                           for p in self.phases],
                "assumed": self.assumed}


def base_phase(model: Sized, name: str) -> Phase:
    """A phase that holds the weights and the runtime."""
    runtime = RUNTIME[model.device] + (HALF_KERNELS if model.device == "cpu" and model.element == 2 else 0)
    return Phase(name).add("weights", model.bytes(model.numel)).add("runtime", runtime)


def site_bytes(model: Sized, batch: Batch, parts: Sequence[str]) -> int:
    """The neuron values of every site of `parts` for one batch (what a trace with gradients reads twice:
    the values and their gradients)."""
    return sum(model.positions(site.part, batch) * site.width * model.element
               for site in model.map.sites if site.part in parts)


def graph_modes(trained: Sequence[str], form: str) -> dict[str, str]:
    """Per part, what a training step's backward needs: "weights" where parameters train, "inputs" after
    the first part that trains (the gradient passes through), "none" before it or where a text-only batch
    does not run (vision, projector)."""
    from mmedit.arch import PARTS

    modes, started = {}, False
    for part in PARTS:
        started = started or part in trained
        runs = form == "multimodal" or part == "llm"
        modes[part] = ("weights" if part in trained else "inputs") if started and runs else "none"
    return modes


def plan_trace(model: Sized, shapes: Shapes, *, batch_size: int = 4, grads: bool = False,
               parts: Sequence[str] = ("vision", "projector", "llm"), forms: Sequence[str] = ("multimodal", "text"),
               which: str = "forget") -> Plan:
    """`mmedit trace`: one batch at a time; with gradients, autograd keeps what the activations' gradients
    need (no weight gradients), and the site values and their gradients are read."""
    phases = [trace_phase(model, shapes.batch(which, form, batch_size), parts, grads, f"trace {form}")
              for form in forms]
    return Plan("trace", model, phases, shapes.assumed)


def trace_phase(model: Sized, batch: Batch, parts: Sequence[str], grads: bool, name: str) -> Phase:
    """One traced batch: the site values kept for the statistics (and their gradients, with autograd's
    activations for them), the logits with the loss's float32 copies, and the statistics."""
    phase = base_phase(model, name).add("statistics", stats_bytes(model, parts))
    if grads:
        return phase.add("activations", model.activations(batch, {part: "inputs" for part in parts}, "loss")
                         + 2 * site_bytes(model, batch, parts))
    return phase.add("activations", model.activations(batch, {}, "loss") // 2 + site_bytes(model, batch, parts))


def stats_bytes(model: Sized, parts: Sequence[str], forms: int = 2, groups: int = 5) -> int:
    """TraceStats: float64 blocks of at most 9 fields x groups x width per site and form."""
    return sum(9 * groups * forms * site.width * 8 for site in model.map.sites if site.part in parts)


def plan_eval(model: Sized, shapes: Shapes, *, batch_size: int = 16, max_new_tokens: int = 16) -> Plan:
    """`mmedit eval`: forward passes without gradients, and generation with a key/value cache."""
    batch = shapes.batch("forget", "multimodal", batch_size)
    config = getattr(model.config, "text_config", model.config)
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // getattr(config, "num_attention_heads", 1)
    cache = 2 * len(model.map.residual) * batch.rows * (batch.tokens + max_new_tokens) * heads * head_dim * model.element
    phase = base_phase(model, "evaluate").add("activations", model.activations(batch, {}, "loss") // 2 + cache)
    return Plan("eval", model, [phase], shapes.assumed)


def plan_merge(model: Sized) -> Plan:
    """`mmedit merge`: the checkpoint loaded, the deltas applied in place, the folder written."""
    largest = max(model.numel.values()) * model.element
    phase = base_phase(model, "merge").add("activations", largest)
    return Plan("merge", model, [phase], ["plus the deltas' own size (mmedit inspect shows it)"])


def plan_plugin(target: str, footprint, model: Sized, shapes: Shapes, config, memory: int | None = None) -> Plan:
    """A plugin's plan: footprint(model, shapes, config) -> phases (Plugin.footprint). An option
    checkpointing="auto" is planned off, and on where that plan exceeds FIT of `memory` (the device's
    free bytes; None: unknown, so off)."""
    auto = getattr(config, "checkpointing", None) == "auto"
    planned = Plan(target, model, _phases(target, footprint, model, shapes, config, "off" if auto else None),
                   list(shapes.assumed))
    if auto and memory is not None and planned.peak_bytes > FIT * memory:
        on = _phases(target, footprint, model, shapes, config, "on")
        planned = Plan(target, model, on, planned.assumed + [f"checkpointing=auto: on (without it the plan exceeds "
                                                             f"{FIT:.0%} of {human(memory)})"])
    elif auto:
        planned.assumed.append("checkpointing=auto: off" + ("" if memory is not None else " (no device size given)"))
    return planned


def _phases(target: str, footprint, model: Sized, shapes: Shapes, config, checkpointing: str | None) -> list[Phase]:
    if checkpointing is not None:
        config = dataclasses.replace(config, checkpointing=checkpointing)
    phases = list(footprint(model, shapes, config))
    if not phases:
        raise MmeditError(f"{target}: its footprint declares no phase")
    return phases


def plan_for(target: str, model: str, *, dtype: str = "auto", device: str = "cuda", footprint=None, options=None,
             sets: Mapping[str, Sequence] | None = None, batch_size: int | None = None, grads: bool = False,
             tokens: int = TEXT_TOKENS, rows: int = 40, memory: int | None = None,
             trust_remote_code: bool = False, device_map: str | dict | None = None,
             max_memory: Mapping | None = None) -> Plan:
    """The plan of `target` on `model` (a folder or hub id: its config only). target: "trace", "eval",
    "merge", or a plugin's name with its `footprint` (Plugin.footprint) and configured `options`. `sets`:
    the data ({"forget": rows, "retain": rows}), measured with the model's processor; without it `tokens`
    text tokens and `rows` rows per set are assumed. dtype "auto": the config's. `memory`: the device's
    free bytes (for checkpointing=auto). `device_map` (a strategy or {module: device}) with `max_memory`:
    the weights split per device as the map places them (Plan.placement, per_device)."""
    result = _plan_for(target, model, dtype=dtype, device=device, footprint=footprint, options=options, sets=sets,
                       batch_size=batch_size, grads=grads, tokens=tokens, rows=rows, memory=memory,
                       trust_remote_code=trust_remote_code)
    if device_map is not None:
        result.placement = weights_per_device(result.model, device_map, max_memory)
        result.backward = target not in ("eval", "merge") and (target != "trace" or grads)
        result.assumed.append("with the device map, everything but the weights on its execution device "
                              f"({result.main_device})" + (", where a backward also holds the weights of the "
                                                           "offloaded layers it passes" if result.backward else ""))
    return result


def weights_per_device(model: Sized, device_map: str | dict, max_memory: Mapping | None = None) -> dict[str, int]:
    """Weight bytes per device ("cuda:N", "cpu", "disk") as `device_map` places `model`'s parameters: a map
    {module: device} by each parameter's longest module prefix ("" is the whole model); a strategy (auto,
    balanced, sequential) as accelerate infers it on the meta model from `max_memory` (default: the
    devices' free memory)."""
    if isinstance(device_map, str):
        import logging

        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        no_split = list(getattr(model.model, "_no_split_modules", None) or [])
        budget = dict(max_memory) if max_memory else None
        quiet = logging.getLogger("accelerate.utils.modeling")
        level, _ = quiet.level, quiet.setLevel(logging.ERROR)  # "device N is not available": a plan for elsewhere
        try:
            if device_map != "sequential" and torch.cuda.is_available():  # without GPUs here: filled in order
                budget = get_balanced_memory(model.model, max_memory=budget, no_split_module_classes=no_split)
            device_map = infer_auto_device_map(model.model, max_memory=budget, no_split_module_classes=no_split)
        finally:
            quiet.setLevel(level)
    placed: dict[str, int] = {}
    for name, numel in model.numel.items():
        owner = max((key for key in device_map if key == "" or name == key or name.startswith(key + ".")),
                    key=len, default=None)
        if owner is None:
            raise MmeditError(f"the device map places no module that holds {name}")
        label = device_label(device_map[owner])
        placed[label] = placed.get(label, 0) + numel * model.element
    return placed


def device_label(device) -> str:
    """A device map's value as a device name: a GPU index N -> "cuda:N"; "cpu" and "disk" as they are."""
    return f"cuda:{device}" if type(device) is int else str(device)


def parse_max_memory(text: str) -> dict[int | str, int]:
    """--max-memory "0=20GiB,1=20GiB,cpu=60GiB" -> {0: bytes, 1: bytes, "cpu": bytes}: per device (a GPU
    index N or cuda:N, cpu, disk) the most the device map strategy may place there."""
    budget: dict[int | str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, size = (piece.strip() for piece in item.partition("="))
        if key.startswith("cuda:") and key[5:].isdigit():
            key = key[5:]
        if not sep or not (key.isdigit() or key in ("cpu", "disk")):
            raise MmeditError(f"--max-memory {text!r}: write DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=60GiB "
                              "(a device is a GPU index N, cuda:N, cpu or disk)")
        device = int(key) if key.isdigit() else key
        if device in budget:
            raise MmeditError(f"--max-memory {text!r}: {key} given twice")
        try:
            budget[device] = parse_bytes(size)
        except MmeditError as error:
            raise MmeditError(f"--max-memory {text!r}: {error}") from None
    if not budget:
        raise MmeditError(f"--max-memory {text!r}: no DEVICE=SIZE pair (e.g. 0=20GiB,cpu=60GiB)")
    return budget


def _plan_for(target: str, model: str, *, dtype: str, device: str, footprint, options, sets, batch_size, grads,
              tokens: int, rows: int, memory: int | None, trust_remote_code: bool) -> Plan:
    from mmedit.loading import _config, _processor

    source, loading_options, config = _config(model, trust_remote_code)
    chosen = dtype if dtype != "auto" else str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    sized = Sized(config, chosen, device)
    size = batch_size or getattr(options, "batch_size", None) or {"eval": 16}.get(target, 4)
    if sets:
        try:
            processor = _processor(source, config, loading_options)
        except (OSError, ValueError, ImportError) as error:
            from mmedit.errors import first_line

            raise MmeditError(f"the data's lengths need {model}'s processor: {first_line(error)}") from None
        shapes = shapes_from_rows(sized, processor, sets, size)
    else:
        shapes = shapes_from_config(sized, {"forget": rows, "retain": rows}, text_tokens=tokens)
    if target == "trace":
        return plan_trace(sized, shapes, batch_size=size, grads=grads)
    if target == "eval":
        return plan_eval(sized, shapes, batch_size=size)
    if target == "merge":
        return plan_merge(sized)
    if footprint is None:
        raise MmeditError(f"no plan for {target!r}: targets are trace, eval, merge and the plugins")
    return plan_plugin(target, footprint, sized, shapes, options, memory)


def preflight(target: str, model: str, *, device: str, dtype: str = "auto", **options) -> Plan:
    """For a command, before its weights load: plan_for(target, model, ...) on the device as the command
    resolves it (auto: cuda when available), refused (check_fits) if it cannot fit in that device's free
    memory; returns the plan."""
    from mmedit.loading import resolve_device

    device_map, max_memory = options.pop("device_map", None), options.pop("max_memory", None)
    if device_map is not None:
        return _preflight_placed(target, model, device=device, dtype=dtype, device_map=device_map,
                                 max_memory=max_memory, **options)
    where = resolve_device(device)
    free = available_bytes(str(where))
    result = plan_for(target, model, dtype=dtype, device=where.type, memory=free, **options)
    check_fits(result, free)
    return result


def _preflight_placed(target: str, model: str, *, device: str, dtype: str, device_map, max_memory=None,
                      **options) -> Plan:
    """preflight with a device map: each device it uses checked against its free memory (disk is not). A
    --max-memory bound is the most weight a strategy places on a device, met by construction; what runs
    there besides (activations, gradients, the runtime) may need more, up to the free memory."""
    from mmedit.loading import check_placement

    check_placement(device, device_map, max_memory)
    gpus = [value for value in device_map.values() if type(value) is int] if isinstance(device_map, dict) else \
        [0] if torch.cuda.is_available() else []
    main = device_label(gpus[0]) if gpus else "cpu"
    result = plan_for(target, model, dtype=dtype, device="cuda" if gpus else "cpu", device_map=device_map,
                      max_memory=max_memory, memory=available_bytes(main), **options)
    for label, needed in result.per_device.items():
        if label == "disk":
            continue
        budget = available_bytes(label)
        if needed > budget:
            weights = result.placement.get(label, 0)
            raise MmeditError(f"{target} needs about {human(needed)} on {label} with this device map "
                              f"({human(weights)} of weights), {human(budget)} available; move modules off {label} "
                              "(a lower --max-memory for it, or a device map file), lower --batch-size or --set "
                              "checkpointing=on")
    return result


def human(nbytes: int) -> str:
    value, unit = float(nbytes), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{nbytes} B" if unit == "B" else f"{value:.1f} {unit}"


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
         "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_bytes(text: str) -> int:
    """'80GB', '24GiB', '8e10' -> bytes."""
    import re

    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not found or found.group(2) not in UNITS:
        raise MmeditError(f"cannot read {text!r} as a size; write e.g. 80GB, 24GiB or 8e10")
    return int(float(found.group(1)) * UNITS[found.group(2)])


def available_bytes(device: str) -> int:
    """Free memory on `device`: CUDA's free bytes, or the CPU's MemAvailable."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MmeditError(f"device {device!r}: CUDA is not available here")
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


ADVICE = {"activations": "lower --batch-size or --set checkpointing=on",
          "gradients": "train a narrower scope (--set parts=... or scope=...)",
          "optimizer": "train a narrower scope (--set parts=... or scope=...)",
          "statistics": "narrow the scope (--set scope=... or parts=...)",
          "originals": "run on a GPU (originals stay in CPU memory) or narrow the scope",
          "references": "use fewer retain rows or a lower --batch-size",
          "weights": "use --dtype bfloat16 or a larger device",
          "runtime": "use a larger device"}


def check_fits(plan: Plan, available: int) -> None:
    """Refuse a run the plan says cannot fit: one line with the predicted and available bytes and what to
    change (the advice for the peak phase's largest term)."""
    if plan.peak_bytes <= available:
        return
    breakdown = plan.breakdown
    largest = max((term for term in breakdown if term not in ("weights", "runtime")), key=breakdown.get)
    if breakdown["weights"] > available:
        largest = "weights"
    raise MmeditError(f"{plan.target} needs about {human(plan.peak_bytes)} on {plan.model.device} at its "
                      f"{plan.peak.name} peak ({largest} {human(breakdown[largest])}), {human(available)} available; "
                      f"{ADVICE[largest]}")
