"""RMU (Li et al. 2024, WMDP): steer forget activations at decoder layer l to a fixed random direction,
keep retain activations where θ₀ had them; only the MLPs of layers 0..l train.

    L = MSE(h_θ^l(x_f), c·u) + α·MSE(h_θ^l(x_r), h_θ₀^l(x_r))

over non-pad positions; u is a seeded random unit vector (uniform entries, normalised, as in the
reference code). Paired forget/retain batches."""
from dataclasses import dataclass

from mmedit.plugins import losses
from mmedit.plugins.base import Choice, Range, option, require
from mmedit.plugins.objectives import Objective, retain_state_distance, steered_distance
from mmedit.plugins.training import (Selection, TrainConfig, TrainingPlugin, forms_option, largest_form, reference_rows,
                                     steered_layer)


@dataclass
class RMUConfig(TrainConfig):
    lr: float = option(5e-5, "AdamW learning rate (no weight decay).", space=Range(1e-6, 3e-3, log=True))
    layer: int = option(7, "Decoder layer l whose output is steered (clamped to the last layer); MLPs of 0..l train.")
    c: float = option(10.0, "Steering coefficient: forget activations are pushed towards c*u (search 1, 10, 100).",
                      space=Range(1.0, 300.0, log=True))
    alpha: float = option(1200.0, "Weight of the retain term (the RMU paper's value).", space=Range(0.1, 2000.0, log=True))
    forms: str = forms_option()

    def __post_init__(self):
        super().__post_init__()
        require(self.layer >= 0, "layer", "be >= 0")
        require(self.alpha >= 0, "alpha", "be >= 0")


def target(trainer, config, batch, states):
    """c·u: the fixed forget target."""
    return losses.fixed_target(losses.random_direction(states.shape[-1], trainer.job.seed, states.device),
                               config.c, states)


class RMU(TrainingPlugin):
    name, version = "rmu", "1.0"
    description = "Representation misdirection: forget activations at layer l -> c*u, retain ones kept."
    Config = RMUConfig
    head = "logits"  # a loss on hidden states
    presets = {"embedded": {"lr": 1e-3, "alpha": 1.0, "c": 100.0}, "conformance": {"lr": 1e-3, "epochs": 5}}
    search_space = {"forms": Choice(("multimodal", "text", "both"))}  # forms_option() is shared: its space is declared here

    def parts(self, config):
        return ("llm",)

    def selections(self, trainer, config):
        mlps = tuple(site.module.rsplit(".", 1)[0] + "."
                     for site in trainer.job.model_map.sites_of("llm")[: steered_layer(trainer.job, config) + 1])
        return {"train": Selection.whole(name for name in trainer.job.original if name.startswith(mlps))}

    def references(self, trainer, batch, which):
        """θ₀'s hidden states at layer l of the retain batches."""
        layer = steered_layer(trainer.job, trainer.config)
        return {"states": trainer.reference(batch, [layer]).held_states(layer)} if which == "retain" else {}

    loss_terms = True

    def loss(self, trainer, step):
        config, layer = trainer.config, steered_layer(trainer.job, trainer.config)
        forget = trainer.forward(step.forget, [layer]).states(layer)
        yield losses.misdirection(forget, target(trainer, config, step.forget, forget))
        retain = trainer.forward(step.retain, [layer]).states(layer)
        yield config.alpha * losses.retain_state(retain, step.reference("retain")["states"])

    def footprint(self, model, shapes, config):
        phases = super().footprint(model, shapes, config)
        tokens = shapes.batch("retain", largest_form(config.forms), 1).tokens
        states = reference_rows(shapes, config, "retain") * tokens * model.hidden("llm") * model.element
        for phase in phases:
            phase.add("references", states, off_device=model.device != "cpu")
        return phases

    def objectives(self, config):
        return [Objective("forget states' distance to c*u", steered_distance(steered_layer, target, config.forms),
                          "down", 1e-3),
                Objective("retain states' distance to base", retain_state_distance(steered_layer, config.forms),
                          "kept", 1e-5)]

    def edit(self, job, config):
        report = super().edit(job, config)
        return report | {"layer": steered_layer(job, config)}


plugin = RMU()
