"""`mmedit` — the Typer app. Each command lives in its own module and registers itself here."""
from __future__ import annotations

import os

import typer

# transformers' own tqdm bars ("Loading weights", "Writing model shards") would interleave with mmedit's
# rich progress; the CLI shows its own.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# OpenMP threads that wait by spinning make torch 3-10x slower than one thread whenever the cores are busy
# with other work (a shared machine, CI, two mmedit runs); waiting passively costs nothing when they are
# idle (BENCHMARKS.md "CPU threads"). Set before torch loads (commands import it lazily); a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    name="mmedit",
    help=(
        "Exact, reversible neuron-level editing and unlearning for multimodal LLMs.\n\n"
        "Example: mmedit demo   (the shipped tiny MLLM: traces, unlearns, evaluates)"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)



@app.callback()
def root() -> None:
    """Exact, reversible neuron-level editing and unlearning for multimodal LLMs."""


# Command modules, each with register(app). Importing them is cheap: torch loads inside commands.
from mmedit.cli import apply, attack, data, delta, demo, eval, export, info, paths, plan, report, sequential, sweep, trace, zoo  # noqa: E402

for module in (apply, attack, data, delta, demo, eval, export, info, paths, plan, report, sequential, sweep, trace, zoo):
    module.register(app)


def main() -> None:  # console-script entry point; under torchrun, inside its process group
    from mmedit import distributed

    with distributed.session():
        app()


if __name__ == "__main__":
    main()
