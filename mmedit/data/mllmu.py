"""MLLMU-Bench parquet files <-> mmedit `Row`s, and `read_rows`, which reads every supported format.

The hub's dataset (MLLMMU/MLLMU-Bench; sources in docs/data-format.md) is a folder of sets, each a folder
of parquet shards named `train-<i>-of-<n>.parquet`:

    forget_5/ forget_10/ forget_15/        the profiles to forget
    retain_95/ retain_90/ retain_85/       the other fictitious profiles
    Test_Set/ (2 shards)                   every fictitious profile, with other pictures (`images`)
    Full_Set/  Retain_Set/ (real people)  ft_Data/ (fine-tuning QA in `metadata`)

A set is read by naming its folder (`read_rows("MLLMU-Bench/forget_10")`). MLLMU-Bench's eval.py filters
Test_Set to the IDs of the forget set it tests; `read_rows(test, people_of=forget)` does the same.

One parquet row is one profile (see docs/data-format.md for the full schema):

    ID                   string
    image                struct{bytes: binary, path: string}       the profile's portrait
    images               list<struct{bytes, path}>  (Test_Set)      other pictures of the same person
    biography            string, optional: prose, or JSON whose "Name" names the person
    metadata             string, JSON list of {Question, Answer}  (ft_Data: fine-tuning QA, image form)
    Classification_Task  struct{Image_Textual_Questions, Pure_Text_Questions:
                                list<struct{Question, Options: struct{A, B, C, D}, Correct_Answer}>}
    Generation_Task      list<struct{Type, Question, Ground_Truth}>   Type: Image_Textual | Pure_Text
    Mask_Task            list<struct{Type, Question, Ground_Truth}>   cloze; the blank (`__`) is in Question

Each question becomes one Row, its Image_Textual form paired with the Pure_Text form of the same index:
multiple choice -> a "qa" row with options, generation -> a "qa" row without, mask -> a "cloze" row.
Row ids are `ID-choice-j`, `ID-gen-j`, `ID-cloze-j` (and `ID-train-j` for metadata); a row's entity is
the biography's Name, or the profile ID where the biography names no one. Where a profile has several
`images`, question j of each task is shown with images[j % len(images)], so every picture is used.
Embedded image bytes are written once, named by content hash, to a cache folder beside the file.
Text is read as stored: a blank stays `__` (MLLMU's) or `___` (the synthetic benchmark's).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import warnings
from itertools import zip_longest
from pathlib import Path

from mmedit.data.rows import Row, read_jsonl
from mmedit.errors import MmeditError
from mmedit.safefile import atomic_file, parse_json

LETTERS = ("A", "B", "C", "D")
BLANK = "__"  # MLLMU-Bench's cloze blank (its eval.py replaces "__" by "[Blank]")
_BLANK = re.compile(r"(?<!_)_{2,}(?!_)")  # a blank of two or more underscores
_SHARD = re.compile(r"(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.parquet")
FORMS = ("Image_Textual", "Pure_Text")
# part name -> (column, row-id tag); the parts read by default are the evaluation tasks
PARTS = {"train": ("metadata", "train"), "choice": ("Classification_Task", "choice"),
         "generation": ("Generation_Task", "gen"), "cloze": ("Mask_Task", "cloze")}
DEFAULT_PARTS = ("choice", "generation", "cloze")
_IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}
# "this person", "the individual in the image", ... -> the name, to make text twins of metadata questions
_REFERENT = re.compile(
    r"\b(?:this|the)\s+(?:person|individual|man|woman|lady|gentleman)"
    r"(?:\s+(?:in|shown in)\s+(?:the|this)\s+(?:image|picture|photo|photograph))?\b",
    re.IGNORECASE,
)


def row_id(profile_id: str, part: str, index: int) -> str:
    """The id a question gets in mmedit: profile, task, position within that task."""
    return f"{profile_id}-{PARTS[part][1]}-{index}"


def read_rows(path: str | Path, image_dir: str | Path | None = None,
              people_of: str | Path | None = None) -> list[Row]:
    """Read a set: a `.jsonl` file, a `.parquet` file, or a folder of `.parquet` files (an MLLMU-Bench set
    such as `forget_10/` or `Test_Set/`; its shards are read in name order and must all be there).

    `people_of` is another set: only the people it holds are kept, as MLLMU-Bench's eval.py keeps only the
    forget set's IDs of Test_Set. Parquet against parquet matches profile IDs (before any image is
    extracted), anything else entities. Every one of those people must be in this set.
    """
    path = Path(path)
    files = _parquet_files(path)
    if people_of is None:
        return read_jsonl(path) if files is None else [row for file in files for row in read_parquet(file, image_dir)]
    others = _parquet_files(Path(people_of))
    if files is None or others is None:
        wanted = list(dict.fromkeys(row.entity for row in read_rows(people_of, image_dir)))
        rows = read_rows(path, image_dir)
        _check_people(path, people_of, wanted, {row.entity for row in rows}, "entity")
        keep = set(wanted)
        return [row for row in rows if row.entity in keep]
    wanted = list(dict.fromkeys(profile for file in others for profile in _profile_ids(file)))
    held = {file: set(_profile_ids(file)) & set(wanted) for file in files}
    _check_people(path, people_of, wanted, set().union(*held.values()), "ID")
    return [row for file in files if held[file] for row in read_parquet(file, image_dir, ids=held[file])]


def read_parquet(path: str | Path, image_dir: str | Path | None = None,
                 parts: tuple[str, ...] = DEFAULT_PARTS, ids: set[str] | None = None) -> list[Row]:
    """Read an MLLMU-Bench parquet file into Rows; any problem is one MmeditError naming file and row.

    `image_dir` is where embedded images are extracted (default: `<file stem>.images/` beside the file).
    `parts` picks the questions: "choice", "generation", "cloze" (default) and "train" (metadata QA).
    `ids` keeps only the profiles with these IDs (the others are not read further, their images not
    extracted).
    """
    path = Path(path)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise MmeditError(f"unknown MLLMU part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    table = _read_table(path)
    missing = [name for name in ("ID",) if name not in table.column_names]
    if "image" not in table.column_names and "images" not in table.column_names:
        missing.append("image")
    if not any(PARTS[part][0] in table.column_names for part in parts):
        missing.append(" or ".join(PARTS[part][0] for part in parts))
    if missing:
        raise MmeditError(f"{path}: missing MLLMU-Bench column(s) {', '.join(missing)}")
    numbers = range(table.num_rows)  # row numbers in the file, for error messages
    if ids is not None:  # only the wanted profiles' bytes become Python objects
        numbers = [number for number, value in enumerate(table.column("ID").to_pylist()) if str(value) in ids]
        table = table.take(numbers)
    cache = Path(image_dir) if image_dir is not None else path.with_name(path.stem + ".images")
    created = not cache.exists()  # a cache folder this call makes goes again if the file turns out bad
    rows = []
    for number, record in zip(numbers, table.to_pylist()):
        where = f"{path}:row {number}"
        try:
            rows.extend(_profile_rows(record, where, cache, path.parent, parts))
        except MmeditError as error:
            if created:
                shutil.rmtree(cache, ignore_errors=True)
            raise MmeditError(f"{where} (ID {record.get('ID')!r}): {error}") from None
    if not rows:
        raise MmeditError(f"{path}: no questions")
    return rows


def write_parquet(rows: list[Row], path: str | Path, ids: dict[str, str] | None = None,
                  biographies: dict[str, dict] | None = None, blank: str | None = BLANK) -> None:
    """Write Rows as an MLLMU-Bench parquet file (one record per entity, in order of first appearance).

    Rows with options go to Classification_Task, other "qa" rows to Generation_Task (and, as training QA,
    to metadata), "cloze" rows to Mask_Task. `ids` maps entity -> profile ID (default "1", "2", ...);
    `biographies` adds fields to an entity's biography. A cloze question's blank (two or more
    underscores) is written as `blank`: MLLMU-Bench's `__` by default, so that its eval.py finds it;
    None keeps the rows' own. Read back with `read_parquet`, the same rows come out (ids follow
    `row_id`; images come back as files in the cache folder), with that blank in the cloze questions.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    by_entity: dict[str, list[Row]] = {}
    for row in rows:
        by_entity.setdefault(row.entity, []).append(row)
    if not by_entity:
        raise MmeditError(f"{path}: no rows to write")
    records = [
        _profile_record(entity, entity_rows, (ids or {}).get(entity, str(number)), (biographies or {}).get(entity, {}),
                        blank)
        for number, (entity, entity_rows) in enumerate(by_entity.items(), start=1)
    ]
    columns = [pa.field(name, kind) for name, kind in _schema().items()]
    if all(len(record["images"]) <= 1 for record in records):  # `images` is the test split's column only
        columns = [column for column in columns if column.name != "images"]
        for record in records:
            del record["images"]
    with atomic_file(path, force=True) as temp:
        pq.write_table(pa.Table.from_pylist(records, pa.schema(columns)), temp)


# ---- reading ---------------------------------------------------------------------------------------

def _parquet_files(path: Path) -> list[Path] | None:
    """The parquet files a set path names (None for JSONL), or one MmeditError saying what is wrong."""
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            sets = _sets_in(path)
            if sets:
                raise MmeditError(f"{path} is an MLLMU-Bench dataset folder, not a set: name one of its sets, "
                                  f"e.g. {path / sets[0]} (it has {', '.join(sets)})")
            raise MmeditError(f"{path}: folder holds no .parquet files")
        _check_shards(path, files)
        return files
    if path.suffix == ".parquet":
        return [path]
    if path.suffix == ".jsonl":
        return None
    if not path.exists() and not path.suffix:  # a set folder that is not there
        sets = _sets_in(path.parent) if path.parent.is_dir() else []
        have = f" ({path.parent} has {', '.join(sets)})" if sets else ""
        raise MmeditError(f"data not found: {path}{have}")
    raise MmeditError(f"{path}: unknown data format (expected .jsonl, .parquet or a folder of .parquet files)")


def _sets_in(folder: Path) -> list[str]:
    """Subfolders holding parquet files: the sets of a downloaded MLLMU-Bench folder."""
    return sorted(child.name for child in folder.iterdir() if child.is_dir() and any(child.glob("*.parquet")))


def _check_shards(folder: Path, files: list[Path]) -> None:
    """Every shard of a sharded set is there: `train-00001-of-00002.parquet` needs `train-00000-of-00002`."""
    names = {file.name for file in files}
    for name in sorted(names):
        match = _SHARD.fullmatch(name)
        if match:
            prefix, total = match["prefix"], int(match["total"])
            absent = [f"{prefix}-{index:05d}-of-{total:05d}.parquet" for index in range(total)
                      if f"{prefix}-{index:05d}-of-{total:05d}.parquet" not in names]
            if absent:
                raise MmeditError(f"{folder}: shard {absent[0]} is missing ({total - len(absent)} of {total} "
                                  "there); the download is incomplete")


def _read_table(path: Path, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    if not path.is_file():
        raise MmeditError(f"data file not found: {path}")
    try:
        return pq.read_table(path, columns=columns)
    except Exception as error:  # pyarrow raises several types for a bad file or column; all mean the same to a user
        raise MmeditError(f"{path}: not a readable parquet file ({error})") from None


def _profile_ids(path: Path) -> list[str]:
    """The profile IDs of a parquet file, read from its ID column alone."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise MmeditError(f"data file not found: {path}")
    try:
        names = pq.read_schema(path).names
    except Exception as error:
        raise MmeditError(f"{path}: not a readable parquet file ({error})") from None
    if "ID" not in names:
        raise MmeditError(f"{path}: missing MLLMU-Bench column(s) ID")
    return [str(value) for value in _read_table(path, ["ID"]).column("ID").to_pylist()]


def _check_people(path: Path, people_of, wanted: list[str], held: set[str], what: str) -> None:
    absent = [person for person in wanted if person not in held]
    if len(absent) == len(wanted):
        raise MmeditError(f"{path} holds none of the people of {people_of} (no {what} in common)")
    if absent:
        raise MmeditError(f"{path} lacks {len(absent)} of the {len(wanted)} people of {people_of} "
                          f"(e.g. {what} {absent[0]!r})")


def _profile_rows(record: dict, where: str, cache: Path, base: Path, parts: tuple[str, ...]) -> list[Row]:
    profile_id = record.get("ID")
    if profile_id is None or (isinstance(profile_id, str) and not profile_id.strip()):
        raise MmeditError("field 'ID' is empty")
    profile_id = str(profile_id)
    name = _name(record.get("biography"))
    images = [_image_file(image, cache, base) for image in (record.get("images") or []) if image is not None]
    if not images and record.get("image") is not None:
        images = [_image_file(record["image"], cache, base)]

    def image_for(index: int) -> Path | None:
        return images[index % len(images)] if images else None

    rows = []
    for part in parts:
        column = PARTS[part][0]
        if record.get(column) is None:
            continue
        if part == "train":
            pairs = [(qa, None) for qa in _question_list(_json_field(record, column), column, ("Question", "Answer"))]
        elif part == "choice":
            rows_by_form = _json_field(record, column)
            if not isinstance(rows_by_form, dict):
                raise MmeditError(f"field '{column}' must be an object with Image_Textual_Questions and "
                                  "Pure_Text_Questions")
            pairs = list(zip_longest(*(
                _question_list(rows_by_form.get(f"{form}_Questions") or [], f"{column}.{form}_Questions",
                               ("Question", "Options", "Correct_Answer"))
                for form in FORMS)))
        else:
            entries = _question_list(_json_field(record, column), column, ("Type", "Question", "Ground_Truth"))
            bad = [entry["Type"] for entry in entries if entry["Type"] not in FORMS]
            if bad:
                raise MmeditError(f"field '{column}': Type must be {' or '.join(FORMS)}, got {bad[0]!r}")
            pairs = list(zip_longest(*([entry for entry in entries if entry["Type"] == form] for form in FORMS)))
        for index, (image_form, text_form) in enumerate(pairs):
            rows.append(_row(part, image_form, text_form, name, name or profile_id, image_for(index),
                             row_id(profile_id, part, index), where, f"{column}[{index}]"))
    return rows


def _name(biography) -> str | None:
    """The person's name: the "Name" of a JSON biography (mmedit's writer, the synthetic benchmark), or
    None for a prose biography, one without a Name, or none at all."""
    if biography is None:
        return None
    if not isinstance(biography, str):
        raise MmeditError("field 'biography' must be a string (prose or JSON)")
    if not biography.lstrip().startswith(("{", "[")):
        return None  # prose
    parsed = parse_json(biography, "field 'biography'")  # text that opens like JSON must be JSON
    name = parsed.get("Name") if isinstance(parsed, dict) else None
    return name if isinstance(name, str) and name.strip() else None


def _row(part: str, image_form: dict | None, text_form: dict | None, name: str | None, entity: str,
         image: Path | None, identifier: str, where: str, entry: str) -> Row:
    # A question present in only one form still becomes a row: an image-only one gets a twin naming the
    # person (which needs the biography's Name), a text-only one has no image.
    first = image_form or text_form
    question = first["Question"]
    if text_form is None and name is None:
        raise MmeditError(f"{entry}: has no Pure_Text form, and the biography gives no \"Name\" to make one")
    text_question = text_form["Question"] if text_form else _named(question, name)
    if part == "choice":
        options, correct = _options(first, entry)
        return Row(id=identifier, entity=entity, image=image if image_form else None, question=question,
                   text_question=text_question, answer=options[correct], options=options, correct=correct,
                   where=f"{where}:{entry}")
    answer = first["Answer"] if part == "train" else first["Ground_Truth"]
    if not isinstance(answer, str) or not answer.strip():
        raise MmeditError(f"{entry}: the answer must be a non-empty string")
    task = "cloze" if part == "cloze" else "qa"
    return Row(id=identifier, entity=entity, image=image if image_form else None, question=question,
               text_question=text_question, answer=answer, task=task, where=f"{where}:{entry}")


def _options(question: dict, entry: str) -> tuple[tuple[str, ...], int]:
    options = question["Options"]
    if not isinstance(options, dict):
        raise MmeditError(f"{entry}: 'Options' must be an object with keys {', '.join(LETTERS)}")
    letters = [letter for letter in LETTERS if options.get(letter) is not None]
    if len(letters) < 2 or not all(isinstance(options[letter], str) for letter in letters):
        raise MmeditError(f"{entry}: 'Options' must hold at least two strings under {', '.join(LETTERS)}")
    correct = str(question["Correct_Answer"]).strip().upper()
    if correct not in letters:
        raise MmeditError(f"{entry}: 'Correct_Answer' must be one of {', '.join(letters)}, got {correct!r}")
    return tuple(options[letter] for letter in letters), letters.index(correct)


def _json_field(record: dict, column: str):
    value = record.get(column)
    if isinstance(value, str):  # the hub's files store biography and metadata as JSON text
        return parse_json(value, f"field '{column}'")
    return value


def _question_list(value, column: str, keys: tuple[str, ...]) -> list[dict]:
    if not isinstance(value, list):
        raise MmeditError(f"field '{column}' must be a list")
    for index, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise MmeditError(f"field '{column}[{index}]' must be an object")
        for key in keys:
            if entry.get(key) is None:
                raise MmeditError(f"field '{column}[{index}]' lacks '{key}'")
        if not isinstance(entry["Question"], str) or not entry["Question"].strip():
            raise MmeditError(f"field '{column}[{index}].Question' must be a non-empty string")
    return value


def _named(question: str, name: str) -> str:
    """Text twin of an image question: the referent replaced by the name, else the name put in front."""
    named, count = _REFERENT.subn(name, question)
    if count:
        return named[0].upper() + named[1:]
    return f"{name}: {question}"


def _image_file(image, cache: Path, base: Path) -> Path:
    """An HF image struct {bytes, path} -> a real file: bytes go to the cache, a bare path is resolved."""
    if not isinstance(image, dict):
        raise MmeditError("image must be a struct {bytes, path}")
    data = image.get("bytes")
    if data is None:
        if not image.get("path"):
            raise MmeditError("image has neither bytes nor path")
        file = (base / image["path"]).resolve()
        if not file.is_file():
            raise MmeditError(f"image not found: {file}")
        return file
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # PIL only warns between its pixel limit and twice that
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                suffix = _IMAGE_FORMATS.get(opened.format, ".img")
                opened.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:
        raise MmeditError(f"image bytes are not a readable image ({error})") from None
    file = (cache / (hashlib.sha256(data).hexdigest()[:32] + suffix)).resolve()
    if not file.is_file():  # named by content: an existing file already holds these bytes
        try:
            with atomic_file(file, force=True) as temp:
                temp.write_bytes(data)
        except (MmeditError, OSError) as error:
            raise MmeditError(f"cannot extract images to {cache} ({error}); pass image_dir") from None
    return file


# ---- writing ---------------------------------------------------------------------------------------

def _schema() -> dict:
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    choice = pa.list_(pa.struct([("Question", pa.string()),
                                 ("Options", pa.struct([(letter, pa.string()) for letter in LETTERS])),
                                 ("Correct_Answer", pa.string())]))
    typed = pa.list_(pa.struct([("Type", pa.string()), ("Question", pa.string()), ("Ground_Truth", pa.string())]))
    return {
        "ID": pa.string(), "image": image, "images": pa.list_(image), "biography": pa.string(),
        "metadata": pa.string(),
        "Classification_Task": pa.struct([(f"{form}_Questions", choice) for form in FORMS]),
        "Generation_Task": typed, "Mask_Task": typed,
    }


def _profile_record(entity: str, rows: list[Row], profile_id: str, biography: dict, blank: str | None) -> dict:
    tasks = {"choice": [], "generation": [], "cloze": []}
    for row in rows:
        part = "cloze" if row.task == "cloze" else "choice" if row.options is not None else "generation"
        tasks[part].append(row)
    images = _image_cycle(entity, tasks)
    choice = {f"{form}_Questions": [] for form in FORMS}
    for row in tasks["choice"]:
        if len(row.options) > len(LETTERS):
            raise MmeditError(f"{row.where or row.id}: MLLMU-Bench holds at most {len(LETTERS)} options")
        options = {letter: None for letter in LETTERS} | dict(zip(LETTERS, row.options))
        for form, question in zip(FORMS, (row.question, row.text_question)):
            choice[f"{form}_Questions"].append(
                {"Question": question, "Options": options, "Correct_Answer": LETTERS[row.correct]})

    def typed(part: str) -> list[dict]:  # all Image_Textual entries, then their Pure_Text twins in the same order
        def text(question: str) -> str:
            return _BLANK.sub(lambda _: blank, question) if part == "cloze" and blank is not None else question

        image_form = [{"Type": "Image_Textual", "Question": text(row.question), "Ground_Truth": row.answer}
                      for row in tasks[part]]
        text_form = [{"Type": "Pure_Text", "Question": text(row.text_question), "Ground_Truth": row.answer}
                     for row in tasks[part]]
        return image_form + text_form

    def struct(file: Path) -> dict:
        return {"bytes": file.read_bytes(), "path": file.name}

    return {
        "ID": profile_id,
        "image": struct(images[0]) if images else None,
        "images": [struct(file) for file in images],
        "biography": json.dumps({"Name": entity, **biography}, ensure_ascii=False),
        "metadata": json.dumps([{"Question": row.question, "Answer": row.answer} for row in tasks["generation"]],
                               ensure_ascii=False),
        "Classification_Task": choice,
        "Generation_Task": typed("generation"),
        "Mask_Task": typed("cloze"),
    }


def _image_cycle(entity: str, tasks: dict[str, list[Row]]) -> list[Path]:
    """The entity's pictures, checked to follow the reader's rule: question j shows images[j % len]."""
    images: list[Path] = []
    for part_rows in tasks.values():
        for row in part_rows:
            if row.image is not None and row.image not in images:
                images.append(row.image)
    for part_rows in tasks.values():
        for index, row in enumerate(part_rows):
            expected = images[index % len(images)] if images else None
            if row.image != expected:
                raise MmeditError(
                    f"{row.where or row.id}: entity {entity!r}: MLLMU-Bench parquet cannot hold this image layout "
                    "(question j of each task must show picture j mod the number of pictures; "
                    "all rows of an entity need an image, or none)")
    return images
