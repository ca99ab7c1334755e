"""Provenance: what produced an artifact, so that it can be reproduced."""
from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path

from mmedit import DISTRIBUTION

_LIBRARIES = {"mmedit": DISTRIBUTION, **{name: name for name in ("torch", "transformers", "nnsight", "safetensors", "einops")}}


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name, distribution in _LIBRARIES.items():
        try:
            versions[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_identity(model) -> dict[str, str | None]:
    """Id and revision of a loaded HF model, as far as its config knows them."""
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "revision": getattr(config, "_commit_hash", None),
    }


def describe(value) -> str:
    """A provenance field as people read it, not as a Python dict: a plugin record {name, version,
    package} -> "ga 1.0 (mmedit==0.1.0)"; a data record {role: {rows, sha256}} -> "forget 150 rows
    (sha256 a475d5d1…), …"; any other mapping -> "key=value, …" (nested mappings in braces)."""
    if isinstance(value, dict):
        if {"name", "version"} <= value.keys() and not value.keys() - {"name", "version", "package"}:
            package = f" ({value['package']})" if value.get("package") else ""
            return f"{value['name']} {value['version']}{package}"
        if value and all(isinstance(item, dict) and "rows" in item for item in value.values()):
            return ", ".join(f"{role} {item['rows']} rows" + (f" (sha256 {str(item['sha256'])[:8]}…)"
                                                              if item.get("sha256") else "")
                             for role, item in value.items())
        return ", ".join(f"{key}={describe(item) if not isinstance(item, dict) else '{' + describe(item) + '}'}"
                         for key, item in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(describe(item) for item in value) + "]"
    return str(value)
