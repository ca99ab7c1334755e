"""Deltas: small, exact, reversible edits of a model's tensors, stored as one safetensors file.

    delta = Delta.load("forget.safetensors")
    with delta.applied(model): ...                # or delta.apply(model) / delta.revert(model)
    model = mmedit.load("llava-dir", deltas=["forget.safetensors"])

The file format is specified in docs/delta-format.md; checkpoint folders (merge, revert, diff) are
mmedit.checkpoint's.
"""
from mmedit.delta.change import Change, encode
from mmedit.delta.core import Delta, applied_stack
from mmedit.delta.names import base_name

__all__ = ["Change", "Delta", "applied_stack", "base_name", "encode"]
