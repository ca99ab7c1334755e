"""GradDiff: ascent on the forget set, descent on the retain set, −NLL(D_f) + NLL(D_r) on paired batches."""
from mmedit.plugins.base import Choice, Range
from mmedit.plugins.objectives import Objective, forget_nll, retain_nll
from mmedit.plugins.training import TrainingPlugin


class GradDiff(TrainingPlugin):
    name, version = "graddiff", "1.0"
    description = "Gradient difference: -NLL(forget) + NLL(retain) on paired batches."
    presets = {"embedded": {"lr": 1e-4}, "conformance": {"lr": 1e-3, "epochs": 3}}
    search_space = {"lr": Range(1e-6, 1e-3, log=True), "forms": Choice(("multimodal", "text", "both"))}

    loss_terms = True

    def loss(self, trainer, step):
        yield -trainer.forward(step.forget).nll
        yield trainer.forward(step.retain).nll

    def objectives(self, config):
        return [Objective("forget answer NLL", forget_nll(config.forms), "up", 0.05),
                Objective("retain answer NLL", retain_nll(config.forms), "kept", 0.05)]


plugin = GradDiff()
