"""`mmedit apply --log-dir`: TensorBoard event files of the training steps, read back with tensorboard's
own reader; bad log folders and a missing tensorboard fail before the model loads, nothing written."""
from __future__ import annotations

import builtins
import json

import pytest
from typer.testing import CliRunner

from mmedit import zoo
from mmedit.cli.main import app
from mmedit.data.rows import write_jsonl
from mmedit.delta import Delta

from test_plugins_conformance import make_rows  # noqa: E402

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tb")
    rows = make_rows(folder)
    write_jsonl(rows[:4], folder / "forget.jsonl")
    write_jsonl(rows[4:], folder / "retain.jsonl")
    return zoo.tiny("llava", root=tmp_path_factory.getbasetemp() / "zoo"), folder


def apply(setup, plugin, out, *extra):
    model, folder = setup
    return CliRunner().invoke(app, ["apply", plugin, str(model), "--forget", str(folder / "forget.jsonl"), "--retain",
                                    str(folder / "retain.jsonl"), "--device", "cpu", "--out", str(out), *extra])


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_every_step_logs_its_loss_terms_lr_and_gradient_norm(setup, tmp_path):
    result = apply(setup, "graddiff", tmp_path / "gd.safetensors", "--set", "lr=1e-3", "--set", "batch_size=1",
                   "--log-dir", tmp_path / "runs" / "gd")
    assert result.exit_code == 0, result.output
    logged = scalars(tmp_path / "runs" / "gd")
    assert set(logged) == {"loss/total", "loss/forget", "loss/retain", "lr", "grad_norm"}
    report = Delta.load(tmp_path / "gd.safetensors").provenance["report"]
    steps = report["steps"]
    assert [step for step, _ in logged["loss/total"]] == list(range(1, steps + 1))
    total, forget, retain = (dict(logged[tag]) for tag in ("loss/total", "loss/forget", "loss/retain"))
    assert total[1] == pytest.approx(report["loss"]["first"], rel=1e-5)
    assert total[steps] == pytest.approx(report["loss"]["last"], rel=1e-5)
    for step in total:  # GradDiff: ascent on the forget NLL (a negative term), descent on the retain NLL
        assert forget[step] < 0 < retain[step] and total[step] == pytest.approx(forget[step] + retain[step], rel=1e-5)
    lrs = [value for _, value in logged["lr"]]  # linear decay from lr to 0 over the run
    assert lrs[0] == pytest.approx(1e-3) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert all(value > 0 for _, value in logged["grad_norm"])
    events = EventAccumulator(str(tmp_path / "runs" / "gd"))
    events.Reload()
    header = json.loads(events.Tensors("mmedit/run/text_summary")[0].tensor_proto.string_val[0].decode()
                        .strip("`\n"))
    assert header["plugin"] == "graddiff" and header["config"]["lr"] == 1e-3 and header["seed"] == 0


def test_a_one_term_loss_logs_its_total_only(setup, tmp_path):
    result = apply(setup, "ga", tmp_path / "ga.safetensors", "--set", "max_steps=2", "--set", "batch_size=1", "--log-dir", tmp_path / "ga")
    assert result.exit_code == 0, result.output
    logged = scalars(tmp_path / "ga")
    assert set(logged) == {"loss/total", "lr", "grad_norm"} and len(logged["loss/total"]) == 2


def test_bad_log_dirs_and_no_tensorboard_fail_before_the_model_loads(setup, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    result = apply(setup, "ga", tmp_path / "a.safetensors", "--log-dir", tmp_path / "file")
    assert result.exit_code == 1 and result.output.strip() == f"error: --log-dir {tmp_path / 'file'} is a file, not a folder"
    real_import = builtins.__import__

    def without_tensorboard(name, *args, **kwargs):
        if name.startswith("tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tensorboard)
    result = apply(setup, "ga", tmp_path / "b.safetensors", "--log-dir", tmp_path / "runs")
    assert result.exit_code == 1
    assert result.output.strip() == ("error: --log-dir writes TensorBoard event files and needs tensorboard: "
                                     "pip install 'mmedit-unlearn[tensorboard]'")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]


def test_attack_logs_every_relearn_fine_tuning(tmp_path):
    """`mmedit attack --log-dir`: each of relearn's four fine-tunings (forget part / retain only, on the
    edited model and the base) is its own series of loss, lr and gradient norm."""
    from mmedit.bench.model import embedded

    shipped = embedded()
    model, bench = shipped.model, shipped.data
    delta = tmp_path / "ga.safetensors"
    made = CliRunner().invoke(app, ["apply", "ga", str(model), "--forget", str(bench / "forget10.jsonl"), "--set",
                                    "max_steps=1", "--device", "cpu", "--out", str(delta)])
    assert made.exit_code == 0, made.output
    result = CliRunner().invoke(app, ["attack", str(model), "--delta", str(delta), "--data", str(bench), "--attacks",
                                      "relearn", "--steps", "3", "--device", "cpu", "--out", str(tmp_path / "a.json"),
                                      "--log-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    logged = scalars(tmp_path / "runs")
    report = json.loads((tmp_path / "a.json").read_text())
    for variant in ("forget-part", "retain-only"):
        for model_name in ("base", "edited"):
            prefix = f"relearn/{variant}/{model_name}"
            assert [step for step, _ in logged[f"{prefix}/loss"]] == [1, 2, 3], prefix
            assert {tag for tag in logged if tag.startswith(prefix + "/")} == {f"{prefix}/{t}" for t in ("loss", "lr", "grad_norm")}
            assert logged[f"{prefix}/loss"][0][1] == pytest.approx(
                report["attacks"]["relearn"]["variants"][variant]["train_loss"][model_name]["first"], rel=1e-6)


def test_sweep_logs_each_trials_training_and_every_trials_objectives(tmp_path):
    from mmedit.bench.model import embedded

    shipped = embedded()
    result = CliRunner().invoke(app, ["sweep", "ga", str(shipped.model), "--forget", str(shipped.data / "forget10.jsonl"),
                                      "--retain", str(shipped.data / "retain90.jsonl"), "--budget", "2", "--set",
                                      "max_steps=2", "--device", "cpu", "--out", str(tmp_path / "sweep.json"),
                                      "--log-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    trials = json.loads((tmp_path / "sweep.json").read_text())["trials"]
    for trial in trials:
        logged = scalars(tmp_path / "runs" / f"trial-{trial['number']:03d}")
        assert [step for step, _ in logged["loss/total"]] == [1, 2]
    objectives = scalars(tmp_path / "runs" / "sweep")
    assert sorted(objectives) == sorted(f"objectives/{key}" for key in trials[0]["values"])
    for tag, points in objectives.items():
        key = tag.split("/", 1)[1]
        assert points == [(trial["number"], pytest.approx(trial["values"][key], rel=1e-6)) for trial in trials]
