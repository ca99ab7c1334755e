"""Parameter names: a delta is keyed by the bare model's names, whatever wraps the model it meets
(PEFT, DDP/FSDP, activation checkpointing, torch.compile)."""
from __future__ import annotations

import itertools

import torch

from mmedit.errors import MmeditError

# Path components that wrappers insert: PEFT's LoRA layer, FSDP, activation checkpointing, torch.compile.
_WRAPPER_PARTS = {"base_layer", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}
_WRAPPER_PREFIXES = ("module.", "base_model.model.")  # DDP/FSDP, PeftModel


def base_name(name: str) -> str:
    """The parameter's name in the bare model: `module.`, `base_model.model.`, `.base_layer` etc. removed."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside PEFT, DDP/DataParallel and torch.compile wrappers."""
    while True:
        if callable(getattr(model, "get_base_model", None)):  # peft.PeftModel
            inner = model.get_base_model()
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            inner = model.module
        else:
            inner = getattr(model, "_orig_mod", model)
        if inner is model:
            return model
        model = inner


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    """Every parameter and buffer, by its own name and by its base name (None where two tensors share one)."""
    own = dict(itertools.chain(model.named_parameters(remove_duplicate=False),
                               model.named_buffers(remove_duplicate=False)))
    found: dict[str, torch.Tensor | None] = dict(own)
    for name, tensor in own.items():
        base = base_name(name)
        if base in own:
            continue
        found[base] = None if base in found and found[base] is not tensor else tensor
    return found


def find(tensors: dict[str, torch.Tensor | None], name: str, source: str) -> torch.Tensor:
    """`name` in model_tensors' answer; MmeditError (prefixed with `source`) when absent or ambiguous."""
    if name not in tensors:
        raise MmeditError(f"{source}: parameter {name} is not in the model (a delta for another architecture?)")
    if tensors[name] is None:
        raise MmeditError(f"{source}: parameter {name} is ambiguous in the wrapped model (two tensors unwrap to it)")
    return tensors[name]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by base name, each tensor once (tied weights keep their first name)."""
    found, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        key = base_name(name)
        if key in found:
            raise MmeditError(f"two tensors of the model unwrap to the same name {key} ({name})")
        found[key] = tensor
    return found


def locate(model: torch.nn.Module | None, names) -> dict[str, tuple[str, int | None] | None]:
    """(part, layer) of each name per mmedit.arch, or {} when the model's family is not mapped."""
    if model is None:
        return {}
    try:
        from mmedit.arch import model_map

        mapped = model_map(unwrap(model))
    except MmeditError:  # not a transformers model, or a family mmedit does not map
        return {}
    return {name: mapped.part_of(name) for name in names}
