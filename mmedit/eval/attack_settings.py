"""What `mmedit attack` can run and with which settings; no torch here, so the CLI can show its defaults
without loading it."""
from __future__ import annotations

from dataclasses import dataclass

from mmedit.errors import MmeditError

ATTACKS = ("relearn", "quantize", "probe", "mia", "leakage")
PARTS = ("vision", "projector", "llm")  # mmedit.arch's parts: where LoRA adapters may go


@dataclass(frozen=True)
class Settings:
    """Every attack's settings. The defaults are scaled for the embedded model (docs/robustness.md)."""
    seed: int = 0  # the fact split, LoRA's initialisation, the batch order, the retain samples
    steps: int = 30  # relearning optimiser steps
    lr: float = 1e-3  # relearning learning rate (AdamW, no weight decay)
    rank: int = 8  # LoRA rank (alpha = 2 * rank)
    full: bool = False  # relearn every weight instead of LoRA adapters
    lora_parts: tuple[str, ...] = ("llm",)  # whose linear layers get LoRA adapters
    train_batch_size: int = 16
    bits: tuple[int, ...] = (8, 4)
    group_size: int = 32  # inputs per quantisation group
    probe_decay: float = 1e-3  # the probe's L2 weight decay (logistic regression on standardised features)
    probe_steps: int = 50  # the probe's L-BFGS iterations
    min_k: float = 0.2  # Min-K%'s fraction of lowest-probability answer tokens
    min_gap: float = 0.05  # recovery is None where the edit moved a value by no more than this (5 points)
    retain_people: int = 5  # retain people scored for collateral damage (seeded sample)
    batch_size: int = 64  # evaluation batch
    max_new_tokens: int = 8
    letters: bool = False  # also the lettered multiple-choice prompt (for a model taught to follow it)

    def __post_init__(self):
        bad = [part for part in self.lora_parts if part not in PARTS]
        if bad or not self.lora_parts:
            raise MmeditError(f"unknown LoRA part {bad[0]!r}; parts are {', '.join(PARTS)}" if bad
                              else f"no LoRA part named; parts are {', '.join(PARTS)}")
        if not self.bits or any(not 2 <= value <= 8 for value in self.bits):
            raise MmeditError(f"quantisation bit widths must be between 2 and 8, got {list(self.bits)}")
        if not 0 < self.min_k <= 1:
            raise MmeditError(f"Min-K% fraction must be in (0, 1], got {self.min_k}")
        for name in ("steps", "rank", "train_batch_size", "group_size", "retain_people", "batch_size",
                     "max_new_tokens", "probe_steps"):
            if getattr(self, name) < 1:
                raise MmeditError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.min_gap < 1:
            raise MmeditError(f"the recovery's minimum gap must be in [0, 1), got {self.min_gap}")
        if not self.probe_decay >= 0:
            raise MmeditError(f"the probe's weight decay must be at least 0, got {self.probe_decay}")
        if not self.lr > 0:
            raise MmeditError(f"the learning rate must be positive, got {self.lr}")


def parse_attacks(text: str) -> tuple[str, ...]:
    """"relearn,mia" -> ("relearn", "mia"), in ATTACKS order; an unknown or missing name is one error line."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ATTACKS]
    if unknown or not names:
        raise MmeditError(f"unknown attack {unknown[0]!r}; attacks are {', '.join(ATTACKS)}" if unknown
                          else f"no attack named; attacks are {', '.join(ATTACKS)}")
    return tuple(name for name in ATTACKS if name in names)
