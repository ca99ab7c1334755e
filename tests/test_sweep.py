"""`mmedit sweep`: the validation split keeps the reported forget people out, the declared spaces are
valid options of every plugin, a sweep writes its front and a best point that `mmedit apply --config`
reproduces, a stored study resumes (and refuses another setup), trials share statistics, bad input is one
line. On the embedded model with small sets: a few seconds per trial."""
import json
import shutil
from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

from mmedit.bench import profiles
from mmedit.bench.model import embedded
from mmedit.cli.main import app
from mmedit.data.rows import Row, write_jsonl
from mmedit.delta import Delta
from mmedit.errors import MmeditError
from mmedit.loading import load
from mmedit.plugins import apply_plugin, available, get, option
from mmedit.plugins import sweep
from mmedit.plugins.base import Choice, Plugin, Range

FAST = ["--set", "max_steps=2", "--val-people", "2", "--retain-people", "3"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The embedded model, and small forget (2 people) / retain (8 people) files of its benchmark."""
    paths = embedded(progress=False)
    info = profiles.load(paths.data)
    folder = tmp_path_factory.mktemp("sweep-data")
    forget, retain = _people(info.rows("forget10"), 2), _people(info.rows("retain90"), 8)
    write_jsonl(forget, folder / "forget.jsonl")
    write_jsonl(retain, folder / "retain.jsonl")
    return paths.model, folder / "forget.jsonl", folder / "retain.jsonl", forget, retain


def _people(rows, count):
    """The rows of the first `count` people."""
    chosen = set(list(dict.fromkeys(row.entity for row in rows))[:count])
    return [row for row in rows if row.entity in chosen]


def invoke(*arguments):
    return CliRunner().invoke(app, [str(argument) for argument in arguments], terminal_width=200)


def one_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# ---- the validation split -----------------------------------------------------------------------------

def person_rows(people, count=3):
    return [Row(id=f"{person}-{i}", entity=person, image=None, question="q?", text_question=f"{person} q?",
                answer="a", options=["a", "b"], correct=0) for person in people for i in range(count)]


def test_the_validation_split_never_holds_a_reported_forget_person():
    forget = person_rows(["F1", "F2"])
    retain = person_rows([f"R{i}" for i in range(10)]) + person_rows(["F1"])  # a forget person in the retain file
    split = sweep.validation_split(forget, retain, people=None, scored=4, seed=0)
    seen = {row.entity for row in split.forget + split.retain + split.scored}
    assert not seen & {"F1", "F2"} and split.excluded == ["F1", "F2"]
    people = split.people()
    assert len(people["forget"]) == 2 and len(people["retain"]) == 8 and len(people["scored_retain"]) == 4
    assert not set(people["forget"]) & set(people["retain"]) and set(people["scored_retain"]) <= set(people["retain"])
    assert sweep.validation_split(forget, retain, None, 4, seed=0).people() == people  # deterministic
    assert any(sweep.validation_split(forget, retain, None, 4, seed=s).people()["forget"] != people["forget"]
               for s in (1, 2, 3))
    assert len(sweep.validation_split(forget, retain, 3, None, 0).people()["retain"]) == 7
    with pytest.raises(MmeditError, match="needs more retain people than the 10"):
        sweep.validation_split(forget, retain, 10, None, 0)


# ---- objectives and the chosen point ------------------------------------------------------------------

def table(forget_vqa, forget_qa, retain_vqa, retain_qa):
    return {"forget": {"Image_Textual": {"choice_acc": forget_vqa}, "Pure_Text": {"choice_acc": forget_qa}},
            "retain": {"Image_Textual": {"choice_acc": retain_vqa}, "Pure_Text": {"choice_acc": retain_qa}}}


def test_objectives_are_the_forgetting_rates_per_form_and_the_mean_retention():
    values = sweep.objectives(table(1.0, 0.8, 1.0, 0.5), table(0.25, 0.4, 0.9, 0.5))
    assert values == pytest.approx({"forgot VQA": 0.75, "forgot QA": 0.5, "retain": 0.95})
    with pytest.raises(MmeditError, match="scores 0 on the validation forget people's Pure_Text"):
        sweep.check_base(table(1.0, 0.0, 1.0, 1.0))


def point(number, forgot_vqa, forgot_qa, retain):
    return {"number": number, "values": {"forgot VQA": forgot_vqa, "forgot QA": forgot_qa, "retain": retain}}


def test_the_chosen_point_forgets_most_above_the_retain_floor_else_the_best_mean():
    front = [point(0, 0.9, 0.9, 0.90), point(1, 0.6, 0.6, 0.96), point(2, 0.5, 0.5, 0.99), point(3, 0.6, 0.6, 0.97)]
    chosen, rule = sweep.choose(front)
    assert chosen["number"] == 3 and "retain >= 95%" in rule  # the tie on forgetting goes to more retain
    chosen, rule = sweep.choose([point(0, 0.9, 0.9, 0.90), point(1, 0.2, 0.2, 0.94)])
    assert chosen["number"] == 0 and rule.startswith("no point keeps")


# ---- declared search spaces ----------------------------------------------------------------------------

def test_every_plugin_declares_a_space_of_valid_option_values():
    """Every Range's ends and every Choice's values are accepted by configure(), one option at a time."""
    plugins = available()
    assert set(plugins) >= {"ga", "graddiff", "kl_min", "npo", "rmu", "mmunlearner", "manu", "mip_editor"}
    for name, plugin in plugins.items():
        space = plugin.space()
        assert space, f"{name} declares no search space"
        for option_name, where in space.items():
            values = (where.low, where.high) if isinstance(where, Range) else where.values
            for value in values:
                config = plugin.configure({option_name: value})
                assert getattr(config, option_name) == value, (name, option_name, value)


@dataclass
class _Config:
    rate: float = option(0.1, "A rate.", space=Range(0.01, 1.0, log=True))
    steps: int = option(2, "Steps.")
    mode: str = option("a", "Mode.", choices=("a", "b"))


@pytest.mark.parametrize("declared, problem", [
    ({"mode": Range(0.0, 1.0)}, "is a range, but the option is str"),
    ({"steps": Range(1.0, 4.0)}, "needs int bounds"),
    ({"rate": Range(0.0, 1.0, log=True)}, "low > 0 (log scale)"),
    ({"rate": Range(1.0, 1.0)}, "low < high"),
    ({"mode": Choice(("a", "c"))}, "offers 'c'"),
    ({"steps": Choice((1, 2.5))}, "needs one or more int values"),
    ({"nope": Choice((1,))}, "names 'nope', which is not an option"),
    ({"steps": (1, 4)}, "must be a Range or a Choice"),
])
def test_a_space_that_does_not_fit_its_option_is_one_error(declared, problem):
    class Fake(Plugin):
        name, description, Config, search_space = "fake", "A fake.", _Config, declared

    with pytest.raises(MmeditError, match="plugin fake: ") as raised:
        Fake().space()
    assert problem in str(raised.value)

    class Own(Plugin):
        name, description, Config = "own", "Its own space.", _Config

    assert Own().space() == {"rate": Range(0.01, 1.0, log=True)}  # option(space=...) alone


# ---- the command ----------------------------------------------------------------------------------------

def test_sweep_writes_its_front_and_a_best_point_that_apply_reproduces_then_resumes(bench, tmp_path, monkeypatch):
    model, forget, retain, forget_rows, _ = bench
    edited, scored = [], []
    real_apply, real_eval = sweep.apply_plugin, sweep.evaluate

    def spy_apply(name, model, processor, forget_set, retain_set, *args, **kwargs):
        edited.extend(row.entity for row in forget_set + retain_set)
        return real_apply(name, model, processor, forget_set, retain_set, *args, **kwargs)

    def spy_eval(model, processor, sets, *args, **kwargs):
        scored.extend(row.entity for rows in sets.values() for row in rows)
        return real_eval(model, processor, sets, *args, **kwargs)

    monkeypatch.setattr(sweep, "apply_plugin", spy_apply)
    monkeypatch.setattr(sweep, "evaluate", spy_eval)
    storage = f"sqlite:///{tmp_path / 'sweep.db'}"
    common = ["sweep", "ga", model, "--forget", forget, "--retain", retain, "--storage", storage, *FAST]
    result = invoke(*common, "--budget", 2, "--out", tmp_path / "s1.json", "--best", tmp_path / "best.json",
                    "--plot", tmp_path / "s1.png")
    assert result.exit_code == 0, result.output
    assert "Pareto front of 2 trials" in result.output and (tmp_path / "s1.png").stat().st_size > 1000
    first = json.loads((tmp_path / "s1.json").read_text())
    reported = {row.entity for row in forget_rows}
    assert edited and scored and not reported & (set(edited) | set(scored))
    assert set(first["validation"]["excluded_reported_forget"]) == reported
    assert [t["state"] for t in first["trials"]] == ["COMPLETE", "COMPLETE"]
    assert first["chosen"]["number"] in first["pareto"] and set(first["space"]) == {"lr", "forms"}
    best = json.loads((tmp_path / "best.json").read_text())
    assert best == first["chosen"]["options"] and best["max_steps"] == 2 and set(best) == {"max_steps", "lr", "forms"}
    assert first["versions"]["torch"] and first["files"]["forget"]["sha256"] and first["setup"]["plugin"] == "ga"

    # the best options, applied to the reported sets: the same delta as apply_plugin with those options
    applied = invoke("apply", "ga", model, "--config", tmp_path / "best.json", "--forget", forget, "--retain", retain,
                     "--out", tmp_path / "best.safetensors")
    assert applied.exit_code == 0, applied.output
    from mmedit.data import read_rows

    loaded, processor = load(model, device="cpu")
    direct = real_apply("ga", loaded, processor, read_rows(forget), read_rows(retain), best, progress=False)
    from_file = Delta.load(tmp_path / "best.safetensors")
    assert set(from_file.changes) == set(direct.changes)
    assert all(torch.equal(from_file.changes[n].new, direct.changes[n].new) for n in direct.changes)

    # resumed: one more trial, the earlier two kept as they were, a new point drawn
    result = invoke(*common, "--budget", 1, "--out", tmp_path / "s2.json")
    assert result.exit_code == 0, result.output
    second = json.loads((tmp_path / "s2.json").read_text())
    assert len(second["trials"]) == 3 and second["trials"][:2] == first["trials"]
    assert second["trials"][2]["options"] not in [t["options"] for t in first["trials"]]

    # another plugin, or other fixed options, on that storage: one line, nothing written or added
    db = (tmp_path / "sweep.db").read_bytes()
    other = invoke("sweep", "npo", model, "--forget", forget, "--retain", retain, "--storage", storage, *FAST,
                   "--budget", 1, "--out", tmp_path / "s3.json")
    assert "holds a sweep of another plugin (ga, not npo)" in one_error_line(other)
    changed = invoke(*common[:-len(FAST)], "--set", "max_steps=3", *FAST[2:], "--budget", 1,
                     "--out", tmp_path / "s3.json")
    assert "holds a sweep of another fixed options" in one_error_line(changed)
    shutil.copytree(model, tmp_path / "same-weights-elsewhere")
    moved = invoke("sweep", "ga", tmp_path / "same-weights-elsewhere", *common[3:], "--budget", 1,
                   "--out", tmp_path / "s3.json")
    assert "holds a sweep of another model (" in one_error_line(moved)
    assert not (tmp_path / "s3.json").exists() and (tmp_path / "sweep.db").read_bytes() == db


def test_trials_share_the_statistics_memo(bench, monkeypatch):
    """MANU traces forget and retain once for the whole sweep, not once per trial."""
    import mmedit.trace

    model_dir, _, _, forget_rows, retain_rows = bench
    traced = []
    real = mmedit.trace.trace
    monkeypatch.setattr(mmedit.trace, "trace", lambda *a, **k: traced.append(1) or real(*a, **k))
    model, processor = load(model_dir, device="cpu")
    split = sweep.validation_split(forget_rows, _people(retain_rows, 4), people=2, scored=2, seed=0)
    fixed = sweep.fixed_options(get("manu"), {"parts": "llm", "batch_size": 16})
    study = sweep.open_study(None, sweep.describe(get("manu"), fixed, split, str(model_dir), 0))
    base = sweep.baseline(model, processor, split)
    memo = {}
    record = sweep.run(study, "manu", model, processor, split, fixed, budget=3, seed=0, base=base, progress=False,
                       memo=memo)
    assert [t["state"] for t in record["trials"]] == ["COMPLETE"] * 3
    assert len(traced) == 2  # forget and retain, each once
    (scope,) = memo.values()
    assert sorted(key for key, _ in scope) == ["forget", "retain"]


def test_bad_inputs_are_one_line_and_write_nothing(bench, tmp_path, monkeypatch):
    model, forget, retain, _, _ = bench
    out = tmp_path / "s.json"
    common = ["--forget", forget, "--retain", retain, "--out", out]
    assert "--budget must be at least 1 trial, got 0" in one_error_line(invoke("sweep", "ga", model, *common,
                                                                               "--budget", 0))
    assert "got -2" in one_error_line(invoke("sweep", "ga", model, *common, "--budget", -2))
    fixed_all = invoke("sweep", "ga", model, *common, "--budget", 1, "--set", "lr=1e-4", "--set", "forms=both")
    assert "nothing is left to search" in one_error_line(fixed_all)
    bad_url = invoke("sweep", "ga", model, *common, *FAST, "--budget", 1, "--storage", "nosuchdb://x")
    assert "cannot open the storage nosuchdb://x" in one_error_line(bad_url)
    monkeypatch.setattr(type(get("ga")), "search_space", {})
    assert "ga declares no search space" in one_error_line(invoke("sweep", "ga", model, *common, "--budget", 1))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_plugins_shows_where_the_sweep_searches_each_option():
    from typer.testing import CliRunner

    from mmedit.cli.main import app
    from mmedit.plugins import get

    lr = get("rmu").space()["lr"]
    shown = CliRunner().invoke(app, ["plugins", "rmu"], terminal_width=240)
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if line.startswith("│ lr "))
    assert f"{lr.low:g}..{lr.high:g}" + (" (log)" if lr.log else "") in row
    row = next(line for line in shown.output.splitlines() if line.startswith("│ epochs "))
    assert row.split("│")[3].strip() == ""  # not searched
