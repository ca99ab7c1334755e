"""`mmedit sequential`: K unlearning requests one after another, each delta stacked on the earlier ones,
metrics after every request, and a one-shot edit of the union as control (mmedit.plugins.sequential)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from mmedit.cli.common import Device, Dtype, Force, ImageDir, Threads, TrustRemoteCode, load_model, out, \
    quiet_transformers, user_errors

REPORT, PLOT = "sequential.json", "sequential.png"
FORMS = (("VQA", "Image_Textual"), ("QA", "Pure_Text"))  # the table's and plot's names for the report's forms
COLUMNS = (("done", "forget_done"), ("current", "forget_current"), ("later", "forget_later"), ("retain", "retain"))


def request_file(number: int) -> str:
    return f"request-{number}.safetensors"


def _cell(table: dict, view: str, metric: str) -> str:
    """"67 / 97": the view's metric in % in the image form / the text form ("-" where not scored)."""
    values = [table.get(view, {}).get(form, {}).get(metric) for _, form in FORMS]
    return " / ".join("-" if value is None else f"{100 * value:.0f}" for value in values)


def _count(value: int) -> str:
    return next((f"{value / size:.1f}{unit}" for unit, size in (("M", 1e6), ("k", 1e3)) if value >= size), str(value))


def summary_table(record: dict) -> Table:
    """Base, each request and the union: the headline metric (%) per view, image / text form, and the
    elements each delta changed."""
    metric = record["headline_metric"]
    grid = Table(title=f"{record['plugin']['name']}: {record['requests']} sequential requests, {metric} (%) VQA / QA",
                 box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False, caption=(
                     "done = the forget groups edited so far, current = this request's group, later = groups not "
                     "asked for yet, retain = retain people; VQA = image form, QA = text form; delta = elements "
                     "changed"))
    for column in ("request", "people", *(name for name, _ in COLUMNS), "delta", "s"):
        grid.add_column(column, justify="left" if column == "request" else "right", no_wrap=True)
    people = sum(len(group) for group in record["groups"])
    grid.add_row("base", str(people), *[_cell(record["base"], view, metric) for _, view in COLUMNS], "", "")
    for row in [*record["sequence"], record["union"]]:
        grid.add_row("union" if row["request"] is None else str(row["request"]), str(len(row["people"])),
                     *[_cell(row["results"]["edited"], view, metric) for _, view in COLUMNS],
                     _count(row["delta"]["elements"]), f"{row['seconds']:.0f}")
    return grid


def plot(record: dict, path: Path, force: bool = False) -> Path:
    """One panel per form: the headline metric against the request number (0: the base) for the groups
    edited so far, the current group, the groups not asked for yet and the retain people; the union's
    one-shot edit as stars at request K. Written with mmedit.safefile.save_figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmedit.safefile import save_figure

    metric, requests, sequence = record["headline_metric"], record["requests"], record["sequence"]
    figure, axes = plt.subplots(1, len(FORMS), figsize=(5.2 * len(FORMS), 4.6), squeeze=False)

    def value(table: dict, view: str, form: str) -> float | None:
        found = table.get(view, {}).get(form, {}).get(metric)
        return None if found is None else 100 * found

    for axis, (name, form) in zip(axes[0], FORMS):
        lines = (("forgotten so far (groups 1..k)", "forget_done", "tab:red", "o"),
                 ("current group k", "forget_current", "tab:orange", "s"),
                 ("not yet asked (groups k+1..K)", "forget_later", "tab:purple", "v"),
                 ("retain people", "retain", "tab:blue", "D"))
        for label, view, colour, marker in lines:
            points = [(0, value(record["base"], "forget_later" if view.startswith("forget") else view, form))]
            points = ([] if view in ("forget_done", "forget_current") else points) + [
                (row["request"], value(row["results"]["edited"], view, form)) for row in sequence]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                axis.plot(*zip(*points), marker=marker, color=colour, label=label)
        for view, colour, label in (("forget_done", "tab:red", "union, one shot: forget"),
                                    ("retain", "tab:blue", "union, one shot: retain")):
            y = value(record["union"]["results"]["edited"], view, form)
            if y is not None:
                axis.scatter([requests], [y], marker="*", s=220, color=colour, edgecolor="black", zorder=5, label=label)
        axis.set_xticks(range(requests + 1))
        axis.set_xlim(-0.3, requests + 0.3)
        axis.set_ylim(-5, 105)
        axis.grid(alpha=0.3)
        axis.set_xlabel("request number (0: the base model)")
        axis.set_ylabel(f"{metric} (%)")
        axis.set_title(f"{name} ({form})")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.suptitle(f"{record['plugin']['name']}: {requests} sequential requests vs one shot", fontsize=11)
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    return save_figure(figure, path, force=force, dpi=110)


@user_errors
def sequential_command(
    plugin: Annotated[str, typer.Argument(help="Plugin name (see `mmedit plugins`).")],
    model: Annotated[str, typer.Argument(help="Base model: HF directory or hub id. It is never modified.")],
    forget: Annotated[Path, typer.Option(help="Forget set (mmedit JSONL or MLLMU-Bench parquet): its people are split into the requests' groups.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for request-1..K.safetensors, union.safetensors, sequential.json and sequential.png.")],
    requests: Annotated[int, typer.Option(help="Number of requests K: disjoint groups of the forget people, from 1 to their number.")],
    retain: Annotated[Path | None, typer.Option(help="Retain set (required by most plugins).")] = None,
    settings: Annotated[list[str] | None, typer.Option("--set", help="Plugin option key=value (repeatable).")] = None,
    config: Annotated[Path | None, typer.Option(help="Plugin options as a JSON object; --set wins.")] = None,
    preset: Annotated[str | None, typer.Option(help=(
        "Start from one of the plugin's named option sets (embedded: tuned for mmedit's embedded model); "
        "--config and --set win."))] = None,
    seed: Annotated[int, typer.Option(help="Seeds the groups, the retain sample and every edit.")] = 0,
    retain_people: Annotated[int, typer.Option(min=1, help="Retain people scored after every request (a seeded sample; the plugin sees every retain row).")] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per evaluation forward / generate call.")] = 64,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest generated answer, in tokens.")] = 8,
    letters: Annotated[bool, typer.Option("--letters/--no-letters", help="Also ask multiple choice as a lettered prompt (off: the embedded model was never taught it).")] = False,
    image_dir: ImageDir = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = 0,
    trust_remote_code: TrustRemoteCode = False,
    force: Force = False,
) -> None:
    """Unlearn the forget people as K requests, one after another: each request's group is edited on the
    model with the earlier requests' deltas applied, and its delta records that it stacks on them. The model
    is scored after every request (the groups done so far, the current one, those not asked for yet, the
    retain people; both forms), and a one-shot edit of all the groups is the control.
    `mmedit merge MODEL OUT/request-1.safetensors ... OUT/request-K.safetensors` applies the stack, and
    `mmedit revert` with the same files restores the base bit for bit.

    Example: mmedit sequential ga tiny --forget bench/forget10.jsonl --retain bench/retain90.jsonl --requests 2 --set lr=1e-3 --set max_steps=5 --retain-people 3 --out sequential-ga
    """
    from mmedit import __version__
    from mmedit.cli.apply import parse_overrides, preset_options
    from mmedit.cli.eval import set_sha256
    from mmedit.data import read_rows
    from mmedit.eval.report import write_json
    from mmedit.plugins import get
    from mmedit.plugins.sequential import check, run_requests
    from mmedit.provenance import library_versions, model_identity
    from mmedit.safefile import atomic_dir, check_writable

    overrides = preset_options(get(plugin), preset) | parse_overrides(config, settings or [])
    check_writable(out_dir, force)  # an existing or unwritable folder fails before any work
    sets = {role: (path, read_rows(path, image_dir)) for role, path in (("forget", forget), ("retain", retain))
            if path is not None}
    retain_rows = sets["retain"][1] if "retain" in sets else []
    check(plugin, sets["forget"][1], retain_rows, requests, seed, overrides)  # bad input fails before loading
    quiet_transformers()
    loaded, processor = load_model(model, device, dtype, trust_remote_code, threads)
    files = {role: {"path": str(path), "sha256": set_sha256(path), "rows": len(rows),
                    "people": len({row.entity for row in rows})} for role, (path, rows) in sets.items()}
    result = run_requests(plugin, loaded, processor, sets["forget"][1], retain_rows, requests,
                          overrides, seed, retain_people=retain_people, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, letters=letters,
                          provenance={"files": {role: {"path": entry["path"], "sha256": entry["sha256"]}
                                                for role, entry in files.items()}, "model_arg": model})
    record = {**result.record, "mmedit_version": __version__, "model": {"arg": model, **model_identity(loaded)},
              "data": files, "overrides": overrides, "preset": preset,
              "files": {"requests": [request_file(number) for number in range(1, requests + 1)],
                        "union": "union.safetensors", "plot": PLOT},
              "settings": {"retain_people": retain_people, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                           "letters": letters, "device": device, "dtype": dtype, "threads": threads,
                           "torch_threads": _torch_threads()},
              "versions": library_versions()}
    with atomic_dir(out_dir, force=force) as work:
        for number, delta in enumerate(result.deltas, 1):
            delta.save(work / request_file(number))
        result.union.save(work / "union.safetensors")
        write_json(record, work / REPORT)
        plot(record, work / PLOT)
    out.print(summary_table(record))
    out.print(f"deltas: {out_dir}/request-1..{requests}.safetensors (apply in this order), "
              f"{out_dir}/union.safetensors; "
              f"report: {out_dir / REPORT}, plot: {out_dir / PLOT}", highlight=False, soft_wrap=True)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def register(app: typer.Typer) -> None:
    app.command("sequential")(sequential_command)
