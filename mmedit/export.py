"""A delta as a PEFT LoRA adapter (adapter_model.safetensors + adapter_config.json) that *is* the delta.

A change of k rows of a weight is exactly rank k: W' = W + B·A with B the one-hot columns selecting the
rows and A the row differences (columns: A one-hot, B the column differences). Every module gets its own
rank through PEFT's rank_pattern, with alpha = rank, so PEFT's scaling alpha / r is exactly 1 (and the
global r = lora_alpha keeps it 1 for readers that ignore the patterns). Bias changes are stored whole,
with bias="all": PEFT loads them over the base model's biases, bit for bit. Element and dense changes have
no exact low rank: they are refused, or with `rank` replaced by their truncated SVD, whose relative
Frobenius error is reported. docs/export.md says what is exact, and how to load and serve the adapter.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmedit.delta import Change, Delta
from mmedit.errors import MmeditError, first_line
from mmedit.safefile import atomic_dir, check_writable

PREFIX = "base_model.model."  # how PeftModel names the base model's modules
ROWS = ("rows", "zeroed_rows")


@dataclass(frozen=True)
class Layout:
    """How a module's LoRA product B·A relates to its weight W, and what PEFT calls A and B."""

    row_axis: int  # the axis of W that is the rows of B·A (Embedding: B·A = W transposed)
    a_key: str
    b_key: str
    exact_axes: tuple[int, ...]  # the axes along which a rows change factors exactly

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """W as the 2-D matrix B·A stands for: rows along row_axis, everything else flattened."""
        return weight.movedim(self.row_axis, 0).reshape(weight.shape[self.row_axis], -1)

    def tensors(self, module: str, a: torch.Tensor, b: torch.Tensor, shape: tuple[int, ...]) -> dict:
        """A [r, cols] and B [rows, r] in PEFT's shapes (a conv's A is a conv, its B a 1x1 conv)."""
        rank, trailing = a.shape[0], shape[2:] if self.a_key.endswith(".weight") else ()
        return {f"{PREFIX}{module}.{self.a_key}": a.reshape(rank, *shape[1:]) if trailing else a,
                f"{PREFIX}{module}.{self.b_key}": b.reshape(*b.shape, *(1,) * len(trailing))}


_LINEAR = Layout(0, "lora_A.weight", "lora_B.weight", (0, 1))
LAYOUTS = {torch.nn.Linear: _LINEAR, torch.nn.Embedding: Layout(1, "lora_embedding_A", "lora_embedding_B", (0, 1)),
           torch.nn.Conv2d: Layout(0, "lora_A.weight", "lora_B.weight", (0,)),
           torch.nn.Conv3d: Layout(0, "lora_A.weight", "lora_B.weight", (0,))}


@dataclass
class Export:
    """What to_peft wrote: the adapter folder, each module's rank, the biases stored whole, and the
    relative Frobenius error of every tensor approximated by its truncated SVD (exact ones are absent)."""

    path: Path
    ranks: dict[str, int] = field(default_factory=dict)
    biases: list[str] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)


def to_peft(delta: Delta | str | Path, out: str | Path, *, base: torch.nn.Module | str | Path | None = None,
            rank: int | None = None, force: bool = False) -> Export:
    """Write `delta` as a PEFT LoRA adapter folder `out` (atomically; an existing one only with force).

    `base` (a model, or a checkpoint folder / cached hub id) is checked to be the delta's base model
    (names, shapes and the original values) and gives the module types and the whole biases; without it,
    the module types come from the config of the base model the delta names (no weights read), and a bias
    change the delta does not store whole is refused. `rank` allows element and dense changes, as their
    truncated SVD of at most that rank; without it they are refused.
    """
    out = check_writable(out, force)  # before any work
    if rank is not None and rank < 1:
        raise MmeditError(f"--rank must be at least 1, got {rank}")
    delta = delta if isinstance(delta, Delta) else Delta.load(delta)
    model, has_weights = _base(delta, base)
    _check_fits(delta, model, base)
    owners = _owners(model)
    result, tensors, biases = Export(Path(out)), {}, {}
    for name, change in delta.changes.items():
        module, _, attribute = name.rpartition(".")
        shared = owners[id(model.get_parameter(name))]
        if len(shared) > 1:
            raise MmeditError(f"{name} is shared by {' and '.join(shared)} (tied weights): a LoRA adapter cannot "
                              "express its change exactly once merged; use mmedit merge")
        if attribute == "bias":
            biases[name] = change
            continue
        layout = LAYOUTS.get(type(model.get_submodule(module))) if attribute == "weight" else None
        if layout is None:
            raise MmeditError(f"{name}: mmedit exports no {type(model.get_submodule(module)).__name__} {attribute} "
                              "(it exports the weights of plain Linear, Embedding and Conv2d/3d modules, and biases; "
                              "use mmedit merge)")
        if change.kind in ROWS and change.axis in layout.exact_axes:
            a, b = _rows_factors(change, layout)
        elif rank is None:
            raise MmeditError(f"{name}: a {change.kind} change has no exact low-rank form; pass --rank R for its "
                              "truncated SVD (the relative error is printed), or use mmedit merge")
        else:
            a, b, result.errors[name] = _svd_factors(change, layout, rank)
        tensors.update(layout.tensors(module, a, b, change.shape))
        result.ranks[module] = a.shape[0]
    if not result.ranks:
        raise MmeditError(f"{delta.source} changes only biases; a LoRA adapter needs at least one weight to carry")
    tensors.update(_whole_biases(biases, _new_biases(delta, model, biases) if has_weights else {}, set(result.ranks)))
    result.biases = sorted(biases)
    _write(out, tensors, _config(delta, model, result, bool(biases)), delta, force)
    return result


def _base(delta: Delta, base) -> tuple[torch.nn.Module, bool]:
    """(the base model, whether it holds weights): the given one, loaded from disk, or built on the meta
    device from the config of the base model the delta's header names."""
    if isinstance(base, torch.nn.Module):
        return base, True
    if base is not None:
        from mmedit.loading import load_model

        return load_model(base, device="cpu"), True
    named = (delta.provenance.get("base_model") or {}).get("name_or_path")
    if not named:
        raise MmeditError(f"{delta.source} does not name its base model; pass --base MODEL")
    from transformers import AutoConfig, AutoModelForImageTextToText

    folder = Path(named).expanduser()
    try:
        config = AutoConfig.from_pretrained(folder if folder.is_dir() else named, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(config), False
    except (OSError, ValueError) as error:
        raise MmeditError(f"the base model {named} that {delta.source} names is not readable here "
                          f"({first_line(error)}); pass --base MODEL") from None


def _check_fits(delta: Delta, model: torch.nn.Module, base) -> None:
    """Every tensor of the delta is a parameter of the base model with the delta's shape and dtype."""
    what = "its base model" if base is None else str(base) if not isinstance(base, torch.nn.Module) else "the base model"
    parameters = dict(model.named_parameters())
    for name, change in delta.changes.items():
        parameter = parameters.get(name)
        if parameter is None:
            raise MmeditError(f"{delta.source} does not fit {what}: it has no parameter {name} (a delta for another "
                              "model?); nothing written")
        if tuple(parameter.shape) != change.shape or parameter.dtype != change.dtype:
            raise MmeditError(f"{delta.source} does not fit {what}: {name} is {parameter.dtype}{list(parameter.shape)} "
                              f"there but {change.dtype}{list(change.shape)} in the delta (made at another --dtype? "
                              "mmedit.export.to_peft(delta, out, base=MODEL loaded at the delta's dtype) takes it); "
                              "nothing written")


def _owners(model: torch.nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> the modules holding it (more than one: tied weights)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for parameter in module._parameters.values():
            if parameter is not None:
                owners.setdefault(id(parameter), []).append(name)
    return owners


def _dtype(change: Change) -> torch.dtype:
    return torch.float64 if change.dtype == torch.float64 else torch.float32


def _rows_factors(change: Change, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact (A, B) of k changed slices: along the product's rows, B one-hot and A the differences;
    along its columns, A one-hot and B the differences."""
    dtype, index = _dtype(change), change.index
    slices = (change.new_values().to(dtype) - change.old.to(dtype)).movedim(change.axis, 0)
    size, k = change.shape[change.axis], index.numel()
    one_hot = torch.zeros(size, k, dtype=dtype)
    one_hot[index, torch.arange(k)] = 1
    if change.axis == layout.row_axis:
        return slices.reshape(k, -1).contiguous(), one_hot  # movedim leaves a view safetensors cannot save
    return one_hot.T.contiguous(), slices.reshape(k, -1).T.contiguous()


def _difference(change: Change) -> torch.Tensor:
    """new - old over the whole tensor (zero where the delta touches nothing)."""
    dtype, whole = _dtype(change), torch.zeros(change.shape, dtype=_dtype(change))
    values = change.new_values().to(dtype) - change.old.to(dtype)
    if change.kind == "dense":
        return values
    if change.kind == "elements":
        return whole.view(-1).index_copy_(0, change.index, values).view(change.shape)
    return whole.index_copy_(change.axis, change.index, values)


def _svd_factors(change: Change, layout: Layout, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The truncated SVD (A, B) of the difference, and its relative Frobenius error."""
    matrix = layout.matrix(_difference(change))
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    kept = min(rank, s.numel())
    total = float(s.square().sum())
    error = math.sqrt(float(s[kept:].square().sum()) / total) if total else 0.0
    return (vh[:kept].to(matrix.dtype).contiguous(), (u[:, :kept] * s[:kept]).to(matrix.dtype).contiguous(),
            error)


def _new_biases(delta: Delta, model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    """The biases `names` with the delta applied; applying checks every original value (the delta is
    this model's), and the model is as it was afterwards."""
    with delta.applied(model):
        return {name: model.get_parameter(name).detach().cpu().clone() for name in names}


def _whole_biases(biases: dict[str, Change], found: dict[str, torch.Tensor],
                  lora_modules: set[str]) -> dict[str, torch.Tensor]:
    """The new bias vectors, whole (from the base model, else from a delta that stores them whole), under
    PEFT's names: a LoRA module's bias lives in its base_layer."""
    found = dict(found)
    for name, change in biases.items():
        if name not in found:
            if change.touched != math.prod(change.shape):
                raise MmeditError(f"{name}: the adapter stores whole biases and the delta holds {change.touched} of "
                                  f"its {math.prod(change.shape)} values; pass --base MODEL")
            found[name] = torch.empty(change.shape, dtype=change.dtype)
            change.write(found[name], change.index, change.new_values())
    renamed = {}
    for name, vector in found.items():
        module = name.rpartition(".")[0]
        renamed[f"{PREFIX}{module}{'.base_layer' if module in lora_modules else ''}.bias"] = vector.contiguous()
    return renamed


def _config(delta: Delta, model: torch.nn.Module, result: Export, with_biases: bool):
    from peft import LoraConfig

    patterns = {re.escape(module): rank for module, rank in sorted(result.ranks.items())}
    top = max(result.ranks.values())
    return LoraConfig(r=top, lora_alpha=top, rank_pattern=patterns, alpha_pattern=dict(patterns),
                      target_modules=sorted(result.ranks), lora_dropout=0.0, use_rslora=False,
                      bias="all" if with_biases else "none", inference_mode=True,
                      base_model_name_or_path=getattr(model.config, "_name_or_path", None) or
                      (delta.provenance.get("base_model") or {}).get("name_or_path"))


def _write(out: Path, tensors: dict[str, torch.Tensor], config, delta: Delta, force: bool) -> None:
    from safetensors.torch import save_file

    with atomic_dir(out, force=force) as temp:
        save_file(tensors, temp / "adapter_model.safetensors",
                  metadata={"format": "pt", "mmedit_delta": delta.checksum})
        config.save_pretrained(temp)
