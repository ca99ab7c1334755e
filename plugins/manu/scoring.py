"""MANU's neuron scores and selection: pure functions on TraceStats (no model, no tracing).

For a neuron n at one site, on a data set D traced in a form m (multimodal: image + question; text: the
text-only twin) at the chosen positions, with z the neuron's activation at one position:

    Z = mean |z|     N = share of positions with |z| > tau (rates; raw count with rates=False)
    V = variance     E = mean z² (rates; raw sum of z² with rates=False)

Two presets (PRESETS), each a weight set and a scorer:

paper (Liu et al., ACL'25; methods.md): the importance of n on D compares the two forms, with
compare(a, b) = |a - b| / (a + b + eps),

    I_abs = compare(Z_multi, Z_text)      I_freq = compare(N_multi, N_text)
    I_var = sqrt(V_multi + V_text)        I_rms  = sqrt(compare(E_multi, E_text))
    I     = w_abs I_abs + w_freq I_freq + w_var I_var + w_rms I_rms      (weights 1, 1, 1, 1)

and S_n = I(D_forget, n) / (I(D_retain, n) + eps), each site keyed separately. Sites with no text side —
the vision encoder and projector, and LLM layers that run only with an image (ModelMap.image_only) —
never see a text-only input: there the neuron's contribution to a text-only input is nothing at all, so
each comparison degenerates (compare(a, 0) ~ 1 for every neuron that ever fires) and carries no
information about the neuron. Their terms use the multimodal statistics alone, as the comparisons'
numerators with the absent side at zero and no normalisation by it:

    I_abs = Z_multi   I_freq = N_multi   I_var = sqrt(V_multi)   I_rms = sqrt(E_multi)

so S_n there compares how a neuron behaves on the forget people's images with the retain people's.

reference (the public code, franciscoliu/MANU prune/prune_utility.py compute_combined_scores_incremental,
called in prune/prune_incremental.py): no comparison of the forms at all. Each site reads ONE form —
the text-only pass for LLM layers, the multimodal pass for the image-only sites — and with the four
statistics of that pass on the forget set (F) and the retain set (R),

    F_abs = Z   F_freq = N   F_var = sqrt(V) (a standard deviation: the code's `std`)   F_rms = sqrt(E)
    S_n = sum_k w_k (F_k / (R_k + 1e-5) - 1)                           (weights abs 2, freq 0, var 2, rms 2)

Selection is within each part (or layer), so scores of different kinds are never ranked against each
other except in the (mllama) LLM layers that are image-only.

Rates (default): raw counts and sums grow with the number of positions, and a multimodal input has
the image tokens on top of the text a text-only input has; comparing them would mostly measure the
sequence length. With `rates=False` N and E are the raw count and sum, as the formulas are often
written (methods.md); with positions="last" both agree up to the row count. The reference code uses
rates (the share active, the root of the mean square).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mmedit.data.batches import FORMS
from mmedit.errors import MmeditError

TERMS = ("abs", "freq", "var", "rms")
EPSILON = 1e-8
REFERENCE_EPSILON = 1e-5  # compute_combined_scores_incremental's epsilon


@dataclass(frozen=True)
class Moments:
    """Per-neuron statistics of one data set, one form, one site (float64, shape [width])."""

    mean_abs: torch.Tensor  # Z
    active: torch.Tensor  # N
    var: torch.Tensor  # V
    energy: torch.Tensor  # E


def parse_weights(text: str, base: Mapping[str, float]) -> dict[str, float]:
    """'abs=2,var=1' on top of `base`; every weight finite and >= 0, not all zero."""
    weights = dict(base)
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in TERMS:
            raise MmeditError(f"option weights must look like 'abs=1,freq=1,var=1,rms=1' (terms {', '.join(TERMS)}); "
                              f"got {item!r}")
        try:
            weights[key] = float(value)
        except ValueError:
            raise MmeditError(f"option weights: {key} must be a number, got {value.strip()!r}") from None
        if not (math.isfinite(weights[key]) and weights[key] >= 0):
            raise MmeditError(f"option weights: {key} must be a finite number >= 0, got {value.strip()!r}")
    if not any(weights.values()):
        raise MmeditError("option weights: at least one weight must be > 0")
    return weights


def moments(stats, role: str, site: str, form: str, group: str, rates: bool = True) -> Moments:
    if f"{site}/{form}/{group}/n" not in stats.tensors:
        how = "both forms (mmedit trace --forms multimodal,text)" if form == "text" else "the multimodal form"
        raise MmeditError(f"the {role} statistics have nothing for site {site}, {form} form, {group} positions: "
                          f"trace the {role} rows in {how}, that part, and that position group")
    count = stats.count(site, form, group)
    if count == 0:
        raise MmeditError(f"the {role} statistics of {site} ({form} form, {group} positions) cover no positions")
    active, energy = stats.active(site, form, group).double(), stats.sum_sq(site, form, group).double()
    if rates:
        active, energy = active / count, energy / count
    return Moments(stats.mean_abs(site, form, group).double(), active, stats.var(site, form, group).double(), energy)


def alone(m: Moments) -> dict[str, torch.Tensor]:
    """The four terms of one form's statistics: Z, N, sqrt(V), sqrt(E)."""
    return {"abs": m.mean_abs, "freq": m.active, "var": m.var.sqrt(), "rms": m.energy.sqrt()}


def compare(a: torch.Tensor, b: torch.Tensor, eps: float = EPSILON) -> torch.Tensor:
    return (a - b).abs() / (a + b + eps)


def terms(multi: Moments, text: Moments | None, eps: float = EPSILON) -> dict[str, torch.Tensor]:
    """The paper's four importance terms; text=None for sites that never see a text-only input."""
    if text is None:
        return alone(multi)
    return {
        "abs": compare(multi.mean_abs, text.mean_abs, eps),
        "freq": compare(multi.active, text.active, eps),
        "var": (multi.var + text.var).sqrt(),
        "rms": compare(multi.energy, text.energy, eps).sqrt(),
    }


def weighted(parts: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    return sum(weights[term] * parts[term] for term in TERMS)


def modality_score(forget, retain, site: str, group: str, image_only: bool, weights, rates: bool):
    """Preset paper: S = I(D_forget) / (I(D_retain) + eps), I comparing the two forms."""
    forms = ("multimodal",) if image_only else FORMS
    importances = []
    for role, stats in (("forget", forget), ("retain", retain)):
        found = {form: moments(stats, role, site, form, group, rates) for form in forms}
        importances.append(weighted(terms(found["multimodal"], found.get("text")), weights))
    return importances[0] / (importances[1] + EPSILON), forms


def reference_score(forget, retain, site: str, group: str, image_only: bool, weights, rates: bool):
    """Preset reference: S = sum_k w_k (F_k / (R_k + 1e-5) - 1) on one form's statistics (no comparison)."""
    form = "multimodal" if image_only else "text"
    f, r = (alone(moments(stats, role, site, form, group, rates)) for role, stats in
            (("forget", forget), ("retain", retain)))
    return sum(weights[k] * (f[k] / (r[k] + REFERENCE_EPSILON) - 1) for k in TERMS), (form,)


@dataclass(frozen=True)
class Preset:
    weights: Mapping[str, float]
    score: Callable  # (forget, retain, site, group, image_only, weights, rates) -> (S [width], forms read)


PRESETS = {
    "paper": Preset({"abs": 1.0, "freq": 1.0, "var": 1.0, "rms": 1.0}, modality_score),
    "reference": Preset({"abs": 2.0, "freq": 0.0, "var": 2.0, "rms": 2.0}, reference_score),
}


@dataclass(frozen=True)
class SiteScore:
    site: str
    part: str
    layer: int
    score: torch.Tensor  # S, [width]
    forms: tuple[str, ...]  # the forms whose statistics S read


def site_scores(forget, retain, sites: Sequence, *, image_only: Sequence[str] = (), group: str = "all",
                preset: str = "paper", weights: Mapping[str, float] | None = None,
                rates: bool = True) -> dict[str, SiteScore]:
    """S per neuron for every site (mmedit.arch.Site or the dicts of TraceStats.sites: name, part, layer).

    LLM sites read `group` positions; vision and projector sites have only "all". Sites named in
    `image_only` (ModelMap.image_only) read the multimodal statistics alone."""
    if preset not in PRESETS:
        raise MmeditError(f"unknown MANU preset {preset!r}; presets are {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    weights = chosen.weights if weights is None else weights
    result = {}
    for site in sites:
        name, part, layer = _field(site, "name"), _field(site, "part"), _field(site, "layer")
        used = group if part == "llm" else "all"
        score, forms = chosen.score(forget, retain, name, used, name in image_only, weights, rates)
        if not bool(torch.isfinite(score).all()):
            raise MmeditError(f"non-finite MANU scores at {name}: check the statistics (overflow or NaN activations)")
        result[name] = SiteScore(name, part, layer, score, forms)
    return result


def _field(site, key: str):
    return site[key] if isinstance(site, Mapping) else getattr(site, key)


def budget(alpha: float, total: int) -> int:
    """How many of `total` neurons alpha percent is: rounded, at least one."""
    return min(total, max(1, round(alpha / 100 * total)))


@dataclass(frozen=True)
class Selection:
    chosen: dict[str, torch.Tensor]  # site -> sorted int64 neuron indices (sites with none left out)
    skipped: dict[str, str]  # pool (a part, or a site with within="layer") -> why nothing was selected there
    ties: dict[str, str] = field(default_factory=dict)  # pool -> neurons tied across the cut, left out


def select(scores: Mapping[str, SiteScore], alpha: float, within: str = "part") -> Selection:
    """Top alpha % of neurons by S, over all sites of a part (within="part") or in each site ("layer").

    Ties are never broken by index: a pool whose scores are all equal (no data told its neurons apart) is
    skipped; neurons whose score ties with the last one in the budget across the cut are all left out (the
    pool gets fewer than alpha %, and `ties` says how many); an error when no pool has anything left."""
    if within not in ("part", "layer"):
        raise MmeditError(f"unknown selection scope {within!r}; use part or layer")
    pools: dict[str, list[SiteScore]] = {}
    for entry in scores.values():
        pools.setdefault(entry.part if within == "part" else entry.site, []).append(entry)
    chosen: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    ties: dict[str, str] = {}
    for pool, entries in pools.items():
        flat = torch.cat([entry.score for entry in entries])
        if bool((flat == flat[0]).all()):
            skipped[pool] = f"all {flat.numel()} scores equal {float(flat[0]):.6g}"
            continue
        values, order = torch.sort(flat, descending=True, stable=True)
        k = budget(alpha, flat.numel())
        cut = values[k - 1]
        order = order[:k]
        if k < flat.numel() and bool(values[k] == cut):  # a tie across the cut: leave every tied neuron out
            order = order[values[:k] > cut]
            tied = f"{int((flat == cut).sum())} neurons tie at {float(cut):.6g} across the cut of {k}"
            if not order.numel():
                skipped[pool] = tied + ", none above"
                continue
            ties[pool] = tied + ", left out"
        start = 0
        for entry in entries:
            width = entry.score.numel()
            mine = order[(order >= start) & (order < start + width)] - start
            if mine.numel():
                chosen[entry.site] = mine.sort().values
            start += width
    if not chosen:
        reasons = "; ".join(f"{pool}: {why}" for pool, why in skipped.items())
        raise MmeditError(f"manu: nothing to select, the scores of every {within} are all equal or tied ({reasons}); "
                          "the statistics do not tell the neurons apart")
    return Selection(chosen, skipped, ties)
