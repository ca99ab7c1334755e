"""`mmedit data synth | show`: write the built-in synthetic benchmark, look inside a data file."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from mmedit.cli.common import Force, ImageDir, out, user_errors

data_app = typer.Typer(name="data", help="Benchmark data: synthesise profiles, inspect JSONL / parquet sets.",
                       no_args_is_help=True)


@data_app.command()
@user_errors
def synth(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the benchmark into.")],
    people: Annotated[int, typer.Option(help="Number of fictitious people.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed for names, looks, attributes, options and splits.")] = 0,
    image_size: Annotated[int, typer.Option(help="Portrait side in pixels.")] = 32,
    views: Annotated[int, typer.Option(help="Other pictures per person, for the test split.")] = 3,
    force: Force = False,
) -> None:
    """Write a seeded synthetic benchmark in MLLMU-Bench's shape (JSONL + parquet); same seed, same bytes.

    Reuses the folder when it already holds the same benchmark.

    Example: mmedit data synth --out bench-small --people 10 --seed 1
    """
    from mmedit.bench.profiles import generate

    info = generate(out_dir, n_people=people, seed=seed, image_size=image_size, n_views=views, force=force)
    table = Table("split", "people", "rows", "jsonl", "parquet",
                  title=f"{info.n_people} people, seed {info.seed}, {info.image_size} px — {info.root}")
    for split in info.sets:
        table.add_row(split, str(len(info.people_in(split))), str(len(info.rows(split))),
                      info.jsonl(split).name, info.parquet(split).relative_to(info.root).as_posix())
    out.print(table)


@data_app.command()
@user_errors
def show(
    file: Annotated[Path, typer.Argument(help="A .jsonl or .parquet set, or a folder of .parquet files.")],
    rows: Annotated[int, typer.Option("--rows", "-n", help="How many rows to print.")] = 5,
    image_dir: ImageDir = None,
) -> None:
    """Print the first rows of a data set and what it holds.

    Example: mmedit data show bench/forget10.jsonl -n 3
    """
    from mmedit.data.mllmu import read_rows

    data = read_rows(file, image_dir)
    table = Table(title=str(file))
    for name in ("id", "entity", "image", "question", "text question", "answer", "options"):
        # ids and file names stay whole (they are what a user greps for); long text wraps, never cut
        table.add_column(name, no_wrap=name in ("id", "image"), overflow="fold")
    for row in data[:rows]:  # data text is escaped: a "[Blank]" in a question is not rich markup
        options = "" if row.options is None else " | ".join(
            f"[b]{escape(option)}[/b]" if index == row.correct else escape(option)
            for index, option in enumerate(row.options))
        table.add_row(escape(row.id), escape(row.entity), "-" if row.image is None else Path(row.image).name,
                      escape(row.question), escape(row.text_question), escape(row.answer), options)
    out.print(table)
    counts = Table("rows", "entities", "with image", "multiple choice", "generation", "cloze", title="counts")
    counts.add_row(
        str(len(data)), str(len({row.entity for row in data})), str(sum(row.image is not None for row in data)),
        str(sum(row.options is not None for row in data)),
        str(sum(row.task == "qa" and row.options is None for row in data)),
        str(sum(row.task == "cloze" for row in data)))
    out.print(counts)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app)
