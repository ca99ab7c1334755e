"""Deltas and whole HF checkpoints: load a model with deltas applied, merge deltas into a checkpoint
folder, revert them out of one, and diff two checkpoints into a delta.

A merged folder is a normal HF checkpoint: the model's own save_pretrained writes the weights, every
other file of the source (config, processor, tokenizer, chat template) is copied as is, and README.md
gets a section recording the merged deltas in order, which revert reads (to take them last first) and
removes again. Folders are written through mmedit.safefile.atomic_dir: a failure leaves the old one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import torch

from mmedit.delta import Delta, applied_stack
from mmedit.errors import MmeditError, first_line
from mmedit.loading import load_model
from mmedit.progress import phase
from mmedit.provenance import describe
from mmedit.safefile import atomic_dir, check_writable, parse_json

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_CARD_BEGIN = "\n<!-- mmedit deltas: begin -->\n"
_CARD_END = "<!-- mmedit deltas: end -->\n"


def load(base, deltas: Iterable = (), *, device: str | None = None, dtype: str = "auto", trust_remote_code: bool = False,
         allow_nonfinite: bool = False, device_map: str | dict | None = None, max_memory: dict | None = None,
         offload_dir: str | Path | None = None) -> torch.nn.Module:
    """`mmedit.load(base, deltas=[...])`: a model (or checkpoint path / hub id) with deltas applied in order;
    `device_map` (with `max_memory`, `offload_dir`) dispatches it as mmedit.loading.load_model does, the
    deltas written where each parameter lives. `device`: cpu by default, auto with a device map (or agreeing
    with the map).

    All or nothing: if one delta does not fit, those already applied are reverted before the error.
    """
    deltas = [delta if isinstance(delta, Delta) else Delta.load(delta) for delta in deltas]
    model = base if isinstance(base, torch.nn.Module) else load_model(
        base, device=device or ("auto" if device_map is not None else "cpu"), dtype=dtype,
        trust_remote_code=trust_remote_code, device_map=device_map, max_memory=max_memory, offload_dir=offload_dir)
    applied = []
    try:
        for delta in deltas:
            delta.apply(model, allow_nonfinite=allow_nonfinite)
            applied.append(delta)
    except BaseException:
        for delta in reversed(applied):
            delta.revert(model)
        raise
    return model


def merge(source: str | Path, deltas: Iterable[str | Path], out: str | Path, *, device: str = "cpu",
          force: bool = False, allow_nonfinite: bool = False, trust_remote_code: bool = False,
          progress: bool = True, placement: dict | None = None) -> Path:
    """Write `source` with `deltas` applied (in order) as a new checkpoint folder `out`. `placement`:
    device_map / max_memory / offload_dir for mmedit.loading.load_model (a model larger than memory,
    dispatched with disk offload: the deltas change the offloaded values where they live)."""
    source, paths = _local_dir(source), [Path(path) for path in deltas]
    out = check_writable(out, force)
    loaded = [Delta.load(path) for path in paths]
    readme, entries = _read_card(source)
    with phase(f"loading {source}", progress):
        model = load_model(source, device=device, trust_remote_code=trust_remote_code, **(placement or {}))
    applied_stack(model)[:] = [(entry["checksum"], entry["file"]) for entry in entries]  # deltas merged before
    for path, delta in zip(paths, loaded):
        with phase(f"applying {path.name}", progress):
            delta.apply(model, allow_nonfinite=allow_nonfinite)
    entries += [{"file": path.name, **_record(delta)} for path, delta in zip(paths, loaded)]
    return _write_checkpoint(model, source, out, _card(readme, entries), force, progress)


def revert(source: str | Path, deltas: Iterable[str | Path], out: str | Path | None = None, *, in_place: bool = False,
           device: str = "cpu", force: bool = False, trust_remote_code: bool = False, progress: bool = True) -> Path:
    """Undo a merge: revert `deltas`, listed in the order they were merged, last first, into `out` or in place.
    The README record of the merge says which deltas are on top; without one the values alone are checked."""
    source, paths = _local_dir(source), [Path(path) for path in deltas]
    if in_place == (out is not None):
        raise MmeditError("give either --out DIR or --in-place")
    out = source if in_place else check_writable(out, force)
    loaded = [Delta.load(path) for path in paths]
    readme, entries = _read_card(source)
    with phase(f"loading {source}", progress):
        model = load_model(source, device=device, trust_remote_code=trust_remote_code)
    applied_stack(model)[:] = [(entry["checksum"], entry["file"]) for entry in entries]
    for path, delta in reversed(list(zip(paths, loaded))):
        with phase(f"reverting {path.name}", progress):
            delta.revert(model)
    entries = entries[:len(applied_stack(model))]  # the records of the deltas still merged
    return _write_checkpoint(model, source, out, _card(readme, entries), force or in_place, progress)


def diff(base: str | Path, edited: str | Path, *, device: str = "cpu", trust_remote_code: bool = False,
         allow_nonfinite: bool = False, progress: bool = True) -> Delta:
    """The delta taking checkpoint `base` to checkpoint `edited` (HF folders, or two .safetensors files)."""
    provenance = {"plugin": "diff", "config": {"base": str(base), "edited": str(edited)}}
    if Path(base).is_file() and Path(edited).is_file():
        from safetensors.torch import load_file

        weights = []
        for path in (base, edited):
            try:
                with phase(f"loading {path}", progress):
                    weights.append(load_file(path))
            except Exception as error:
                raise MmeditError(f"{path} is not a readable safetensors file: {first_line(error)}") from None
        with phase("comparing the weights", progress):
            return Delta.from_state_dicts(*weights, provenance=provenance, allow_nonfinite=allow_nonfinite)
    from mmedit.provenance import model_identity

    models = []
    for path in (base, edited):
        with phase(f"loading {path}", progress):
            models.append(load_model(_local_dir(path), device=device, trust_remote_code=trust_remote_code))
    provenance["config"]["edited_model"] = model_identity(models[1])
    with phase("comparing the weights", progress):
        return Delta.from_models(*models, provenance=provenance, allow_nonfinite=allow_nonfinite)


def _local_dir(source: str | Path) -> Path:
    """A folder, or a hub id already in the local HF cache (merge copies the source's files; no downloads)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), local_files_only=True))
    except Exception:
        raise MmeditError(f"model not found: {source} is no directory, nor a hub id in the local HF cache") from None


def _write_checkpoint(model: torch.nn.Module, source: Path, out: Path, readme: str | None, force: bool,
                      progress: bool) -> Path:
    """save_pretrained's weights + the source's other files + readme, swapped into `out` in one rename."""
    with phase(f"writing {out}", progress), atomic_dir(out, force=force) as temp:
        model.save_pretrained(temp)
        for item in source.iterdir():  # the source's own config, processor and tokenizer files win
            if item.name.startswith(".") or item.name == "README.md" or item.name.endswith(_WEIGHT_SUFFIXES):
                continue
            if item.is_dir():
                shutil.copytree(item, temp / item.name, dirs_exist_ok=True)
            else:
                shutil.copy2(item, temp / item.name)
        if readme is not None:
            (temp / "README.md").write_text(readme, encoding="utf-8")
    return out  # atomic_dir gave every file umask modes (save_pretrained writes its weights 0600)


# ---- model card ---------------------------------------------------------------------------------------
def _read_card(source: Path) -> tuple[str | None, list[dict]]:
    """(README as it was before any merge, or None if there was none; records of the merged deltas, in order)."""
    path = source / "README.md"
    if not path.is_file():
        return None, []
    text = path.read_text(encoding="utf-8")
    if _CARD_BEGIN not in text:
        return text, []
    readme, _, section = text.partition(_CARD_BEGIN)
    try:
        record = parse_json(section.split("```json\n", 1)[1].split("\n```", 1)[0], f"{path}: the mmedit deltas section")
        entries = list(record["deltas"])
        if not all(isinstance(entry["checksum"], str) and isinstance(entry["file"], str) for entry in entries):
            raise TypeError
        return (readme if record["readme_existed"] else None), entries
    except (IndexError, KeyError, TypeError):
        raise MmeditError(f"{path}: the mmedit deltas section is damaged; remove it by hand") from None


def _record(delta: Delta) -> dict:
    header = delta.header()
    del header["tensors"]
    return {**header, "checksum": delta.checksum}


def _card(readme: str | None, entries: list[dict]) -> str | None:
    if not entries:
        return readme
    rows = "\n".join(
        f"| {number} | `{entry['file']}` | {describe(entry.get('plugin', '-'))} | {entry['counts']['tensors']} | "
        f"{entry['counts']['elements']:,} | `{entry['checksum'][:19]}…` |"
        for number, entry in enumerate(entries, 1)
    )
    record = json.dumps({"readme_existed": readme is not None, "deltas": entries}, indent=1)
    section = (
        "## mmedit edits\n\n"
        "These weights are the base model with the mmedit deltas below merged, in this order. "
        "`mmedit revert DIR DELTA... --out DIR2` with the same delta files, listed in this order, restores the "
        "base weights bit for bit.\n\n"
        "| # | delta | plugin | tensors | elements | checksum |\n|---:|---|---|---:|---:|---|\n"
        f"{rows}\n\n<details><summary>Provenance (JSON)</summary>\n\n```json\n{record}\n```\n\n</details>\n"
    )
    return (readme or "") + _CARD_BEGIN + section + _CARD_END
