"""The family registry: one JSON entry per `config.model_type`, never class-name sniffing.

Built-in entries live in `mmedit/arch/families/*.json`. More come from the directories named in the
`MMEDIT_FAMILIES` environment variable (os.pathsep-separated, read at lookup time, so setting it any
time before `model_map` is called works) and from `register_family(entry)`. A later entry with the same
model_type replaces the earlier one, so a user can also fix a built-in. See docs/architectures.md.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mmedit.errors import MmeditError

PARTS = ("vision", "projector", "llm")
IOS = ("input", "output")
KEYS = ("model_type", "image_token_id", "parts")  # an entry is the architecture only (tiny-model recipes: mmedit/zoo_recipes)
_BUILTIN = Path(__file__).parent / "families"

# model_type -> entry. Filled with the built-ins on import; register_family and MMEDIT_FAMILIES add to it.
FAMILIES: dict[str, dict] = {}
_loaded_env: set[str] = set()


def _check_paths(value, where: str) -> None:
    """A path group: a non-empty list of alternative dotted paths (first that resolves wins)."""
    if not (isinstance(value, list) and value and all(isinstance(path, str) for path in value)):
        raise MmeditError(f"{where}: expected a non-empty list of alternative module paths")


def validate(entry: object, source: str = "register_family") -> dict:
    """Check an entry's shape; any problem is one MmeditError naming the source and the field."""
    if not isinstance(entry, dict) or not isinstance(entry.get("model_type"), str) or not entry["model_type"]:
        raise MmeditError(f"{source}: a family entry needs a non-empty string 'model_type'")
    where = f"{source} ({entry['model_type']})"
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise MmeditError(f"{where}: unknown key {unknown[0]!r}; an entry has {', '.join(KEYS)}")
    tokens = entry.get("image_token_id", [])
    if not (isinstance(tokens, list) and all(isinstance(name, str) for name in tokens)):
        raise MmeditError(f"{where}: 'image_token_id' must be a list of config attribute names")
    parts = entry.get("parts")
    if not isinstance(parts, dict) or set(parts) != set(PARTS):
        raise MmeditError(f"{where}: 'parts' must have exactly the keys {', '.join(PARTS)}")
    for part in PARTS:
        spec = parts[part]
        at = f"{where} parts.{part}"
        if not isinstance(spec, dict):
            raise MmeditError(f"{at}: expected an object")
        roots = spec.get("roots")
        if not isinstance(roots, list) or not roots:
            raise MmeditError(f"{at}.roots: expected a non-empty list of path groups")
        for group in roots:
            _check_paths(group, f"{at}.roots")
        layers = spec.get("layers", [])
        if part != "projector" and not layers:
            raise MmeditError(f"{at}.layers: expected a non-empty list of path groups")
        for group in layers:
            _check_paths(group, f"{at}.layers")
        neuron = spec.get("neuron")
        if not isinstance(neuron, dict) or not isinstance(neuron.get("module"), str) or neuron.get("io") not in IOS:
            raise MmeditError(f"{at}.neuron: needs 'module' (path) and 'io' (input or output)")
        producers = neuron.get("producers")
        if not (
            isinstance(producers, list)
            and producers
            and all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and p[1] in (0, 1) for p in producers
            )
        ):
            raise MmeditError(f"{at}.neuron.producers: expected a list of [parameter path, axis 0 or 1]")
        for key in ("feature_layer", "image_only_layers"):
            if key in spec and not isinstance(spec[key], str):
                raise MmeditError(f"{at}.{key}: expected a config attribute path such as text_config.{key}")
    return entry


def register_family(entry: dict, source: str = "register_family") -> None:
    """Add (or replace) a family entry, validated first. The documented way to support a new model."""
    entry = validate(entry, source)
    FAMILIES[entry["model_type"]] = entry


def _load_file(path: Path) -> None:
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise MmeditError(f"family file {path}: cannot read JSON ({error})") from None
    register_family(entry, source=str(path))


def _load_env() -> None:
    """Load the directories named in MMEDIT_FAMILIES that were not loaded yet."""
    for folder in filter(None, os.environ.get("MMEDIT_FAMILIES", "").split(os.pathsep)):
        if folder in _loaded_env:
            continue
        directory = Path(folder)
        if not directory.is_dir():
            raise MmeditError(f"MMEDIT_FAMILIES: not a directory: {directory}")
        for path in sorted(directory.glob("*.json")):
            _load_file(path)
        _loaded_env.add(folder)


def family(model_type: str | None) -> dict:
    """The entry for a model_type, or an MmeditError naming the supported types."""
    _load_env()
    if model_type not in FAMILIES:
        raise MmeditError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))} "
            "(add one with MMEDIT_FAMILIES or mmedit.arch.register_family, see docs/architectures.md)"
        )
    return FAMILIES[model_type]


for _path in sorted(_BUILTIN.glob("*.json")):
    _load_file(_path)
