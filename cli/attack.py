"""`mmedit attack`: does what an edit forgot come back? Relearning, quantisation, a hidden-state probe,
membership inference and leakage across forms, on the edited model and on the base as control
(mmedit.eval.attacks)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from mmedit.cli.common import (AllowNonfinite, Device, Dtype, Force, ImageDir, LogDir, Threads, TrustRemoteCode, load_model, out,
                               quiet_transformers, user_errors)
from mmedit.eval.attack_settings import ATTACKS, PARTS, Settings

DEFAULT_ATTACKS = "relearn,quantize,probe,leakage"  # mia needs --mia-control: people the model never saw
DEFAULTS = Settings()


def _numbers(text: str, what: str) -> tuple[int, ...]:
    from mmedit.errors import MmeditError

    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise MmeditError(f"{what} must be comma-separated integers, got {text!r}") from None


@user_errors
def attack_command(
    model: Annotated[str, typer.Argument(help="HF model directory or hub id (the base model).")],
    deltas: Annotated[list[Path], typer.Option("--delta", help="The edit to attack (repeat: applied in order).")],
    data: Annotated[Path, typer.Option(help="Data folder: a synthetic benchmark, or forget/test/retain JSONL or MLLMU-Bench parquet.")],
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the JSON report.")],
    attacks: Annotated[str, typer.Option(help=f"Comma-separated, of: {', '.join(ATTACKS)}. mia needs --mia-control.")] = DEFAULT_ATTACKS,
    mia_control: Annotated[Path | None, typer.Option(help="Rows (JSONL or parquet) about people the model never saw: mia's non-members.")] = None,
    forget: Annotated[int, typer.Option(help="Forget percentage: picks forgetN / retain(100-N).")] = 10,
    plot: Annotated[Path | None, typer.Option(help="Also write a PNG: recovery per attack, probe accuracy, MIA AUC, leakage.")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the fact split, LoRA's initialisation, batch order and retain samples.")] = DEFAULTS.seed,
    steps: Annotated[int, typer.Option(min=1, help="relearn: optimiser steps.")] = DEFAULTS.steps,
    lr: Annotated[float, typer.Option(min=0.0, help="relearn: AdamW learning rate.")] = DEFAULTS.lr,
    rank: Annotated[int, typer.Option(min=1, help="relearn: LoRA rank (alpha = 2 x rank).")] = DEFAULTS.rank,
    full: Annotated[bool, typer.Option("--full", help="relearn: train every weight instead of LoRA adapters.")] = False,
    lora_parts: Annotated[str, typer.Option(help=f"relearn: comma-separated parts whose linear layers get LoRA, of {', '.join(PARTS)}.")] = ",".join(DEFAULTS.lora_parts),
    train_batch_size: Annotated[int, typer.Option(min=1, help="relearn: rows per training step.")] = DEFAULTS.train_batch_size,
    bits: Annotated[str, typer.Option(help="quantize: comma-separated bit widths, each 2..8.")] = ",".join(map(str, DEFAULTS.bits)),
    group_size: Annotated[int, typer.Option(min=1, help="quantize: inputs per quantisation group.")] = DEFAULTS.group_size,
    probe_decay: Annotated[float, typer.Option(min=0.0, help="probe: L2 weight decay of the logistic-regression probe.")] = DEFAULTS.probe_decay,
    probe_steps: Annotated[int, typer.Option(min=1, help="probe: L-BFGS iterations per layer's probe.")] = DEFAULTS.probe_steps,
    min_k: Annotated[float, typer.Option(help="mia: Min-K%'s fraction of lowest-probability answer tokens, in (0, 1].")] = DEFAULTS.min_k,
    min_gap: Annotated[float, typer.Option(help="Recovery is left undefined where the edit moved a value by no more than this (fraction: 0.05 = 5 points).")] = DEFAULTS.min_gap,
    retain_people: Annotated[int, typer.Option(min=1, help="Retain people scored for collateral damage (seeded sample).")] = DEFAULTS.retain_people,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per evaluation forward / generate call.")] = DEFAULTS.batch_size,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest generated answer, in tokens.")] = DEFAULTS.max_new_tokens,
    letters: Annotated[bool, typer.Option("--letters/--no-letters", help="Also ask multiple choice as a lettered prompt (off: the embedded model was never taught it).")] = DEFAULTS.letters,
    log_dir: LogDir = None,
    allow_nonfinite: AllowNonfinite = False,
    image_dir: ImageDir = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = 0,
    trust_remote_code: TrustRemoteCode = False,
    force: Force = False,
) -> None:
    """Attack an edit and say how much of what it forgot comes back: relearn (fine-tune on half of each
    forget person's facts, scored on the other half; and on retain rows only), quantize (weight-only int8 /
    int4 round-to-nearest), probe (a linear probe fitted on the base model's hidden states of other retain
    people, read on the forget people's hidden states in the edited model), mia (loss and Min-K% membership
    AUC against --mia-control people) and leakage (forgotten in the image form, still known in the text
    form, and the reverse). Each runs on the edited
    model and, as control, on the base; recovery = (attacked - edited) / (base - edited).

    Example: mmedit attack tiny --delta mmu.safetensors --data bench --attacks quantize,probe,mia,leakage --mia-control bench-small/retain90.jsonl --out attack-mia.json --plot attack-mia.png
    """
    from mmedit import __version__
    from mmedit.cli.eval import delta_provenance, set_sha256
    from mmedit.data import read_rows
    from mmedit.delta import Delta
    from mmedit.errors import MmeditError
    from mmedit.eval import attack_report, attacks as attack_module
    from mmedit.eval.attack_settings import parse_attacks
    from mmedit.eval.report import write_json
    from mmedit.eval.harness import find_sets
    from mmedit.provenance import library_versions, model_identity
    from mmedit.safefile import check_writable

    for path in filter(None, (out_path, plot)):  # refused before any work, not after
        check_writable(path, force)
    if log_dir is not None:
        from mmedit.logs import check_log_dir

        check_log_dir(log_dir)
    chosen = parse_attacks(attacks)
    if mia_control is not None and "mia" not in chosen:
        raise MmeditError("--mia-control is for the mia attack: add mia to --attacks")
    settings = Settings(seed=seed, steps=steps, lr=lr, rank=rank, full=full,
                        lora_parts=tuple(part.strip() for part in lora_parts.split(",") if part.strip()),
                        train_batch_size=train_batch_size, bits=_numbers(bits, "--bits"), group_size=group_size,
                        probe_decay=probe_decay, probe_steps=probe_steps, min_k=min_k, min_gap=min_gap,
                        retain_people=retain_people, batch_size=batch_size, max_new_tokens=max_new_tokens,
                        letters=letters)
    files = {split: path for split, path in find_sets(data, forget).items() if split != "test"}
    sets = {split: read_rows(path, image_dir) for split, path in files.items()}
    control = read_rows(mia_control, image_dir) if mia_control is not None else None
    attack_module.check(chosen, sets, control, settings)
    if "quantize" in chosen:  # the layers' shapes from the config, before the weights load
        from mmedit.plan import Sized, read_config

        attack_module.quantizable(Sized(read_config(model, trust_remote_code)).model, settings.group_size)
    loaded_deltas = [Delta.load(path) for path in deltas]  # a bad delta fails before the model loads
    quiet_transformers()
    loaded, processor = load_model(model, device, dtype, trust_remote_code, threads)
    from mmedit.logs import logging_to

    header = {"attacks": list(chosen), "settings": dataclasses.asdict(settings),
              "deltas": [{"path": str(path), "checksum": delta.checksum} for path, delta in zip(deltas, loaded_deltas)]}
    with logging_to(log_dir, header):  # relearn's fine-tunings: relearn/<variant>/<base|edited>/loss, lr, grad_norm
        result = attack_module.run(loaded, processor, sets, loaded_deltas, chosen, settings, control,
                                   allow_nonfinite=allow_nonfinite)
    provenance = {
        "mmedit_version": __version__,
        "model": {"arg": model, **model_identity(loaded)},
        "deltas": [delta_provenance(path, delta) for path, delta in zip(deltas, loaded_deltas)],
        "data": {"folder": str(data), "forget_percent": forget, "sets": {
            split: {"path": str(path), "sha256": set_sha256(path), "rows": len(sets[split]),
                    "people": len({row.entity for row in sets[split]})} for split, path in files.items()},
            "mia_control": None if mia_control is None else {
                "path": str(mia_control), "sha256": set_sha256(mia_control), "rows": len(control),
                "people": len({row.entity for row in control})}},
        "attacks_run": list(chosen), "device": device, "dtype": dtype,
        "versions": library_versions(),
    }
    record = attack_report.build(result, provenance)
    write_json(record, out_path, force=force)
    for table in attack_report.tables(record):
        out.print(table)
    if plot:
        attack_report.plot(record, plot, force=force)
        out.print(f"plot: {plot}")
    out.print(f"report: {out_path}")


def register(app: typer.Typer) -> None:
    app.command("attack")(attack_command)
