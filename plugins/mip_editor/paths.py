"""MIP-Editor paths as a result and a file: NeuronPaths (path neurons per site with their summed scores),
saved as safetensors + a JSON header through mmedit.safefile, loaded and checked against a model.

The search that finds them is mip_editor.search (find_paths, layer_attributions)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmedit import safefile
from mmedit.errors import MmeditError

FORMAT = "mmedit.mip-paths/1"
_META_KEY = "mmedit_mip_paths"


@dataclass
class NeuronPaths:
    """Path neurons per site ("llm.3", "vision.0"), best first, with their summed scores."""

    neurons: dict[str, torch.Tensor]  # site -> int64 [P]
    scores: dict[str, torch.Tensor]  # site -> float64 [P]
    meta: dict = field(default_factory=dict)

    def sites(self, part: str | None = None) -> list[str]:
        """Site names in model order (as found), optionally of one part."""
        return [name for name in self.neurons if part is None or name.split(".")[0] == part]

    def count(self) -> int:
        return sum(int(index.numel()) for index in self.neurons.values())

    def summary(self) -> dict:
        """Small JSON: neurons per site (for reports and delta provenance)."""
        return {name: int(index.numel()) for name, index in self.neurons.items()}

    def save(self, path: str | Path, force: bool = False) -> Path:
        tensors = {}
        for name in self.neurons:
            tensors[f"neurons/{name}"] = self.neurons[name].to(torch.int64)
            tensors[f"scores/{name}"] = self.scores[name].to(torch.float64)
        header = {"format": FORMAT, **self.meta, "order": list(self.neurons)}
        return safefile.save(path, tensors, _META_KEY, header, force)

    @classmethod
    def load(cls, path: str | Path) -> NeuronPaths:
        meta, tensors = safefile.load(path, _META_KEY, FORMAT, "MIP-Editor paths")
        order = meta.pop("order")
        try:
            neurons = {name: tensors[f"neurons/{name}"] for name in order}
            scores = {name: tensors[f"scores/{name}"] for name in order}
        except KeyError as error:
            raise MmeditError(f"{path}: truncated paths file (missing {error.args[0]})") from None
        return cls(neurons, scores, meta)

    def check(self, model_map) -> None:
        """Refuse paths that do not fit this model: unknown sites, or neurons past a site's width."""
        if self.meta.get("family") not in (None, model_map.family):
            raise MmeditError(f"the paths were found on a {self.meta['family']} model, not {model_map.family}")
        for name, index in self.neurons.items():
            site = model_map.site(name)
            if index.numel() and (int(index.max()) >= site.width or int(index.min()) < 0):
                raise MmeditError(f"paths: neuron {int(index.max())} of {name} is out of range (width {site.width})")

