"""θ₀'s values of what an edit changes: kept just before it changes them, and off the model's device.

apply_plugin gives every Job an `Originals` over the parameters of the plugin's declared parts. Before a
parameter changes, `keep(name)` copies it whole, `keep(name, axis=a, index=i)` copies slices along an
axis (rows), `keep(name, mask=m)` copies the elements of a bool mask; nothing else is copied. The copies
are off the model's device: in CPU memory when the model is on a GPU; on a CPU, a copy of MIN_SPILL bytes
or more goes to a temporary file, so that an edit on the CPU never holds a second copy of what it trains.

`originals[name]` is θ₀'s whole tensor: the kept values written into a copy of the live parameter (the
live parameter itself when nothing of it was kept: it must not have changed). `changes()` feeds
Delta.from_changes one parameter at a time; `restore()` writes every kept value back bit for bit.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mmedit.errors import MmeditError

MIN_SPILL = 1 << 20  # bytes: on a CPU, kept values this large go to a temporary file


def resident(what: str, params: Mapping[str, torch.Tensor]) -> None:
    """Refuse to edit a parameter that accelerate offloaded (on the meta device between forwards, its values
    in CPU memory or on disk): its gradient, update and kept values would have nowhere to live."""
    offloaded = next((name for name, param in params.items() if param.is_meta), None)
    if offloaded is not None:
        raise MmeditError(f"{what}: {offloaded} is offloaded by the device map (its values live in CPU memory or on "
                          "disk between forwards), so it cannot be edited; keep its module resident with a larger "
                          "--max-memory or a --device-map that puts it on a device")


@dataclass
class _Kept:
    """One keep: the values before the change, where they sit (axis + index, mask, or the whole tensor)."""

    values: torch.Tensor | Path  # in CPU memory, or a temporary safetensors file
    axis: int | None = None
    index: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def load(self) -> torch.Tensor:
        if isinstance(self.values, Path):
            from safetensors.torch import load_file

            return load_file(self.values)["values"]
        return self.values

    def write(self, tensor: torch.Tensor) -> None:
        """Put these values back into `tensor` (in place, bit for bit)."""
        values = self.load().to(tensor.device)
        if self.index is not None:
            tensor.index_copy_(self.axis, self.index.to(tensor.device), values)
        elif self.mask is not None:
            tensor.masked_scatter_(self.mask.to(tensor.device), values)
        else:
            tensor.copy_(values)


class Originals(Mapping):
    """θ₀'s values of the declared parameters: name -> whole tensor (see the module docstring)."""

    def __init__(self, params: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor] | None = None):
        """`params`: the declared parameters by name. `given`: θ₀'s values of some of them, already in hand
        (e.g. the base weights while the model holds an edit): kept as they are, as changed."""
        self.params = dict(params)
        self.kept: dict[str, list[_Kept]] = {}
        self._versions = {name: p._version for name, p in self.params.items()}  # at the start, and at each first keep
        self._folder: Path | None = None
        self._files = 0
        for name, tensor in (given or {}).items():
            self.kept[name] = [_Kept(tensor.detach())]
            self._versions[name] = -1

    # ---- keeping ------------------------------------------------------------------------------------
    def keep(self, name: str, axis: int | None = None, index=None, mask: torch.Tensor | None = None) -> None:
        """Copy `name`'s current values (whole; slices `index` along `axis`; or the elements of a bool
        `mask` of its shape) before they change. Call it before every change; values kept earlier win."""
        if name not in self.params:
            raise MmeditError(f"keep: {name} is not a parameter of the declared parts (a plugin bug)")
        resident("edit", {name: self.params[name]})
        if name not in self.kept and self.params[name]._version != self._versions[name]:
            raise MmeditError(f"keep: {name} changed before it was kept (a plugin bug: keep before changing)")
        with torch.no_grad():
            tensor = self.params[name].detach()
            if index is not None:
                index = torch.as_tensor(index, dtype=torch.int64, device=tensor.device)
                record = _Kept(self._store(tensor.index_select(axis, index)), axis % tensor.dim(), index.cpu())
            elif mask is not None:
                mask = mask.expand(tensor.shape)
                record = _Kept(self._store(tensor.masked_select(mask.to(tensor.device))), mask=mask.cpu())
            else:
                record = _Kept(self._store(tensor))
        self.kept.setdefault(name, []).append(record)

    def _store(self, values: torch.Tensor) -> torch.Tensor | Path:
        if values.device.type != "cpu" or values.numel() * values.element_size() < MIN_SPILL:
            return values.to("cpu", copy=True)
        from safetensors.torch import save_file

        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="mmedit-originals-"))
        path = self._folder / f"{self._files}.safetensors"
        self._files += 1
        try:
            save_file({"values": values.contiguous()}, path)
        except OSError as error:
            raise MmeditError(f"cannot keep the original values in {self._folder}: {error} (set TMPDIR to a "
                              "folder with space)") from None
        return path

    # ---- reading --------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        """θ₀'s whole tensor `name`, on the parameter's device."""
        live = self.params[name].detach()
        records = self.kept.get(name)
        if not records:
            return live
        if records[0].index is None and records[0].mask is None and len(records) == 1:
            return records[0].load().to(live.device)
        full = live.clone()
        for record in reversed(records):  # earlier keeps hold the older values: they are written last
            record.write(full)
        return full

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def changed(self) -> list[str]:
        """Kept parameters whose values moved since their first keep (θ₀ differs from the live tensor)."""
        return [name for name in self.kept if self.params[name]._version != self._versions[name]]

    def unkept_changes(self) -> list[str]:
        """Declared parameters that changed without a keep (a plugin bug: they cannot be restored)."""
        return [name for name, p in self.params.items() if name not in self.kept and p._version != self._versions[name]]

    def bytes(self) -> dict[str, int]:
        """Kept bytes: {"memory": ..., "disk": ...}."""
        held = {"memory": 0, "disk": 0}
        for records in self.kept.values():
            for record in records:
                if isinstance(record.values, Path):
                    held["disk"] += record.values.stat().st_size
                else:
                    held["memory"] += record.values.numel() * record.values.element_size()
        return held

    # ---- the end of an edit -----------------------------------------------------------------------------
    def changes(self) -> Mapping[str, tuple[torch.Tensor, torch.Tensor]]:
        """{name: (θ₀, live)} of every kept parameter, each θ₀ tensor made only when it is read."""
        return _Changes(self)

    def restore(self) -> None:
        """Write every kept value back into the live parameters (bit for bit) and drop the copies."""
        with torch.no_grad():
            for name, records in self.kept.items():
                for record in reversed(records):
                    record.write(self.params[name].detach())
        self.close()

    def close(self) -> None:
        self.kept.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


class _Changes(Mapping):
    """The lazy {name: (θ₀, live)} of Originals.changes(): Delta.from_changes reads one pair at a time."""

    def __init__(self, originals: Originals):
        self.originals = originals

    def __getitem__(self, name: str):
        return self.originals[name], self.originals.params[name].detach()

    def __iter__(self):
        return iter(list(self.originals.kept))

    def __len__(self) -> int:
        return len(self.originals.kept)


def footprint(phase, model, kept: Mapping[str, int]) -> None:
    """A plan's originals (mmedit.plan): `kept` elements per parameter, in CPU memory beside a GPU; on a
    CPU in a temporary file from MIN_SPILL bytes on (phase.disk), else in memory."""
    for elements in kept.values():
        nbytes = elements * model.element
        if model.device != "cpu":
            phase.add("originals", nbytes, off_device=True)
        elif nbytes >= MIN_SPILL:
            phase.disk += nbytes
        else:
            phase.add("originals", nbytes)
