"""Streaming per-neuron statistics and the `TraceStats` file that holds them.

Statistics are kept as running sums (float64), so memory is O(neurons) whatever the data size, two
runs merge by adding, and every derived statistic (mean, variance, ...) is exact up to float64
rounding of float32 batch sums. Keys are "site/form/group/field":

    site   "vision.0", "projector.0", "llm.3" (see mmedit.arch.Site.name)
    form   "multimodal" (image + question) or "text" (the text-only twin)
    group  token positions: "all" (non-pad), "image", "text", "answer", "last" (last prompt token);
           vision-encoder and projector sites only have "all"
    field  n, sum, sum_abs, sum_sq, active (count of |z| > tau), and with gradients
           grad_sum_abs, grad_sum_sq, grad_sum_z (sum of g*z)

Per-weight squared gradients (diagonal Fisher) are kept under "fisher/form/param_name" with the
number of batches under "fisher_batches/form".
"""
from __future__ import annotations

from pathlib import Path

import torch

from mmedit import safefile
from mmedit.errors import MmeditError

FORMS = ("multimodal", "text")
GROUPS = ("all", "image", "text", "answer", "last")
ACTIVATION_FIELDS = ("n", "sum", "sum_abs", "sum_sq", "active")
GRADIENT_FIELDS = ("grad_sum_abs", "grad_sum_sq", "grad_sum_z")
FORMAT = "mmedit.trace/1"
_META_KEY = "mmedit_trace"


class Accumulator:
    """Adds one batch of activations (and gradients) of one site into running sums.

    Each (site, form) keeps one float64 block [fields, groups, width] that a batch updates with one
    matmul per field and a single add (on a GPU, a few kernels per site instead of one per field and
    group); result() splits the blocks into the per-key tensors of TraceStats."""

    def __init__(self, tau: float = 0.1):
        self.tau = tau
        self.blocks: dict[tuple, torch.Tensor] = {}  # (site, form, groups, fields) -> [fields, groups, width]
        self.counts: dict[tuple, torch.Tensor] = {}  # same key -> [groups] positions counted
        self.fisher: dict[str, torch.Tensor] = {}
        self.fisher_batches: dict[str, int] = {}

    def add(
        self,
        site: str,
        form: str,
        values: torch.Tensor,
        masks: dict[str, torch.Tensor],
        grads: torch.Tensor | None = None,
    ) -> None:
        """values/grads: [..., width]; masks: group -> bool tensor of values.shape[:-1]."""
        width = values.shape[-1]
        z = values.detach().reshape(-1, width).float()
        g = None if grads is None else grads.detach().reshape(-1, width).float()
        groups = tuple(masks)
        weights = torch.stack([masks[group].reshape(-1) for group in groups]).to(z.dtype)
        columns = [lambda: z, z.abs, z.square, lambda: (z.abs() > self.tau).to(z.dtype)]
        fields = ACTIVATION_FIELDS[1:]
        if g is not None:
            columns += [g.abs, g.square, lambda: g * z]
            fields += GRADIENT_FIELDS
        # Every masked sum as a [groups, positions] @ [positions, width] matmul written into one block, one
        # column at a time (peak memory: one extra activation-sized tensor).
        sums = z.new_empty(len(fields), len(groups), width)
        for index, column in enumerate(columns):
            torch.matmul(weights, column(), out=sums[index])
        key = (site, form, groups, fields)
        if key in self.blocks:
            self.blocks[key] += sums
            self.counts[key] += weights.sum(dim=1)
        else:
            self.blocks[key] = sums.double()
            self.counts[key] = weights.sum(dim=1).double()

    def add_fisher(self, form: str, param: str, grad: torch.Tensor) -> None:
        key, square = f"fisher/{form}/{param}", grad.detach().float().square()
        if key in self.fisher:
            self.fisher[key] += square
        else:
            self.fisher[key] = square.clone()

    def count_fisher_batch(self, form: str) -> None:
        self.fisher_batches[form] = self.fisher_batches.get(form, 0) + 1

    def result(self, meta: dict) -> TraceStats:
        tensors: dict[str, torch.Tensor] = {}

        def put(key: str, value: torch.Tensor) -> None:  # blocks with and without gradients share keys
            tensors[key] = tensors[key] + value if key in tensors else value.clone()

        for key, block in self.blocks.items():
            site, form, groups, fields = key
            block, counts = block.cpu(), self.counts[key].cpu()
            for g, group in enumerate(groups):
                put(f"{site}/{form}/{group}/n", counts[g : g + 1])
                for f, field in enumerate(fields):
                    put(f"{site}/{form}/{group}/{field}", block[f, g])
        tensors.update((key, value.cpu()) for key, value in self.fisher.items())
        for form, count in self.fisher_batches.items():
            tensors[f"fisher_batches/{form}"] = torch.tensor([count], dtype=torch.int64)
        return TraceStats(tensors, meta)


class TraceStats:
    """Per-neuron statistics of one traced data set; see the module docstring for the keys."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict):
        self.tensors = tensors
        self.meta = meta

    # -- raw access -----------------------------------------------------------------------------
    def sum(self, site: str, form: str, group: str, field: str) -> torch.Tensor:
        key = f"{site}/{form}/{group}/{field}"
        if key not in self.tensors:
            raise MmeditError(self._missing(site, form, group, field))
        return self.tensors[key]

    def _missing(self, site: str, form: str, group: str, field: str) -> str:
        if site in self.meta.get("dead_sites", []) and field.startswith("grad"):
            return f"site {site} has no gradient statistics: it is off the loss path (dead branch)"
        if site not in self.site_names:
            return f"no statistics for site {site!r}; traced sites: {', '.join(self.site_names)}"
        return f"no statistics for {site} / form {form} / group {group} / {field}"

    def count(self, site: str, form: str = "multimodal", group: str = "all") -> float:
        return float(self.sum(site, form, group, "n").item())

    def _mean(self, site: str, form: str, group: str, field: str) -> torch.Tensor:
        return self.sum(site, form, group, field) / max(self.count(site, form, group), 1.0)

    # -- derived statistics (float64, shape [width]) --------------------------------------------
    def mean(self, site: str, form: str = "multimodal", group: str = "all") -> torch.Tensor:
        return self._mean(site, form, group, "sum")

    def mean_abs(self, site: str, form: str = "multimodal", group: str = "all") -> torch.Tensor:
        return self._mean(site, form, group, "sum_abs")

    def sum_sq(self, site: str, form: str = "multimodal", group: str = "all") -> torch.Tensor:
        return self.sum(site, form, group, "sum_sq")

    def var(self, site: str, form: str = "multimodal", group: str = "all") -> torch.Tensor:
        """Population variance."""
        mean = self.mean(site, form, group)
        return (self._mean(site, form, group, "sum_sq") - mean.square()).clamp_min(0.0)

    def active(self, site: str, form: str = "multimodal", group: str = "all") -> torch.Tensor:
        """How many positions had |z| > tau."""
        return self.sum(site, form, group, "active")

    def grad_mean_abs(self, site: str, form: str = "multimodal", group: str = "all") -> torch.Tensor:
        return self._mean(site, form, group, "grad_sum_abs")

    def grad_mean_sq(self, site: str, form: str = "multimodal", group: str = "all") -> torch.Tensor:
        return self._mean(site, form, group, "grad_sum_sq")

    def grad_mean_z(self, site: str, form: str = "multimodal", group: str = "all") -> torch.Tensor:
        """Mean of g*z: a first-order estimate of each neuron's effect on the loss."""
        return self._mean(site, form, group, "grad_sum_z")

    def fisher(self, param: str, form: str = "multimodal") -> torch.Tensor:
        """Diagonal empirical Fisher: mean over batches of the squared batch gradient (float32)."""
        key = f"fisher/{form}/{param}"
        if key not in self.tensors:
            raise MmeditError(f"no Fisher statistics for parameter {param!r} (form {form})")
        return self.tensors[key] / self.tensors[f"fisher_batches/{form}"].item()

    # -- what is inside ---------------------------------------------------------------------------
    @property
    def sites(self) -> list[dict]:
        return self.meta.get("sites", [])

    @property
    def site_names(self) -> list[str]:
        return [site["name"] for site in self.sites]

    @property
    def forms(self) -> list[str]:
        return sorted({key.split("/")[1] for key in self.tensors if not key.startswith("fisher")})

    def has_gradients(self, site: str) -> bool:
        return any(key.startswith(f"{site}/") and key.endswith("/grad_sum_abs") for key in self.tensors)

    # -- combining and files --------------------------------------------------------------------
    def merge(self, other: TraceStats) -> TraceStats:
        """Statistics of the union of both data sets (sums add)."""
        tensors = dict(self.tensors)
        for key, value in other.tensors.items():
            tensors[key] = tensors[key] + value if key in tensors else value
        meta = dict(self.meta)
        meta["merged_from"] = [self.meta.get("data"), other.meta.get("data")]
        return TraceStats(tensors, meta)

    def save(self, path: str | Path, force: bool = False) -> Path:
        return safefile.save(path, self.tensors, _META_KEY, {"format": FORMAT, **self.meta}, force)

    @classmethod
    def load(cls, path: str | Path) -> TraceStats:
        meta, tensors = safefile.load(path, _META_KEY, FORMAT, "trace")
        return cls(tensors, meta)
