"""Delta: an exact, reversible edit of a model's tensors, one Change per edited tensor.

apply checks every touched element against the original before it writes anything; revert checks the
new values and writes the originals back, both on the model's own device and dtype, all or nothing.
Each model also remembers the deltas applied to it, in order, so that revert takes only the last one,
and a delta made on top of others (provenance "stacks_on": their checksums) applies only right after them.
A Delta is not changed once built (its checksum is computed once).
"""
from __future__ import annotations

import contextlib
import json
import weakref
from pathlib import Path
from typing import Iterator, Mapping

import torch

from mmedit.delta import fileformat
from mmedit.delta.change import Change, adds_nonfinite, bits, encode
from mmedit.delta.names import base_name, find, locate, model_tensors, unwrap, weights
from mmedit.errors import MmeditError
from mmedit.loading import offloaded_values

WRITER_KEYS = ("format", "format_version", "tensors", "counts", "checksum")  # the writer owns these
# Per bare model, (checksum, source) of the deltas applied to it in this process, oldest first. A model
# with none known (loaded from disk, a copy) has an unknown stack: revert then relies on the values alone.
_APPLIED: weakref.WeakKeyDictionary[torch.nn.Module, list[tuple[str, str]]] = weakref.WeakKeyDictionary()


def applied_stack(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(checksum, source) of the deltas applied to `model`, oldest first; the list itself, so that a caller
    who knows the history better (the card of a merged checkpoint) can fill it in. Empty when unknown."""
    return _APPLIED.setdefault(unwrap(model), [])


class Delta:
    """An exact edit of a model: `changes` by base parameter name, plus the provenance that made it."""

    def __init__(self, changes: Mapping[str, Change], provenance: Mapping | None = None, *,
                 where: Mapping[str, tuple[str, int | None] | None] | None = None, source: str = "delta (in memory)"):
        self.changes: dict[str, Change] = dict(changes)
        self.provenance: dict = dict(provenance or {})
        self.where = dict(where or {})  # name -> (part, layer); None where the model map puts it in no part
        self.source = source  # for error messages: the file it came from
        self._checksum: str | None = None  # computed on first use; a loaded delta takes its file's
        reserved = [key for key in WRITER_KEYS if key in self.provenance]
        if reserved:
            raise MmeditError(f"provenance key {reserved[0]!r} is reserved for the delta writer")
        try:
            json.dumps(self.provenance)
        except (TypeError, ValueError) as error:
            raise MmeditError(f"provenance is not JSON-serialisable: {error}") from None

    # ---- building ----------------------------------------------------------------------------------
    @classmethod
    def from_changes(cls, changes: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                     provenance: Mapping | None = None, model: torch.nn.Module | None = None,
                     allow_nonfinite: bool = False) -> "Delta":
        """{parameter name: (original tensor, new tensor)} -> Delta, each tensor in its smallest encoding.

        Bit-identical pairs are dropped. `model` (the base) only places tensors in parts and layers.
        """
        encoded: dict[str, Change] = {}
        seen: set[str] = set()
        with torch.no_grad():
            for name, (old, new) in changes.items():
                key = base_name(name)
                if key in seen:
                    raise MmeditError(f"{name}: two entries unwrap to the same parameter {key}")
                seen.add(key)
                if old.shape != new.shape or old.dtype != new.dtype:
                    raise MmeditError(f"{name}: original is {old.dtype}{list(old.shape)} "
                                      f"but new is {new.dtype}{list(new.shape)}")
                if old.dtype not in fileformat.SAFETENSORS_DTYPES:
                    raise MmeditError(f"{name}: dtype {old.dtype} cannot be stored in a delta")
                new = new.to(old.device)
                if not allow_nonfinite and (bad := adds_nonfinite(old, new)):
                    raise MmeditError(f"{name}: the new values put NaN/inf in {bad} finite element(s); "
                                      "pass allow_nonfinite=True (--allow-nonfinite) to keep them")
                change = encode(old, new)
                if change is not None:
                    encoded[key] = change
        if model is not None:
            from mmedit.provenance import model_identity

            provenance = {"base_model": model_identity(unwrap(model)), **(provenance or {})}
        return cls(encoded, provenance, where=locate(model, encoded))

    @classmethod
    def from_state_dicts(cls, base: Mapping[str, torch.Tensor], edited: Mapping[str, torch.Tensor], *,
                         provenance: Mapping | None = None, model: torch.nn.Module | None = None,
                         allow_nonfinite: bool = False) -> "Delta":
        """Diff two state dicts with the same keys."""
        odd = sorted(set(base) ^ set(edited))
        if odd:
            side = "base" if odd[0] in base else "edited"
            raise MmeditError(f"{odd[0]} is in the {side} weights but not in the other")
        return cls.from_changes({name: (base[name], edited[name]) for name in base}, provenance=provenance,
                                model=model, allow_nonfinite=allow_nonfinite)

    @classmethod
    def from_models(cls, base: torch.nn.Module, edited: torch.nn.Module, *, provenance: Mapping | None = None,
                    allow_nonfinite: bool = False) -> "Delta":
        """Diff two models of the same architecture (any device; wrapped or not)."""
        return cls.from_state_dicts(weights(base), weights(edited), provenance=provenance, model=base,
                                    allow_nonfinite=allow_nonfinite)

    @classmethod
    def zeroed_rows(cls, model: torch.nn.Module, rows: Mapping[str, object], *, axes: Mapping[str, int] | None = None,
                    provenance: Mapping | None = None) -> "Delta":
        """Zero slices: {parameter: indices along axes.get(parameter, 0)} (pruning neurons: rows of the
        up/gate projections, axis 1 of the down projection)."""
        from mmedit.provenance import model_identity

        tensors, changes = model_tensors(model), {}
        with torch.no_grad():
            for name, indices in rows.items():
                tensor = offloaded_values(model, find(tensors, name, "zeroed_rows"), name)  # where its values live
                axis = (axes or {}).get(name, 0)
                if not 0 <= axis < tensor.dim():
                    raise MmeditError(f"{name}: axis {axis} out of range for shape {list(tensor.shape)}")
                index = torch.as_tensor(indices, dtype=torch.int64).flatten().unique()
                if index.numel() and (index[0] < 0 or index[-1] >= tensor.shape[axis]):
                    raise MmeditError(f"{name}: index out of range 0..{tensor.shape[axis] - 1} along axis {axis}")
                if index.numel():
                    old = tensor.index_select(axis, index.to(tensor.device)).cpu()
                    changes[base_name(name)] = Change("zeroed_rows", tuple(tensor.shape), tensor.dtype, old,
                                                      None, index, axis)
        provenance = {"base_model": model_identity(unwrap(model)), **(provenance or {})}
        return cls(changes, provenance, where=locate(model, changes))

    # ---- files -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Delta":
        """Read and check a delta file (checksum, version, structure); raises MmeditError naming the file."""
        header, tensors = fileformat.read(path)
        specs = header.get("tensors")
        if not isinstance(specs, dict):
            raise MmeditError(f"{path} is corrupt: its header has no tensor table")
        changes = {name: Change.from_file(name, spec, tensors, str(path)) for name, spec in specs.items()}
        if tensors:
            raise MmeditError(f"{path} is corrupt: tensor {sorted(tensors)[0]!r} is not described by the header")
        where = {}
        for name, spec in specs.items():
            if "part" in spec:
                part, layer = spec["part"], spec.get("layer")
                if not (part is None or isinstance(part, str)) or not (
                        layer is None or (type(layer) is int and layer >= 0)):
                    raise MmeditError(f"{path}: entry {name!r} is malformed (part {part!r}, layer {layer!r})")
                where[name] = (part, layer) if part else None
        provenance = {key: value for key, value in header.items() if key not in WRITER_KEYS}
        delta = cls(changes, provenance, where=where, source=str(path))
        delta._checksum = header["checksum"]  # verified by fileformat.read
        return delta

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write atomically (temp file + rename); refuses to replace an existing file unless overwrite."""
        tensors = self._file_tensors()
        return fileformat.write(path, tensors, self._sealed(tensors), overwrite=overwrite)

    def header(self) -> dict:
        """The JSON header exactly as save writes it: writer fields, provenance, tensor table, counts, checksum."""
        return json.loads(self._sealed(self._file_tensors()))

    @property
    def checksum(self) -> str:
        """sha256 over the header and every stored tensor: what identifies the delta in a model's stack."""
        if self._checksum is None:
            self._checksum = self.header()["checksum"]
        return self._checksum

    def _file_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, change in self.changes.items():
            tensors.update(change.file_tensors(name))
        return tensors

    def _sealed(self, tensors: dict[str, torch.Tensor]) -> str:
        from mmedit import __version__
        from mmedit.provenance import library_versions

        header = {"format": fileformat.FORMAT, "format_version": fileformat.FORMAT_VERSION,
                  "mmedit_version": __version__, "libraries": library_versions()}
        header.update(self.provenance)  # a loaded delta keeps the versions that made it
        table = {}
        for name, change in self.changes.items():
            table[name] = change.spec()
            if name in self.where:
                part, layer = self.where[name] or (None, None)
                table[name].update(part=part, layer=layer)
        header["tensors"] = table
        header["counts"] = self.counts()
        return fileformat.seal(header, tensors)

    def counts(self) -> dict:
        """Tensors, touched elements and stored bytes; per part and per layer where the model map placed them."""
        counts = {"tensors": len(self.changes), "elements": self.touched, "bytes": self.nbytes}
        if self.where:
            parts, layers = {}, {}
            for name, change in self.changes.items():
                if name not in self.where:
                    continue
                part, layer = self.where[name] or ("other", None)
                tally = parts.setdefault(part, {"tensors": 0, "elements": 0})
                tally["tensors"] += 1
                tally["elements"] += change.touched
                if layer is not None:
                    layers[f"{part}.{layer}"] = layers.get(f"{part}.{layer}", 0) + change.touched
            counts["parts"], counts["layers"] = parts, layers
        return counts

    @property
    def touched(self) -> int:
        return sum(change.touched for change in self.changes.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._file_tensors().values())

    # ---- models ------------------------------------------------------------------------------------
    def apply(self, model: torch.nn.Module, *, allow_nonfinite: bool = False) -> torch.nn.Module:
        """Write the new values, after checking every touched element holds the original; all or nothing."""
        if not allow_nonfinite:
            for name, change in self.changes.items():
                if bad := change.adds_nonfinite:
                    raise MmeditError(f"{self.source}: {name} would put NaN/inf in {bad} finite element(s); "
                                      "pass allow_nonfinite=True (--allow-nonfinite) if that is intended")
        self._swap(model, forward=True)
        return model

    def revert(self, model: torch.nn.Module) -> torch.nn.Module:
        """Restore the original values bit for bit, after checking the new ones are in place; all or nothing."""
        self._swap(model, forward=False)
        return model

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module, *, allow_nonfinite: bool = False) -> Iterator[torch.nn.Module]:
        """`with delta.applied(model):` — the edit holds inside the block and is reverted on the way out."""
        self.apply(model, allow_nonfinite=allow_nonfinite)
        try:
            yield model
        finally:
            self.revert(model)

    def _swap(self, model: torch.nn.Module, forward: bool) -> None:
        # Phase 1: resolve, check and move everything to the device; the model is not touched yet.
        stack, checksum = applied_stack(model), self.checksum
        under = self.provenance.get("stacks_on") or [] if forward else []
        if under and (not isinstance(under, list) or [top for top, _ in stack[-len(under):]] != under):
            raise MmeditError(f"{self.source} was made on top of other deltas (its stacks_on), which are not the "
                              "last ones applied to this model: apply those first, in order; nothing was changed")
        if not forward and stack and stack[-1][0] != checksum:
            top, source = stack[-1]
            raise MmeditError(f"cannot revert {self.source}: the last delta applied to this model is {source} "
                              f"({top[:19]}…), which must be reverted first; nothing was changed")
        tensors, steps = model_tensors(model), []
        for name, change in self.changes.items():
            target = find(tensors, name, self.source)
            if target.shape != change.shape or target.dtype != change.dtype:
                raise MmeditError(f"{self.source}: {name} is {target.dtype}{list(target.shape)} in the model "
                                  f"but {change.dtype}{list(change.shape)} in the delta")
            target = offloaded_values(model, target, f"{self.source}: {name}")  # the values, where they live
            if change.kind == "elements" and not target.is_contiguous():
                raise MmeditError(f"{self.source}: {name} is not contiguous in memory; element edits need it to be")
            device = target.device
            index = None if change.index is None else change.index.to(device)
            old, new = change.old.to(device), change.new_values(device)
            steps.append((name, change, target, index, *((old, new) if forward else (new, old))))
        with torch.no_grad():
            # Phase 2: verify every touched element, bit for bit.
            for name, change, target, index, expected, _ in steps:
                found = change.read(target, index)
                if not torch.equal(found, bits(expected)):
                    differ = int(torch.count_nonzero(found != bits(expected)))
                    raise MmeditError(self._mismatch(name, differ, change.touched, forward))
            # Phase 3: write; if anything fails part-way, put back what was written.
            done = []
            try:
                for step in steps:
                    name, change, target, index, _, values = step
                    change.write(target, index, values)
                    done.append(step)
            except BaseException:
                for name, change, target, index, expected, _ in reversed(done):
                    change.write(target, index, expected)
                raise
        if forward:
            stack.append((checksum, self.source))
        elif stack:
            stack.pop()

    def _mismatch(self, name: str, differ: int, touched: int, forward: bool) -> str:
        if forward:
            return (f"{self.source} does not fit this model: {name} does not hold the delta's original values "
                    f"({differ} of {touched} touched elements differ) - wrong base model, or a delta that must be "
                    "applied after another one; nothing was changed")
        return (f"cannot revert {self.source}: {name} does not hold the delta's new values ({differ} of {touched} "
                "touched elements differ) - the delta is not applied, or deltas applied after it must be reverted "
                "first; nothing was changed")

    def __len__(self) -> int:
        return len(self.changes)

    def __repr__(self) -> str:
        return f"Delta({len(self)} tensors, {self.touched} elements touched, {self.source})"
