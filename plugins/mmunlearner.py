"""MMUnlearner (Huo et al., ACL'25 Findings): saliency-masked gradient ascent.

1. Diagonal Fisher (mean squared batch gradient, model in train mode, streamed by mmedit.trace) of every
   Linear weight of attention/MLP layers and the projector in the scope, on the forget VQA (F_T) and on
   the preserve set: retain VQA for the vision encoder and projector; the text-only QA of all entities
   (job.text_retain, by default forget + retain rows) together with the retain VQA for the LLM (F_P).
2. Mask m = (F_T + 1e-15) / (F_P + 1e-15) >= tau; a mask selecting nothing is an error.
3. One epoch over the retain batches (plain NLL on those weights, whole); after every ⌊|R|/|F|⌋ of them
   a forget step, −NLL(forget VQA), whose gradient is multiplied by m. Each kind of step has its own
   AdamW, so a forget step changes masked-in elements only — momentum from retain steps never leaks
   into it. Embeddings, norms, lm_head and everything outside the scope stay frozen.

Precomputed statistics (apply_plugin's `stats`): "forget" (multimodal forget rows), "retain" (multimodal
retain rows) and "text" (text form of the text-retain rows), each traced with fisher_params covering the
weights in scope ("text": the LLM ones). Vision layers no gradient reaches (ModelMap.expected_dead, e.g.
LLaVA's layers after vision_feature_layer) are left out: they cannot matter to the output.
"""
from dataclasses import dataclass

import torch

from mmedit.errors import MmeditError
from mmedit.modelstate import preserved
from mmedit.plugins.base import Range, option, require
from mmedit.plugins.objectives import Objective, nll_gap, retain_nll
from mmedit.plugins.training import Selection, TrainConfig, Trainer, TrainingPlugin, interleaved

SCOPES = {"vision": ("vision", "projector"), "language": ("llm",), "both": ("vision", "projector", "llm")}
EPSILON = 1e-15


@dataclass
class MMUnlearnerConfig(TrainConfig):
    tau: float = option(1.0, "Saliency threshold: a weight trains in forget steps where F_forget/F_preserve >= tau "
                        "(search 0.5, 1, 2).", space=Range(0.5, 4.0, log=True))
    scope: str = option("both", "Where to unlearn: vision (encoder + projector), language (LLM) or both.",
                        choices=tuple(SCOPES))

    def __post_init__(self):
        super().__post_init__()
        require(self.tau >= 0, "tau", "be >= 0")


def maskable(job, parts) -> list[str]:
    """Weights of the Linear modules inside the layers of `parts` (the projector is one layer)."""
    dead = set(job.model_map.expected_dead)
    names = []
    for path, module in job.model.named_modules():
        if isinstance(module, torch.nn.Linear):
            where = job.model_map.part_of(f"{path}.weight")
            if where and where[0] in parts and where[1] is not None and f"{where[0]}.{where[1]}" not in dead:
                names.append(f"{path}.weight")
    return names


def fisher(job, key: str, rows, form: str, names: list[str], batch_size: int):
    """TraceStats with the Fisher of `names` over `rows` (or the precomputed stats[key])."""
    from mmedit.data.batches import make_batches
    from mmedit.trace import TraceStats, trace

    def compute():
        params = dict(job.model.named_parameters())
        with preserved(job.model):
            for name in names:
                params[name].requires_grad_(True)
            job.model.train()
            batches = make_batches(rows, job.processor, form, batch_size=batch_size)
            return trace(job.model, batches, model_map=job.model_map, parts=("llm",), groups=("all",),
                         fisher_params=names, progress=job.progress, total=-(-len(rows) // batch_size),
                         description=f"MMUnlearner: Fisher of the {key} rows ({form})")

    return job.statistics(key, compute, {"form": form, "params": names, "batch_size": batch_size}, TraceStats)


def pooled(sets, name: str) -> torch.Tensor:
    """Mean squared batch gradient over all batches of several (stats, form) sets."""
    total = sum(stats.fisher(name, form) * _batches(stats, form) for stats, form in sets)
    return total / sum(_batches(stats, form) for stats, form in sets)


def _batches(stats, form: str) -> int:
    return int(stats.tensors[f"fisher_batches/{form}"].item())


class MMUnlearner(TrainingPlugin):
    name, version = "mmunlearner", "1.0"
    description = "Fisher-saliency-masked gradient ascent on forget VQA, interleaved with retain steps."
    Config = MMUnlearnerConfig
    stats_keys = ("forget", "retain", "text")
    presets = {"embedded": {"lr": 1e-3, "tau": 2.0}, "conformance": {"lr": 1e-3, "epochs": 3}}
    search_space = {"lr": Range(1e-6, 3e-3, log=True)}  # TrainConfig's lr

    def parts(self, config):
        return SCOPES[config.scope]

    def selections(self, trainer, config):
        job = trainer.job
        names = maskable(job, self.parts(config))
        if not names:
            raise MmeditError(f"mmunlearner: no Linear weight in scope {config.scope}")
        language = [name for name in names if job.model_map.part_of(name)[0] == "llm"]
        # The preserve sets first, pooled per weight, then the forget set: two Fisher-sized sets at a time.
        retain = fisher(job, "retain", job.retain, "multimodal", names, config.batch_size)
        text = fisher(job, "text", job.text_retain, "text", language, config.batch_size) if language else None
        preserve = {name: pooled([(retain, "multimodal")] + ([(text, "text")] if name in language else []), name)
                    for name in names}
        del retain, text
        forget = fisher(job, "forget", job.forget, "multimodal", names, config.batch_size)
        masks = {}
        for name in names:
            ratio = (forget.fisher(name, "multimodal") + EPSILON) / (preserve.pop(name) + EPSILON)
            masks[name] = (ratio >= config.tau).cpu()  # in CPU memory: a forget step moves one at a time
        if not any(bool(mask.any()) for mask in masks.values()):
            raise MmeditError(f"mmunlearner: the saliency mask selects no weight at tau={config.tau}; lower tau")
        return {"forget": Selection(masks), "retain": Selection.whole(names)}

    def schedule(self, trainer, config):
        return interleaved(trainer, "multimodal")

    def loss(self, trainer, step):
        if step.kind == "forget":
            return -trainer.forward(step.forget).nll
        return trainer.forward(step.retain).nll

    def footprint(self, model, shapes, config, selected: float = 0.5):
        """Three Fisher passes (retain, text, forget: float32 sums of the scope's squared gradients, two sets
        at a time), then training: the scope whole for retain steps, `selected` of it (an assumption: the
        mask is data) for forget steps, with a bool mask of the scope."""
        from types import SimpleNamespace

        from mmedit.plan import base_phase, graph_modes
        from mmedit.plugins.training import training_phases

        names = maskable(SimpleNamespace(model=model.model, model_map=model.map), self.parts(config))
        scope = sum(model.numel[name] for name in names)
        language = sum(model.numel[name] for name in names if model.map.part_of(name)[0] == "llm")
        trained = {model.map.part_of(name)[0] for name in names}
        off = model.device != "cpu"  # finished statistics are moved to the CPU
        phases = []
        for which, form, accumulating, finished in (("retain", "multimodal", scope, 0), ("text", "text", language, scope),
                                                    ("forget", "multimodal", scope, scope)):
            batch = shapes.batch("retain" if which == "text" else which, form, config.batch_size)
            phase = base_phase(model, f"Fisher ({which})").add("statistics", 4 * accumulating)
            phase.add("statistics", 4 * finished, off_device=off)
            phase.add("gradients", max(model.numel[name] for name in names) * model.element)  # one at a time
            phase.add("activations", model.activations(batch, graph_modes(trained, form)))
            phases.append(phase)
        kinds = {"retain": {name: model.numel[name] for name in names},
                 "forget": {name: int(model.numel[name] * selected) for name in names}}
        training = training_phases(model, shapes, config, kinds, [("retain", "multimodal")])
        for phase in training:
            phase.add("statistics", scope, off_device=off)  # the bool masks
        return phases + training

    def objectives(self, config):
        return [Objective("forget minus retain VQA answer NLL", nll_gap("multimodal"), "up", 0.05),
                Objective("retain VQA answer NLL", retain_nll("multimodal"), "kept", 0.05)]

    def edit(self, job, config):
        trainer = Trainer(job, config, self)
        report = trainer.run()
        per_part = {}
        for name, mask in trainer.selections["forget"].masks.items():
            tally = per_part.setdefault(job.model_map.part_of(name)[0], [0, 0])
            tally[0] += int(mask.sum())
            tally[1] += mask.numel()
        return report | {"mask": {part: {"selected": n, "of": total} for part, (n, total) in per_part.items()}}


plugin = MMUnlearner()
