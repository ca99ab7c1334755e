"""`mmedit sweep`: search a plugin's declared options for its best forget / retain trade-offs (Optuna,
multi-objective) on a validation split of the people, then print and write the Pareto front and the
chosen point's options (docs/sweep.md)."""
from __future__ import annotations

import platform
import re
import time
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from mmedit.cli.common import Device, Dtype, Force, ImageDir, LogDir, Threads, TrustRemoteCode, load_model, out, \
    quiet_transformers, user_errors


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


def _searched(point: dict, space: dict) -> str:
    return " ".join(f"{name}={_show(point['options'][name])}" for name in space if name in point["options"])


def _show(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def pareto_table(record: dict) -> Table:
    """The Pareto front, most forgetting first; the chosen point is starred."""
    from mmedit.eval.report import HEADLINE

    chosen = record["chosen"]["number"]
    front = [trial for trial in record["trials"] if trial["number"] in record["pareto"]]
    front.sort(key=lambda t: -(t["values"]["forgot VQA"] + t["values"]["forgot QA"]))
    grid = Table(title=f"{record['plugin']['name']}: Pareto front of {len(record['trials'])} trials ({HEADLINE}, %)",
                 box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False,
                 caption=f"validation people only; forgot = 1 - edited/base, retain = edited/base (both forms); "
                         f"* = chosen: {record['chosen']['rule']}")
    for column in ("trial", "options"):
        grid.add_column(column, no_wrap=column == "trial")
    for column in ("forgot\nVQA", "forgot\nQA", "retain", "s"):
        grid.add_column(column, justify="right", no_wrap=True)
    for trial in front:
        mark = "*" if trial["number"] == chosen else ""
        values = trial["values"]
        grid.add_row(f"{trial['number']}{mark}", _searched(trial, record["space"]), _percent(values["forgot VQA"]),
                     _percent(values["forgot QA"]), _percent(values["retain"]), f"{trial['seconds']:.0f}")
    return grid


def plot(record: dict, path: Path, force: bool) -> Path:
    """Every completed trial at (mean forgetting, retain), the Pareto front in colour, the chosen point
    starred and the retain floor dashed; written atomically (safefile.save_figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmedit.plugins.sweep import RETAIN_FLOOR
    from mmedit.safefile import save_figure

    def point(trial):
        values = trial["values"]
        return 50 * (values["forgot VQA"] + values["forgot QA"]), 100 * values["retain"]

    done = [trial for trial in record["trials"] if trial["values"]]
    front = [trial for trial in done if trial["number"] in record["pareto"]]
    chosen = next(trial for trial in done if trial["number"] == record["chosen"]["number"])
    figure, axis = plt.subplots(figsize=(6.4, 5.2))
    axis.scatter(*zip(*map(point, done)), s=30, color="0.7", label="trial", zorder=2)
    axis.scatter(*zip(*map(point, front)), s=55, color="tab:blue", label="Pareto front", zorder=3)
    axis.scatter(*point(chosen), s=220, marker="*", color="tab:red", label=f"chosen (trial {chosen['number']})",
                 zorder=4)
    axis.axhline(100 * RETAIN_FLOOR, color="tab:red", linestyle="--", linewidth=0.8, alpha=0.6,
                 label=f"retain {RETAIN_FLOOR:.0%} of base")
    xs, ys = zip(*map(point, done))
    axis.set_xlim(min(-5, min(xs) - 5), 105)  # an edit can raise accuracy: negative forgetting, retain > 100
    axis.set_ylim(min(-5, min(ys) - 5), max(105, max(ys) + 5))
    axis.set_xlabel("forgetting rate, mean of VQA and QA (%), higher = more forgotten")
    axis.set_ylabel("retain: edited / base (%), higher = better kept")
    axis.set_title(f"mmedit sweep {record['plugin']['name']}: {len(record['trials'])} trials, validation people")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower left", fontsize=8)
    return save_figure(figure, path, force=force)


def _redacted(storage: str | None) -> str | None:
    """The storage URL without a password (user:password@host)."""
    return None if storage is None else re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", storage)


def _model_key(model: str) -> str:
    """A local model directory by its absolute path (so that ./tiny and tiny resume the same study), a hub id
    as given."""
    path = Path(model)
    return str(path.resolve()) if path.is_dir() else model


def _files(paths: dict) -> dict:
    from mmedit.cli.eval import set_sha256

    return {role: {"path": str(path), "sha256": set_sha256(path)} for role, path in paths.items()}


@user_errors
def sweep_command(
    plugin: Annotated[str, typer.Argument(help="Plugin name (see `mmedit plugins`); it must declare a search space.")],
    model: Annotated[str, typer.Argument(help="Base model: HF directory or hub id. It is never modified.")],
    forget: Annotated[Path, typer.Option(help="Forget set (the reported one): its people are never edited nor "
                                         "scored by the sweep.")],
    retain: Annotated[Path, typer.Option(help="Retain set: the validation forget and retain people are drawn from it.")],
    budget: Annotated[int, typer.Option(help="Trials to run now (added to a resumed study's).")],
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the JSON report (every trial, the front).")],
    storage: Annotated[str | None, typer.Option(help=(
        "Optuna storage URL, e.g. sqlite:///sweep.db: an existing sweep there continues (same plugin, model, data "
        "and options), a new one is made. Default: in memory, not resumable."))] = None,
    best: Annotated[Path | None, typer.Option(help="Also write the chosen point's options as a JSON object, for "
                                              "`mmedit apply --config`.")] = None,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Also write a PNG of the trials and the front.")] = None,
    settings: Annotated[list[str] | None, typer.Option("--set", help=(
        "Hold a plugin option at key=value in every trial (repeatable); a searched option set so is not searched."))] = None,
    preset: Annotated[str | None, typer.Option(help="Start from one of the plugin's named option sets; --set wins.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the validation people, the plugin and the sampler.")] = 0,
    val_people: Annotated[int | None, typer.Option(help=(
        "Retain people that play the forget people (default: as many as the forget set has)."))] = None,
    retain_people: Annotated[int, typer.Option(help="Other retain people scored each trial (a seeded sample; the "
                                               "edits see them all).")] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward call in evaluation.")] = 64,
    log_dir: LogDir = None,
    image_dir: ImageDir = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = 0,
    trust_remote_code: TrustRemoteCode = False,
    force: Force = False,
) -> None:
    """Search PLUGIN's declared options (Optuna, multi-objective: forgetting of VQA and of QA up, retain
    accuracy kept) on a validation split: retain people drawn with --seed play the forget people, the other
    retain people are kept, and the reported forget people are never edited nor scored. Prints the Pareto
    front; --best writes the chosen point (the most forgetting with retain >= 95 % of base) for `mmedit
    apply --config`. With --storage the study is resumable: run again to add --budget trials.

    Example: mmedit sweep ga tiny --forget bench/forget10.jsonl --retain bench/retain90.jsonl --budget 2 --set max_steps=4 --out sweep.json --best best.json --plot sweep.png
    """
    from mmedit import __version__
    from mmedit.cli.apply import parse_overrides, preset_options
    from mmedit.data import read_rows
    from mmedit.eval.report import write_json
    from mmedit.plugins import get
    from mmedit.plugins import sweep
    from mmedit.provenance import library_versions, model_identity
    from mmedit.safefile import atomic_file, check_writable

    started = time.perf_counter()
    chosen_plugin = get(plugin)
    fixed = sweep.fixed_options(chosen_plugin, preset_options(chosen_plugin, preset) | parse_overrides(None, settings or []))
    sweep.searched(chosen_plugin, fixed)  # no declared space: one error before anything is read
    sweep.check_budget(budget)
    for path in filter(None, (out_path, best, plot_path)):
        check_writable(path, force)
    if log_dir is not None:
        from mmedit.logs import check_log_dir

        check_log_dir(log_dir)
    split = sweep.validation_split(read_rows(forget, image_dir), read_rows(retain, image_dir), val_people,
                                   retain_people, seed)
    setup = sweep.describe(chosen_plugin, fixed, split, _model_key(model), seed)
    quiet_transformers()
    loaded, processor = load_model(model, device, dtype, trust_remote_code, threads)
    base = sweep.baseline(loaded, processor, split, batch_size)
    study = sweep.open_study(storage, setup)  # last: a refused run leaves no new storage behind
    record = sweep.run(study, plugin, loaded, processor, split, fixed, budget, seed, base, batch_size=batch_size,
                       log_dir=log_dir)
    record.update({
        "mmedit_version": __version__,
        "model": {"arg": model, **model_identity(loaded)},
        "files": _files({"forget": forget, "retain": retain}),
        "validation": split.people(),
        "settings": {"budget": budget, "seed": seed, "storage": _redacted(storage), "preset": preset,
                     "fixed": fixed, "val_people": val_people, "retain_people": retain_people,
                     "batch_size": batch_size, "device": device, "dtype": dtype},
        "timings": {"wall_s": round(time.perf_counter() - started, 2)},
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
        "versions": library_versions(),
    })
    write_json(record, out_path, force=force)
    if best is not None:
        import json

        with atomic_file(best, force=force) as temp:
            temp.write_text(json.dumps(record["chosen"]["options"], indent=1) + "\n", encoding="utf-8")
    if plot_path is not None:
        plot(record, plot_path, force)
    out.print(pareto_table(record))
    counts = {state: sum(trial["state"] == state for trial in record["trials"]) for state in ("COMPLETE", "FAIL")}
    people = record["validation"]
    out.print(f"{len(record['trials'])} trials ({counts['COMPLETE']} complete, {counts['FAIL']} failed; {budget} now) "
              f"on {len(people['forget'])} validation forget and {len(people['scored_retain'])} scored retain people; "
              f"wall {record['timings']['wall_s']:.0f} s", highlight=False, soft_wrap=True)
    written = [f"report: {out_path}"] + [f"best: {best}"] * (best is not None) + [f"plot: {plot_path}"] * (
        plot_path is not None)
    out.print(", ".join(written), highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep_command)
