"""Streaming per-neuron statistics and the `TraceStats` file that holds them.

Statistics are kept as running sums and centred second moments (float64, computed in float64 from the
activations' own values), so memory is O(neurons) whatever the data size, two runs merge (sums add;
second moments by the parallel formula of Chan et al.), and every derived statistic (mean, variance,
...) is exact up to float64 rounding. Keys are "site/form/group/field":

    site   "vision.0", "projector.0", "llm.3" (see mmedit.arch.Site.name)
    form   "multimodal" (image + question) or "text" (the text-only twin)
    group  token positions: "all" (non-pad), "image", "text", "answer", "last" (last prompt token);
           vision-encoder and projector sites only have "all"
    field  n (positions), sum, sum_abs, sum_sq, active (count of |z| > tau), m2 (sum of (z - mean)^2),
           and with gradients grad_n (positions that had gradients), grad_sum_abs, grad_sum_sq,
           grad_sum_z (sum of g*z)

Per-weight squared gradients (diagonal Fisher) are kept under "fisher/form/param_name" with the
number of batches under "fisher_batches/form".
"""
from __future__ import annotations

from pathlib import Path

import torch

from mmedit import safefile
from mmedit.data.batches import FORMS  # the one definition; mmedit.trace re-exports it
from mmedit.errors import MmeditError

__all__ = ["FORMS", "GROUPS", "Accumulator", "TraceStats"]

GROUPS = ("all", "image", "text", "answer", "last")
ACTIVATION_FIELDS = ("n", "sum", "sum_abs", "sum_sq", "active", "m2")
GRADIENT_FIELDS = ("grad_n", "grad_sum_abs", "grad_sum_sq", "grad_sum_z")
FORMAT = "mmedit.trace/2"  # /2: m2 and grad_n added
_META_KEY = "mmedit_trace"


def _spread(n_a: torch.Tensor, sum_a: torch.Tensor, n_b: torch.Tensor, sum_b: torch.Tensor) -> torch.Tensor:
    """What joining two sets adds to the summed m2 (Chan et al.): n_a n_b / n * (mean_b - mean_a)^2."""
    delta = sum_b / n_b.clamp_min(1) - sum_a / n_a.clamp_min(1)
    return delta.square() * (n_a * n_b / (n_a + n_b).clamp_min(1))


def _combine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TraceStats tensors of the union of two data sets: counts and sums add, m2 merges by Chan et al."""
    tensors = {**b, **a}
    for key in a.keys() & b.keys():
        tensors[key] = a[key] + b[key]
        if key.endswith("/m2"):
            prefix = key[: -len("m2")]
            tensors[key] += _spread(a[prefix + "n"], a[prefix + "sum"], b[prefix + "n"], b[prefix + "sum"])
    return tensors


class Accumulator:
    """Adds one batch of activations (and gradients) of one site into running sums.

    Each (site, form) keeps one float64 block [fields, groups, width] that a batch updates with one
    matmul per field, one add and the [groups, width] Chan correction of m2 (on a GPU, a few kernels per
    site instead of one per field and group); result() splits the blocks into the per-key tensors of
    TraceStats.

    A batch's m2 is computed centred, in float64: the sum of (z - shift)^2 with one per-neuron shift (the
    batch mean of its largest group) minus count * (group mean - shift)^2. Its rounding grows with how far
    a group's mean sits from the shift, not with (mean / std)^2 as E[z^2] - E[z]^2 does."""

    def __init__(self, tau: float = 0.1):
        self.tau = tau
        self.blocks: dict[tuple, torch.Tensor] = {}  # (site, form, groups, fields) -> [fields, groups, width]
        self.counts: dict[tuple, torch.Tensor] = {}  # same key -> [groups, 1] positions counted
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
        z = values.detach().reshape(-1, width)
        g = None if grads is None else grads.detach().reshape(-1, width)
        groups = tuple(masks)
        weights = torch.stack([masks[group].reshape(-1) for group in groups]).to(z.device, torch.float64)
        count = weights.sum(dim=1, keepdim=True)

        def wide(x: torch.Tensor) -> torch.Tensor:  # a float64 copy, free to change in place
            return x.to(torch.float64, copy=True)

        fields = ACTIVATION_FIELDS[1:]
        columns = [lambda: z.to(torch.float64), lambda: wide(z).abs_(), lambda: wide(z).square_(),
                   lambda: wide(z).abs_().gt_(self.tau), lambda: wide(z).sub_(shift).square_()]  # shift: below
        if g is not None:
            fields += GRADIENT_FIELDS[1:]
            columns += [lambda: wide(g).abs_(), lambda: wide(g).square_(), lambda: wide(g).mul_(z)]
        # Every masked sum as a [groups, positions] @ [positions, width] matmul written into one block, one
        # column at a time (peak memory: one float64 activation-sized tensor).
        batch = weights.new_empty(len(fields), len(groups), width)
        torch.matmul(weights, columns[0](), out=batch[0])
        largest = count.argmax()
        shift = batch[0, largest] / count[largest].clamp_min(1)
        for index, column in enumerate(columns[1:], start=1):
            torch.matmul(weights, column(), out=batch[index])
        m2 = fields.index("m2")
        batch[m2] -= (batch[0] - count * shift).square() / count.clamp_min(1)
        batch[m2].clamp_min_(0.0)
        key = (site, form, groups, fields)
        if key in self.blocks:
            block, seen = self.blocks[key], self.counts[key]
            block[m2] += _spread(seen, block[0], count, batch[0])  # before the sums move
            block += batch
            seen += count
        else:
            self.blocks[key] = batch
            self.counts[key] = count

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
        for key, block in self.blocks.items():  # blocks with and without gradients share keys: combine
            site, form, groups, fields = key
            block, counts = block.cpu(), self.counts[key].cpu()
            for g, group in enumerate(groups):
                prefix = f"{site}/{form}/{group}/"
                part = {prefix + field: block[f, g].clone() for f, field in enumerate(fields)}
                part[prefix + "n"] = counts[g].clone()
                if "grad_sum_abs" in fields:
                    part[prefix + "grad_n"] = counts[g].clone()
                tensors = _combine(tensors, part)
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

    def _mean(self, site: str, form: str, group: str, field: str, count: str = "n") -> torch.Tensor:
        """field / count; gradient sums divide by grad_n, the positions that had gradients."""
        return self.sum(site, form, group, field) / self.sum(site, form, group, count).clamp_min(1.0)

    # -- derived statistics (float64, shape [width]) --------------------------------------------
    def mean(self, site: str, form: str = "multimodal", group: str = "all") -> torch.Tensor:
        return self._mean(site, form, group, "sum")

    def mean_abs(self, site: str, form: str = "multimodal", group: str = "all") -> torch.Tensor:
        return self._mean(site, form, group, "sum_abs")

    def sum_sq(self, site: str, form: str = "multimodal", group: str = "all") -> torch.Tensor:
        return self.sum(site, form, group, "sum_sq")

    def var(self, site: str, form: str = "multimodal", group: str = "all") -> torch.Tensor:
        """Population variance: m2 / n."""
        return self._mean(site, form, group, "m2")

    def active(self, site: str, form: str = "multimodal", group: str = "all") -> torch.Tensor:
        """How many positions had |z| > tau."""
        return self.sum(site, form, group, "active")

    def grad_mean_abs(self, site: str, form: str = "multimodal", group: str = "all") -> torch.Tensor:
        return self._mean(site, form, group, "grad_sum_abs", "grad_n")

    def grad_mean_sq(self, site: str, form: str = "multimodal", group: str = "all") -> torch.Tensor:
        return self._mean(site, form, group, "grad_sum_sq", "grad_n")

    def grad_mean_z(self, site: str, form: str = "multimodal", group: str = "all") -> torch.Tensor:
        """Mean of g*z: a first-order estimate of each neuron's effect on the loss."""
        return self._mean(site, form, group, "grad_sum_z", "grad_n")

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

    def importance(self, site: str, form: str = "multimodal", group: str = "all") -> torch.Tensor:
        """|mean(g*z)| (first-order effect on the loss) where this form and group have gradients, else mean |z|."""
        grads = f"{site}/{form}/{group}/grad_sum_z" in self.tensors
        return self.grad_mean_z(site, form, group).abs() if grads else self.mean_abs(site, form, group)

    def has_gradients(self, site: str) -> bool:
        return any(key.startswith(f"{site}/") and key.endswith("/grad_sum_abs") for key in self.tensors)

    # -- combining and files --------------------------------------------------------------------
    def merge(self, other: TraceStats) -> TraceStats:
        """Statistics of the union of both data sets (sums add, m2 by Chan et al.)."""
        tensors = _combine(self.tensors, other.tensors)
        meta = dict(self.meta)
        meta["merged_from"] = [self.meta.get("data"), other.meta.get("data")]
        return TraceStats(tensors, meta)

    def save(self, path: str | Path, force: bool = False) -> Path:
        return safefile.save(path, self.tensors, _META_KEY, {"format": FORMAT, **self.meta}, force)

    @classmethod
    def load(cls, path: str | Path) -> TraceStats:
        meta, tensors = safefile.load(path, _META_KEY, FORMAT, "trace")
        return cls(tensors, meta)
