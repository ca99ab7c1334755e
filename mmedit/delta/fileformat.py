"""The delta file on disk: one safetensors file whose tensors are keyed `<parameter>/<field>`, plus one
JSON header stored under the safetensors metadata key "mmedit" (safetensors metadata is str -> str).

This module knows bytes, not edits: it writes atomically, reads, and checks what makes a file
trustworthy (a delta at all, a version we read, a checksum that matches). docs/delta-format.md is the spec.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmedit.errors import MmeditError, first_line
from mmedit.safefile import atomic_file, parse_json

FORMAT = "mmedit.delta"
FORMAT_VERSION = 1
HEADER_KEY = "mmedit"

# torch dtype -> the name safetensors writes in its own header; the checksum hashes these names.
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


PLACEHOLDER = "sha256:" + "0" * 64  # the checksum's value while the checksum is computed


def seal(header: dict, tensors: dict[str, torch.Tensor]) -> str:
    """The header as JSON text, its "checksum" filled in: sha256 over that text (with PLACEHOLDER as the
    checksum), then over every tensor in key order as `key NUL DTYPE NUL d0,d1,... NUL` + its raw bytes.
    Covering the text makes any edit of the provenance or the tensor table as detectable as a flipped weight."""
    text = json.dumps({**header, "checksum": PLACEHOLDER})
    if text.count(PLACEHOLDER) != 1:
        raise MmeditError("delta provenance must not contain the checksum placeholder string")
    return text.replace(PLACEHOLDER, _digest(text, tensors))


def _digest(text: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(text.encode("utf-8"))
    for key in sorted(tensors):
        tensor = tensors[key]
        shape = ",".join(str(size) for size in tensor.shape)
        digest.update(f"{key}\0{SAFETENSORS_DTYPES[tensor.dtype]}\0{shape}\0".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


def write(path: str | Path, tensors: dict[str, torch.Tensor], text: str, *, overwrite: bool = False) -> Path:
    """Write `tensors` and the sealed header `text` (see `seal`) atomically (mmedit.safefile.atomic_file):
    a crash or a full disk leaves the old file or the new one, never a mix."""
    with atomic_file(path, force=overwrite) as temp:
        save_file(tensors, temp, metadata={HEADER_KEY: text})
    return Path(path)


def read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) of a delta file whose checksum matches; MmeditError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise MmeditError(f"{path}: no such delta file")
    try:
        with safe_open(path, framework="pt") as opened:
            metadata = opened.metadata() or {}
            tensors = {key: opened.get_tensor(key) for key in opened.keys()}
    except Exception as error:
        raise MmeditError(f"{path} is not a readable safetensors file (corrupt or truncated): "
                          f"{first_line(error)}") from None
    if HEADER_KEY not in metadata:
        raise MmeditError(f"{path} is not an mmedit delta (no {HEADER_KEY!r} entry in its safetensors metadata)")
    header = parse_json(metadata[HEADER_KEY], f"{path} is corrupt: its mmedit header")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise MmeditError(f"{path} is not an mmedit delta (header format is not {FORMAT!r})")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise MmeditError(
            f"{path} is delta format version {version!r}; this mmedit reads version {FORMAT_VERSION} (upgrade mmedit?)"
        )
    unknown = sorted(key for key, tensor in tensors.items() if tensor.dtype not in SAFETENSORS_DTYPES)
    if unknown:
        raise MmeditError(f"{path}: tensor {unknown[0]!r} has dtype {tensors[unknown[0]].dtype}, unused by deltas")
    text, claimed = metadata[HEADER_KEY], header.get("checksum")
    valid = isinstance(claimed, str) and text.count(claimed) == 1
    if not valid or _digest(text.replace(claimed, PLACEHOLDER), tensors) != claimed:
        raise MmeditError(f"{path} is corrupt or was modified: its content does not match its checksum")
    return header, tensors

