"""NPO (Zhang et al. 2024): L = −(2/β)·mean log σ(β·(NLL_θ(x_f) − NLL_ref(x_f))), sequence-mean NLLs.

The reference is θ₀ unless `ref` names a model directory (the NPO paper's reference trained on the retain
set); its per-sequence NLLs of the forget batches are computed once before training (Trainer.prepare), and a
loaded reference model is dropped from memory before the first step."""
from dataclasses import dataclass

from mmedit.plugins import losses
from mmedit.plugins.base import Choice, Range, option, require
from mmedit.plugins.objectives import Objective, forget_nll
from mmedit.plugins.training import BaselineConfig, Trainer, TrainingPlugin, largest_form


@dataclass
class NPOConfig(BaselineConfig):
    beta: float = option(0.4, "Inverse temperature beta of the NPO loss.", space=Range(0.05, 2.0, log=True))
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
    search_space = {"lr": Range(1e-6, 1e-3, log=True), "forms": Choice(("multimodal", "text", "both"))}

    def references(self, trainer, batch, which):
        return {"nll": trainer.reference(batch).sequence_nll} if which == "forget" else {}

    def loss(self, trainer, step):
        return losses.npo(trainer.forward(step.forget).sequence_nll, step.reference("forget")["nll"],
                          trainer.config.beta)

    def footprint(self, model, shapes, config):
        """With `ref`, a second model of the same shape is loaded for the θ₀ passes before training."""
        from mmedit.plan import base_phase

        phases = super().footprint(model, shapes, config)
        if config.ref:
            batch = shapes.batch("forget", largest_form(config.forms), config.batch_size)
            phases.insert(0, base_phase(model, "reference model").add("references", model.bytes(model.numel))
                          .add("activations", model.activations(batch, {}, "loss")))
        return phases

    def objectives(self, config):
        return [Objective("forget answer NLL", forget_nll(config.forms), "up", 0.05)]

    def edit(self, job, config):
        reference = None
        if config.ref:
            from mmedit.loading import DTYPES, load

            weight = next(job.model.parameters())
            dtype = str(weight.dtype).removeprefix("torch.")
            reference, _ = load(config.ref, device=str(weight.device), dtype=dtype if dtype in DTYPES else "auto")
        trainer = Trainer(job, config, self, reference_model=reference)
        del reference  # the trainer drops it once its NLLs are computed
        return trainer.run()


plugin = NPO()
