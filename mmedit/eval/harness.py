"""Evaluate a model on forget / test / retain sets, in both forms, the way MLLMU-Bench scores them.

    sets = {"forget": rows_f, "test": rows_t, "retain": rows_r}
    records = evaluate(model, processor, sets)        # one Record per question, form and metric
    table = summarise(records)                        # {split: {form: {metric: mean}}}

Which rows feed which metric (every row in both forms; Image_Textual only for rows with a picture):

| row                          | metric              | how                                                          |
| has options                  | `choice_acc`        | each option scored as the answer: summed log-probability of  |
|                              |                     | its tokens (and the closing eos) after the plain question;    |
|                              |                     | the most likely option is the model's choice                 |
| has options                  | `answer_prob`       | the correct option's per-token probability (geometric mean   |
|                              |                     | over its tokens): moves before any choice flips               |
| has options                  | `choice_letter_acc` | the question with lettered options (LLaVA-1.5's prompt);     |
|                              |                     | the generated letter, read by metrics.parse_choice            |
| task "qa" without options    | `rougeL`, `gen_acc` | greedy generation: ROUGE-L F1, and whether the answer occurs  |
|                              |                     | in it (metrics.cloze_correct)                                 |
| task "cloze"                 | `cloze_acc`         | greedy generation contains the answer (metrics.cloze_correct) |

Multiple-choice rows are not also scored by ROUGE-L: in MLLMU-Bench (and the synthetic benchmark) the
generation rows ask the same questions, so that would count them twice.

Everything is batched: one forward scores `batch_size` options, one `generate` answers `batch_size`
prompts. Text prompts carry no pixel keys (make_prompts leaves them out).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from mmedit.data.batches import FORMS, IGNORE, make_batches, make_prompts
from mmedit.data.rows import Row
from mmedit.errors import MmeditError
from mmedit.loading import input_device
from mmedit.modelstate import preserved
from mmedit.eval import metrics
from mmedit.progress import track

REPORT_FORMS = dict(zip(FORMS, metrics.FORMS))  # batches' form -> the report's (MLLMU-Bench's) name
METRICS = ("choice_acc", "answer_prob", "choice_letter_acc", "rougeL", "gen_acc", "cloze_acc")
# LLaVA-1.5's multiple-choice instruction after a lettered list of options (MLLMU-Bench's own is "Just give
# ONE letter representing the answer directly.")
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Record:
    """One question's result under one metric, with what the model said."""
    split: str
    form: str  # Image_Textual | Pure_Text
    metric: str
    row: str  # row id
    entity: str
    value: float
    output: str  # generated text, or the chosen option


def lettered(row: Row, order: Sequence[int] | None = None) -> Row:
    """The multiple-choice row as a lettered prompt whose answer is the right letter.

    `order` lists option indices in the order to show them (default: as stored)."""
    if row.options is None or row.correct is None:
        raise MmeditError(f"{row.where or row.id}: row has no options to letter")
    if len(row.options) > len(metrics.LETTERS):
        raise MmeditError(f"{row.where or row.id}: {len(row.options)} options; letters go up to {metrics.LETTERS[-1]}")
    order = list(range(len(row.options))) if order is None else list(order)
    if sorted(order) != list(range(len(row.options))):
        raise MmeditError(f"{row.where or row.id}: bad option order {order}")
    listed = "\n".join(f"{metrics.LETTERS[i]}. {row.options[index]}" for i, index in enumerate(order))

    def ask(question: str) -> str:
        return f"{question}\n{listed}\n{LETTER_INSTRUCTION}"

    return dataclasses.replace(row, question=ask(row.question), text_question=ask(row.text_question),
                               answer=metrics.LETTERS[order.index(row.correct)], options=None, correct=None)


def find_sets(data: str | Path, forget: int = 10) -> dict[str, Path]:
    """The forget / test / retain files of a data folder, for one forget percentage.

    Understands the synthetic benchmark and mmedit JSONL (`forget10.jsonl`, `test10.jsonl`,
    `retain90.jsonl`) and MLLMU-Bench parquet names (`forget_10.parquet` or a `forget_10/` folder of
    parquet files, also under `parquet/`), and MLLMU-Bench as published (its `Test_Set/` holds every
    person's test pictures: read it with read_rows(..., people_of=the forget set), as `mmedit eval` does).
    The test set is optional.
    """
    data = Path(data)
    if not data.is_dir():
        raise MmeditError(f"data folder not found: {data}")
    if not 1 <= forget <= 99:
        raise MmeditError(f"forget percentage must be between 1 and 99, got {forget}")
    found = {}
    for split, percent in (("forget", forget), ("test", forget), ("retain", 100 - forget)):
        candidates = [data / f"{split}{percent}.jsonl"] + [
            folder / f"{split}_{percent}{suffix}" for folder in (data, data / "parquet") for suffix in (".parquet", "")]
        if split == "test":  # MLLMU-Bench as published: one Test_Set of every person, read for the forget IDs
            candidates.append(data / "Test_Set")
        path = next((path for path in candidates if path.is_file() or (path.is_dir() and any(path.glob("*.parquet")))),
                    None)
        if path is not None:
            found[split] = path
        elif split != "test":
            raise MmeditError(f"{data}: no {split} set for forget {forget}% "
                              f"(looked for {', '.join(path.name for path in candidates[:2])})")
    return found


def select_people(rows: Sequence[Row], count: int | None, seed: int | None = None) -> list[Row]:
    """The rows of `count` people: the first ones in file order, or a seeded sample when seed is given."""
    people = list(dict.fromkeys(row.entity for row in rows))
    if count is None or count >= len(people):
        return list(rows)
    if count < 1:
        raise MmeditError(f"number of people must be at least 1, got {count}")
    chosen = set(people[:count] if seed is None else random.Random(f"mmedit-eval:{seed}").sample(people, count))
    return [row for row in rows if row.entity in chosen]


def evaluate(model, processor, sets: dict[str, Sequence[Row]], *, forms: Sequence[str] = FORMS,
             batch_size: int = 16, max_new_tokens: int = 16, letters: bool = True, progress: bool = True,
             description: str = "evaluating") -> list[Record]:
    """Score every row of every set in every form (see the module doc); the model is left as it was.
    letters=False skips the lettered multiple-choice prompt (for models never taught to follow it)."""
    bad = [form for form in forms if form not in FORMS]
    if bad:
        raise MmeditError(f"unknown form {bad[0]!r}; forms are {', '.join(FORMS)}")
    jobs = []  # (split, form, kind, rows): kind is "options", "letters" or "generate"
    for split, rows in sets.items():
        for form in forms:
            usable = [row for row in rows if form == "text" or row.image is not None]
            choice = [row for row in usable if row.options is not None]
            letterable = [row for row in choice if letters and len(row.options) <= len(metrics.LETTERS)]
            jobs += [(split, form, "options", choice), (split, form, "letters", letterable),
                     (split, form, "generate", [row for row in usable if row.options is None])]
    jobs = [job for job in jobs if job[3]]
    if not jobs:
        raise MmeditError("nothing to evaluate: the sets are empty")
    total = sum(math.ceil(_units(kind, rows) / batch_size) for _, _, kind, rows in jobs)
    records: list[Record] = []
    with preserved(model, clear_grads=False), torch.no_grad():
        model.eval()
        steps = _run(model, processor, jobs, batch_size, max_new_tokens, records)
        for _ in track(steps, description, total=total, enabled=progress):
            pass
    return records


def evaluate_edited(model, processor, sets: dict[str, Sequence[Row]], deltas: Sequence, *,
                    allow_nonfinite: bool = False, **options) -> list[Record]:
    """`evaluate` with `deltas` (mmedit.Delta) applied in order; reverted in reverse order afterwards,
    also when something fails, so the model comes back bit for bit."""
    with applied(model, deltas, allow_nonfinite=allow_nonfinite):
        return evaluate(model, processor, sets, **options)


@contextlib.contextmanager
def applied(model, deltas: Sequence, *, allow_nonfinite: bool = False):
    """`deltas` applied in order (each verified against the model), reverted last-first on exit. Entering
    and leaving it at once checks that they fit, before any long evaluation."""
    with contextlib.ExitStack() as stack:
        for delta in deltas:
            stack.enter_context(delta.applied(model, allow_nonfinite=allow_nonfinite))
        yield model


def summarise(records: Iterable[Record]) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {form: {metric: mean}}}."""
    return metrics.aggregate(metrics.Score(r.split, r.form, r.metric, r.value) for r in records)


def by_entity(records: Iterable[Record]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{split: {form: {metric: {entity: mean}}}}: to find the person a model knows worst."""
    totals: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0])
    for r in records:
        total = totals[(r.split, r.form, r.metric, r.entity)]
        total[0] += r.value
        total[1] += 1
    table: dict = {}
    for (split, form, metric, entity), (value, count) in totals.items():
        table.setdefault(split, {}).setdefault(form, {}).setdefault(metric, {})[entity] = value / count
    return table


# ---- the three kinds of job ----------------------------------------------------------------------

def _units(kind: str, rows: Sequence[Row]) -> int:
    return sum(len(row.options) for row in rows) if kind == "options" else len(rows)


def _run(model, processor, jobs, batch_size, max_new_tokens, records):
    """Run the jobs, appending to `records`; yields once per batch (for the progress bar)."""
    kinds = {"options": _score_options, "letters": _answer_letters, "generate": _answer}
    for split, form, kind, rows in jobs:
        yield from kinds[kind](model, processor, rows, split, form, batch_size, max_new_tokens, records)


def _device(model) -> torch.device:
    return input_device(model)  # a dispatched model's execution device


def _score_options(model, processor, rows, split, form, batch_size, max_new_tokens, records):
    candidates = [dataclasses.replace(row, answer=option) for row in rows for option in row.options]
    scores: list[float] = []
    tokens: list[int] = []
    for batch in make_batches(candidates, processor, form=form, batch_size=batch_size, device=_device(model)):
        inputs = dict(batch.inputs)
        labels = inputs.pop("labels")
        scores += _answer_loglik(model(**inputs).logits, labels).tolist()
        tokens += (labels[:, 1:] != IGNORE).sum(dim=1).tolist()
        yield
    start, name = 0, REPORT_FORMS[form]
    for row in rows:
        chosen = metrics.choice_from_logliks(scores[start:start + len(row.options)])
        records.append(Record(split, name, "choice_acc", row.id, row.entity, float(chosen == row.correct),
                              row.options[chosen]))
        # per-token probability of the correct answer (geometric mean, TOFU's "probability"): a continuous
        # measure that moves before any choice flips
        correct = start + row.correct
        probability = math.exp(scores[correct] / max(tokens[correct], 1))
        records.append(Record(split, name, "answer_prob", row.id, row.entity, probability, f"{probability:.4f}"))
        start += len(row.options)


def _answer_loglik(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sequence: summed log-probability of the labelled tokens (log-softmax only where labelled,
    so a large vocabulary costs memory for the answer tokens only)."""
    target = labels[:, 1:]
    where = target != IGNORE
    picked = logits[:, :-1][where].float().log_softmax(dim=-1)
    token = picked.gather(-1, target[where].unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device)
    return sums.index_add_(0, where.nonzero()[:, 0], token).cpu()


def _answer_letters(model, processor, rows, split, form, batch_size, max_new_tokens, records):
    texts: list[str] = []
    yield from _generate(model, processor, [lettered(row) for row in rows], form, batch_size, max_new_tokens, texts)
    for row, text in zip(rows, texts):
        chosen = metrics.parse_choice(text, len(row.options))
        records.append(Record(split, REPORT_FORMS[form], "choice_letter_acc", row.id, row.entity,
                              float(chosen == row.correct), text))


def _answer(model, processor, rows, split, form, batch_size, max_new_tokens, records):
    texts: list[str] = []
    yield from _generate(model, processor, rows, form, batch_size, max_new_tokens, texts)
    name = REPORT_FORMS[form]
    for row, text in zip(rows, texts):
        found = float(metrics.cloze_correct(row.answer, text))
        if row.task == "cloze":
            records.append(Record(split, name, "cloze_acc", row.id, row.entity, found, text))
        else:
            records.append(Record(split, name, "rougeL", row.id, row.entity, metrics.rouge_l(row.answer, text), text))
            records.append(Record(split, name, "gen_acc", row.id, row.entity, found, text))


def _generate(model, processor, rows, form, batch_size, max_new_tokens, texts):
    """Greedy answers into `texts`, decoded without the prompt and special tokens; yields per batch."""
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for batch in make_prompts(rows, processor, form=form, batch_size=batch_size, device=_device(model)):
        output = model.generate(**batch.inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        new = output[:, batch.inputs["input_ids"].shape[1]:]
        texts += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
        yield
