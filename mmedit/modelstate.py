"""One context manager that puts a model's mutable flags back: train/eval mode of every module,
requires_grad of every parameter, and (optionally) clears the .grad the block left behind.

    with preserved(model):
        model.train(); [p.requires_grad_(False) for p in model.parameters()]
        ...                                         # whatever happens, the flags are restored on exit
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def preserved(model: torch.nn.Module, *, clear_grads: bool = True) -> Iterator[torch.nn.Module]:
    """Restore every module's training flag and every parameter's requires_grad on exit (error or not);
    with clear_grads, also drop the gradients the block accumulated (p.grad = None)."""
    training = [module.training for module in model.modules()]
    flags = [parameter.requires_grad for parameter in model.parameters()]
    try:
        yield model
    finally:
        for module, mode in zip(model.modules(), training):
            module.training = mode
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
            if clear_grads:
                parameter.grad = None
