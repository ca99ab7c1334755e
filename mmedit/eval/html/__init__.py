"""`mmedit report`: one self-contained HTML file from a trace, deltas, eval and attack reports — a neuron
atlas per part and layer (traced importance, what each delta touches), forget/retain charts per method,
attack recovery, and the provenance of every input. No scripts, no network resources: inline CSS and SVG.

    html = build(trace="forget.safetensors", deltas=["manu.safetensors"], evals=["eval.json"])
    write(html, "report.html")            # or render(read_inputs(...)) to look at the inputs first
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mmedit.errors import MmeditError
from mmedit.eval.html import inputs as readers
from mmedit.eval.html import page
from mmedit.safefile import atomic_file

__all__ = ["build", "read_inputs", "render", "write"]


def read_inputs(trace: str | Path | None = None, deltas: Sequence[str | Path] = (), evals: Sequence[str | Path] = (),
                attacks: Sequence[str | Path] = ()) -> list[readers.Input]:
    """Every input read and checked (one MmeditError naming the first bad file), in a fixed order."""
    if trace is None and not (deltas or evals or attacks):
        raise MmeditError("nothing to report: give at least one of --trace, --delta, --eval, --attack")
    found = [readers.read_trace(trace)] if trace is not None else []
    found += [readers.read_delta(path) for path in deltas]
    found += [readers.read_eval(path) for path in evals]
    found += [readers.read_attack(path) for path in attacks]
    return found


def build(trace: str | Path | None = None, deltas: Sequence[str | Path] = (), evals: Sequence[str | Path] = (),
          attacks: Sequence[str | Path] = (), *, form: str = "multimodal", title: str = "mmedit report") -> str:
    """The report of these files as one HTML string."""
    return render(read_inputs(trace, deltas, evals, attacks), form=form, title=title)


def render(found: list[readers.Input], *, form: str = "multimodal", title: str = "mmedit report") -> str:
    """The report of inputs read by read_inputs, as one HTML string."""
    from mmedit import __version__
    from mmedit.provenance import library_versions
    from mmedit.trace import FORMS

    if form not in FORMS:
        raise MmeditError(f"unknown form {form!r}; forms are {', '.join(FORMS)}")
    of = {kind: [item for item in found if item.kind == kind] for kind in ("trace", "delta", "eval", "attack")}
    trace = of["trace"][0] if of["trace"] else None
    if trace is not None and form not in trace.content.forms:
        raise MmeditError(f"{trace.path} has no {form} statistics (traced forms: {', '.join(trace.content.forms)})")
    atlas_html, atlas_notes = page.atlas_section(trace, of["delta"], form)
    own = {"mmedit_version": __version__, "versions": library_versions(), "form": form,
           "inputs": [{"kind": item.kind, "path": str(item.path), "sha256": item.sha256} for item in found]}
    return page.page(title, {
        "inputs": page.inputs_section(found, _mismatches(trace, of["delta"]) + atlas_notes),
        "atlas": atlas_html,
        "eval": page.eval_section(of["eval"]),
        "attack": page.attack_section(of["attack"]),
        "provenance": page.provenance_section(found, own),
    })


def _mismatches(trace: readers.Input | None, deltas: list[readers.Input]) -> list[str]:
    """Deltas made on another model type than the traced one (the atlas then compares unlike things)."""
    if trace is None:
        return []
    traced = trace.content.meta.get("family")
    notes = []
    for delta in deltas:
        base = (delta.content.provenance.get("base_model") or {})
        made = base.get("model_type") if isinstance(base, dict) else None
        if made and traced and made != traced:
            notes.append(f"{delta.path}: made on a {made} model, but the trace is of a {traced} model")
    return notes


def write(html: str, path: str | Path, force: bool = False) -> Path:
    """Write atomically (safefile.atomic_file); an existing `path` needs force."""
    with atomic_file(path, force=force) as temp:
        temp.write_text(html, encoding="utf-8")
    return Path(path)
