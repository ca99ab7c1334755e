"""`mmedit eval`: the base model and the base + deltas on forget / test / retain, both forms."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated

import typer

from mmedit.cli.common import (AllowNonfinite, Device, DeviceMap, Dtype, Force, IgnorePlan, ImageDir, MaxMemory, OffloadDir,
                               Threads, TrustRemoteCode, check_memory, load_model, out, placement, quiet_transformers,
                               user_errors)


def set_sha256(path: Path) -> str:
    """sha256 of a set file, or of a folder of parquet files (over their names and hashes)."""
    from mmedit.provenance import file_sha256

    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for part in sorted(path.glob("*.parquet")):
        digest.update(f"{part.name}\0{file_sha256(part)}\n".encode())
    return digest.hexdigest()


def _placement_record(placed: dict, model) -> dict:
    """The report's record of a device map: as given, and where transformers put each module."""
    if not placed:
        return {}
    return {"device_map": placed["device_map"], "max_memory": placed["max_memory"],
            "placed": {name: str(device) for name, device in getattr(model, "hf_device_map", {}).items()}}


def delta_provenance(path: Path, delta) -> dict:
    return {"path": str(path), "checksum": delta.checksum, "provenance": delta.provenance, "counts": delta.counts()}


@user_errors
def eval_command(
    model: Annotated[str, typer.Argument(help="HF model directory or hub id (the base model).")],
    data: Annotated[Path, typer.Option(help="Data folder: a synthetic benchmark, or forget/test/retain JSONL or MLLMU-Bench parquet.")],
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the JSON report.")],
    deltas: Annotated[list[Path] | None, typer.Option("--delta", help="Delta to apply (repeat: applied in order).")] = None,
    forget: Annotated[int, typer.Option(help="Forget percentage: picks forgetN / testN / retain(100-N).")] = 10,
    limit_people: Annotated[int | None, typer.Option(min=1, help="Evaluate only N people per set.")] = None,
    seed: Annotated[int | None, typer.Option(help="With --limit-people: draw the people with this seed instead of taking the first N.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Also write a PNG: forget vs retain accuracy per form.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward / generate call.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest generated answer, in tokens.")] = 16,
    letters: Annotated[bool, typer.Option("--letters/--no-letters", help="Also ask multiple choice as a lettered prompt (LLaVA-1.5's instruction).")] = True,
    allow_nonfinite: AllowNonfinite = False,
    image_dir: ImageDir = None,
    device: Device = "auto",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_dir: OffloadDir = None,
    dtype: Dtype = "auto",
    threads: Threads = 0,
    trust_remote_code: TrustRemoteCode = False,
    ignore_plan: IgnorePlan = False,
    force: Force = False,
) -> None:
    """Score multiple choice (option likelihood and generated letter), generation (ROUGE-L) and cloze on
    the forget, test and retain sets, in the Image_Textual and Pure_Text forms, for the base model and
    (with --delta) the edited one; forgetting rate = 1 - edited/base, retention = edited/base.

    Example: mmedit eval tiny --delta mip.safetensors --data bench --limit-people 3 --out mip.json
    """
    from mmedit import __version__
    from mmedit.data import read_rows
    from mmedit.delta import Delta
    from mmedit.eval import report
    from mmedit.eval.harness import applied, evaluate, evaluate_edited, find_sets, select_people, summarise
    from mmedit.provenance import library_versions, model_identity
    from mmedit.safefile import check_writable

    placed = placement(device, device_map, max_memory, offload_dir)
    for path in filter(None, (out_path, plot)):  # refused before the evaluation, not after
        check_writable(path, force)
    files = find_sets(data, forget)
    # the test set is the forget people's other pictures: only theirs are kept (MLLMU-Bench's Test_Set
    # holds every person's, and its eval.py keeps the forget IDs)
    sets = {split: select_people(read_rows(path, image_dir, people_of=files["forget"] if split == "test" else None),
                                 limit_people, seed) for split, path in files.items()}
    loaded_deltas = [Delta.load(path) for path in deltas or []]  # a bad delta fails before the model loads
    quiet_transformers()
    check_memory("eval", model, ignore=ignore_plan, device=device, dtype=dtype, batch_size=batch_size,
                 trust_remote_code=trust_remote_code, placed=placed)
    loaded, processor = load_model(model, device, dtype, trust_remote_code, threads, placed)
    with applied(loaded, loaded_deltas, allow_nonfinite=allow_nonfinite):
        pass  # the deltas fit this model (or one clear error) before the base model is evaluated

    options = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, letters=letters)
    results = {report.BASE: summarise(evaluate(loaded, processor, sets, description="base model", **options))}
    if loaded_deltas:
        records = evaluate_edited(loaded, processor, sets, loaded_deltas, allow_nonfinite=allow_nonfinite,
                                  description="edited model", **options)
        results["edited"] = summarise(records)
    provenance = {
        "mmedit_version": __version__,
        "model": {"arg": model, **model_identity(loaded)},
        "deltas": [delta_provenance(path, delta) for path, delta in zip(deltas or [], loaded_deltas)],
        "data": {"folder": str(data), "forget_percent": forget, "sets": {
            split: {"path": str(path), "sha256": set_sha256(path), "rows": len(sets[split]),
                    "people": len({row.entity for row in sets[split]})} for split, path in files.items()}},
        "settings": {"limit_people": limit_people, "seed": seed, "people": "seeded sample" if seed is not None
                     and limit_people else "first N" if limit_people else "all", **options,
                     "device": device, "dtype": dtype, **_placement_record(placed, loaded)},
        "versions": library_versions(),
    }
    report.write_json(report.build(results, provenance), out_path, force=force)
    out.print(report.table(results))
    if plot:
        report.plot(results, plot, force=force)
        out.print(f"plot: {plot}")
    out.print(f"report: {out_path}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
