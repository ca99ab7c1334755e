"""`mmedit zoo FAMILY --out DIR`: save a tiny random-weight model of a supported family, or (`embedded`)
the tiny LLaVA mmedit trained on its synthetic benchmark, the model `mmedit demo` edits."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmedit.cli.common import Force, out, user_errors


@user_errors
def zoo(
    family: Annotated[str, typer.Argument(help=(
        "Model family, e.g. llava, qwen2_vl, idefics3, mllama; or embedded: the tiny LLaVA trained on "
        "`mmedit data synth`'s default benchmark (shipped with mmedit, checksums verified)."))],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write the model to.")],
    seed: Annotated[int, typer.Option(help=(
        "Weight seed (same seed, same weights). embedded: the benchmark and training seed (0 is shipped; "
        "another trains here, about 2 min on a CPU, then is cached)."))] = 0,
    force: Force = False,
) -> None:
    """Save a tiny random-weight model (config, weights, processor) loadable offline with from_pretrained.

    Example: mmedit zoo llava --out tiny-llava
    Example: mmedit zoo embedded --out tiny
    """
    from mmedit import zoo as tiny_zoo

    if family == EMBEDDED:
        path = _embedded(out_dir, seed, force)
        out.print(f"saved the embedded model (trained on `mmedit data synth --seed {seed}`) to {path}",
                  highlight=False, soft_wrap=True)
        return
    path = tiny_zoo.write(family, out_dir, seed=seed, force=force, progress=True)
    out.print(f"saved tiny {family} model to {path}", highlight=False, soft_wrap=True)


EMBEDDED = "embedded"


def _embedded(out_dir: Path, seed: int, force: bool) -> Path:
    """Copy the embedded model (the shipped weights, verified; another seed: trained once, cached) to out_dir."""
    import shutil

    from mmedit.bench.model import embedded
    from mmedit.safefile import atomic_dir, check_writable

    check_writable(out_dir, force)
    source = embedded(seed=seed).model
    with atomic_dir(out_dir, force=force) as temp:
        for file in sorted(source.iterdir()):
            shutil.copy2(file, temp / file.name)
    return out_dir


def register(app: typer.Typer) -> None:
    app.command()(zoo)
