"""apply_plugin: run a plugin on a model and return its edit as a Delta, leaving the model as it was.

The plugin edits the caller's model in place (no second copy of the weights). What it changes is kept
first (job.original, plugins/originals.py: only what the plugin keeps, or the declared parts whole for a
plugin with keeps_originals=False; off the model's device) and written back bit for bit afterwards, on
success and on error alike, together with train/eval modes, requires_grad flags and .grad. Tensors are
watched (storage and in-place version counter): a plugin that writes outside its declared parts, or
inside them without keeping first, is a bug and fails loudly.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mmedit.errors import MmeditError
from mmedit.logs import logging_to
from mmedit.modelstate import preserved
from mmedit.plugins.base import Job, rows_sha256
from mmedit.plugins.originals import Originals
from mmedit.plugins.registry import get, package_of


def apply_plugin(
    name: str,
    model: torch.nn.Module,
    processor,
    forget_rows: Sequence,
    retain_rows: Sequence | None,
    overrides: Mapping[str, object] | None = None,
    seed: int = 0,
    progress: bool = True,
    stats: Mapping | None = None,
    *,
    text_retain_rows: Sequence | None = None,
    provenance: Mapping | None = None,
    memo: dict | None = None,
    log_dir: str | Path | None = None,
):
    """Run plugin `name` and return its Delta (provenance: plugin, config, seed, data hashes, base model,
    library versions). `model` is unchanged afterwards. `stats`: precomputed mmedit.trace.TraceStats by the
    keys the plugin documents. `text_retain_rows`: rows whose text form the plugin preserves (default: the
    forget and retain rows). `provenance`: extra header entries (the CLI adds file paths and hashes).
    `memo`: a dict shared by several calls on the same base model and data, so that statistics one edit
    computed (traces, Fisher, paths) are reused by the next whose options they depend on are the same.
    `log_dir`: a TensorBoard run folder for the training steps (mmedit.logs)."""
    from mmedit.arch import PARTS, model_map
    from mmedit.delta import Delta

    plugin = get(name)
    config = plugin.configure(overrides)
    plugin.check_stats_keys(stats or {})
    if not forget_rows:
        raise MmeditError(f"{name}: the forget set is empty")
    if plugin.needs_retain and not retain_rows:
        raise MmeditError(f"{name}: needs a retain set (--retain), and none was given")
    forget, retain = list(forget_rows), list(retain_rows or [])
    text_retain = list(text_retain_rows) if text_retain_rows is not None else forget + retain
    mapping = model_map(model)
    parts = tuple(plugin.parts(config))
    if not parts or set(parts) - set(PARTS):
        raise MmeditError(f"{name}: declares parts {list(parts)}; parts are {', '.join(PARTS)}")

    declared = {n: p for n, p in model.named_parameters() if (mapping.part_of(n) or (None,))[0] in parts}
    original = Originals(declared)
    watched = _watch(model, declared)
    data = {key: {"rows": len(rows), "sha256": rows_sha256(rows)}
            for key, rows in (("forget", forget), ("retain", retain), ("text_retain", text_retain))}
    if memo is not None:  # statistics stay valid for this plugin, these weights, this seed and these data
        scope = (name, seed, _fingerprint(model), *(entry["sha256"] for entry in data.values()))
        memo = memo.setdefault(scope, {})
    job = Job(model, processor, mapping, forget, retain, text_retain, seed, progress, original, stats or {}, memo,
              stats_keys=tuple(plugin.stats_keys))
    try:
        if not plugin.keeps_originals:
            for n in declared:
                original.keep(n)
        header = {"plugin": name, "version": plugin.version, "config": dataclasses.asdict(config), "seed": seed,
                  "data": data, **(provenance or {})}
        with preserved(model), torch.random.fork_rng(devices=_cuda_devices(model)), logging_to(log_dir, header):
            torch.manual_seed(seed)
            report = plugin.edit(job, config)
        moved = [n for n, mark in _watch(model, declared).items() if watched[n] != mark]
        if moved:
            raise MmeditError(f"plugin {name} changed {moved[0]}, outside its declared parts {', '.join(parts)} "
                              "(a plugin bug: that tensor is not restored)")
        unkept = original.unkept_changes()
        if unkept:
            raise MmeditError(f"plugin {name} changed {unkept[0]} without keeping its original values first "
                              "(a plugin bug: call job.original.keep before changing; that tensor is not restored)")
        record = {
            "plugin": {"name": name, "version": plugin.version, "package": package_of(name)},
            "config": dataclasses.asdict(config),
            "seed": seed,
            "data": data,
            "report": report or {},
        }
        record.update(provenance or {})
        return Delta.from_changes(original.changes(), provenance=record, model=model)
    finally:
        original.restore()


def _fingerprint(model: torch.nn.Module) -> str:
    """A digest of the weights (per tensor: float64 sum and norm) that tells a memo the base model changed,
    e.g. a delta applied between two edits; computed on the tensors' own device without copying them."""
    from mmedit.loading import offloaded_values

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            tensor = offloaded_values(model, tensor, name)  # an offloaded one's values, where they live
            if tensor.is_floating_point() or tensor.is_complex():
                numbers = (tensor.sum(dtype=torch.float64), torch.linalg.vector_norm(tensor, dtype=torch.float64))
            else:
                numbers = (tensor.sum(), tensor.numel())
            digest.update(f"{name}:{tuple(tensor.shape)}:{[float(x) for x in numbers]};".encode())
    return digest.hexdigest()


def _watch(model: torch.nn.Module, declared: Mapping) -> dict[str, tuple[int, int]]:
    """(storage address, in-place version) of every tensor outside the declared parts; not of offloaded
    (meta) ones, which accelerate replaces at every forward and whose values are not on the model."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return {n: (t.data_ptr(), t._version) for n, t in tensors if n not in declared and not t.is_meta}


def _cuda_devices(model: torch.nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
