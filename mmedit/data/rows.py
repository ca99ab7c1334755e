"""mmedit's JSONL format: one row per question about one entity (see docs/data-format.md).

    {"id": "p03-occupation", "entity": "Mara Velde", "image": "images/p03.png",
     "question": "What is the occupation of this person?",
     "text_question": "What is the occupation of Mara Velde?",
     "answer": "glassblower",
     "options": ["glassblower", "pilot", "baker", "judge"], "correct": 0,
     "task": "qa"}

`image` is relative to the JSONL file. `options`/`correct` are optional (multiple choice), `task` is
"qa" (short answer, default) or "cloze" (question holds a blank, answer fills it).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmedit.errors import MmeditError
from mmedit.safefile import atomic_file, parse_json

TASKS = ("qa", "cloze")
_REQUIRED = ("entity", "question", "text_question", "answer")


@dataclass(frozen=True)
class Row:
    id: str
    entity: str
    image: Path | None  # absolute path, or None for text-only rows
    question: str  # image form: refers to "this person"
    text_question: str  # text-only twin: names the entity
    answer: str
    options: tuple[str, ...] | None = None
    correct: int | None = None  # index into options
    task: str = "qa"
    where: str = field(default="", compare=False)  # "file:line", for error messages

    def to_json(self, relative_to: Path) -> dict:
        record = asdict(self)
        record.pop("where")
        record["image"] = None if self.image is None else Path(os.path.relpath(self.image, relative_to)).as_posix()
        record["options"] = None if self.options is None else list(self.options)
        return {key: value for key, value in record.items() if value is not None}


def _parse(record: object, where: str, base: Path) -> Row:
    if not isinstance(record, dict):
        raise MmeditError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in _REQUIRED:
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise MmeditError(f"{where}: field '{key}' must be a non-empty string")
    image = record.get("image")
    image_path = None
    if image is not None:
        if not isinstance(image, str):
            raise MmeditError(f"{where}: field 'image' must be a path string")
        image_path = (base / image).resolve()
        if not image_path.is_file():
            raise MmeditError(f"{where}: image not found: {image_path}")
    options = record.get("options")
    correct = record.get("correct")
    if options is not None:
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise MmeditError(f"{where}: field 'options' must be a list of at least two strings")
        if not isinstance(correct, int) or isinstance(correct, bool) or not 0 <= correct < len(options):
            raise MmeditError(f"{where}: field 'correct' must be an index into 'options' (0..{len(options) - 1})")
        options = tuple(options)
    elif correct is not None:
        raise MmeditError(f"{where}: field 'correct' given without 'options'")
    task = record.get("task", "qa")
    if task not in TASKS:
        raise MmeditError(f"{where}: field 'task' must be one of {', '.join(TASKS)}, got {task!r}")
    return Row(
        id=str(record.get("id", where)),
        entity=record["entity"],
        image=image_path,
        question=record["question"],
        text_question=record["text_question"],
        answer=record["answer"],
        options=options,
        correct=correct,
        task=task,
        where=where,
    )


def read_jsonl(path: str | Path) -> list[Row]:
    """Read and validate a JSONL set; any problem is one MmeditError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise MmeditError(f"data file not found: {path}")
    rows = []
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError as error:
        raise MmeditError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        rows.append(_parse(parse_json(line, where), where, path.parent.resolve()))
    if not rows:
        raise MmeditError(f"{path}: no rows")
    return rows


def write_jsonl(rows: list[Row], path: str | Path) -> None:
    """Write rows; image paths are stored relative to the file's folder."""
    path = Path(path)
    base = path.parent.resolve()
    text = "".join(json.dumps(row.to_json(base), ensure_ascii=False) + "\n" for row in rows)
    with atomic_file(path, force=True) as temp:
        temp.write_text(text, encoding="utf-8")
