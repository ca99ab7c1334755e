"""`mmedit sequential` (mmedit.plugins.sequential): the forget people in K disjoint seeded groups, each
request edited on the model with the earlier requests' deltas applied (its delta says so, and only fits
there), metrics after every request and for the one-shot union, and the stack merged and reverted bit for
bit; bad input is one line with nothing written. The edits are GA at lr 1e-3 for 5 steps on the shipped
embedded model (under a second each), scored on a few retain people."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from mmedit.bench.model import embedded
from mmedit.cli.main import app
from mmedit.data import read_rows
from mmedit.delta import Delta
from mmedit.errors import MmeditError
from mmedit.eval.harness import Record
from mmedit.loading import load
from mmedit.plugins import apply_plugin
from mmedit.plugins.sequential import run_requests, split_groups, views

runner = CliRunner()
GA = {"lr": 1e-3, "max_steps": 5}


def mmedit(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def refused(result, message):
    """The CLI contract for bad input: exit 1, one line on stderr naming the problem."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


def people_rows(names, per_person=3):
    return [SimpleNamespace(entity=name, id=f"{name}-{index}") for name in names for index in range(per_person)]


# ---- groups and views (no model) ------------------------------------------------------------------------

@pytest.mark.parametrize("count, requests", [(5, 5), (5, 2), (7, 3), (4, 1)])
def test_groups_are_disjoint_cover_the_people_and_are_seeded(count, requests):
    names = [f"person {index}" for index in range(count)]
    rows = people_rows(names)
    groups = split_groups(rows, requests, seed=0)
    assert len(groups) == requests and all(groups)
    flat = [person for group in groups for person in group]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))  # disjoint and covering
    assert max(map(len, groups)) - min(map(len, groups)) <= 1
    assert all(group == [name for name in names if name in group] for group in groups)  # file order
    assert split_groups(rows, requests, seed=0) == groups
    if 1 < requests < count:
        assert any(split_groups(rows, requests, seed=seed) != groups for seed in range(1, 6))


@pytest.mark.parametrize("requests", [0, -1, 6])
def test_a_request_count_outside_one_to_the_people_is_refused(requests):
    with pytest.raises(MmeditError, match=r"--requests must be between 1 and the number of forget people \(5\)"):
        split_groups(people_rows("abcde"), requests)


def test_views_after_request_k_are_the_groups_so_far_the_current_one_and_the_later_ones():
    groups = [["a"], ["b", "c"], ["d"]]
    values = {"a": 0.0, "b": 1.0, "c": 0.5, "d": 1.0, "r": 0.25}
    records = [Record("retain" if person == "r" else "forget", "Pure_Text", "choice_acc", person, person, value, "")
               for person, value in values.items()]
    after_two = views(records, groups, 2)
    assert after_two["forget_done"]["Pure_Text"]["choice_acc"] == pytest.approx(0.5)  # a, b, c: pooled rows
    assert after_two["forget_current"]["Pure_Text"]["choice_acc"] == pytest.approx(0.75)  # b, c
    assert after_two["forget_later"]["Pure_Text"]["choice_acc"] == 1.0  # d
    assert after_two["retain"]["Pure_Text"]["choice_acc"] == 0.25
    assert [after_two[f"group_{number}"]["Pure_Text"]["choice_acc"] for number in (1, 2, 3)] == [0.0, 0.75, 1.0]
    each = {"group_1", "group_2", "group_3"}
    assert set(views(records, groups, 0)) == {"forget_later", "retain"} | each  # the base: nothing done yet
    assert set(views(records, groups, 3, union=True)) == {"forget_done", "retain"} | each  # no current group


def test_a_delta_with_stacks_on_applies_only_right_after_those_deltas():
    """The delta layer's side, on a bare Linear: the values of the two edits do not overlap, so only the
    stacks_on record tells that the second belongs on top of the first."""
    layer = torch.nn.Linear(3, 2)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    first = Delta.from_changes({"weight": (weight, weight + 1)})
    second = Delta.from_changes({"bias": (bias, bias - 1)}, provenance={"stacks_on": [first.checksum]})
    other = Delta.from_changes({"bias": (bias, bias * 2)})
    with pytest.raises(MmeditError, match="made on top of other deltas"):
        second.apply(layer)  # the base: request 1 is missing
    with other.applied(layer), pytest.raises(MmeditError, match="made on top of other deltas"):
        Delta(second.changes, {"stacks_on": [first.checksum]}).apply(layer)  # another delta on top
    for malformed in ("sha256:x", 5, {"a": 1}):
        with first.applied(layer), pytest.raises(MmeditError, match="made on top of other deltas"):
            Delta(second.changes, {"stacks_on": malformed}).apply(layer)
    assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)  # refusals changed nothing
    with first.applied(layer), second.applied(layer):
        assert torch.equal(layer.bias, bias - 1)
        with pytest.raises(MmeditError, match="must be reverted first"):
            first.revert(layer)
    assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)


# ---- a real run ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench():
    paths = embedded(progress=False)
    return paths, read_rows(paths.data / "forget10.jsonl"), read_rows(paths.data / "retain90.jsonl")


@pytest.fixture(scope="module")
def ran(bench):
    """run_requests with K = 2 on the shipped model, which must come back bit for bit."""
    paths, forget, retain = bench
    model, processor = load(paths.model, device="cpu")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    result = run_requests("ga", model, processor, forget, retain, 2, GA, seed=0, retain_people=2, progress=False,
                          batch_size=64, max_new_tokens=8, letters=False)
    return model, processor, before, result


def test_the_model_comes_back_bit_for_bit(ran):
    model, _, before, _ = ran
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_each_request_stacks_on_the_earlier_ones_and_fits_only_there(ran, bench):
    model, processor, _, result = ran
    first, second = result.deltas
    assert first.provenance["stacks_on"] == [] and second.provenance["stacks_on"] == [first.checksum]
    assert second.provenance["sequential"]["people"] == result.record["groups"][1]
    with pytest.raises(MmeditError, match="made on top of other deltas"):
        second.apply(model)  # not on the base
    # its stored originals are what request 1 left: without the stacks_on record, the values alone refuse the base
    unrecorded = Delta(second.changes, {}, source="request 2 without stacks_on")
    with pytest.raises(MmeditError, match="does not fit this model"):
        unrecorded.apply(model)
    with first.applied(model), second.applied(model):
        pass  # on the stack it fits (every touched element verified)
    # the same edit of the same group made on the base is another delta: the order of requests matters
    _, forget, retain = bench
    people = set(result.record["groups"][1])
    on_base = apply_plugin("ga", model, processor, [row for row in forget if row.entity in people], retain, GA,
                           seed=0, progress=False)
    name = next(iter(second.changes))
    assert not torch.equal(on_base.changes[name].old, second.changes[name].old)
    assert not torch.equal(on_base.changes[name].new_values("cpu"), second.changes[name].new_values("cpu"))


def test_metrics_after_every_request_and_for_the_union(ran):
    *_, result = ran
    record = result.record
    groups, sequence = record["groups"], record["sequence"]
    assert [row["request"] for row in sequence] == [1, 2] and [row["people"] for row in sequence] == groups
    first, second = (row["results"]["edited"] for row in sequence)
    assert first["forget_done"] == first["forget_current"] == first["group_1"] and "forget_later" in first
    assert second["group_2"] == second["forget_current"] and "forgetting_rate" in \
        sequence[1]["comparison"]["group_1"]["Image_Textual"]["choice_acc"]  # request 1's group after request 2
    assert "forget_later" not in second and {"forget_done", "forget_current", "retain"} <= set(second)
    for row in sequence:
        for view in ("forget_done", "forget_current"):
            for form in ("Image_Textual", "Pure_Text"):
                cell = row["comparison"][view][form]["choice_acc"]
                assert cell["forgetting_rate"] == pytest.approx(1 - cell["edited"] / cell["base"])
        assert "retention" in row["comparison"]["retain"]["Image_Textual"]["choice_acc"]
    base_current = sequence[0]["results"]["base"]["forget_current"]["Image_Textual"]["choice_acc"]
    assert first["forget_current"]["Image_Textual"]["choice_acc"] < base_current  # GA forgot something
    union = record["union"]
    assert union["request"] is None and union["people"] == [p for group in groups for p in group]
    assert union["delta"]["stacks_on"] == [] and result.union.provenance["sequential"]["union_of"] == 2
    assert set(union["results"]["edited"]) == {"forget_done", "retain", "group_1", "group_2"}
    assert len(record["evaluated"]["retain"]) == 2 and record["evaluated"]["forget"] == sorted(sum(groups, []))


# ---- the command -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def command(bench, tmp_path_factory):
    paths, *_ = bench
    folder = tmp_path_factory.mktemp("sequential")
    out = folder / "seq"
    result = mmedit("sequential", "ga", paths.model, "--forget", paths.data / "forget10.jsonl", "--retain",
                    paths.data / "retain90.jsonl", "--requests", 2, "--set", "lr=1e-3", "--set", "max_steps=5",
                    "--retain-people", 2, "--out", out)
    assert result.exit_code == 0, result.output
    return paths, folder, out, result


def test_the_command_writes_the_deltas_report_and_plot(command):
    paths, _, out, result = command
    assert sorted(path.name for path in out.iterdir()) == [
        "request-1.safetensors", "request-2.safetensors", "sequential.json", "sequential.png", "union.safetensors"]
    record = json.loads((out / "sequential.json").read_text())
    deltas = [Delta.load(out / f"request-{number}.safetensors") for number in (1, 2)]
    assert [row["delta"]["checksum"] for row in record["sequence"]] == [delta.checksum for delta in deltas]
    assert deltas[1].provenance["stacks_on"] == [deltas[0].checksum]
    assert record["union"]["delta"]["checksum"] == Delta.load(out / "union.safetensors").checksum
    assert record["plugin"]["name"] == "ga" and record["config"]["lr"] == 1e-3
    assert record["overrides"]["max_steps"] == "5" and record["config"]["max_steps"] == 5
    assert record["data"]["forget"]["people"] == 5 and len(record["data"]["forget"]["sha256"]) == 64
    assert {"torch", "transformers"} <= set(record["versions"]) and record["model"]["arg"] == str(paths.model)
    assert (out / "sequential.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sequential requests" in result.stdout and "union" in result.stdout


def test_merge_of_the_stack_then_revert_restores_the_base_bytes(command):
    paths, folder, out, _ = command
    stack = [out / "request-1.safetensors", out / "request-2.safetensors"]
    assert mmedit("merge", paths.model, *stack, "--out", folder / "merged").exit_code == 0
    refused(mmedit("merge", paths.model, stack[1], "--out", folder / "wrong"), "made on top of other deltas")
    refused(mmedit("merge", paths.model, *stack[::-1], "--out", folder / "wrong"), "made on top of other deltas")
    assert not (folder / "wrong").exists()
    refused(mmedit("revert", folder / "merged", *stack[::-1], "--out", folder / "wrong"), "must be reverted first")
    assert mmedit("revert", folder / "merged", *stack, "--out", folder / "back").exit_code == 0
    weights = sorted(Path(paths.model).glob("*.safetensors"))
    assert weights and all((folder / "back" / path.name).read_bytes() == path.read_bytes() for path in weights)
    # one request at a time gives the same checkpoint: a merged folder knows what it holds
    assert mmedit("merge", paths.model, stack[0], "--out", folder / "one").exit_code == 0
    assert mmedit("merge", folder / "one", stack[1], "--out", folder / "two").exit_code == 0
    assert all((folder / "two" / path.name).read_bytes() == (folder / "merged" / path.name).read_bytes()
               for path in weights)


@pytest.mark.parametrize("extra, message", [
    (["--requests", "0"], "--requests must be between 1 and the number of forget people (5), got 0"),
    (["--requests", "6"], "--requests must be between 1 and the number of forget people (5), got 6"),
    (["--requests", "2", "--set", "nope=1"], "nope"),
    (["--requests", "2", "--preset", "nope"], "no preset 'nope'"),
])
def test_bad_input_is_one_line_and_writes_nothing(bench, tmp_path, extra, message):
    paths, *_ = bench
    out = tmp_path / "seq"
    refused(mmedit("sequential", "ga", paths.model, "--forget", paths.data / "forget10.jsonl", "--retain",
                   paths.data / "retain90.jsonl", *extra, "--out", out), message)
    assert list(tmp_path.iterdir()) == []


def test_a_plugin_that_needs_a_retain_set_is_refused_without_one(bench, tmp_path):
    paths, *_ = bench
    refused(mmedit("sequential", "graddiff", paths.model, "--forget", paths.data / "forget10.jsonl",
                   "--requests", 2, "--out", tmp_path / "seq"), "graddiff: needs a retain set (--retain)")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_out_needs_force(bench, tmp_path):
    paths, *_ = bench
    out = tmp_path / "seq"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    refused(mmedit("sequential", "ga", paths.model, "--forget", paths.data / "forget10.jsonl", "--requests", 2,
                   "--out", out), "already exists; pass --force")
    assert [path.name for path in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep"
