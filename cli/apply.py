"""`mmedit apply` (run an edit plugin, write its delta) and `mmedit plugins` (list them, show options)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mmedit.cli.common import (Device, DeviceMap, Dtype, Force, IgnorePlan, ImageDir, LogDir, MaxMemory, OffloadDir, Threads,
                               TrustRemoteCode, check_memory, load_model, out, placement, user_errors)
from mmedit.errors import MmeditError, first_line
from mmedit.safefile import check_writable, parse_json


def parse_overrides(config_file: Path | None, settings: list[str]) -> dict[str, object]:
    """--config FILE (a JSON object) first, then each --set key=value on top."""
    overrides: dict[str, object] = {}
    if config_file is not None:
        try:
            text = config_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise MmeditError(f"cannot read config file {config_file}: {first_line(error)}") from None
        loaded = parse_json(text, f"config file {config_file}")
        if not isinstance(loaded, dict):
            raise MmeditError(f"config file {config_file} must hold a JSON object of options")
        overrides.update(loaded)
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key.strip():
            raise MmeditError(f"--set expects key=value, got {setting!r}")
        overrides[key.strip()] = value
    return overrides


def preset_options(plugin, preset: str | None) -> dict[str, object]:
    """The options of `plugin`'s named preset (none: {})."""
    if preset is None:
        return {}
    if preset not in plugin.presets:
        known = ", ".join(plugin.presets) or "none"
        raise MmeditError(f"{plugin.name} has no preset {preset!r}; its presets: {known}")
    return dict(plugin.presets[preset])


def _data(path: Path | None, role: str, image_dir: Path | None) -> tuple[list, dict]:
    from mmedit.data import read_rows
    from mmedit.provenance import file_sha256

    if path is None:
        return [], {}
    rows = read_rows(path, image_dir)
    return rows, {role: {"path": str(path), "sha256": file_sha256(path)}}


def _stats_paths(settings: list[str]) -> dict[str, Path]:
    """--stats KEY=PATH ... -> {key: path}, checked for syntax only."""
    paths: dict[str, Path] = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise MmeditError(f"--stats expects KEY=PATH (e.g. forget=forget.safetensors), got {setting!r}")
        if key in paths:
            raise MmeditError(f"--stats {key} given twice")
        paths[key] = Path(value.strip())
    return paths


def _stats(settings: list[str]) -> tuple[dict, dict]:
    """--stats KEY=PATH -> ({key: TraceStats}, {"stats/key": {path, sha256}})."""
    from mmedit.provenance import file_sha256
    from mmedit.trace import TraceStats

    loaded, files = {}, {}
    for key, path in _stats_paths(settings).items():
        loaded[key] = TraceStats.load(path) if _is_trace(path) else path
        files[f"stats/{key}"] = {"path": str(path), "sha256": file_sha256(path)}
    return loaded, files


def _is_trace(path: Path) -> bool:
    """Whether PATH is a `mmedit trace` file; other safetensors files (e.g. mip_editor's paths) reach the
    plugin as their path and the plugin reads its own format. Unreadable files count as traces, so that
    TraceStats.load names the problem."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return "mmedit_trace" in (handle.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return True


@user_errors
def apply_command(
    plugin: Annotated[str, typer.Argument(help="Plugin name (see `mmedit plugins`).")],
    model: Annotated[str, typer.Argument(help="Base model: HF directory or hub id. It is never modified.")],
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the delta (.safetensors).")],
    forget: Annotated[Path, typer.Option(help="Forget set: mmedit JSONL or MLLMU-Bench parquet.")],
    retain: Annotated[Path | None, typer.Option(help="Retain set (required by most plugins).")] = None,
    text_retain: Annotated[Path | None, typer.Option(
        help="Rows whose text-only form must be kept (MMUnlearner); default: the forget and retain rows.")] = None,
    settings: Annotated[list[str] | None, typer.Option("--set", help="Plugin option key=value (repeatable).")] = None,
    config: Annotated[Path | None, typer.Option(help="Plugin options as a JSON object; --set wins.")] = None,
    preset: Annotated[str | None, typer.Option(help=(
        "Start from one of the plugin's named option sets (`mmedit plugins NAME` lists them; embedded: the "
        "settings tuned for mmedit's embedded model); --config and --set win."))] = None,
    stats: Annotated[list[str] | None, typer.Option("--stats", help=(
        "Precomputed statistics KEY=PATH from `mmedit trace` (repeatable; keys per plugin, e.g. manu: forget, "
        "retain; mip_editor: paths, a file from `mmedit paths find`); the plugin skips "
        "that work."))] = None,
    seed: Annotated[int, typer.Option(help="Seed of every random choice: same seed, same delta.")] = 0,
    log_dir: LogDir = None,
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
    """Run an edit plugin on MODEL and write the edit as a delta file; MODEL itself is never changed.

    Example: mmedit apply ga tiny --forget bench/forget10.jsonl --retain bench/retain90.jsonl --set lr=1e-3 --set max_steps=20 --out ga.safetensors
    """
    from mmedit.plugins import apply_plugin, get

    placed = placement(device, device_map, max_memory, offload_dir)
    overrides = preset_options(get(plugin), preset) | parse_overrides(config, settings or [])
    options = get(plugin).configure(overrides)  # bad options fail before anything loads
    get(plugin).check_stats_keys(_stats_paths(stats or []))
    check_writable(out_path, force)  # an existing or unwritable output fails before the plugin runs
    if log_dir is not None:
        from mmedit.logs import check_log_dir

        check_log_dir(log_dir)
    forget_rows, files = _data(forget, "forget", image_dir)
    retain_rows, retain_file = _data(retain, "retain", image_dir)
    text_rows, text_file = _data(text_retain, "text_retain", image_dir)
    traced, stats_files = _stats(stats or [])
    check_memory(plugin, model, ignore=ignore_plan, device=device, dtype=dtype, footprint=get(plugin).footprint,
                 options=options, sets={"forget": forget_rows, **({"retain": retain_rows} if retain_rows else {})},
                 trust_remote_code=trust_remote_code, placed=placed)
    loaded, processor = load_model(model, device, dtype, trust_remote_code, threads, placed)
    delta = apply_plugin(plugin, loaded, processor, forget_rows, retain_rows, overrides, seed=seed,
                         stats=traced, text_retain_rows=text_rows if text_retain else None, log_dir=log_dir,
                         provenance={"files": files | retain_file | text_file | stats_files, "model_arg": model})
    if not delta.changes:
        raise MmeditError(f"{plugin} changed nothing (all updates were zero); no delta written")
    delta.save(out_path, overwrite=force)
    shown = get(plugin).report_table(delta.provenance.get("report") or {})
    if shown is not None:
        out.print(shown)
    counts = delta.counts()
    parts = ", ".join(f"{part} {tally['elements']:,}" for part, tally in counts.get("parts", {}).items())
    out.print(f"delta: {out_path} ({counts['tensors']} tensors, {counts['elements']:,} elements: {parts}; "
              f"{counts['bytes']:,} bytes)", highlight=False)


@user_errors
def plugins_command(
    name: Annotated[str | None, typer.Argument(help="Show this plugin's options.")] = None,
) -> None:
    """List the edit plugins (built-in and installed), or one plugin's options.

    Example: mmedit plugins mmunlearner
    """
    from mmedit.plugins import available, get
    from mmedit.plugins.registry import package_of

    if name is None:
        table = Table("plugin", "version", "package", "description", title="mmedit plugins")
        for plugin in available().values():
            table.add_row(plugin.name, plugin.version, package_of(plugin.name) or "", plugin.description)
        out.print(table)
        return
    plugin = get(name)
    space = plugin.space()
    table = Table("option", "default", "sweep searches", "help",
                  title=f"{plugin.name} {plugin.version}: {plugin.description}")
    for field in plugin.options():
        choices = field.metadata.get("choices")
        help_text = field.metadata["help"] + (f" [{' | '.join(map(str, choices))}]" if choices else "")
        table.add_row(field.name, str(field.default), _searched(space.get(field.name)), help_text)
    out.print(table)
    for preset, options in plugin.presets.items():
        settings = " ".join(f"{key}={value}" for key, value in options.items()) or "(the defaults)"
        out.print(f"preset {preset}: {settings}", highlight=False, markup=False)


def _searched(where) -> str:
    """An option's search space as `mmedit plugins NAME` shows it: 1e-05..0.01 (log), a | b, or blank."""
    if where is None:
        return ""
    if hasattr(where, "values"):
        return " | ".join(map(str, where.values))
    return f"{where.low:g}..{where.high:g}" + (" (log)" if where.log else "")


def register(app: typer.Typer) -> None:
    app.command("apply")(apply_command)
    app.command("plugins")(plugins_command)
