"""Evaluation harness and `mmedit eval`: lettered prompts, option log-likelihoods by hand, set discovery,
and a delta whose effect is known exactly (two people's name embeddings swapped) on the fast embedded model."""
import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from mmedit.bench import profiles
from mmedit.bench.model import SPACE, embedded
from mmedit.cli.main import app
from mmedit.data.batches import IGNORE, make_batches
from mmedit.data.rows import Row
from mmedit.delta import Delta
from mmedit.errors import MmeditError
from mmedit.eval import harness, report
from mmedit.loading import load

runner = CliRunner()
EMBEDDINGS = "model.language_model.embed_tokens.weight"


@pytest.fixture(scope="session")
def fast(tmp_path_factory):
    """The fast embedded model, shared through one cache folder by every test module that trains it."""
    return embedded(fast=True, root=tmp_path_factory.getbasetemp() / "embedded", progress=False)


@pytest.fixture(scope="module")
def loaded(fast):
    return load(fast.model, device="cpu")


@pytest.fixture(scope="module")
def swap(fast, loaded, tmp_path_factory):
    """A delta that swaps the name-token embeddings of the forget person X and a retain person Y: every
    Pure_Text question about X then *is* the same question about Y (and back), nothing else changes."""
    model, processor = loaded
    info = profiles.load(fast.data)
    forget, retain, _ = profiles.split_names(10)
    x, y = info.people_in(forget)[0], info.people_in(retain)[0]
    words = [word for person in info.people for word in person.name.split()]
    assert all(words.count(word) == 1 for word in x.name.split() + y.name.split())  # names share no token
    # a name word is one token, spelt with the space mark after a space ("was ▁Ann") and without it after
    # ": " ("USER: Ann ..."): both spellings of each word are swapped
    vocab = processor.tokenizer.get_vocab()
    pairs = [(vocab[mark + a], vocab[mark + b]) for a, b in zip(x.name.split(), y.name.split())
             for mark in ("", SPACE) if mark + a in vocab]
    assert processor.tokenizer.tokenize(f" {x.name}") == [SPACE + word for word in x.name.split()]
    ids_x, ids_y = [a for a, _ in pairs], [b for _, b in pairs]
    old = model.get_parameter(EMBEDDINGS).detach()
    new = old.clone()
    new[ids_x], new[ids_y] = old[ids_y], old[ids_x]
    path = tmp_path_factory.mktemp("swap") / "swap.safetensors"
    Delta.from_changes({EMBEDDINGS: (old, new)}, provenance={"what": "swap X and Y"}, model=model).save(path)
    return x, y, path


def _row(**fields):
    return Row(**{"id": "r", "entity": "Ada", "image": None, "question": "Q this?", "text_question": "Q Ada?",
                  "answer": "b", **fields})


def test_lettered_prompt_lists_the_options_and_answers_with_the_letter():
    row = _row(options=("a", "b", "c", "d"), correct=1)
    asked = harness.lettered(row)
    assert asked.question == "Q this?\nA. a\nB. b\nC. c\nD. d\n" + harness.LETTER_INSTRUCTION
    assert asked.text_question.startswith("Q Ada?\nA. a\n") and asked.answer == "B" and asked.options is None
    assert harness.lettered(row, [2, 3, 0, 1]).answer == "D"  # b is shown fourth
    with pytest.raises(MmeditError, match="bad option order"):
        harness.lettered(row, [0, 0, 1, 2])
    with pytest.raises(MmeditError, match="no options"):
        harness.lettered(_row())
    with pytest.raises(MmeditError, match="letters go up to D"):
        harness.lettered(_row(options=tuple("abcde"), correct=0))


def test_answer_loglik_sums_the_labelled_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.full((3, 6), IGNORE)
    labels[0, 4:] = torch.tensor([3, 7])
    labels[1, 2:5] = torch.tensor([1, 2, 10])
    # row 2 has no label at all: an empty answer scores 0
    expected = []
    for i in range(3):
        total = 0.0
        for t in range(1, 6):
            if labels[i, t] != IGNORE:
                total += logits[i, t - 1].log_softmax(-1)[labels[i, t]].item()
        expected.append(total)
    assert torch.allclose(harness._answer_loglik(logits, labels), torch.tensor(expected), atol=1e-5)


def test_find_sets_and_select_people(fast, tmp_path):
    found = harness.find_sets(fast.data, 10)
    assert [path.name for path in found.values()] == ["forget10.jsonl", "test10.jsonl", "retain90.jsonl"]
    assert [path.name for path in harness.find_sets(fast.data / "parquet", 10).values()] == [
        "forget_10.parquet", "test_10.parquet", "retain_90.parquet"]
    with pytest.raises(MmeditError, match="no retain set"):
        (tmp_path / "forget10.jsonl").write_text("")
        harness.find_sets(tmp_path, 10)
    with pytest.raises(MmeditError, match="not found"):
        harness.find_sets(tmp_path / "nowhere", 10)
    rows = [_row(entity=name, id=f"{name}{i}") for name in "ABCDE" for i in range(2)]
    assert [r.entity for r in harness.select_people(rows, 2)] == ["A", "A", "B", "B"]
    sample = harness.select_people(rows, 3, seed=1)
    assert len({r.entity for r in sample}) == 3 and sample == harness.select_people(rows, 3, seed=1)
    assert harness.select_people(rows, None) == rows


def test_known_delta_moves_exactly_the_swapped_answers(fast, loaded, swap):
    model, processor = loaded
    x, y, path = swap
    info = profiles.load(fast.data)
    rows = {person.name: [row for row in info.rows("forget10") + info.rows("retain90") if row.entity == person.name]
            for person in (x, y)}
    sets = {"x": rows[x.name], "y": rows[y.name]}
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    base = harness.evaluate(model, processor, sets, progress=False, batch_size=64)
    edited = harness.evaluate_edited(model, processor, sets, [Delta.load(path)], progress=False, batch_size=64)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())  # reverted

    def outputs(records, split, form, metric):
        return [r.output for r in records if (r.split, r.form, r.metric) == (split, form, metric)]

    for metric in ("gen_acc", "cloze_acc"):
        # text questions about X are now answered exactly as the base model answered them about Y
        assert outputs(edited, "x", "Pure_Text", metric) == outputs(base, "y", "Pure_Text", metric)
        assert outputs(edited, "y", "Pure_Text", metric) == outputs(base, "x", "Pure_Text", metric)
    for metric in harness.METRICS:  # image questions never see a name: untouched
        assert outputs(edited, "x", "Image_Textual", metric) == outputs(base, "x", "Image_Textual", metric)
    # the base model knows both people, so X's text accuracy becomes the share of attributes X and Y share
    shared = sum(x.attributes[a] == y.attributes[a] for a in profiles.ATTRIBUTES) / len(profiles.ATTRIBUTES)
    table = harness.summarise(edited)
    assert harness.summarise(base)["x"]["Pure_Text"]["gen_acc"] == 1.0
    assert table["x"]["Pure_Text"]["gen_acc"] == pytest.approx(shared)
    assert table["x"]["Pure_Text"]["cloze_acc"] == pytest.approx(shared)
    assert table["x"]["Image_Textual"] == harness.summarise(base)["x"]["Image_Textual"]


def test_eval_cli_reports_base_and_edited_with_provenance(fast, swap, tmp_path):
    x, y, delta = swap
    out, plot = tmp_path / "report.json", tmp_path / "report.png"
    args = ["eval", str(fast.model), "--delta", str(delta), "--data", str(fast.data), "--out", str(out),
            "--plot", str(plot), "--batch-size", "64", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "forgetting rate" in result.output and plot.stat().st_size > 0
    record = json.loads(out.read_text())
    assert record["format"] == "mmedit.eval-report"
    assert record["deltas"][0]["provenance"]["what"] == "swap X and Y"
    assert set(record["data"]["sets"]) == {"forget", "test", "retain"}
    assert all(len(entry["sha256"]) == 64 for entry in record["data"]["sets"].values())
    base, edited = record["results"]["base"], record["results"]["edited"]
    shared = sum(x.attributes[a] == y.attributes[a] for a in profiles.ATTRIBUTES) / len(profiles.ATTRIBUTES)
    # forget = X alone: its text generation accuracy falls to `shared`; the image form is untouched
    assert base["forget"]["Pure_Text"]["gen_acc"] == 1.0
    assert edited["forget"]["Pure_Text"]["gen_acc"] == pytest.approx(shared)
    assert edited["forget"]["Image_Textual"] == base["forget"]["Image_Textual"]
    assert record["comparison"]["edited"]["forget"]["Pure_Text"]["gen_acc"]["forgetting_rate"] == pytest.approx(
        1 - shared)
    assert "retention" in record["comparison"]["edited"]["retain"]["Pure_Text"]["gen_acc"]

    again = runner.invoke(app, args)  # an existing report is not overwritten without --force
    assert again.exit_code == 1 and "exists" in again.output
    assert "choice_letter_acc" in base["retain"]["Image_Textual"]
    limited = runner.invoke(app, [*args[:-4], "--limit-people", "1", "--no-letters", "--force"])
    assert limited.exit_code == 0, limited.output
    record = json.loads(out.read_text())
    assert {entry["people"] for entry in record["data"]["sets"].values()} == {1}
    assert "choice_letter_acc" not in record["results"]["base"]["retain"]["Image_Textual"]


def test_eval_cli_bad_inputs_are_one_line_errors(fast, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a delta")
    cases = [
        (["--data", str(tmp_path / "missing")], "data folder not found"),
        (["--data", str(fast.data), "--delta", str(broken)], "broken.safetensors"),
        (["--data", str(fast.data), "--forget", "0"], "forget percentage"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["eval", str(fast.model), "--out", str(tmp_path / "r.json"), *extra])
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output


def test_eval_cli_checks_that_the_deltas_fit_before_evaluating(fast, loaded, tmp_path, monkeypatch):
    """A delta for another base model is refused before the (long) base evaluation starts; a delta that adds
    NaN is refused with the eval command's own --allow-nonfinite named, and accepted with it."""
    from mmedit.eval import harness

    model, _ = loaded
    weights = model.get_parameter(EMBEDDINGS).detach()
    other = tmp_path / "other-base.safetensors"
    Delta.from_changes({EMBEDDINGS: (weights + 1, weights)}, model=model).save(other)
    evaluated = []
    monkeypatch.setattr(harness, "evaluate", lambda *a, **k: evaluated.append(1) or [])
    args = ["eval", str(fast.model), "--data", str(fast.data), "--out", str(tmp_path / "r.json")]
    result = runner.invoke(app, [*args, "--delta", str(other)])
    assert result.exit_code == 1 and "does not fit this model" in result.output and evaluated == []

    poisoned = weights.clone()
    poisoned[0, 0] = float("nan")
    nan = tmp_path / "nan.safetensors"
    Delta.from_changes({EMBEDDINGS: (weights, poisoned)}, model=model, allow_nonfinite=True).save(nan)
    result = runner.invoke(app, [*args, "--delta", str(nan)])
    assert result.exit_code == 1 and "--allow-nonfinite" in result.output and evaluated == []
    result = runner.invoke(app, [*args, "--delta", str(nan), "--allow-nonfinite", "--force"])
    assert result.exit_code == 0, result.output


def test_report_compare_and_table():
    base = {"forget": {"Pure_Text": {"gen_acc": 0.8}}, "retain": {"Pure_Text": {"gen_acc": 0.5}}}
    edited = {"forget": {"Pure_Text": {"gen_acc": 0.2}}, "retain": {"Pure_Text": {"gen_acc": 0.4}}}
    compared = report.compare(base, edited)
    assert compared["forget"]["Pure_Text"]["gen_acc"]["forgetting_rate"] == pytest.approx(0.75)
    assert compared["retain"]["Pure_Text"]["gen_acc"]["retention"] == pytest.approx(0.8)
    assert report.compare({"forget": {"Pure_Text": {"gen_acc": 0.0}}}, base)["forget"]["Pure_Text"]["gen_acc"][
        "forgetting_rate"] is None
    grid = report.table({"base": base, "edited": edited})
    assert grid.row_count == 2
    cells = {column.header: list(column.cells) for column in grid.columns}
    assert cells["base"] == ["80.0", "50.0"] and cells["rate"] == ["75.0", "80.0"]  # per cent, as the caption says
    assert "every value in %" in grid.caption and "answer_prob = mean probability" in grid.caption
    assert "retention (edited/base) on retain" in grid.caption
    assert "rate:" not in report.table({"base": base, "a": edited, "b": edited}).caption  # no rate column then


def test_report_files_are_replaced_only_with_force(tmp_path):
    results = {"base": {"forget": {"Pure_Text": {"choice_acc": 1.0}}, "retain": {"Pure_Text": {"choice_acc": 0.5}}}}
    path = report.write_json({"a": 1}, tmp_path / "r.json")
    with pytest.raises(MmeditError, match="already exists"):
        report.write_json({"a": 2}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    report.write_json({"a": 2}, path, force=True)
    assert json.loads(path.read_text()) == {"a": 2}
    png = tmp_path / "p.png"
    png.write_bytes(b"mine")
    with pytest.raises(MmeditError, match="already exists"):
        report.plot(results, png)
    assert png.read_bytes() == b"mine"
    report.plot(results, png, force=True)
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(file.name for file in tmp_path.iterdir()) == ["p.png", "r.json"]  # no temp files left


def test_answer_prob_is_the_correct_options_per_token_probability(fast, loaded):
    """answer_prob = exp(mean log-probability of the correct option's labelled tokens), from a plain forward."""
    model, processor = loaded
    rows = [row for row in profiles.load(fast.data).rows("forget10") if row.options][:3]
    records = harness.evaluate(model, processor, {"f": rows}, forms=("text",), letters=False, progress=False)
    got = {r.row: r.value for r in records if r.metric == "answer_prob"}
    for row in rows:
        correct = dataclasses.replace(row, answer=row.options[row.correct])
        batch = next(make_batches([correct], processor, form="text", batch_size=1))
        labels = batch.inputs["labels"]
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.inputs.items() if k != "labels"}).logits
        mask = labels[0, 1:] != IGNORE
        logprobs = logits[0, :-1].log_softmax(-1)[mask].gather(-1, labels[0, 1:][mask].unsqueeze(-1))
        assert got[row.id] == pytest.approx(float(logprobs.mean().exp()), rel=1e-4)
    assert 0 < min(got.values()) <= max(got.values()) <= 1
