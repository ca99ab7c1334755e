"""What a training plugin declares it moves, measured the same way for every plugin.

    class GA(TrainingPlugin):
        def objectives(self, config):
            return [Objective("forget answer NLL", forget_nll(config.forms), "up", 0.05)]

The shared conformance suite (tests/test_plugins_conformance.py) runs every registered plugin, the
third-party ones included, a few steps on tiny models with its "conformance" preset, and asserts that
each declared objective moved the declared way by its margin:

    up      after >= before + margin            (e.g. the forget answers' NLL)
    down    after <= before - margin            (e.g. the steered layer's distance to its target)
    kept    after <= before + margin            (e.g. retain NLL, KL to θ₀: allowed to rise this much)

A measure is a function (passes, config) -> float, evaluated without gradients on the job's forget and
retain rows; `passes.forward` runs the model as it is, `passes.reference` runs θ₀.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from mmedit.errors import MmeditError
from mmedit.modelstate import preserved
from mmedit.plugins import losses
from mmedit.plugins.base import Job
from mmedit.plugins.originals import Originals
from mmedit.plugins.training import FORMS, Passes

DIRECTIONS = ("up", "down", "kept")
Measure = Callable[[Passes, object], float]


@dataclass(frozen=True)
class Objective:
    """A quantity the method moves, the way it moves it, and by how much at least (or at most, for kept)."""

    name: str
    measure: Measure
    direction: str
    margin: float

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise MmeditError(f"objective {self.name}: direction must be one of {', '.join(DIRECTIONS)}")
        if not self.margin >= 0:
            raise MmeditError(f"objective {self.name}: margin must be >= 0")

    def holds(self, before: float, after: float) -> bool:
        if self.direction == "up":
            return after >= before + self.margin
        if self.direction == "down":
            return after <= before - self.margin
        return after <= before + self.margin


def _batches(passes: Passes, which: str, forms: str):
    rows = list(getattr(passes.job, which))
    return [passes.encode(rows, form) for form in FORMS[forms]
            if form == "text" or all(row.image is not None for row in rows)]


def _mean(values: Sequence[torch.Tensor]) -> float:
    return float(torch.stack([value.detach().float() for value in values]).mean())


def nll(which: str, forms: str = "multimodal") -> Measure:
    """Answer NLL of the `which` rows ("forget" or "retain") in `forms`, averaged over the forms."""
    def measure(passes, config):
        return _mean([passes.forward(batch).nll for batch in _batches(passes, which, forms)])
    return measure


def forget_nll(forms: str = "multimodal") -> Measure:
    return nll("forget", forms)


def retain_nll(forms: str = "multimodal") -> Measure:
    return nll("retain", forms)


def nll_gap(forms: str = "multimodal") -> Measure:
    """Forget answer NLL minus retain answer NLL: rises when an edit forgets selectively."""
    forget, retain = nll("forget", forms), nll("retain", forms)

    def measure(passes, config):
        return forget(passes, config) - retain(passes, config)
    return measure


def retain_kl(forms: str = "multimodal") -> Measure:
    """KL(p_θ₀ ‖ p_θ) over the retain answer tokens (0 before any edit)."""
    def measure(passes, config):
        return _mean([losses.kl_to_reference(passes.forward(batch).answer_logits,
                                             passes.reference(batch).answer_logits)
                      for batch in _batches(passes, "retain", forms)])
    return measure


def steered_distance(layer: Callable, target: Callable, forms: str = "multimodal") -> Measure:
    """MSE between the forget hidden states after decoder layer layer(job, config) and
    target(passes, config, batch, states) -- e.g. c·u."""
    def measure(passes, config):
        values, at = [], layer(passes.job, config)
        for batch in _batches(passes, "forget", forms):
            states = passes.forward(batch, [at]).states(at)
            values.append(losses.misdirection(states, target(passes, config, batch, states)))
        return _mean(values)
    return measure


def retain_state_distance(layer: Callable, forms: str = "multimodal") -> Measure:
    """MSE between the retain hidden states after decoder layer layer(job, config) and θ₀'s (0 before
    any edit)."""
    def measure(passes, config):
        at = layer(passes.job, config)
        return _mean([losses.retain_state(passes.forward(batch, [at]).states(at),
                                          passes.reference(batch, [at]).states(at))
                      for batch in _batches(passes, "retain", forms)])
    return measure


def measure(objectives: Sequence[Objective], model: torch.nn.Module, processor, forget: Sequence,
            retain: Sequence, config, original: Mapping[str, torch.Tensor], seed: int = 0) -> dict[str, float]:
    """Each objective's value on `model` as it is; `original`: θ₀'s values of the tensors the edit may
    change (parameter name -> tensor), which `reference` passes swap in."""
    from mmedit.arch import model_map

    params = dict(model.named_parameters())
    theta0 = Originals({name: params[name] for name in original}, given=original)
    job = Job(model, processor, model_map(model), list(forget), list(retain), list(forget) + list(retain),
              seed, False, theta0)
    passes = Passes(job)
    with torch.no_grad(), preserved(model):
        model.eval()
        return {objective.name: objective.measure(passes, config) for objective in objectives}
