"""KL-Min: ascent on the forget set, NLL on the retain set, and KL(p_θ₀ ‖ p_θ) on the retain answers."""
from mmedit.plugins import losses
from mmedit.plugins.base import Choice, Range
from mmedit.plugins.objectives import Objective, forget_nll, retain_kl
from mmedit.plugins.training import TrainingPlugin, reference_rows


class KLMin(TrainingPlugin):
    name, version = "kl_min", "1.0"
    description = "-NLL(forget) + NLL(retain) + KL(base || edited) on the retain answer tokens."
    presets = {"embedded": {"lr": 1e-4}, "conformance": {"lr": 1e-3, "epochs": 3}}
    search_space = {"lr": Range(1e-6, 1e-3, log=True), "forms": Choice(("multimodal", "text", "both"))}

    def references(self, trainer, batch, which):
        """θ₀'s answer logits of the retain batches (in the model's dtype: exactly its float32 values)."""
        if which != "retain":
            return {}
        base = trainer.reference(batch)
        return {"logits": base.answer_logits.to(base.logits.dtype)}

    loss_terms = True

    def loss(self, trainer, step):
        yield -trainer.forward(step.forget).nll
        retain = trainer.forward(step.retain)
        yield retain.nll + losses.kl_to_reference(retain.answer_logits, step.reference("retain")["logits"])

    def footprint(self, model, shapes, config):
        phases = super().footprint(model, shapes, config)
        logits = reference_rows(shapes, config, "retain") * shapes.answers * model.vocab * model.element
        for phase in phases:
            phase.add("references", logits, off_device=model.device != "cpu")
        return phases

    def objectives(self, config):
        return [Objective("forget answer NLL", forget_nll(config.forms), "up", 0.05),
                Objective("retain KL(base || edited)", retain_kl(config.forms), "kept", 0.05)]


plugin = KLMin()
