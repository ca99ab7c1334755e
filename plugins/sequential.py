"""Sequential unlearning requests: the forget people split into K disjoint groups (seeded), edited one
after another, each edit a delta made on the model with the earlier ones applied, evaluated after every
request; a one-shot edit of the union of the groups is the control.

    result = run_requests("ga", model, processor, forget_rows, retain_rows, 5, {"lr": 1e-4}, seed=0)
    result.deltas      # request 1..K: apply them in this order (mmedit merge BASE request-1 ... request-K)
    result.union       # the control: one edit of every group's rows, on the base
    result.record      # groups, per-request metrics against the base, the union's, timings

Request k's delta records the checksums of requests 1..k-1 as its provenance "stacks_on", so mmedit.delta
applies it only right after them; its stored originals are the values the earlier edits left. Applying
the K deltas in order and reverting them last first gives the base back bit for bit.

After request k the forget people fall in three views, each scored against the base on the same rows:
`forget_done` (groups 1..k: is what was forgotten still forgotten?), `forget_current` (group k) and
`forget_later` (groups k+1..K: collateral damage on people not asked for yet); and each group alone
(`group_1`..`group_K`). `retain` is a seeded sample of the retain people. The run lives among the shared
plugin modules because it runs plugins (through apply_plugin and the registry, never a plugin module),
and the CLI sits on top of it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Mapping, Sequence

from mmedit.errors import MmeditError
from mmedit.eval import report
from mmedit.eval.harness import evaluate, select_people, summarise
from mmedit.plugins.apply import apply_plugin
from mmedit.plugins.registry import get, package_of

FORMAT = "mmedit.sequential-report"
VIEWS = ("forget_done", "forget_current", "forget_later", "retain")  # the report's splits after a request
RETAIN_PEOPLE = 10  # retain people scored after every request (a seeded sample; the plugin sees every row)


@dataclasses.dataclass
class Result:
    """What run_requests made: the stacked deltas in request order, the union control and the record."""
    deltas: list
    union: object
    record: dict


def split_groups(rows: Sequence, requests: int, seed: int = 0) -> list[list[str]]:
    """The forget people in `requests` disjoint groups that cover them all: a seeded shuffle dealt out in
    turn, so group sizes differ by at most one; each group keeps the people in file order."""
    people = list(dict.fromkeys(row.entity for row in rows))
    if not people:
        raise MmeditError("the forget set is empty")
    if not 1 <= requests <= len(people):
        raise MmeditError(f"--requests must be between 1 and the number of forget people ({len(people)}), "
                          f"got {requests}")
    shuffled = random.Random(f"mmedit-sequential:{seed}").sample(people, len(people))
    dealt = [set(shuffled[index::requests]) for index in range(requests)]
    return [[person for person in people if person in group] for group in dealt]


def check(name: str, forget_rows: Sequence, retain_rows: Sequence | None, requests: int, seed: int = 0,
          overrides: Mapping | None = None) -> list[list[str]]:
    """What run_requests refuses, before any model loads: unknown plugin or options, a retain set the
    plugin needs and lacks, a request count the forget people cannot fill. Returns the groups."""
    plugin = get(name)
    plugin.configure(overrides)
    if plugin.needs_retain and not retain_rows:
        raise MmeditError(f"{name}: needs a retain set (--retain), and none was given")
    return split_groups(forget_rows, requests, seed)


def views(records: Sequence, groups: Sequence[Sequence[str]], request: int, union: bool = False) -> dict:
    """{view: {form: {metric: mean}}} of evaluation records (splits "forget" and "retain") after `request`
    requests (0: the base), then each group on its own ("group_1".."group_K": does request 1's person
    stay forgotten after request 5?); `union`: the one-shot control, which has no current group."""
    group_of = {person: number for number, group in enumerate(groups, 1) for person in group}
    relabelled = []
    for record in records:
        number = group_of.get(record.entity) if record.split == "forget" else None
        if record.split == "retain":
            relabelled.append(record)
        elif number is None:
            raise MmeditError(f"{record.entity} was evaluated as a forget person but is in no group")
        else:
            names = (["forget_done"] if number <= request else ["forget_later"]) + (
                ["forget_current"] if number == request and not union else []) + [f"group_{number}"]
            relabelled += [dataclasses.replace(record, split=name) for name in names]
    table = summarise(relabelled)
    order = [*VIEWS, *(f"group_{number}" for number in range(1, len(groups) + 1))]
    return {view: table[view] for view in order if view in table}


def run_requests(name: str, model, processor, forget_rows: Sequence, retain_rows: Sequence | None, requests: int,
                 overrides: Mapping | None = None, seed: int = 0, *, retain_people: int = RETAIN_PEOPLE,
                 progress: bool = True, provenance: Mapping | None = None, **eval_options) -> Result:
    """Edit the groups of split_groups(forget_rows, requests, seed) one after another with plugin `name`,
    each on the model with the earlier deltas applied, then the union of the groups on the base; evaluate
    after every request and the union (harness.evaluate: `eval_options`, e.g. batch_size, max_new_tokens,
    letters). `provenance` goes into every delta's header. `model` is left as it was, bit for bit."""
    groups = check(name, forget_rows, retain_rows, requests, seed, overrides)  # before any work
    plugin = get(name)
    config = plugin.configure(overrides)
    forget_rows, retain_rows = list(forget_rows), list(retain_rows or [])
    sets = {"forget": forget_rows, "retain": select_people(retain_rows, retain_people, seed)}
    if not sets["retain"]:
        sets.pop("retain")
    options = {"progress": progress, **eval_options}
    started = time.perf_counter()
    base = evaluate(model, processor, sets, description="base model", **options)
    rows, deltas = [], []
    with contextlib.ExitStack() as stack:  # the deltas stay applied in order, and are reverted last first
        for number, people in enumerate(groups, 1):
            mark = time.perf_counter()
            chosen = set(people)
            header = {"stacks_on": [delta.checksum for delta in deltas],
                      "sequential": {"request": number, "requests": requests, "seed": seed, "people": people}}
            delta = apply_plugin(name, model, processor, [row for row in forget_rows if row.entity in chosen],
                                 retain_rows, overrides, seed=seed, progress=progress,
                                 provenance={**(provenance or {}), **header})
            stack.enter_context(delta.applied(model))
            edit_s = time.perf_counter() - mark
            after = evaluate(model, processor, sets, description=f"after request {number}/{requests}", **options)
            deltas.append(delta)
            rows.append(_row(number, people, delta, views(base, groups, number), views(after, groups, number),
                             edit_s, time.perf_counter() - mark))
    mark = time.perf_counter()
    union = apply_plugin(name, model, processor, forget_rows, retain_rows, overrides, seed=seed, progress=progress,
                         provenance={**(provenance or {}), "sequential": {
                             "union_of": requests, "seed": seed, "people": [p for group in groups for p in group]}})
    edit_s = time.perf_counter() - mark
    with union.applied(model):
        after = evaluate(model, processor, sets, description="union (one shot)", **options)
    control = _row(None, [person for group in groups for person in group], union,
                   views(base, groups, requests, union=True), views(after, groups, requests, union=True), edit_s,
                   time.perf_counter() - mark)
    record = {
        "format": FORMAT, "format_version": 1,
        "plugin": {"name": name, "version": plugin.version, "package": package_of(name)},
        "config": dataclasses.asdict(config), "seed": seed, "requests": requests, "groups": groups,
        "headline_metric": report.HEADLINE,
        "evaluated": {split: sorted({row.entity for row in chosen}) for split, chosen in sets.items()},
        "base": views(base, groups, 0), "sequence": rows, "union": control,
        "total_s": round(time.perf_counter() - started, 2),
    }
    return Result(deltas, union, record)


def _row(number: int | None, people: list[str], delta, base: dict, edited: dict, edit_s: float, total_s: float) -> dict:
    """One request (or the union) in the record: who, its delta, the views base vs edited, and seconds."""
    return {"request": number, "people": people,
            "delta": {"checksum": delta.checksum, "stacks_on": list(delta.provenance.get("stacks_on", [])),
                      "tensors": len(delta), "elements": delta.touched},
            "results": {"base": base, "edited": edited}, "comparison": report.compare(base, edited),
            "edit_s": round(edit_s, 2), "seconds": round(total_s, 2)}
