"""GA: gradient ascent on the forget set, minimise −NLL(D_f)."""
from mmedit.plugins.base import Choice, Range
from mmedit.plugins.objectives import Objective, forget_nll
from mmedit.plugins.training import TrainingPlugin


class GA(TrainingPlugin):
    name, version = "ga", "1.0"
    description = "Gradient ascent: minimise -NLL of the forget answers."
    needs_retain = False
    presets = {"embedded": {"lr": 1e-4}, "conformance": {"lr": 1e-3, "epochs": 3}}
    search_space = {"lr": Range(1e-6, 1e-3, log=True), "forms": Choice(("multimodal", "text", "both"))}

    def loss(self, trainer, step):
        return -trainer.forward(step.forget).nll

    def objectives(self, config):
        return [Objective("forget answer NLL", forget_nll(config.forms), "up", 0.05)]


plugin = GA()
