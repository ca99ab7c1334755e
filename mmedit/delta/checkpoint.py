"""Deltas and whole HF checkpoints: load a model with deltas applied, merge deltas into a checkpoint
directory, revert them out of one, and diff two checkpoints into a delta.

A merged directory is a normal HF checkpoint: the model's own save_pretrained writes the weights, every
other file of the source (config, processor, tokenizer, chat template) is copied as is, and README.md
gets a section recording the merged deltas, which revert removes again. Directories are written to a
temp directory beside the target and renamed into place, so a failure leaves the old one intact.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from mmedit.delta.core import Delta
from mmedit.errors import MmeditError
from mmedit.safefile import make_ordinary

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_CARD_BEGIN = "\n<!-- mmedit deltas: begin -->\n"
_CARD_END = "<!-- mmedit deltas: end -->\n"


def load_model(source: str | Path, *, device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False):
    """Any HF checkpoint as the class its config names (config.architectures), in eval mode."""
    import transformers

    from mmedit.loading import resolve_device, resolve_dtype

    target, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    try:
        config = transformers.AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise MmeditError(f"{source} is not a model directory or hub id: {_first_line(error)}") from None
    name = (config.architectures or [""])[0]
    model_class = getattr(transformers, name, None)
    if model_class is None and trust_remote_code:  # the Auto class whose auto_map entry names this class
        auto_map = getattr(config, "auto_map", None) or {}
        auto = next((key for key, ref in auto_map.items() if isinstance(ref, str) and ref.endswith(f".{name}")), None)
        model_class = getattr(transformers, auto, None) if auto else None
    if model_class is None:
        raise MmeditError(f"{source}: architecture {name or '(none)'} is not in transformers "
                          f"{transformers.__version__} (pass --trust-remote-code if the checkpoint ships its code)")
    try:
        model, info = model_class.from_pretrained(str(source), config=config, dtype=torch_dtype,
                                                  trust_remote_code=trust_remote_code, output_loading_info=True)
    except (OSError, ValueError) as error:
        raise MmeditError(f"cannot load {source}: {_first_line(error)}") from None
    # Weights that transformers would silently initialise at random must never reach a merged checkpoint.
    missing = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
    if missing:
        raise MmeditError(f"{source}: checkpoint lacks or mis-shapes weight {missing[0]} ({len(missing)} in all)")
    return model.to(target).eval()


def load(base, deltas: Iterable = (), *, device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False,
         allow_nonfinite: bool = False) -> torch.nn.Module:
    """`mmedit.load(base, deltas=[...])`: a model (or checkpoint path / hub id) with deltas applied in order.

    All or nothing: if one delta does not fit, those already applied are reverted before the error.
    """
    deltas = [delta if isinstance(delta, Delta) else Delta.load(delta) for delta in deltas]
    model = base if isinstance(base, torch.nn.Module) else load_model(
        base, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
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
          force: bool = False, allow_nonfinite: bool = False, trust_remote_code: bool = False) -> Path:
    """Write `source` with `deltas` applied (in order) as a new checkpoint directory `out`."""
    source, out, paths = _local_dir(source), Path(out), [Path(path) for path in deltas]
    _check_out(out, force)
    loaded = [Delta.load(path) for path in paths]
    model = load_model(source, device=device, trust_remote_code=trust_remote_code)
    for delta in loaded:
        delta.apply(model, allow_nonfinite=allow_nonfinite)
    readme, entries = _read_card(source)
    entries += [_card_entry(path, delta) for path, delta in zip(paths, loaded)]
    return _write_checkpoint(model, source, out, _card(readme, entries))


def revert(source: str | Path, deltas: Iterable[str | Path], out: str | Path | None = None, *, in_place: bool = False,
           device: str = "cpu", force: bool = False, trust_remote_code: bool = False) -> Path:
    """Undo a merge: revert `deltas` (listed in the order they were merged) last first, into `out` or in place."""
    source, paths = _local_dir(source), [Path(path) for path in deltas]
    if in_place == (out is not None):
        raise MmeditError("give either --out DIR or --in-place")
    out = source if in_place else Path(out)
    if not in_place:
        _check_out(out, force)
    loaded = [Delta.load(path) for path in paths]
    model = load_model(source, device=device, trust_remote_code=trust_remote_code)
    for delta in reversed(loaded):
        delta.revert(model)
    readme, entries = _read_card(source)
    for delta in reversed(loaded):  # drop the latest record of each reverted delta from the card
        checksum = delta.checksum
        hits = [i for i, entry in enumerate(entries) if entry.get("checksum") == checksum]
        if hits:
            del entries[hits[-1]]
    return _write_checkpoint(model, source, out, _card(readme, entries))


def diff(base: str | Path, edited: str | Path, *, device: str = "cpu", trust_remote_code: bool = False,
         allow_nonfinite: bool = False) -> Delta:
    """The delta taking checkpoint `base` to checkpoint `edited` (HF directories, or two .safetensors files)."""
    provenance = {"plugin": "diff", "config": {"base": str(base), "edited": str(edited)}}
    if Path(base).is_file() and Path(edited).is_file():
        from safetensors.torch import load_file

        weights = []
        for path in (base, edited):
            try:
                weights.append(load_file(path))
            except Exception as error:
                raise MmeditError(f"{path} is not a readable safetensors file: {_first_line(error)}") from None
        return Delta.from_state_dicts(*weights, provenance=provenance, allow_nonfinite=allow_nonfinite)
    from mmedit.provenance import model_identity

    models = [load_model(_local_dir(path), device=device, trust_remote_code=trust_remote_code)
              for path in (base, edited)]
    provenance["config"]["edited_model"] = model_identity(models[1])
    return Delta.from_models(*models, provenance=provenance, allow_nonfinite=allow_nonfinite)


# ---- directories --------------------------------------------------------------------------------------
def _local_dir(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MmeditError(f"{path} is not an HF checkpoint directory (no config.json)")
        return path
    try:  # a hub id already in the local HF cache; mmedit does not download here
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), local_files_only=True))
    except Exception:
        raise MmeditError(f"model not found: {source} is no directory, nor a hub id in the local HF cache") from None


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise MmeditError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise MmeditError(f"{out} exists and is not a directory")


def _is_weights(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES)


def _write_checkpoint(model: torch.nn.Module, source: Path, out: Path, readme: str | None) -> Path:
    """save_pretrained's weights + the source's other files + readme, swapped into `out` in one rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(temp)
        for item in source.iterdir():  # the source's own config, processor and tokenizer files win
            if item.name.startswith(".") or item.name == "README.md" or _is_weights(item.name):
                continue
            if item.is_dir():
                shutil.copytree(item, temp / item.name, dirs_exist_ok=True)
            else:
                shutil.copy2(item, temp / item.name)
        if readme is not None:
            (temp / "README.md").write_text(readme, encoding="utf-8")
        for file in temp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        make_ordinary(temp)
        _swap_into_place(temp, out)
    except BaseException as error:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(error, Exception) and not isinstance(error, MmeditError):
            raise MmeditError(f"could not write {out}: {_first_line(error)}") from error
        raise
    return out


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing target is exchanged atomically (Linux renameat2) and removed."""
    if not target.exists():
        os.rename(new, target)
        return
    if not _exchange(new, target):  # no renameat2: two renames, the old tree kept until the new one is in
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, backup)
        os.rename(new, target)
        new = backup
    shutil.rmtree(new)  # after the exchange `new` holds the old tree


def _exchange(first: Path, second: Path) -> bool:
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


# ---- model card ---------------------------------------------------------------------------------------
def _read_card(source: Path) -> tuple[str | None, list[dict]]:
    """(README as it was before any merge, or None if there was none; records of the merged deltas)."""
    path = source / "README.md"
    if not path.is_file():
        return None, []
    text = path.read_text(encoding="utf-8")
    if _CARD_BEGIN not in text:
        return text, []
    readme, _, section = text.partition(_CARD_BEGIN)
    try:
        record = json.loads(section.split("```json\n", 1)[1].split("\n```", 1)[0])
        return (readme if record["readme_existed"] else None), list(record["deltas"])
    except (IndexError, KeyError, TypeError, json.JSONDecodeError):
        raise MmeditError(f"{path}: the mmedit deltas section is damaged; remove it by hand") from None


def _card_entry(path: Path, delta: Delta) -> dict:
    header = delta.header()
    del header["tensors"]
    return {"file": path.name, **header}


def _card(readme: str | None, entries: list[dict]) -> str | None:
    if not entries:
        return readme
    rows = "\n".join(
        f"| {number} | `{entry['file']}` | {entry.get('plugin', '-')} | {entry['counts']['tensors']} | "
        f"{entry['counts']['elements']:,} | `{entry['checksum'][:19]}…` |"
        for number, entry in enumerate(entries, 1)
    )
    record = json.dumps({"readme_existed": readme is not None, "deltas": entries}, indent=1)
    section = (
        "## mmedit edits\n\n"
        "These weights are the base model with the mmedit deltas below merged, in this order. "
        "`mmedit revert DIR DELTA... --out DIR2` with the same delta files restores the base weights bit for bit.\n\n"
        "| # | delta | plugin | tensors | elements | checksum |\n|---:|---|---|---:|---:|---|\n"
        f"{rows}\n\n<details><summary>Provenance (JSON)</summary>\n\n```json\n{record}\n```\n\n</details>\n"
    )
    return (readme or "") + _CARD_BEGIN + section + _CARD_END


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
