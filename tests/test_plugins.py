"""Options, the training loop's guarantees (selections, θ₀ reference, schedules, NaN guard), MMUnlearner's
mask, RMU's scope, NPO's reference model, the registry's handling of bad plugins, and `mmedit apply`."""
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from mmedit import zoo
from mmedit.arch import model_map
from mmedit.cli.main import app
from mmedit.data.batches import make_batches
from mmedit.data.rows import Row, write_jsonl
from mmedit.delta import Delta
from mmedit.errors import MmeditError
from mmedit.loading import load
from mmedit.plugins import (BaselineConfig, Job, Originals, Plugin, Selection, Trainer, TrainingPlugin, apply_plugin,
                            available, get, interleaved, option, paired)
from mmedit.plugins.mmunlearner import maskable
from mmedit.trace import trace


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rows")
    made = []
    for i in range(12):
        image = Image.new("RGB", (32, 32), (20 * i, 170 - 12 * i, 80 + 5 * i))
        image.paste((255, 255, 255), (3 + i, 5, 12 + i, 15))
        image.save(folder / f"p{i}.png")
        made.append(Row(id=f"p{i}", entity=f"Person {i}", image=folder / f"p{i}.png",
                        question="Where was this person born?", text_question=f"Where was Person {i} born?",
                        answer=["Lisbon", "Oslo", "Kyoto", "Lima"][i % 4], where=f"rows.jsonl:{i + 1}"))
    return made


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return zoo.tiny("llava", root=tmp_path_factory.getbasetemp() / "zoo")


@pytest.fixture
def llava(model_dir):
    return load(model_dir, device="cpu")


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise bit difference."""
    return a.contiguous().view(torch.int32) != b.contiguous().view(torch.int32)


# ---- options ----------------------------------------------------------------------------------------
def test_options_are_parsed_by_type_and_checked():
    ga = get("ga")
    config = ga.configure({"lr": "2e-5", "epochs": "2", "forms": "both", "parts": "llm", "grad_clip": 0})
    assert (config.lr, config.epochs, config.forms, config.parts, config.grad_clip) == (2e-5, 2, "both", "llm", 0.0)
    listing = 'options are lr=1e-05, lr_decay="linear", epochs=1, batch_size=4'
    with pytest.raises(MmeditError, match=f"ga: unknown option 'lrr'; {listing}"):
        ga.configure({"lrr": 1})
    with pytest.raises(MmeditError, match=f"ga: bad value for option epochs: expected int, got 'two'; {listing}"):
        ga.configure({"epochs": "two"})
    with pytest.raises(MmeditError, match="option forms: expected one of multimodal, text, both, got 'video'"):
        ga.configure({"forms": "video"})
    with pytest.raises(MmeditError, match="ga: option lr must be a positive number; options are"):
        ga.configure({"lr": "-1"})
    with pytest.raises(MmeditError, match="option parts must be a comma-separated subset of vision, projector, llm"):
        ga.configure({"parts": "vision,decoder"})
    with pytest.raises(MmeditError, match="expected float, got True"):
        ga.configure({"lr": True})
    with pytest.raises(MmeditError, match="unknown plugin 'nope'; plugins are .*ga.*mmunlearner"):
        get("nope")


def test_option_machinery_for_any_config():
    @dataclass
    class Config:
        flag: bool = option(False, "A switch.")
        name: str = option("a", "A name.")

    class Example(Plugin):
        name, description = "example", "An example."

    Example.Config = Config
    Example().check()
    assert Example().configure({"flag": "yes", "name": "b"}) == Config(True, "b")
    assert Example().configure({"flag": "off"}).flag is False
    with pytest.raises(MmeditError, match="expected bool"):
        Example().configure({"flag": "maybe"})

    @dataclass
    class Undocumented:
        rate: float = 1.0

    Example.Config = Undocumented
    with pytest.raises(MmeditError, match="option rate has no help text"):
        Example().check()


# ---- the training loop ------------------------------------------------------------------------------
def job_for(model, processor, rows, parts=("llm",)) -> Job:
    mapping = model_map(model)
    declared = {n: p for n, p in model.named_parameters() if (mapping.part_of(n) or (None,))[0] in parts}
    return Job(model, processor, mapping, rows[:4], rows[4:8], rows[:8], seed=0, progress=False,
               original=Originals(declared))


class RowsOnly(TrainingPlugin):
    """MIP-Editor's shape: train only the producer rows of two neurons, with a loss on hidden states
    at a decoder layer of the edited model against θ₀."""

    name, description, needs_retain = "rows-only", "Test plugin.", False

    def selections(self, trainer, config):
        site = trainer.job.model_map.sites_of("llm")[0]
        return {"train": Selection.rows(trainer.job.model, {p.param: (p.axis, [1, 5]) for p in site.producers})}

    def loss(self, trainer, step):
        edited, base = trainer.forward(step.forget, [0]), trainer.reference(step.forget, [0])
        return F.mse_loss(edited.hidden[0], base.hidden[0] + 1.0)


def test_row_selection_and_theta0_reference(llava, rows, model_dir):
    model, processor = llava
    before = snapshot(model)
    job = job_for(model, processor, rows)
    trainer = Trainer(job, BaselineConfig(lr=1e-2, epochs=2), RowsOnly())
    report = trainer.run()
    assert report["steps"] == 2 and report["trainable"]["train"] == 2 * 2 * 64  # gate+up rows, width 64
    site = job.model_map.sites_of("llm")[0]
    producers = {p.param: p.axis for p in site.producers}
    for name, p in model.named_parameters():
        changed = differs(p.detach(), before[name])
        if name in producers:
            rows_changed = changed.any(dim=1 - producers[name]).nonzero().flatten().tolist()
            assert rows_changed == [1, 5], name
        else:
            assert not changed.any(), name

    # The reference pass sees θ₀ exactly; forward sees the edit; the weights are back afterwards.
    base_model, _ = load(model_dir, device="cpu")
    batch = next(make_batches(rows[:4], processor, "multimodal", 4))
    with torch.no_grad():
        expected = base_model(**batch.inputs)
    trained = snapshot(model)
    reference = trainer.reference(batch)
    assert torch.equal(reference.logits, expected.logits)
    assert all(torch.equal(p.detach(), trained[n]) for n, p in model.named_parameters())
    assert not torch.equal(trainer.forward(batch).logits.detach(), expected.logits)
    # Output.nll is HF's token-mean loss over the answer tokens.
    torch.testing.assert_close(reference.nll, expected.loss)


def test_schedules():
    chunks = {"forget": ["f0", "f1"], "retain": ["r0", "r1", "r2", "r3", "r4"]}
    fake = SimpleNamespace(config=SimpleNamespace(epochs=1), chunks=lambda which, forms, epoch: chunks[which])
    assert interleaved(fake, "multimodal") == [
        ("retain", None, "r0"), ("retain", None, "r1"), ("forget", "f0", None), ("retain", None, "r2"),
        ("retain", None, "r3"), ("forget", "f1", None), ("retain", None, "r4")]
    assert paired(fake, "multimodal") == [("train", "f0", "r0"), ("train", "f1", "r1")]
    assert paired(fake, "multimodal", anchor="retain")[2:] == [("train", "f0", "r2"), ("train", "f1", "r3"),
                                                               ("train", "f0", "r4")]


def test_nan_guard(llava, rows):
    model, processor = llava
    before = snapshot(model)
    with pytest.raises(MmeditError, match=r"ga: the loss is nan at step 2 \(train\); stopped, nothing written"):
        apply_plugin("ga", model, processor, rows[:4], None, {"lr": 1e30, "batch_size": 1}, progress=False)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


# ---- methods ----------------------------------------------------------------------------------------
def test_mmunlearner_mask_is_applied(llava, rows, monkeypatch):
    model, processor = llava
    forget, retain = rows[:4], rows[4:12]
    text_only = [dataclasses.replace(row, image=None) for row in rows[:2]]
    steps = []
    real_step = Trainer._step

    def spy(self, index, step, optimizer, lr):
        before = snapshot(self.model)
        real_step(self, index, step, optimizer, lr)
        steps.append((step.kind, before, snapshot(self.model), self.selections))

    monkeypatch.setattr(Trainer, "_step", spy)
    delta = apply_plugin("mmunlearner", model, processor, forget, retain, progress=False, text_retain_rows=text_only)
    assert [kind for kind, *_ in steps] == ["retain", "retain", "forget"]  # 2 retain batches per forget batch
    for kind, before, after, selections in steps:
        masks = selections[kind].masks if kind == "forget" else selections["forget"].masks
        changed_in = changed_out = 0
        for name in before:
            changed = differs(after[name], before[name])
            if name not in masks:
                assert not changed.any(), f"{name} is outside every selection but changed"
                continue
            changed_in += int((changed & masks[name]).sum())
            changed_out += int((changed & ~masks[name]).sum())
        assert changed_in > 0
        if kind == "forget":
            assert changed_out == 0, "a forget step changed weights outside the saliency mask"
        else:
            assert changed_out > 0  # retain steps train the whole weights, so the check above is not vacuous
    assert set(delta.changes) <= set(maskable(SimpleNamespace(model=model, model_map=model_map(model)),
                                              ("vision", "projector", "llm")))
    header = delta.header()
    assert header["data"]["text_retain"]["rows"] == 2
    assert 0 < header["report"]["mask"]["llm"]["selected"] < header["report"]["mask"]["llm"]["of"]

    # Precomputed statistics (apply_plugin's stats) give the same edit as the plugin's own traces.
    monkeypatch.setattr(Trainer, "_step", real_step)
    mapping = model_map(model)
    names = maskable(SimpleNamespace(model=model, model_map=mapping), ("vision", "projector", "llm"))
    language = [n for n in names if mapping.part_of(n)[0] == "llm"]

    def fisher(rows_, form, params):
        return trace(model, make_batches(rows_, processor, form, 4), parts=("llm",), fisher_params=params, progress=False)

    stats = {"forget": fisher(forget, "multimodal", names), "retain": fisher(retain, "multimodal", names),
             "text": fisher(text_only, "text", language)}
    again = apply_plugin("mmunlearner", model, processor, forget, retain, stats=stats, progress=False,
                         text_retain_rows=text_only)
    assert again.header()["tensors"] == header["tensors"]
    assert all(torch.equal(again.changes[n].new, delta.changes[n].new) for n in delta.changes)


def test_mmunlearner_scope_and_empty_mask(llava, rows):
    model, processor = llava
    delta = apply_plugin("mmunlearner", model, processor, rows[:4], rows[4:8], {"scope": "vision"}, progress=False)
    assert {where[0] for where in delta.where.values()} == {"vision", "projector"}
    with pytest.raises(MmeditError, match="mmunlearner: the saliency mask selects no weight at tau=1e\\+30"):
        apply_plugin("mmunlearner", model, processor, rows[:4], rows[4:8], {"tau": "1e30"}, progress=False)


def test_rmu_trains_mlps_up_to_its_layer(llava, rows):
    model, processor = llava
    mapping = model_map(model)
    delta = apply_plugin("rmu", model, processor, rows[:4], rows[4:8], {"layer": 0}, progress=False)
    mlp = mapping.site("llm.0").module.rsplit(".", 1)[0] + "."
    assert delta.changes and all(name.startswith(mlp) for name in delta.changes)
    assert delta.header()["report"]["layer"] == 0
    deep = apply_plugin("rmu", model, processor, rows[:4], rows[4:8], {"layer": 99}, progress=False)
    assert deep.header()["report"]["layer"] == len(mapping.residual) - 1
    assert {deep.where[name][1] for name in deep.changes} == {0, 1}


def test_npo_reference_model_equals_theta0(llava, rows, model_dir):
    model, processor = llava
    own = apply_plugin("npo", model, processor, rows[:4], None, {"max_steps": 2, "batch_size": 2}, progress=False)
    loaded = apply_plugin("npo", model, processor, rows[:4], None, {"max_steps": 2, "batch_size": 2,
                                                                     "ref": str(model_dir)}, progress=False)
    assert own.header()["report"]["loss"]["first"] == pytest.approx(2 / 0.4 * 0.6931471805599453)
    assert set(own.changes) == set(loaded.changes)
    assert all(torch.equal(own.changes[n].new, loaded.changes[n].new) for n in own.changes)


# ---- registry ---------------------------------------------------------------------------------------
def install(site: Path, package: str, entries: dict[str, str], module: str | None = None) -> None:
    if module is not None:
        (site / f"{package}.py").write_text(module, encoding="utf-8")
    info = site / f"{package}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mmedit.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))


SNEAKY = '''
import torch
from dataclasses import dataclass
from mmedit.plugins import Plugin, option

@dataclass
class Config:
    scale: float = option(2.0, "Factor.")

class Sneaky(Plugin):
    name, description, Config = "sneaky", "Declares the projector, writes the LLM.", Config
    def parts(self, config):
        return ("projector",)
    def edit(self, job, config):
        with torch.no_grad():
            job.model.get_parameter(job.model_map.parameters("llm")[0]).mul_(config.scale)

plugin = Sneaky()
not_a_plugin = object()
'''


def test_registry_rejects_bad_plugins(tmp_path, monkeypatch, model_dir, rows):
    install(tmp_path, "sneaky", {"sneaky": "sneaky:plugin", "broken": "no_such_module:plugin",
                                 "impostor": "sneaky:not_a_plugin"}, SNEAKY)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning) as warned:
        found = available()
    assert "sneaky" in found and "broken" not in found and "impostor" not in found and "ga" in found
    messages = " ".join(str(w.message) for w in warned)
    assert "cannot load entry point broken = no_such_module:plugin (package sneaky)" in messages
    assert "impostor" in messages and "not an mmedit.plugins.Plugin" in messages
    with pytest.raises(MmeditError, match="plugin broken: cannot load .*ModuleNotFoundError"):
        get("broken")
    model, processor = load(model_dir, device="cpu")
    with pytest.raises(MmeditError, match=r"plugin sneaky changed model\.language_model\..*outside its declared parts"):
        apply_plugin("sneaky", model, processor, rows[:4], rows[4:8], progress=False)


# ---- mmedit apply -----------------------------------------------------------------------------------
def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_apply_cli(tmp_path, rows, model_dir):
    forget, retain, text = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl", tmp_path / "text.jsonl"
    write_jsonl(rows[:4], forget)
    write_jsonl(rows[4:12], retain)
    write_jsonl([dataclasses.replace(row, image=None) for row in rows[:3]], text)
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"tau": 0.5, "scope": "language", "max_steps": 3}))
    weights = sha(model_dir / "model.safetensors")
    runner = CliRunner()
    base = ["apply", "mmunlearner", str(model_dir), "--forget", str(forget), "--retain", str(retain), "--device", "cpu"]
    out = tmp_path / "mmu.safetensors"
    result = runner.invoke(app, [*base, "--text-retain", str(text), "--config", str(settings), "--set", "tau=2",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "delta:" in result.output and "llm" in result.output
    header = Delta.load(out).header()
    assert header["config"]["tau"] == 2.0 and header["config"]["scope"] == "language"  # --set wins over --config
    assert header["data"]["text_retain"]["rows"] == 3 and header["files"]["text_retain"]["sha256"] == sha(text)
    assert header["files"]["forget"]["sha256"] == sha(forget) and header["seed"] == 0
    assert set(header["counts"]["parts"]) == {"llm"}
    assert sha(model_dir / "model.safetensors") == weights  # MODEL is never modified

    def fails(args, message):
        failed = runner.invoke(app, args)
        assert failed.exit_code == 1 and message in " ".join(failed.output.split()), failed.output

    fails([*base, "--out", str(out)], "already exists; pass --force")
    (tmp_path / "file").write_text("not a folder")
    fails([*base, "--out", str(tmp_path / "file" / "d.safetensors")], "is not a writable folder")
    fails([*base, "--set", "tau", "--out", str(tmp_path / "x")], "--set expects key=value, got 'tau'")
    fails([*base, "--set", "colour=red", "--out", str(tmp_path / "x")],
          "mmunlearner: unknown option 'colour'; options are lr=1e-05")
    settings.write_text("[1, 2]")
    fails([*base, "--config", str(settings), "--out", str(tmp_path / "x")], "must hold a JSON object of options")
    fails(["apply", "ga", str(model_dir), "--forget", str(forget), "--device", "cpu", "--set", "lr=1e30",
           "--set", "batch_size=1", "--out", str(tmp_path / "nan.safetensors")], "the loss is nan at step 2")
    fails(["apply", "graddiff", str(model_dir), "--forget", str(forget), "--out", str(tmp_path / "x")],
          "graddiff: needs a retain set (--retain)")
    # Statistics a plugin does not read are refused, not ignored (and recorded as if they were used).
    fails(["apply", "ga", str(model_dir), "--forget", str(forget), "--stats", f"forget={forget}", "--out",
           str(tmp_path / "x")], "ga: unknown statistics key 'forget'; it reads none")
    fails([*base, "--stats", f"paths={forget}", "--out", str(tmp_path / "x")],
          "mmunlearner: unknown statistics key 'paths'; it reads forget, retain, text")
    assert not (tmp_path / "x").exists() and not (tmp_path / "nan.safetensors").exists()


def test_memo_reuses_statistics_only_when_their_options_match(llava, rows, monkeypatch):
    """apply_plugin(memo=...): a second edit that needs the same statistics reuses them (same delta bytes as
    computing them afresh); a changed option they depend on, other data, another plugin or changed base
    weights compute their own."""
    import mmedit.trace as tracing

    model, processor = llava
    forget, retain = rows[:4], rows[4:8]
    calls = []
    real = tracing.trace
    monkeypatch.setattr(tracing, "trace", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    memo: dict = {}
    first = apply_plugin("manu", model, processor, forget, retain, {"alpha": 2.0}, memo=memo, progress=False)
    assert len(calls) == 2 and first.header()["report"]["statistics"] == {"forget": "computed", "retain": "computed"}
    second = apply_plugin("manu", model, processor, forget, retain, {"alpha": 5.0}, memo=memo, progress=False)
    assert len(calls) == 2 and second.header()["report"]["statistics"] == {"forget": "reused", "retain": "reused"}
    fresh = apply_plugin("manu", model, processor, forget, retain, {"alpha": 5.0}, progress=False)  # traces 2
    assert second.changes.keys() == fresh.changes.keys() and all(
        torch.equal(c.index, fresh.changes[n].index) for n, c in second.changes.items())
    apply_plugin("manu", model, processor, forget, retain, {"alpha": 5.0, "tau": 0.5}, memo=memo, progress=False)
    assert len(calls) == 6  # tau changes the statistics: traced again
    apply_plugin("manu", model, processor, forget[:3], retain, {"alpha": 5.0}, memo=memo, progress=False)
    assert len(calls) == 8  # other data
    with second.applied(model):  # other base weights: nothing reused
        apply_plugin("manu", model, processor, forget, retain, {"alpha": 5.0}, memo=memo, progress=False)
    assert len(calls) == 10
    apply_plugin("manu", model, processor, forget, retain, {"alpha": 5.0}, memo=memo, progress=False)
    assert len(calls) == 10  # the original weights again: reused


def test_memo_is_kept_per_plugin_and_only_with_declared_dependencies(llava, rows, monkeypatch):
    """Two plugins asking for the same key never see each other's result; a result without depends_on
    is never kept."""
    import mmedit.plugins.apply as applying

    class Asks(Plugin):
        Config = BaselineConfig
        needs_retain = False
        stats_keys = ("forget", "other")
        jobs: list = []

        def parts(self, config):
            return ("projector",)

        def edit(self, job, config):
            Asks.jobs.append(job)
            return {"value": job.statistics("forget", lambda: self.name, {"x": 1}),
                    "undeclared": job.statistics("other", lambda: f"{self.name} {len(Asks.jobs)}")}

    plugins = {name: type(name, (Asks,), {"name": name})() for name in ("asks_a", "asks_b")}
    monkeypatch.setattr(applying, "get", lambda name: plugins[name])
    monkeypatch.setattr(applying, "package_of", lambda name: "test")
    model, processor = llava
    memo: dict = {}
    reports = [apply_plugin(name, model, processor, rows[:2], [], memo=memo, progress=False).header()["report"]
               for name in ("asks_a", "asks_b", "asks_a")]
    assert [r["value"] for r in reports] == ["asks_a", "asks_b", "asks_a"]
    assert [r["undeclared"] for r in reports] == ["asks_a 1", "asks_b 2", "asks_a 3"]  # recomputed every time
    assert [job.sources["forget"] for job in Asks.jobs] == ["computed", "computed", "reused"]
    # A key the plugin does not declare in stats_keys is a plugin bug, said at once.
    Asks.stats_keys = ("forget",)
    with pytest.raises(MmeditError, match="statistics 'other': not in the plugin's stats_keys \\['forget'\\]"):
        apply_plugin("asks_a", model, processor, rows[:2], [], progress=False)


def test_mmunlearner_leaves_out_layers_no_gradient_reaches(rows):
    """LLaVA with vision_feature_layer=-2: the last vision layer is off the loss path (ModelMap.expected_dead).
    MMUnlearner masks none of its weights and its delta never touches them (a Fisher of zeros there would
    otherwise count as salient wherever the preserve Fisher is zero too)."""
    model, processor = zoo.build("llava", config={"vision_feature_layer": -2})
    mapping = model_map(model)
    assert mapping.expected_dead == ("vision.1",)
    dead = mapping.site("vision.1").module.rsplit(".mlp", 1)[0]  # the layer, e.g. ...encoder.layers.1
    delta = apply_plugin("mmunlearner", model, processor, rows[:4], rows[4:8], {"max_steps": 2}, progress=False)
    assert delta.changes and not [name for name in delta.changes if name.startswith(dead + ".")]
    assert any(mapping.part_of(name)[0] == "vision" for name in delta.changes)


def test_progress_bars_name_their_phase(llava, rows, monkeypatch):
    """Each bar says what it is doing: MMUnlearner's three Fisher passes and its training are not all "tracing"."""
    import mmedit.plugins.training as training
    import mmedit.trace.tracer as tracer

    labels = []

    def spy(items, description, total=None, enabled=True):
        labels.append(description)
        yield from items

    monkeypatch.setattr(tracer, "track", spy)
    monkeypatch.setattr(training, "track", spy)
    model, processor = llava
    apply_plugin("mmunlearner", model, processor, rows[:4], rows[4:8], {"max_steps": "1"}, progress=True,
                 text_retain_rows=rows[8:10])
    assert labels == ["MMUnlearner: Fisher of the retain rows (multimodal)",  # the preserve sets first
                      "MMUnlearner: Fisher of the text rows (text)",
                      "MMUnlearner: Fisher of the forget rows (multimodal)", "mmunlearner: training"]
