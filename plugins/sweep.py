"""The search behind `mmedit sweep`: an Optuna multi-objective study of one plugin's options on a
validation split, so that the reported forget people are never edited nor scored while searching.

    split = validation_split(forget_rows, retain_rows, people=None, scored=10, seed=0)
    setup = describe(get("ga"), fixed, split, model="tiny", seed=0)
    study = open_study("sqlite:///sweep.db", setup)          # a new study, or this setup's earlier one
    record = run(study, "ga", model, processor, split, fixed, budget=20, seed=0)

The validation split (docs/sweep.md): a seeded subset of the given retain people, as many as there are
forget people, plays the forget people; the other retain people are the retain set the edits keep, and a
seeded sample of them is scored. On a model that knows every person equally (the embedded model) that is
the reported task in miniature, with other people. The objectives, all maximised, are the forgetting rate
(1 - edited/base) of the validation forget people in each form (VQA: image + question, QA: the text-only
twin) and the retention (edited/base) of the scored retain people, both forms averaged; every score is the
option-likelihood accuracy of the multiple-choice rows (mmedit.eval.report.HEADLINE), the cheapest exact
score the harness has. Every trial edits with the same plugin seed and shares one statistics memo
(apply_plugin(memo=...)): traces, Fisher and paths are computed once per value of the options they
depend on. The sampler is Optuna's TPE (multi-objective), seeded with seed + the trials already stored,
so a resumed study draws new points rather than repeating its first ones.
"""
from __future__ import annotations

import random
import statistics
import time
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from dataclasses import dataclass

from mmedit import logs
from mmedit.errors import MmeditError
from mmedit.plugins.apply import apply_plugin
from mmedit.plugins.base import Choice, Plugin, Range, rows_sha256
from mmedit.plugins.registry import package_of

STUDY = "mmedit-sweep"  # the study's name in its storage: one sweep setup per storage
SETUP = "mmedit"  # the study's user attribute holding the setup it was made for
FORMAT = "mmedit.sweep-report"
OBJECTIVES = ("forgot VQA", "forgot QA", "retain")  # all maximised
FORMS = {"forgot VQA": "Image_Textual", "forgot QA": "Pure_Text"}  # objective -> the harness's form name
RETAIN_FLOOR = 0.95  # the chosen point keeps at least this share of the base's retain accuracy, if any does
STARTUP = 10  # TPE's random trials before it models the front


@dataclass
class Split:
    """The people a sweep edits and scores: never the reported forget people."""
    forget: list  # rows of the validation forget people (edited as the forget set, and scored)
    retain: list  # rows of the other retain people (the edits' retain set)
    scored: list  # rows of the retain people scored (a seeded sample of `retain`)
    excluded: list[str]  # the reported forget people, in none of the above

    def people(self) -> dict[str, list[str]]:
        return {"forget": _people(self.forget), "retain": _people(self.retain), "scored_retain": _people(self.scored),
                "excluded_reported_forget": self.excluded}


def _people(rows: Sequence) -> list[str]:
    return list(dict.fromkeys(row.entity for row in rows))


def validation_split(forget_rows: Sequence, retain_rows: Sequence, people: int | None, scored: int | None,
                     seed: int) -> Split:
    """`people` retain people (default: as many as the forget set has) drawn with `seed` play the forget
    people; the rest are the retain set, of which `scored` (a seeded sample; None: all) are scored. Retain
    rows of a forget person are dropped, so that no reported forget person is edited or scored."""
    from mmedit.eval.harness import select_people

    excluded = _people(forget_rows)
    pool = [row for row in retain_rows if row.entity not in set(excluded)]
    candidates = _people(pool)
    count = len(excluded) if people is None else people
    if count < 1:
        raise MmeditError(f"--val-people must be at least 1, got {count}")
    if count >= len(candidates):
        raise MmeditError(f"the validation split needs more retain people than the {count} it makes forget people: "
                          f"the retain set has {len(candidates)} (besides the forget people)")
    if scored is not None and scored < 1:
        raise MmeditError(f"--retain-people must be at least 1, got {scored}")
    chosen = set(random.Random(f"mmedit-sweep:{seed}").sample(candidates, count))
    forget = [row for row in pool if row.entity in chosen]
    retain = [row for row in pool if row.entity not in chosen]
    return Split(forget, retain, select_people(retain, scored, seed), excluded)


def fixed_options(plugin: Plugin, overrides: Mapping[str, object]) -> dict[str, object]:
    """The options held fixed (a preset, --set), as their typed values: strings from --set are parsed."""
    config = plugin.configure(overrides)
    return {name: getattr(config, name) for name in overrides}


def searched(plugin: Plugin, fixed: Mapping[str, object]) -> dict[str, Range | Choice]:
    """The plugin's declared space minus the options held fixed; none declared or none left: one error."""
    space = plugin.space()
    if not space:
        raise MmeditError(f"{plugin.name} declares no search space, so it cannot be swept (a plugin declares one "
                          "with option(space=...) or Plugin.search_space: see docs/sweep.md)")
    left = {name: where for name, where in space.items() if name not in fixed}
    if not left:
        raise MmeditError(f"every option {plugin.name} searches ({', '.join(space)}) is fixed by --set or the preset: "
                          "nothing is left to search")
    return left


def space_json(space: Mapping[str, Range | Choice]) -> dict[str, dict]:
    return {name: ({"low": where.low, "high": where.high, "log": where.log} if isinstance(where, Range)
                   else {"choices": list(where.values)}) for name, where in space.items()}


def describe(plugin: Plugin, fixed: Mapping[str, object], split: Split, model: str, seed: int) -> dict:
    """What a study's trials depend on: plugin, model, validation data, fixed options, space and seed. A
    stored study continues only with the same setup."""
    space = searched(plugin, fixed)
    return {"plugin": plugin.name, "plugin_version": plugin.version, "model": model, "seed": seed,
            "data": {role: rows_sha256(rows) for role, rows in (("forget", split.forget), ("retain", split.retain),
                                                                 ("scored_retain", split.scored))},
            "fixed": dict(fixed), "space": space_json(space), "objectives": list(OBJECTIVES)}


def _optuna():
    try:
        import optuna
    except ImportError:
        raise MmeditError("mmedit sweep needs optuna: pip install 'mmedit[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


WHAT = {"plugin": "plugin", "plugin_version": "plugin version", "model": "model", "seed": "seed",
        "data": "validation data (forget or retain set)", "fixed": "fixed options", "space": "search space",
        "objectives": "objectives"}


def open_study(storage: str | None, setup: dict):
    """The study for `setup` in `storage` (None: in memory): the one stored there, which must have been
    made for the same setup (else one error and nothing changes), or a new one."""
    optuna = _optuna()
    url = storage
    if storage is not None:
        try:
            storage = optuna.storages.RDBStorage(storage)
        except Exception as error:  # noqa: BLE001 - SQLAlchemy and Optuna raise many kinds for a bad URL
            raise MmeditError(f"cannot open the storage {url}: {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}") from None
        names = [summary.study_name for summary in optuna.get_all_study_summaries(storage)]
        if STUDY in names:
            study = optuna.load_study(study_name=STUDY, storage=storage)
            stored = study.user_attrs.get(SETUP)
            if stored is None:
                raise MmeditError(f"the storage {url} holds a study {STUDY!r} that mmedit sweep did not make")
            for key in setup:
                if stored.get(key) != setup[key]:
                    shown = (f" ({stored.get(key)}, not {setup[key]})" if key in ("plugin", "model", "seed")
                             else "")
                    raise MmeditError(f"the storage {url} holds a sweep of another {WHAT[key]}{shown}; resume it "
                                      "with the same settings or use another --storage")
            return study
    study = optuna.create_study(storage=storage, study_name=STUDY, directions=["maximize"] * len(OBJECTIVES))
    study.set_user_attr(SETUP, setup)
    return study


def distributions(plugin: Plugin, space: Mapping[str, Range | Choice]) -> dict:
    """Optuna distributions of the searched options (an int range for an int option)."""
    optuna = _optuna()
    kinds = typing.get_type_hints(plugin.Config)
    found = {}
    for name, where in space.items():
        if isinstance(where, Choice):
            found[name] = optuna.distributions.CategoricalDistribution(list(where.values))
        elif kinds[name] is int:
            found[name] = optuna.distributions.IntDistribution(where.low, where.high, log=where.log)
        else:
            found[name] = optuna.distributions.FloatDistribution(where.low, where.high, log=where.log)
    return found


def scored_sets(split: Split) -> dict[str, list]:
    """The multiple-choice rows the objectives read: validation forget and scored retain people."""
    sets = {"forget": [row for row in split.forget if row.options is not None],
            "retain": [row for row in split.scored if row.options is not None]}
    empty = [role for role, rows in sets.items() if not rows]
    if empty:
        raise MmeditError(f"the validation {empty[0]} people have no multiple-choice rows: the sweep scores "
                          "option-likelihood accuracy")
    return sets


def evaluate(model, processor, sets: dict, deltas: Sequence = (), batch_size: int = 64) -> dict:
    """{split: {form: {metric: mean}}} of the multiple-choice rows, with `deltas` applied."""
    from mmedit.eval.harness import evaluate_edited, summarise

    return summarise(evaluate_edited(model, processor, sets, list(deltas), batch_size=batch_size, letters=False,
                                     progress=False))


def objectives(base: dict, edited: dict) -> dict[str, float]:
    """The three objective values of an edit, from the base's and the edit's tables."""
    from mmedit.eval import metrics
    from mmedit.eval.report import HEADLINE

    values = {name: metrics.forgetting_rate(base["forget"][form][HEADLINE], edited["forget"][form][HEADLINE])
              for name, form in FORMS.items()}
    values["retain"] = statistics.fmean(metrics.retention(base["retain"][form][HEADLINE],
                                                          edited["retain"][form][HEADLINE]) for form in FORMS.values())
    return values


def check_base(base: dict) -> None:
    """A form the base model gets wholly wrong has nothing to forget or keep: one error before any trial."""
    from mmedit.eval.report import HEADLINE

    for split in ("forget", "retain"):
        for name, form in FORMS.items():
            if base.get(split, {}).get(form, {}).get(HEADLINE, 0) == 0:
                raise MmeditError(f"the base model scores 0 on the validation {split} people's {form} questions "
                                  f"(or there are none): the {name.split()[-1]} objectives need them")


def check_budget(budget: int) -> None:
    if budget < 1:
        raise MmeditError(f"--budget must be at least 1 trial, got {budget}")


def baseline(model, processor, split: Split, batch_size: int = 64) -> dict:
    """The base model's table on the validation people; a form it gets wholly wrong: one error."""
    base = evaluate(model, processor, scored_sets(split), batch_size=batch_size)
    check_base(base)
    return base


def run(study, name: str, model, processor, split: Split, fixed: Mapping[str, object], budget: int, seed: int,
        base: dict, batch_size: int = 64, progress: bool = True, memo: dict | None = None,
        log_dir: str | Path | None = None) -> dict:
    """`budget` more trials of plugin `name` in `study`, scored against `base` (baseline()); returns the
    record of every trial stored, its Pareto front and the chosen point (see `choose`). `memo`: statistics
    shared by the trials (and by the caller's later calls, e.g. a benchmark's). `log_dir`: TensorBoard runs,
    trial-NNN/ with each trial's training steps and sweep/ with every trial's objectives (mmedit.logs)."""
    from mmedit.plugins.registry import get
    from mmedit.progress import track

    optuna = _optuna()
    check_budget(budget)
    plugin = get(name)
    space = searched(plugin, fixed)
    sets = scored_sets(split)
    memo = {} if memo is None else memo
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), n_startup_trials=STARTUP)
    with logs.logging_to(None if log_dir is None else Path(log_dir) / "sweep"):  # one event file for the run
        for _ in track(range(budget), f"sweep {name}", total=budget, enabled=progress):
            trial = study.ask(distributions(plugin, space))
            options = {**fixed, **trial.params}
            trial.set_user_attr("options", options)
            started = time.perf_counter()
            try:
                delta = apply_plugin(name, model, processor, split.forget, split.retain, options, seed=seed,
                                     progress=False, memo=memo,
                                     log_dir=None if log_dir is None else Path(log_dir) / f"trial-{trial.number:03d}")
                edited = evaluate(model, processor, sets, [delta], batch_size=batch_size)
            except Exception as error:  # noqa: BLE001 - a failing point (NaN loss, bad combination) is a result
                trial.set_user_attr("error", _one_line(error))
                trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            except BaseException:  # Ctrl-C: the trial is stored as failed, not left running
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            values = objectives(base, edited)
            trial.set_user_attr("table", edited)
            trial.set_user_attr("elements", delta.touched)
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
            study.tell(trial, [values[key] for key in OBJECTIVES])
            logs.scalars(values, prefix="objectives", step=trial.number)  # into sweep/ (the trials' own: inside)
    return record(study, base, plugin, space)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def trial_record(trial) -> dict:
    return {"number": trial.number, "state": trial.state.name, "options": trial.user_attrs.get("options", {}),
            "values": dict(zip(OBJECTIVES, trial.values)) if trial.values else None,
            "seconds": trial.user_attrs.get("seconds"), "elements": trial.user_attrs.get("elements"),
            "error": trial.user_attrs.get("error"), "table": trial.user_attrs.get("table")}


def choose(front: Sequence[dict], floor: float = RETAIN_FLOOR) -> tuple[dict, str]:
    """The Pareto point to use, and the rule that chose it: the most forgetting (mean of both forms) among
    the points keeping retain >= floor (ties: more retain, then the earlier trial); when none does, the
    best mean of the three objectives."""
    def forgetting(point):
        return statistics.fmean(point["values"][key] for key in FORMS)

    kept = [point for point in front if point["values"]["retain"] >= floor]
    if kept:
        best = max(kept, key=lambda p: (forgetting(p), p["values"]["retain"], -p["number"]))
        return best, f"most forgetting (mean of both forms) with retain >= {floor:.0%} of base"
    best = max(front, key=lambda p: (statistics.fmean(p["values"].values()), -p["number"]))
    return best, f"no point keeps retain >= {floor:.0%} of base: best mean of the three objectives"


def record(study, base: dict, plugin: Plugin, space: Mapping) -> dict:
    """Every stored trial, the Pareto front (trial numbers) and the chosen point; no trial complete: one error."""
    optuna = _optuna()
    trials = [trial_record(trial) for trial in study.trials]
    complete = [trial for trial in trials if trial["state"] == "COMPLETE"]
    if not complete:
        errors = [trial["error"] for trial in trials if trial["error"]]
        raise MmeditError(f"no trial of the sweep completed ({len(trials)} failed)"
                          + (f"; the first: {errors[0]}" if errors else ""))
    front_numbers = sorted(trial.number for trial in study.best_trials)
    front = [trial for trial in complete if trial["number"] in front_numbers]
    chosen, rule = choose(front)
    return {"format": FORMAT, "format_version": 1,
            "plugin": {"name": plugin.name, "version": plugin.version, "package": package_of(plugin.name)},
            "setup": study.user_attrs[SETUP], "objectives": list(OBJECTIVES), "metric": _headline(),
            "space": space_json(space), "base": base, "trials": trials, "pareto": front_numbers,
            "chosen": {"number": chosen["number"], "options": chosen["options"], "values": chosen["values"],
                       "rule": rule},
            "sampler": {"name": "TPESampler", "optuna": optuna.__version__, "n_startup_trials": STARTUP}}


def _headline() -> str:
    from mmedit.eval.report import HEADLINE

    return HEADLINE
