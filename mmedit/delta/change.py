"""Change: the edit of one tensor, and `encode`, which picks its smallest encoding.

A Change holds the original (`old`) and new value of every touched element, addressed in one of four
ways (FIELDS). Reads, writes and comparisons go through integer views of the same bits, so -0.0, NaN
payloads and float8 survive unchanged.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from mmedit.delta.fileformat import SAFETENSORS_DTYPES
from mmedit.errors import MmeditError

# What each kind stores. rows: whole slices along `axis`; zeroed_rows: the same with all-zero new values
# (not stored); elements: flat C-order positions; dense: the whole tensor.
FIELDS = {
    "rows": ("index", "new", "old"),
    "zeroed_rows": ("index", "old"),
    "elements": ("index", "new", "old"),
    "dense": ("new", "old"),
}
_BY_NAME = {str(dtype).removeprefix("torch."): dtype for dtype in SAFETENSORS_DTYPES}
_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Exponent bits that are all set exactly for NaN/inf (float8_e4m3fn has no inf; its NaN is S.1111.111).
_NONFINITE_MASKS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000,
                    torch.float64: 0x7FF0000000000000, torch.float8_e5m2: 0x7C, torch.float8_e4m3fn: 0x7F}
_INT32_LIMIT = 2**31  # indices below this are stored as int32


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory as an integer tensor: equality becomes bit equality and every dtype can be indexed."""
    return tensor.view(_INTS[tensor.element_size()])


def adds_nonfinite(old: torch.Tensor, new: torch.Tensor) -> int:
    """How many elements are NaN/inf in `new` but finite in `old` (a bit test: all exponent bits set)."""
    mask = _NONFINITE_MASKS.get(new.dtype)
    if mask is None:
        return 0
    old_bad, new_bad = (bits(old) & mask) == mask, (bits(new) & mask) == mask
    return int(torch.count_nonzero(new_bad & ~old_bad))  # ~10x faster than .sum() on bool


@dataclass
class Change:
    """The edit of one tensor: its touched elements' original values (`old`) and new values (`new`)."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    old: torch.Tensor
    new: torch.Tensor | None = None  # None for zeroed_rows: the new values are zeros
    index: torch.Tensor | None = None  # int64, sorted and unique; None for dense
    axis: int = 0  # rows and zeroed_rows: the dimension the index selects along

    @property
    def touched(self) -> int:
        return self.old.numel()

    @functools.cached_property
    def adds_nonfinite(self) -> int:
        """Elements this change makes NaN/inf that were finite (computed once: a pass over the values)."""
        return 0 if self.new is None else adds_nonfinite(self.old, self.new)

    def new_values(self, device: torch.device | str = "cpu") -> torch.Tensor:
        if self.new is None:
            return torch.zeros(self.old.shape, dtype=self.dtype, device=device)
        return self.new.to(device)

    def read(self, tensor: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """Bits of the touched elements of `tensor`, laid out like `old`."""
        if self.kind == "dense":
            return bits(tensor)
        if self.kind == "elements":  # gather/scatter_: ~30 % faster than index_select/index_copy_ on 1-D
            return bits(tensor).view(-1).gather(0, index)
        return bits(tensor).index_select(self.axis, index)

    def write(self, tensor: torch.Tensor, index: torch.Tensor | None, values: torch.Tensor) -> None:
        target, values = bits(tensor), bits(values)
        if self.kind == "dense":
            target.copy_(values)
        elif self.kind == "elements":
            target.view(-1).scatter_(0, index, values)
        else:
            target.index_copy_(self.axis, index, values)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        tensors = {f"{name}/old": self.old}
        if self.new is not None:
            tensors[f"{name}/new"] = self.new
        if self.index is not None:
            limit = math.prod(self.shape) if self.kind == "elements" else self.shape[self.axis]
            tensors[f"{name}/index"] = self.index.to(torch.int32) if limit <= _INT32_LIMIT else self.index
        return tensors

    def spec(self) -> dict:
        spec = {"kind": self.kind, "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
                "touched": self.touched}
        if self.kind in ("rows", "zeroed_rows"):
            spec["axis"] = self.axis
        return spec

    @classmethod
    def from_file(cls, name: str, spec: object, tensors: dict[str, torch.Tensor], source: str) -> "Change":
        """Rebuild from a header entry, taking (popping) its tensors out of `tensors`; checks every field."""

        def malformed(why: str) -> MmeditError:
            return MmeditError(f"{source}: entry {name!r} is malformed ({why})")

        if not isinstance(spec, dict) or spec.get("kind") not in FIELDS:
            raise malformed(f"unknown kind {spec.get('kind') if isinstance(spec, dict) else spec!r}")
        kind, shape, dtype = spec["kind"], spec.get("shape"), _BY_NAME.get(spec.get("dtype"))
        if dtype is None or not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise malformed("bad dtype or shape")
        stored = {field: tensors.pop(f"{name}/{field}", None) for field in FIELDS[kind]}
        missing = [field for field, tensor in stored.items() if tensor is None]
        if missing:
            raise malformed(f"tensor {name}/{missing[0]} is missing")
        axis, index = spec.get("axis", 0), stored.get("index")
        if kind == "dense":
            values_shape, limit = list(shape), None
        elif index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
            raise malformed("index must be a 1-D int32/int64 tensor")
        elif kind == "elements":
            values_shape, limit = [index.numel()], math.prod(shape)
        elif isinstance(axis, int) and 0 <= axis < len(shape):
            values_shape, limit = shape[:axis] + [index.numel()] + shape[axis + 1:], shape[axis]
        else:
            raise malformed(f"axis {axis!r} out of range")
        for field in ("old", "new"):
            tensor = stored.get(field)
            if tensor is not None and (tensor.dtype != dtype or list(tensor.shape) != values_shape):
                raise malformed(f"{field} is {tensor.dtype}{list(tensor.shape)}, expected {dtype}{values_shape}")
        if index is not None:
            index = index.to(torch.int64)
            if index.numel() and (index[0] < 0 or index[-1] >= limit or not bool((index[1:] > index[:-1]).all())):
                raise malformed(f"indices must be increasing and within 0..{limit - 1}")
        return cls(kind, tuple(shape), dtype, stored["old"], stored.get("new"), index, axis)


def encode(old: torch.Tensor, new: torch.Tensor) -> Change | None:
    """The smallest Change taking `old` to `new` (None if they are bit-identical); tensors end on the CPU.

    Candidates: slices along each axis (zeroed_rows when all their new values are zero), flat elements,
    dense. Sizes count stored bytes exactly; ties go to the earlier candidate in that order.
    """
    changed = bits(old) != bits(new)
    if not bool(changed.any()):
        return None
    item, dims, nonzero = old.element_size(), range(old.dim()), bits(new) != 0
    candidates = []  # (stored bytes, order, kind, axis, index)
    for axis in dims:
        others = tuple(d for d in dims if d != axis)
        rows = (changed.any(dim=others) if others else changed).nonzero().flatten()
        zeroed = not bool((nonzero.any(dim=others) if others else nonzero)[rows].any())
        slice_bytes = old.numel() // old.shape[axis] * item
        index_bytes = 4 if old.shape[axis] <= _INT32_LIMIT else 8
        size = rows.numel() * (index_bytes + slice_bytes * (1 if zeroed else 2))
        candidates.append((size, len(candidates), "zeroed_rows" if zeroed else "rows", axis, rows))
    flat = changed.reshape(-1).nonzero().flatten()
    index_bytes = 4 if old.numel() <= _INT32_LIMIT else 8
    candidates.append((flat.numel() * (index_bytes + 2 * item), len(candidates), "elements", 0, flat))
    candidates.append((2 * old.numel() * item, len(candidates), "dense", 0, None))
    _, _, kind, axis, index = min(candidates, key=lambda candidate: candidate[:2])

    shape = tuple(old.shape)
    if kind == "dense":
        return Change(kind, shape, old.dtype, old.detach().to("cpu", copy=True).contiguous(),
                      new.detach().to("cpu", copy=True).contiguous())
    if kind == "elements":
        old, new = old.reshape(-1), new.reshape(-1)
    old_values = old.index_select(axis, index).cpu()
    new_values = None if kind == "zeroed_rows" else new.index_select(axis, index).cpu()
    return Change(kind, shape, old.dtype, old_values, new_values, index.cpu(), axis)
