"""`mmedit merge | revert | inspect | diff`: deltas and checkpoints."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Column, Table

from mmedit.cli.common import (AllowNonfinite, DeviceMap, Force, IgnorePlan, MaxMemory, OffloadDir, TrustRemoteCode,
                               WeightsDevice, check_memory, out, placement, quiet_transformers, user_errors)
from mmedit.provenance import describe

Deltas = Annotated[list[Path], typer.Argument(help="Delta files, in the order they are (or were) applied.")]


@user_errors
def merge_command(
    model: Annotated[str, typer.Argument(help="Base HF checkpoint directory (or hub id in the local cache).")],
    deltas: Deltas,
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the merged checkpoint.")],
    device: Annotated[str | None, typer.Option(help=(
        "Where the weights are added: cpu (the default without --device-map: no model runs, the result is the "
        "same bit for bit on any device), cuda, cuda:N or auto; with --device-map the map decides."))] = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_dir: OffloadDir = None,
    allow_nonfinite: AllowNonfinite = False,
    trust_remote_code: TrustRemoteCode = False,
    ignore_plan: IgnorePlan = False,
    force: Force = False,
) -> None:
    """Write MODEL with the deltas applied as a normal HF checkpoint; README.md records the deltas.

    Example: mmedit merge tiny mip.safetensors --out tiny-forgot-mip
    """
    from mmedit.checkpoint import merge

    device = device or ("auto" if device_map else "cpu")
    placed = placement(device, device_map, max_memory, offload_dir)
    quiet_transformers()
    check_memory("merge", model, ignore=ignore_plan, device=device, trust_remote_code=trust_remote_code, placed=placed)
    path = merge(model, deltas, out_dir, device=device, force=force, allow_nonfinite=allow_nonfinite,
                 trust_remote_code=trust_remote_code, placement=placed)
    out.print(f"merged {len(deltas)} delta(s) into {path}")


@user_errors
def revert_command(
    model_dir: Annotated[Path, typer.Argument(help="A checkpoint written by `mmedit merge`.")],
    deltas: Deltas,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Directory for the restored checkpoint.")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="Replace MODEL_DIR (atomically) instead.")] = False,
    device: WeightsDevice = "cpu",
    trust_remote_code: TrustRemoteCode = False,
    force: Force = False,
) -> None:
    """Undo `mmedit merge`: revert the deltas (listed as they were merged) and restore the weights bit for bit.

    Example: mmedit revert tiny-forgot-mip mip.safetensors --out tiny-again-mip
    """
    from mmedit.checkpoint import revert

    quiet_transformers()
    path = revert(model_dir, deltas, out_dir, in_place=in_place, device=device, force=force,
                  trust_remote_code=trust_remote_code)
    out.print(f"reverted {len(deltas)} delta(s) into {path}")


@user_errors
def diff_command(
    base: Annotated[str, typer.Argument(help="Base checkpoint directory (or a .safetensors file).")],
    edited: Annotated[str, typer.Argument(help="Edited checkpoint of the same model (or a .safetensors file).")],
    out_path: Annotated[Path, typer.Option("--out", help="Delta file to write (.safetensors).")],
    device: WeightsDevice = "cpu",
    allow_nonfinite: AllowNonfinite = False,
    trust_remote_code: TrustRemoteCode = False,
    force: Force = False,
) -> None:
    """Turn two checkpoints (e.g. the output of another unlearning tool) into a small delta.

    Example: mmedit diff tiny tiny-forgot-mip --out mip-diff.safetensors
    """
    from mmedit.checkpoint import diff
    from mmedit.errors import MmeditError
    from mmedit.safefile import check_writable

    check_writable(out_path, force)  # before minutes of loading
    quiet_transformers()
    delta = diff(base, edited, device=device, allow_nonfinite=allow_nonfinite, trust_remote_code=trust_remote_code)
    if not delta.changes:
        raise MmeditError(f"{base} and {edited} hold identical weights; no delta written")
    delta.save(out_path, overwrite=force)
    out.print(f"wrote {out_path}: {len(delta)} tensors, {delta.touched:,} elements, {_size(out_path.stat().st_size)}")


@user_errors
def inspect_command(
    delta_path: Annotated[Path, typer.Argument(metavar="DELTA", help="A delta file.")],
    tensors: Annotated[bool, typer.Option("--tensors", help="Also list every tensor.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the header JSON and nothing else.")] = False,
    model: Annotated[str | None, typer.Option(help=(
        "Base model (local folder or cached hub id) whose config places tensors the delta does not place "
        "itself (default: the base model the delta names, when it is on this machine)."))] = None,
) -> None:
    """Show a delta's provenance and what it touches per part and layer (checksum verified).

    Example: mmedit inspect mmu.safetensors --tensors
    Example: mmedit inspect mip-diff.safetensors --model tiny
    """
    from mmedit.delta import Delta

    delta = Delta.load(delta_path)
    header = delta.header()
    if as_json:
        print(json.dumps(header, indent=2))
        return
    _print_provenance(delta_path, header)
    groups: dict[tuple[str, str], list] = {}
    for name, (part, layer) in _places(header, model).items():
        groups.setdefault((part, "-" if layer is None else str(layer)), []).append(header["tensors"][name])
    table = Table("part", "layer", "tensors", "elements touched", "of", "density", title="what it touches")
    for (part, layer), specs in sorted(groups.items(), key=lambda item: (item[0][0], _layer_key(item[0][1]))):
        touched = sum(spec["touched"] for spec in specs)
        total = sum(math.prod(spec["shape"]) for spec in specs)
        table.add_row(part, layer, str(len(specs)), f"{touched:,}", f"{total:,}", _density(touched, total))
    out.print(table)
    if tensors:
        listing = Table(Column("tensor", overflow="fold"), Column("kind", no_wrap=True), "shape", "dtype",
                        "touched", "density", title="tensors")
        for name, spec in header["tensors"].items():
            kind = spec["kind"] + (f" (axis {spec['axis']})" if spec.get("axis") else "")
            listing.add_row(name, kind, "x".join(map(str, spec["shape"])) or "scalar", spec["dtype"],
                            f"{spec['touched']:,}", _density(spec["touched"], math.prod(spec["shape"])))
        out.print(listing)


def _print_provenance(path: Path, header: dict) -> None:
    counts, base = header["counts"], header.get("base_model") or {}
    out.print(f"[bold]{path}[/]  {_size(path.stat().st_size)}, format {header['format_version']}, "
              f"checksum ok ({header['checksum'][:19]}…)", highlight=False)
    out.print(f"touches {counts['tensors']} tensors, {counts['elements']:,} elements ({_size(counts['bytes'])} stored)")
    if base:
        revision = f" @ {base['revision']}" if base.get("revision") else ""
        out.print(f"base model: {base.get('name_or_path') or '?'} ({base.get('model_type') or '?'}){revision}")
    for key in ("plugin", "seed", "config", "data"):
        if header.get(key) not in (None, {}, ""):
            out.print(f"{key}: {describe(header[key])}", highlight=False, markup=False)
    libraries = header.get("libraries") or {}
    made = ", ".join(f"{name} {version}" for name, version in libraries.items()
                     if name != "mmedit" and version != "not installed")
    out.print(f"made with mmedit {header.get('mmedit_version', '?')}" + (f"; {made}" if made else ""))


OTHER = "other"  # the bucket of tensors that no model map puts in a part


def _places(header: dict, model: str | None) -> dict[str, tuple[str, int | None]]:
    """(part, layer) of each tensor: as the header records it (the model map placed it when the delta was
    made), else per the model map of the base model (`model`, or the one the header names); tensors that
    no map places go to "other"."""
    specs = header["tensors"]
    unplaced = [name for name, spec in specs.items() if "part" not in spec]
    source = model or (header.get("base_model") or {}).get("name_or_path")
    mapped = _config_map(source, explicit=model is not None) if unplaced and source else None
    if unplaced and mapped is None:
        out.print(f"[yellow]note:[/] {len(unplaced)} tensor(s) the delta does not place are counted as "
                  f"{OTHER}; --model BASE places them by the base model's architecture", highlight=False)
    places = {}
    for name, spec in specs.items():
        if "part" in spec:
            part, layer = spec["part"], spec.get("layer")
        else:
            part, layer = (mapped and mapped.part_of(name)) or (None, None)
        places[name] = (part, layer) if part else (OTHER, None)
    return places


def _config_map(source: str, explicit: bool):
    """The ModelMap of a base model built from its config alone (on the meta device: no weights are read,
    nothing is downloaded). None when a model the header names cannot be mapped here; for a --model
    given by the user that is an error."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from mmedit.arch import model_map
    from mmedit.errors import MmeditError
    from mmedit.errors import first_line

    folder = Path(source).expanduser()
    try:
        config = AutoConfig.from_pretrained(folder if folder.is_dir() else source, local_files_only=True)
        with torch.device("meta"):
            return model_map(AutoModelForImageTextToText.from_config(config))
    except (OSError, ValueError, MmeditError) as error:
        if not explicit:
            return None
        raise MmeditError(f"--model {source}: cannot map its architecture ({first_line(error)})") from None


def _layer_key(layer: str) -> tuple[int, int]:
    return (0, int(layer)) if layer.isdigit() else (1, 0)


def _density(touched: int, total: int) -> str:
    return f"{100 * touched / total:.3g} %" if total else "-"


def _size(nbytes: int) -> str:
    value, unit = float(nbytes), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{nbytes} B" if unit == "B" else f"{value:.1f} {unit}"


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_command)
    app.command("revert")(revert_command)
    app.command("inspect")(inspect_command)
    app.command("diff")(diff_command)
