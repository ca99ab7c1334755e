"""The report's inputs, read and checked: a trace file, deltas, eval and attack reports, each with its path,
size and sha256. A file that is unreadable or of another kind is one MmeditError naming it, before any
HTML is built; the fields the report uses are checked here, so the page code reads plain, well-formed data."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mmedit.errors import MmeditError
from mmedit.eval.attack_report import FORMAT as ATTACK_FORMAT
from mmedit.eval.report import BASE
from mmedit.provenance import file_sha256
from mmedit.safefile import parse_json

EVAL_FORMAT = "mmedit.eval-report"
KINDS = {EVAL_FORMAT: "an eval report (mmedit eval)", ATTACK_FORMAT: "an attack report (mmedit attack)"}


@dataclass
class Input:
    """One input file: what it is, where, its bytes' sha256, and what was read from it (`content`)."""

    kind: str  # "trace", "delta", "eval", "attack"
    path: Path
    sha256: str
    size: int
    content: object = field(repr=False)


def _file(path: Path, what: str) -> tuple[str, int]:
    if not path.is_file():
        raise MmeditError(f"{what} file not found: {path}")
    try:
        return file_sha256(path), path.stat().st_size
    except OSError as error:
        raise MmeditError(f"{path}: cannot read the {what} file ({error.strerror})") from None


def read_trace(path: str | Path) -> Input:
    from mmedit.trace import TraceStats

    path = Path(path)
    sha256, size = _file(path, "trace")
    stats = TraceStats.load(path)
    if not stats.sites:
        raise MmeditError(f"{path}: the trace file names no traced sites")
    return Input("trace", path, sha256, size, stats)


def read_delta(path: str | Path) -> Input:
    from mmedit.delta import Delta

    path = Path(path)
    sha256, size = _file(path, "delta")
    return Input("delta", path, sha256, size, Delta.load(path))


def _json_report(path: Path, format: str, kind: str) -> Input:
    sha256, size = _file(path, kind)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MmeditError(f"{path}: not {KINDS[format]}: not UTF-8 text") from None
    record = parse_json(text, str(path))
    found = record.get("format") if isinstance(record, dict) else None
    if found != format:
        what = KINDS.get(found, f"format {found!r}" if isinstance(found, str) else "no mmedit format")
        raise MmeditError(f"{path}: not {KINDS[format]}; it is {what}")
    return Input(kind, path, sha256, size, record)


def _is_table(value) -> bool:
    """{split: {form: {metric: number | None}}}, as harness.summarise writes it."""
    return isinstance(value, dict) and all(
        isinstance(forms, dict) and all(
            isinstance(metrics, dict) and all(isinstance(v, (int, float)) or v is None for v in metrics.values())
            for metrics in forms.values())
        for forms in value.values())


def read_eval(path: str | Path) -> Input:
    found = _json_report(Path(path), EVAL_FORMAT, "eval")
    results = found.content.get("results")
    if not isinstance(results, dict) or BASE not in results or not all(map(_is_table, results.values())):
        raise MmeditError(f"{path}: malformed eval report (its results are not one table per model, base included)")
    return found


def read_attack(path: str | Path) -> Input:
    found = _json_report(Path(path), ATTACK_FORMAT, "attack")
    attacks = found.content.get("attacks")
    if not isinstance(attacks, dict):
        raise MmeditError(f"{path}: malformed attack report (no attacks)")
    for name in ("relearn", "quantize"):
        if name not in attacks:
            continue
        entry = attacks[name]
        reference = entry.get("reference") if isinstance(entry, dict) else None
        variants = entry.get("variants") if isinstance(entry, dict) else None
        if not (isinstance(reference, dict) and _is_table(reference.get("base")) and _is_table(reference.get("edited"))
                and isinstance(variants, dict) and all(
                    isinstance(v, dict) and isinstance(v.get("attacked"), dict) and _is_table(v["attacked"].get("edited"))
                    and _is_table({"recovery": v.get("recovery")}) for v in variants.values())):
            raise MmeditError(f"{path}: malformed attack report ({name}: reference, variants or recovery missing)")
    leakage = attacks.get("leakage", {})
    if not (isinstance(leakage, dict) and isinstance(leakage.get("directions", {}), dict) and all(
            isinstance(d, dict) and all(isinstance(v, dict) and {"forgotten", "leaked", "rate"} <= v.keys()
                                        for v in d.values()) for d in leakage.get("directions", {}).values())):
        raise MmeditError(f"{path}: malformed attack report (leakage directions)")
    mia = attacks.get("mia", {})
    if not (isinstance(mia, dict) and isinstance(mia.get("models", {}), dict) and all(
            isinstance(m, dict) and isinstance(m.get("auc"), dict) for m in mia.get("models", {}).values())):
        raise MmeditError(f"{path}: malformed attack report (mia models)")
    return found
