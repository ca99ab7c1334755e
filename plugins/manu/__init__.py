"""MANU (Liu et al., ACL'25, arXiv 2502.15910): modality-aware neuron pruning, no training.

1. Trace the forget rows and the retain rows, each in both forms (image + question, and the text-only
   twin), with mmedit.trace: per neuron and per site (every layer keyed on its own) the mean |z|, the
   share of positions with |z| > tau, the variance and the mean z², at all non-pad positions or at
   the last prompt token (`positions`).
2. Score every neuron (scoring.py). Preset `paper`: S = I(D_forget) / (I(D_retain) + eps) with MANU's
   importance I comparing the two forms (the vision encoder and the projector, which never see a
   text-only input, from the multimodal statistics alone). Preset `reference`: the public code's
   S = sum_k w_k (F_k / (R_k + 1e-5) - 1) on one form's statistics (LLM: text-only; vision and
   projector: multimodal), no comparison of the forms.
3. Select the top alpha % by S over all layers of each part (vision, projector, llm), or in each layer.
   A part (layer) whose scores are all equal is skipped and reported, never cut by neuron index; neurons
   tied across the cut are left out together (reported as ties).
4. Prune: zero the slices of the producing parameters (fc1 rows and bias, gate_proj + up_proj rows and
   biases, as the family's ModelMap names them); the selected neurons are then exactly zero on every
   input, and the delta stores only row indices and the old rows. `soft=DECAY` multiplies each
   selected neuron's output by DECAY instead: the consumer's input column (fc2 / down_proj) for sites
   read at a module's input, the producer rows for sites that are a module's output — exact for every
   activation function, where scaling fc1 or gate rows would not be.

Precomputed statistics (apply_plugin's `stats`, `mmedit apply --stats KEY=PATH`): "forget" and "retain",
each a TraceStats of those rows in both forms, as `mmedit trace` writes them; their tau must equal
this run's tau. Unlike the reference code, statistics are keyed per layer (it pools every layer under
one key and prunes only the last three layers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mmedit.data.batches import FORMS, make_batches
from mmedit.errors import MmeditError
from mmedit.modelstate import preserved
from mmedit.plugins.base import Choice, Plugin, Range, option, require, rows_sha256
from mmedit.plugins.manu import report, scoring
from mmedit.plugins.training import split_parts

STATS_KEYS = ("forget", "retain")


@dataclass
class MANUConfig:
    alpha: float = option(2.0, "Percent of neurons to prune in each part (or layer, see within); search 2, 5, 10.",
                          space=Range(1.0, 50.0, log=True))
    within: str = option("part", "Rank neurons over all layers of a part (part) or in each layer (layer).",
                         choices=("part", "layer"), space=Choice(("part", "layer")))
    # each parts value traces once per sweep (the statistics depend on it), so a few are searched
    parts: str = option("vision,projector,llm", "Comma-separated parts to prune in; the others stay as they are.",
                        space=Choice(("vision,projector,llm", "llm", "vision,projector")))
    preset: str = option("paper", "Scoring: paper (equal weights, the forms compared as |a-b|/(a+b), I(forget) / "
                         "I(retain)) or reference (the public code: sum of w (forget/retain - 1) with abs 2, freq 0, "
                         "var 2, rms 2, one form per part: LLM text-only, vision and projector multimodal).",
                         choices=tuple(scoring.PRESETS), space=Choice(tuple(scoring.PRESETS)))
    weights: str = option("", "Override some of the preset's term weights, e.g. 'abs=1,freq=0,var=1,rms=1'.")
    positions: str = option("all", "LLM token positions the statistics cover: all (non-pad) or last (the last "
                            "prompt token). Vision and projector sites always use all positions.",
                            choices=("all", "last"))
    rates: bool = option(True, "Use the share of active positions and the mean z² (true) instead of the raw count "
                         "and sum (false), which grow with the number of image tokens.")
    tau: float = option(0.1, "A neuron counts as active at a position where |z| > tau.")
    soft: float = option(0.0, "0: zero the selected neurons; DECAY in (0, 1): multiply their output by DECAY.")
    batch_size: int = option(4, "Rows per tracing batch.")
    plot: str = option("", "Also write a PNG of how many neurons were selected per layer and part to this path.")

    def __post_init__(self):
        require(0 < self.alpha <= 100 and math.isfinite(self.alpha), "alpha", "be a percentage in (0, 100]")
        split_parts(self.parts)
        scoring.parse_weights(self.weights, scoring.PRESETS[self.preset].weights)
        require(self.tau >= 0 and math.isfinite(self.tau), "tau", "be >= 0")
        require(0 <= self.soft < 1, "soft", "be 0 (zero the neurons) or a decay factor in (0, 1)")
        require(self.batch_size >= 1, "batch_size", "be at least 1")
        require(not self.plot or not Path(self.plot).exists(), "plot", f"name a new file ({self.plot} exists)")
        require(not self.plot or Path(self.plot).parent.is_dir(), "plot", f"be in an existing folder ({self.plot})")

    @property
    def scoring(self) -> dict:
        weights = scoring.parse_weights(self.weights, scoring.PRESETS[self.preset].weights)
        return {"preset": self.preset, "weights": weights, "group": self.positions, "rates": self.rates}


def candidate_sites(model_map, parts) -> list:
    """Sites of `parts` that can matter to the output (not ModelMap.expected_dead)."""
    dead = set(model_map.expected_dead)
    return [site for site in model_map.sites if site.part in parts and site.name not in dead]


def statistics(job, role: str, rows, config, parts):
    """TraceStats of `rows` in both forms: precomputed job.stats[role], or traced now."""
    from mmedit.trace import TraceStats, trace

    def compute():
        def batches():
            for form in FORMS:
                yield from make_batches(rows, job.processor, form, batch_size=config.batch_size, with_answer=True)

        meta = {"data": {"role": role, "rows": len(rows), "rows_sha256": rows_sha256(rows)}}
        with preserved(job.model):
            job.model.eval()
            return trace(job.model, batches(), model_map=job.model_map, parts=parts, groups=(config.positions,),
                         tau=config.tau, meta=meta, progress=job.progress,
                         total=2 * -(-len(rows) // config.batch_size), description=f"MANU: tracing {role}")

    return job.statistics(role, compute, {"parts": parts, "positions": config.positions, "tau": config.tau,
                                          "batch_size": config.batch_size}, TraceStats)


def check_statistics(stats, role: str, rows, config, model_map, sites) -> None:
    """Precomputed statistics must come from this model family and these rows, with this tau."""
    meta = stats.meta
    if meta.get("family") not in (None, model_map.family):
        raise MmeditError(f"the {role} statistics were traced on a {meta['family']} model, not {model_map.family}")
    tau = meta.get("options", {}).get("tau")
    if tau is not None and not math.isclose(tau, config.tau):
        raise MmeditError(f"the {role} statistics were traced with tau={tau} but manu has tau={config.tau}; "
                          f"set tau={tau} or trace again")
    widths = {site["name"]: site["width"] for site in stats.sites}
    for site in sites:
        if site.name in widths and widths[site.name] != site.width:
            raise MmeditError(f"the {role} statistics have {widths[site.name]} neurons at {site.name}, the model "
                              f"{site.width}: traced on another model")
    data = meta.get("data") or {}
    if data.get("rows") is not None and data["rows"] != len(rows):
        raise MmeditError(f"the {role} statistics cover {data['rows']} rows, the {role} set has {len(rows)}")
    if data.get("rows_sha256") not in (None, rows_sha256(rows)):
        raise MmeditError(f"the {role} statistics were traced on other rows than the {role} set")


def prune(job, chosen: dict[str, torch.Tensor], soft: float) -> None:
    """Zero (soft=0) or scale by `soft` the selected neurons of each site, in place (their slices kept first)."""
    model_map, params = job.model_map, dict(job.model.named_parameters())
    with torch.no_grad():
        for name, indices in chosen.items():
            site = model_map.site(name)
            if soft and site.io == "input":
                slices = [(f"{site.module}.weight", 1)]
            else:
                slices = [(producer.param, producer.axis) for producer in site.producers]
            for param_name, axis in slices:
                param = params.get(param_name)
                if param is None or param.dim() <= axis or param.shape[axis] != site.width:
                    raise MmeditError(f"manu: {param_name} has no axis {axis} of the {site.width} neurons of {name}")
                index = indices.to(param.device)
                job.original.keep(param_name, axis=axis, index=index)
                if soft:
                    param.index_copy_(axis, index, param.index_select(axis, index) * soft)
                else:
                    param.index_fill_(axis, index, 0)


class MANU(Plugin):
    name, version = "manu", "1.0"
    description = "Modality-aware neuron pruning: zero the neurons more important to forget than retain data."
    Config = MANUConfig
    stats_keys = STATS_KEYS
    keeps_originals = True  # prune() keeps the slices it changes

    def parts(self, config):
        return split_parts(config.parts)

    def edit(self, job, config):
        parts = self.parts(config)
        sites = candidate_sites(job.model_map, parts)
        if not sites:
            raise MmeditError(f"manu: no neuron sites in parts {', '.join(parts)}")
        found = {}
        for role, rows in (("forget", job.forget), ("retain", job.retain)):
            found[role] = statistics(job, role, rows, config, parts)
            check_statistics(found[role], role, rows, config, job.model_map, sites)
        settings = config.scoring
        scores = scoring.site_scores(found["forget"], found["retain"], sites, image_only=job.model_map.image_only,
                                     **settings)
        selection = scoring.select(scores, config.alpha, config.within)
        prune(job, selection.chosen, config.soft)
        summary = report.summary(scores, selection) | {
            "scoring": settings, "statistics": {role: job.sources[role] for role in STATS_KEYS}}
        if config.plot:
            report.plot(summary, config.plot)
        return summary

    def footprint(self, model, shapes, config):
        """Tracing (no gradients) of both sets in both forms, their statistics, then the pruned slices kept."""
        from mmedit.plan import base_phase, trace_phase
        from mmedit.plugins.originals import footprint

        parts = self.parts(config)
        sites = candidate_sites(model.map, parts)
        stats = sum(2 * 2 * 6 * site.width * 8 for site in sites)  # forget + retain, two forms, six fields
        batch = shapes.batch("forget", "multimodal", config.batch_size)
        tracing = trace_phase(model, batch, parts, False, "tracing").add("statistics", stats)
        pruning = base_phase(model, "pruning").add("statistics", stats)
        kept = {}
        for site in sites:
            chosen = math.ceil(site.width * config.alpha / 100)
            for producer in site.producers:
                kept[producer.param] = chosen * model.numel[producer.param] // site.width
        footprint(pruning, model, kept)
        return [tracing, pruning]

    def report_table(self, summary):
        return report.table(summary)


plugin = MANU()
