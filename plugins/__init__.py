"""Edit methods as plugins (shipped as mmedit.plugins).

    from mmedit.plugins import available, apply_plugin
    delta = apply_plugin("mmunlearner", model, processor, forget_rows, retain_rows, {"tau": 2.0}, seed=0)
    delta.save("forget.safetensors")

Every plugin, built-in or third-party, registers through the `mmedit.plugins` entry-point group; see
docs/writing-a-plugin.md. apply_plugin never leaves a change in the model passed in.
"""
from mmedit.plugins.apply import apply_plugin
from mmedit.plugins.base import Job, Plugin, option, require
from mmedit.plugins.objectives import Objective
from mmedit.plugins.originals import Originals
from mmedit.plugins.registry import GROUP, available, get
from mmedit.plugins.training import (BaselineConfig, Output, Passes, Selection, Step, TrainConfig, Trainer,
                                     TrainingPlugin, interleaved, paired)

__all__ = ["GROUP", "BaselineConfig", "Job", "Objective", "Originals", "Output", "Passes", "Plugin", "Selection", "Step",
           "TrainConfig", "Trainer", "TrainingPlugin", "apply_plugin", "available", "get", "interleaved", "option",
           "paired", "require"]
