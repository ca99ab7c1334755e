"""NPO (Zhang et al. 2024): L = −(2/β)·mean log σ(β·(NLL_θ(x_f) − NLL_ref(x_f))), sequence-mean NLLs.

The reference is θ₀ (the base weights, swapped in for each reference pass) unless `ref` names a
model directory (the NPO paper's reference trained on the retain set)."""
from dataclasses import dataclass

from mmedit.plugins import losses
from mmedit.plugins.base import option, require
from mmedit.plugins.objectives import Objective, forget_nll
from mmedit.plugins.training import BaselineConfig, Trainer, TrainingPlugin


@dataclass
class NPOConfig(BaselineConfig):
    beta: float = option(0.4, "Inverse temperature beta of the NPO loss.")
    ref: str = option("", "Reference model directory, loaded on the model's device and dtype (empty: the base model).")

    def __post_init__(self):
        super().__post_init__()
        require(self.beta > 0, "beta", "be > 0")


class NPO(TrainingPlugin):
    name, version = "npo", "1.0"
    description = "Negative preference optimisation against the base (or --set ref=DIR) model."
    Config = NPOConfig
    needs_retain = False
    presets = {"embedded": {"lr": 1e-4}, "conformance": {"lr": 1e-3, "epochs": 3}}

    def loss(self, trainer, step):
        return losses.npo(trainer.forward(step.forget).sequence_nll, trainer.reference(step.forget).sequence_nll,
                          trainer.config.beta)

    def objectives(self, config):
        return [Objective("forget answer NLL", forget_nll(config.forms), "up", 0.05)]

    def edit(self, job, config):
        reference = None
        if config.ref:
            from mmedit.loading import DTYPES, load

            weight = next(job.model.parameters())
            dtype = str(weight.dtype).removeprefix("torch.")
            reference, _ = load(config.ref, device=str(weight.device), dtype=dtype if dtype in DTYPES else "auto")
        return Trainer(job, config, self, reference_model=reference).run()


plugin = NPO()
