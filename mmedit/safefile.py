"""mmedit's artifact files (trace statistics, neuron paths): safetensors + one JSON header, written
atomically (temp file + rename), read back with one clear error for anything that is not the kind asked."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from mmedit.errors import MmeditError

if TYPE_CHECKING:  # safefile stays importable without torch (the data and zoo commands use it)
    import torch


def make_ordinary(path: str | Path) -> None:
    """Give a temp file or folder (mkstemp/mkdtemp make them private) the permissions a plain open() or
    mkdir would have given it under the current umask, before it is renamed into place."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only be read by
    setting it, which would briefly expose files other threads create)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)  # the safe fallback: anything created meanwhile is private, not open
    os.umask(mask)
    return mask


def save(path: str | Path, tensors: dict[str, torch.Tensor], key: str, header: dict, force: bool = False) -> Path:
    """Write tensors + header (JSON under metadata[key]); an existing file needs force."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not force:
        raise MmeditError(f"{path} exists; pass --force to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file({name: value.contiguous() for name, value in tensors.items()}, temporary,
                  {key: json.dumps(header, sort_keys=True)})
        make_ordinary(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def load(path: str | Path, key: str, format: str, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header without its "format", tensors) of a file written by save with header["format"] == format.
    `what` names the kind of file in errors ("trace statistics", "MIP-Editor paths")."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MmeditError(f"{what} file not found: {path}")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise MmeditError(f"{path}: not a readable safetensors file ({error})") from None
    if key not in metadata:
        raise MmeditError(f"{path}: not an mmedit {what} file (no '{key}' header)")
    header = json.loads(metadata[key])
    if header.pop("format", None) != format:
        raise MmeditError(f"{path}: unsupported {what} format (this mmedit reads {format})")
    return header, tensors
