"""`mmedit demo --fast` end to end with the plugins registered now, each run with its embedded preset;
failing, misbehaving and missing plugins; reuse of the cached model; shipped weights used without training
and `--retrain` training from the recipe; an existing output folder refused without --force."""
import dataclasses
import json
import types

import pytest
import torch
from typer.testing import CliRunner

from mmedit.bench import model as embedded_model
from mmedit.cli import demo
from mmedit.cli.main import app
from mmedit.errors import MmeditError

runner = CliRunner()


@pytest.fixture(autouse=True)
def shared_cache(tmp_path_factory, monkeypatch):
    """The fast model lives in the same cache folder the other test modules train it into."""
    monkeypatch.setenv("MMEDIT_CACHE", str(tmp_path_factory.getbasetemp()))


def test_demo_fast_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--fast", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / demo.REPORT).read_text())
    assert record["format"] == demo.FORMAT and record["settings"]["fast"] is True
    for name in ("demo.png", "trace-forget.safetensors", "trace-forget.png"):
        assert (out / name).stat().st_size > 0
    installed, _ = demo.plugins()
    presets = {name: dict(plugin.presets.get("embedded", {})) for name, plugin in installed.items()}
    assert any(presets.values())  # else the checks below could not tell a preset from the defaults
    names = [method["name"] for method in record["methods"]]
    table = (out / demo.MARKDOWN).read_text().splitlines()
    assert [line.split(" | ")[0].lstrip("| ") for line in table[4:]] == names  # one markdown row per method
    assert names == ["base", *(demo.label(name, presets[name]) for name in sorted(installed))]
    assert record["settings"]["runs"] == [{"plugin": name, "options": presets[name]} for name in sorted(installed)]
    for method in record["methods"][1:]:
        # every plugin either produced a delta that was evaluated, or failed with one line
        if method["error"]:
            assert "\n" not in method["error"] and method["name"] not in record["results"]
        else:
            assert (out / method["delta"]["file"]).is_file() and method["name"] in record["comparison"]
            provenance = method["delta"]["provenance"]
            name = provenance["plugin"]["name"]
            assert name == method["name"].split()[0]
            # the edit really ran with the plugin's preset: its recorded config is the preset's config
            assert provenance["config"] == dataclasses.asdict(installed[name].configure(presets[name]))
    assert sum(not method["error"] for method in record["methods"][1:] if presets[method["name"].split()[0]]) >= 3
    base = record["results"]["base"]
    assert base["forget"]["Image_Textual"]["choice_acc"] >= 0.9 and base["retain"]["Pure_Text"]["gen_acc"] >= 0.9
    assert "choice_letter_acc" not in base["forget"]["Pure_Text"]  # the embedded model never learnt the letters
    people = record["data"]["evaluated_people"]
    assert people["forget"] == people["test"] and len(people["retain"]) >= 1
    assert record["timings"]["total_s"] > 0 and record["peak_memory_mb"] > 0
    assert "base" in result.output and "forgetting rate" in result.output


def test_paper_defaults_run_every_plugin_without_its_preset():
    installed, _ = demo.plugins()
    assert demo.default_runs(installed, paper_defaults=True) == [(name, {}) for name in sorted(installed)]
    tuned = demo.default_runs(installed, paper_defaults=False)
    assert tuned == [(name, dict(installed[name].presets.get("embedded", {}))) for name in sorted(installed)]
    assert any(options for _, options in tuned)


def _fake_plugins(monkeypatch, apply):
    unset = types.SimpleNamespace(presets={})
    monkeypatch.setattr(demo, "plugins", lambda: ({"boom": unset, "meddler": unset}, apply))


def test_failing_plugins_are_reported_and_the_model_is_kept(tmp_path, monkeypatch):
    def apply(name, model, processor, forget_rows, retain_rows, overrides=None, seed=0, progress=True, memo=None):
        if name == "boom":
            raise RuntimeError("exploded\nwith a second line")
        with torch.no_grad():  # a plugin that breaks the contract by editing the model it was given
            next(model.parameters()).add_(1.0)
        raise AssertionError("not reached by a well-behaved plugin")

    _fake_plugins(monkeypatch, apply)
    embedded_model.embedded(fast=True, progress=False)  # built once (if no other test did) ...
    monkeypatch.setattr(embedded_model, "write", lambda *a, **k: pytest.fail("retrained a cached model"))
    record = demo.run(tmp_path / "demo", fast=True, progress=False)  # ... and reused from here on
    errors = {method["name"]: method["error"] for method in record["methods"]}
    assert errors == {"base": None, "boom": "RuntimeError: exploded",
                      "meddler": "AssertionError: not reached by a well-behaved plugin"}
    assert list(record["results"]) == ["base"]

    def meddle(name, model, processor, forget_rows, retain_rows, overrides=None, seed=0, progress=True, memo=None):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        from mmedit.delta import Delta

        return Delta({}, {})

    _fake_plugins(monkeypatch, meddle)
    again = demo.run(tmp_path / "demo", fast=True, progress=False, force=True)  # replaces its earlier output
    assert {m["name"]: m["error"] for m in again["methods"]}["meddler"].endswith("modified the model it was given "
                                                                                 "(weights restored)")
    # after the meddler the base numbers are still the base numbers: the weights were put back
    assert again["results"]["base"] == record["results"]["base"]


def test_without_plugins_the_demo_evaluates_the_base_model(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "plugins", lambda: ({}, None))
    result = runner.invoke(app, ["demo", "--fast", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "no plugins are installed" in result.output
    record = json.loads((tmp_path / "demo" / demo.REPORT).read_text())
    assert [method["name"] for method in record["methods"]] == ["base"] and record["comparison"] == {}


def test_demo_refuses_an_existing_out_before_any_work_and_replaces_it_with_force(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "plugins", lambda: ({}, None))
    monkeypatch.setattr(embedded_model, "embedded", lambda *a, **k: pytest.fail("worked before checking --out"))
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    for target in (out, tmp_path / "file"):
        result = runner.invoke(app, ["demo", "--fast", "--out", str(target)])
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [f"error: {target} already exists; pass --force to replace it"]
    assert (out / "keep.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "x"
    monkeypatch.undo()
    monkeypatch.setattr(demo, "plugins", lambda: ({}, None))
    result = runner.invoke(app, ["demo", "--fast", "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in out.iterdir()) == sorted(
        [demo.REPORT, demo.MARKDOWN, "demo.png", "trace-forget.safetensors", "trace-forget.png"])
    again = runner.invoke(app, ["demo", "--fast", "--out", str(out)])  # its own earlier output is refused too
    assert again.exit_code == 1 and "--force" in again.output


def test_demo_uses_shipped_weights_without_training_and_retrain_trains(tmp_path, monkeypatch, tmp_path_factory):
    """The fast model shipped to a folder stands in for mmedit's own weights: the demo takes it without
    training; --retrain trains from the recipe into an empty cache instead."""
    monkeypatch.setattr(demo, "plugins", lambda: ({}, None))
    fast = embedded_model.embedded(fast=True, progress=False)
    shipped = embedded_model.ship(fast.model, tmp_path / "weights")
    monkeypatch.setattr(embedded_model, "SHIPPED", shipped)
    write, written = embedded_model.write, []
    monkeypatch.setattr(embedded_model, "write", lambda *a, **k: written.append(a[1]) or write(*a, **k))

    result = runner.invoke(app, ["demo", "--fast", "--out", str(tmp_path / "shipped")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "shipped" / demo.REPORT).read_text())
    assert written == [] and record["model"]["path"] == str(shipped) and record["model"]["shipped"] is True
    assert record["settings"]["retrain"] is False and "shipped with mmedit" in result.output

    monkeypatch.setenv("MMEDIT_CACHE", str(tmp_path / "empty-cache"))
    result = runner.invoke(app, ["demo", "--fast", "--retrain", "--out", str(tmp_path / "retrained")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "retrained" / demo.REPORT).read_text())
    assert len(written) == 1 and written[0].parent == tmp_path / "empty-cache" / "embedded"
    assert record["model"]["path"] == str(written[0]) and record["model"]["shipped"] is False
    assert record["settings"]["retrain"] is True and "trained from the recipe" in result.output
    # the recipe trains the same weights on this machine, so both runs score the same
    assert record["results"]["base"] == json.loads((tmp_path / "shipped" / demo.REPORT).read_text())["results"]["base"]


def test_demo_help_says_where_the_model_comes_from():
    result = runner.invoke(app, ["demo", "--help"])
    text = " ".join(result.output.split())
    assert "the model is the one mmedit ships" in text and "--retrain trains it from the recipe" in text


def test_demo_runs_chosen_settings_and_rejects_bad_ones(tmp_path):
    runner = CliRunner()
    out = tmp_path / "runs"
    result = runner.invoke(app, ["demo", "--fast", "--out", str(out), "--run", "manu alpha=5", "--run", "manu alpha=10"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / demo.REPORT).read_text())
    assert [method["name"] for method in record["methods"]] == ["base", "manu alpha=5", "manu alpha=10"]
    sizes = [method["delta"]["elements"] for method in record["methods"][1:]]
    assert sizes[0] < sizes[1]  # 10 % of the neurons prune more rows than 5 %
    for spec, message in (("nosuch", "unknown plugin 'nosuch'"), ("ga foo=1", "unknown option 'foo'"),
                          ("", "--run needs")):
        bad = runner.invoke(app, ["demo", "--fast", "--out", str(tmp_path / "bad"), "--run", spec])
        assert bad.exit_code == 1 and message in bad.output
        assert not (tmp_path / "bad").exists()


def test_demo_over_seeds_reports_mean_and_spread_of_each_cell(tmp_path):
    """--seeds 0,1: one demo per seed in OUT/seed-N/, and each summary cell as mean / sample sd / min / max
    of the per-seed values (recomputed here from the per-seed reports)."""
    import statistics

    out = tmp_path / "seeds"
    result = runner.invoke(app, ["demo", "--fast", "--seeds", "0,1", "--run", "ga lr=0.01", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / demo.SEEDS_REPORT).read_text())
    assert record["seeds"] == [0, 1] and [m["method"] for m in record["methods"]] == ["base", "ga lr=0.01"]
    per_seed = {seed: json.loads((out / f"seed-{seed}" / demo.REPORT).read_text()) for seed in (0, 1)}
    assert per_seed[0]["settings"]["seed"] == 0 and per_seed[1]["settings"]["seed"] == 1
    for method in record["methods"]:
        for column in demo.SUMMARY_COLUMNS:
            values = [row[column] for seed in (0, 1) for row in demo.summary_rows(per_seed[seed])
                      if row["method"] == method["method"] and row[column] is not None]
            cell = method["cells"][column]
            if not values:
                assert cell is None
                continue
            assert cell["mean"] == pytest.approx(statistics.fmean(values)) and cell["n"] == len(values)
            assert cell["sd"] == pytest.approx(statistics.stdev(values)) if len(values) > 1 else cell["sd"] is None
            assert (cell["min"], cell["max"]) == (min(values), max(values))
    assert any(cell and cell["sd"] for m in record["methods"] for cell in m["cells"].values())  # seeds differ
    table = (out / demo.SEEDS_MARKDOWN).read_text()
    assert "over seeds 0, 1" in table and "±" in table and "| ga lr=0.01 |" in table
    assert "over seeds 0, 1" in result.output


def test_seeds_bad_input_is_one_line(tmp_path):
    for arguments, message in ((["--seeds", "0,x"], "--seeds takes comma-separated integers"),
                               (["--seeds", "1"], "--seeds needs two or more different seeds"),
                               (["--seeds", "1,1"], "--seeds needs two or more different seeds"),
                               (["--seeds", "0,1", "--seed", "3"], "give --seed or --seeds, not both"),
                               (["--seeds", "0,1", "--seed", "0"], "give --seed or --seeds, not both")):
        result = runner.invoke(app, ["demo", "--fast", "--out", str(tmp_path / "x"), *arguments])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.output
        assert not (tmp_path / "x").exists()
