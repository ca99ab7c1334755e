"""ModelMap: a model's parts, layers, neuron sites and token masks, resolved from its family entry."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmedit.arch.registry import PARTS, family
from mmedit.data.batches import IGNORE
from mmedit.errors import MmeditError


@dataclass(frozen=True)
class Producer:
    """Slice [n along axis] of parameter `param` produces neuron n."""

    param: str
    axis: int


@dataclass(frozen=True)
class Site:
    """One layer's neuron vector: `module`'s input[0] (io="input") or its output (io="output")."""

    part: str
    layer: int
    module: str
    io: str
    width: int
    producers: tuple[Producer, ...]

    @property
    def name(self) -> str:
        return f"{self.part}.{self.layer}"


def _join(*paths: str) -> str:
    return ".".join(path for path in paths if path)


def _config_value(config, dotted: str | None):
    """config.a.b for dotted "a.b"; None when dotted is None or any step is missing."""
    if not dotted:
        return None
    value = config
    for name in dotted.split("."):
        value = getattr(value, name, None)
    return value


def _exists(model: torch.nn.Module, path: str) -> bool:
    """Whether path names a submodule, or a bare parameter (llava_next's image_newline is a part root)."""
    for getter in (model.get_submodule, model.get_parameter):
        try:
            getter(path)
            return True
        except AttributeError:
            pass
    return False


def _resolve(model: torch.nn.Module, group: list[str]) -> str | None:
    """The first alternative path that exists in model (transformers 5.x paths first, then 4.5x)."""
    return next((path for path in group if _exists(model, path)), None)


class ModelMap:
    """Built by `model_map(model)`; holds names and shapes only, never the model itself."""

    def __init__(self, model: torch.nn.Module):
        config = model.config
        self.family: str = config.model_type
        entry = family(self.family)
        params = dict(model.named_parameters())
        self._roots: dict[str, tuple[str, ...]] = {}
        self._layers: dict[str, tuple[str, ...]] = {}  # part -> layer module paths, in numbering order
        sites = []
        for part in PARTS:
            spec = entry["parts"][part]
            self._roots[part] = tuple(self._must(model, group, f"{part} root") for group in spec["roots"])
            if part == "projector":
                layers = [self._roots[part][0]]
            else:
                layers = []
                for group in spec["layers"]:
                    container = self._must(model, group, f"{part} layers")
                    layers += [f"{container}.{i}" for i in range(len(model.get_submodule(container)))]
            self._layers[part] = tuple(layers)
            for index, layer in enumerate(layers):
                sites.append(self._site(model, params, part, index, layer, spec["neuron"]))
        self.sites: tuple[Site, ...] = tuple(sites)
        self.residual: tuple[str, ...] = self._layers["llm"]
        self.image_token_id: int | None = next(
            (getattr(config, name) for name in entry.get("image_token_id", []) if getattr(config, name, None) is not None),
            None,
        )
        self.expected_dead: tuple[str, ...] = self._dead(config, entry["parts"]["vision"].get("feature_layer"))
        # Sites that run only when the batch has an image: the vision side, and LLM layers that the model
        # skips without one (mllama's cross-attention layers).
        skipped = _config_value(config, entry["parts"]["llm"].get("image_only_layers")) or []
        self.image_only: tuple[str, ...] = tuple(
            site.name for site in self.sites if site.part != "llm" or site.layer in skipped
        )
        self._parameters = {part: [] for part in PARTS}
        for name in params:
            owner = self.part_of(name)
            if owner is not None:
                self._parameters[owner[0]].append(name)

    def _must(self, model, group: list[str], what: str) -> str:
        path = _resolve(model, group)
        if path is None:
            raise MmeditError(f"{self.family}: no {what} module found at any of {', '.join(group)}")
        return path

    def _site(self, model, params, part: str, index: int, layer: str, neuron: dict) -> Site:
        module = _join(layer, neuron["module"])
        self._must(model, [module], f"{part} neuron")
        producers = []
        for path, axis in neuron["producers"]:
            name = _join(layer, path)
            if name in params:
                producers.append(Producer(name, axis))
            elif not name.endswith("bias"):  # biases are optional: configs turn them off (mlp_bias, ...)
                raise MmeditError(f"{self.family}: producer parameter {name} not found")
        widths = {params[p.param].shape[p.axis] for p in producers}
        if len(widths) != 1:
            raise MmeditError(f"{self.family}: producers of {module} disagree on the neuron count: {sorted(widths)}")
        return Site(part, index, module, neuron["io"], widths.pop(), tuple(producers))

    def _dead(self, config, attribute: str | None) -> tuple[str, ...]:
        """Vision layers past the one whose hidden state the projector reads (LLaVA's vision_feature_layer).

        hidden_states[0] is the embedding output and hidden_states[k + 1] the output of layer k, so with
        feature layers F (negative ones counted from the end) the layers k >= max(F) feed nothing.
        """
        selected = _config_value(config, attribute)
        if selected is None:
            return ()
        count = len(self._layers["vision"])
        indices = [selected] if isinstance(selected, int) else list(selected)
        last = max(index % (count + 1) for index in indices)
        return tuple(f"vision.{k}" for k in range(last, count))

    def site(self, name: str) -> Site:
        for site in self.sites:
            if site.name == name:
                return site
        raise MmeditError(f"{self.family}: no site {name!r}; sites are {', '.join(s.name for s in self.sites)}")

    def sites_of(self, part: str) -> tuple[Site, ...]:
        self._check_part(part)
        return tuple(site for site in self.sites if site.part == part)

    def part_modules(self, part: str) -> tuple[str, ...]:
        """Root module paths of a part (disjoint from the other parts' roots)."""
        self._check_part(part)
        return self._roots[part]

    def parameters(self, part: str) -> list[str]:
        """Names (as in model.named_parameters()) of the parameters inside a part: a training scope."""
        self._check_part(part)
        return list(self._parameters[part])

    def part_of(self, param_name: str) -> tuple[str, int | None] | None:
        """(part, layer) of a base-model parameter name; layer None outside the layers (embeddings, norms,
        lm_head); None if the name lies in no part. The longest matching root wins."""
        best = None
        for part, roots in self._roots.items():
            for root in roots:
                if (param_name == root or param_name.startswith(root + ".")) and (best is None or len(root) > len(best[1])):
                    best = (part, root)
        if best is None:
            return None
        part = best[0]
        if part == "projector":  # the projector is one layer, whatever its roots
            return part, 0
        for index, layer in enumerate(self._layers[part]):
            if param_name.startswith(layer + "."):
                return part, index
        return part, None

    def token_masks(self, inputs: dict, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Bool [B, T] masks over LLM positions: image placeholders, text, answer (labels != IGNORE), pad.

        labels defaults to inputs["labels"] when there is one.
        """
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        pad = torch.zeros_like(ids, dtype=torch.bool) if mask is None else mask == 0
        image = torch.zeros_like(pad) if self.image_token_id is None else (ids == self.image_token_id) & ~pad
        labels = inputs.get("labels") if labels is None else labels
        answer = torch.zeros_like(pad) if labels is None else labels != IGNORE
        return {"image": image, "text": ~pad & ~image, "answer": answer, "pad": pad}

    def _check_part(self, part: str) -> None:
        if part not in PARTS:
            raise MmeditError(f"unknown part {part!r}; parts are {', '.join(PARTS)}")

    def __repr__(self) -> str:
        counts = ", ".join(f"{part}={len(self.sites_of(part))}" for part in PARTS)
        return f"ModelMap({self.family}: {counts} sites)"


def model_map(model: torch.nn.Module) -> ModelMap:
    """Map a HF ...ForConditionalGeneration model by its config.model_type."""
    if getattr(model, "config", None) is None:
        raise MmeditError(f"cannot map a {type(model).__name__}: expected a transformers model with a .config")
    return ModelMap(model)
