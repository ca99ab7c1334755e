"""`mmedit export DELTA --peft OUT`: a delta as a PEFT LoRA adapter (docs/export.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmedit.cli.common import Force, out, quiet_transformers, user_errors


@user_errors
def export_command(
    delta_path: Annotated[Path, typer.Argument(metavar="DELTA", help="A delta file.")],
    peft: Annotated[Path, typer.Option("--peft", help="Folder for the PEFT LoRA adapter "
                                                      "(adapter_model.safetensors + adapter_config.json).")],
    base: Annotated[str | None, typer.Option(help=(
        "The base model (folder or cached hub id): checked to be the delta's, and read for module types and "
        "whole biases (default: the config of the base model the delta names; no weights read)."))] = None,
    rank: Annotated[int | None, typer.Option(help=(
        "Allow element and dense changes as their truncated SVD of at most this rank; the relative error "
        "of each is printed (row changes stay exact whatever their rank)."))] = None,
    force: Force = False,
) -> None:
    """Write DELTA as a PEFT LoRA adapter that is exactly the edit for row and zeroed-row changes and biases.

    Example: mmedit export mip.safetensors --peft mip-lora --base tiny
    Example: mmedit export mmu.safetensors --peft mmu-lora --base tiny --rank 8
    """
    from mmedit.export import to_peft

    quiet_transformers()
    result = to_peft(delta_path, peft, base=base, rank=rank, force=force)
    for name, error in result.errors.items():
        out.print(f"{name}: truncated SVD, relative Frobenius error {error:.3g}", highlight=False, soft_wrap=True)
    if result.errors:
        worst = max(result.errors, key=result.errors.get)
        out.print(f"worst relative error {result.errors[worst]:.3g} ({worst})", highlight=False, soft_wrap=True)
    top = max(result.ranks.values())
    exact = "exact" if not result.errors else f"{len(result.errors)} tensor(s) approximated"
    out.print(f"wrote {result.path}: {len(result.ranks)} LoRA modules (rank up to {top}), "
              f"{len(result.biases)} whole bias(es); {exact}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
