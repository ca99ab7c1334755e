"""Conformance suite, run for every registered plugin on tiny models of several families (PEFT-style):
the delta touches only the declared parts, apply -> revert is bit-exact, the same seed gives the same
delta bytes, the provenance is complete, bad options are rejected, the model passed in is unchanged, and a
gradient method moves every objective it declares (plugin.objectives) the declared way by its margin.

A plugin installed in the environment is picked up by `available()` and gets these tests for free; the
third-party example from docs/writing-a-plugin.md is installed from a temp dir and put through the same
checks and through `mmedit apply`.
"""
import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mmedit import zoo
from mmedit.arch import model_map
from mmedit.cli.main import app
from mmedit.data.rows import Row, write_jsonl
from mmedit.delta import Delta
from mmedit.errors import MmeditError
from mmedit.loading import load
from mmedit.plugins import TrainingPlugin, apply_plugin, available, get
from mmedit.plugins.objectives import measure

FAMILIES = [family for family in ("llava", "qwen2_5_vl", "idefics3") if family in zoo.FAMILIES]
DOC = Path(__file__).parent.parent / "docs" / "writing-a-plugin.md"
JOBS = ["glassblower", "pilot", "judge", "baker", "cartographer", "beekeeper", "luthier", "ferry captain"]  # forget != retain


def make_rows(folder: Path, count: int = 8) -> list[Row]:
    rows = []
    for i in range(count):
        image = Image.new("RGB", (32, 32), (30 * i, 160 - 15 * i, 90))
        image.paste((255, 255, 255), (4 + i, 4, 14 + i, 16))
        image.save(folder / f"p{i}.png")
        rows.append(Row(id=f"p{i}", entity=f"Person {i}", image=folder / f"p{i}.png",
                        question="What is the job of this person?", text_question=f"What is the job of Person {i}?",
                        answer=JOBS[i % len(JOBS)], where=f"rows.jsonl:{i + 1}"))
    return rows


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return make_rows(tmp_path_factory.mktemp("plugin-rows"))


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, tmp_path_factory):
    return load(zoo.tiny(request.param, root=tmp_path_factory.getbasetemp() / "zoo"), device="cpu")


def state(model) -> dict:
    return {
        "tensors": {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().view(torch.uint8)


def unchanged(model, before: dict) -> bool:
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    same_bits = all(tensors[n].dtype == t.dtype and torch.equal(bits(tensors[n]), bits(t))
                    for n, t in before["tensors"].items())
    return (same_bits and before["training"] == [m.training for m in model.modules()]
            and before["requires_grad"] == [p.requires_grad for p in model.parameters()]
            and all(p.grad is None for p in model.parameters()))


def conforms(name: str, model, processor, rows, folder: Path) -> Delta:
    forget, retain = rows[:4], rows[4:]
    plugin = get(name)
    config = plugin.configure()
    before = state(model)

    delta = apply_plugin(name, model, processor, forget, retain, seed=3, progress=False)
    assert unchanged(model, before), "the model passed in was changed"

    # Confined to the declared parts, and not empty.
    parts = set(plugin.parts(config))
    mapping = model_map(model)
    assert delta.changes
    for key in delta.changes:
        assert (mapping.part_of(key) or (None,))[0] in parts, f"{key} is outside the declared parts {parts}"

    # Provenance.
    header = delta.header()
    assert header["plugin"]["name"] == name and header["plugin"]["version"] == plugin.version
    assert header["plugin"]["package"]
    assert header["config"] == dataclasses.asdict(config)
    assert header["seed"] == 3
    for role, count in (("forget", 4), ("retain", 4), ("text_retain", 8)):
        assert header["data"][role]["rows"] == count and re.fullmatch("[0-9a-f]{64}", header["data"][role]["sha256"])
    assert header["base_model"]["model_type"] == model.config.model_type
    assert {"torch", "transformers", "nnsight", "mmedit"} <= set(header["libraries"])
    assert header["mmedit_version"] and isinstance(header["report"], dict)

    # Save -> load -> apply changes the model -> revert restores it bit for bit.
    first = delta.save(folder / f"{name}-a.safetensors")
    loaded_delta = Delta.load(first)
    loaded_delta.apply(model)
    assert not unchanged(model, before)
    loaded_delta.revert(model)
    assert unchanged(model, before)

    # Same seed, same bytes.
    again = apply_plugin(name, model, processor, forget, retain, seed=3, progress=False)
    assert first.read_bytes() == again.save(folder / f"{name}-b.safetensors").read_bytes()

    # Bad options: one error listing every valid option; the model still untouched.
    options = [f.name for f in plugin.options()]
    with pytest.raises(MmeditError) as unknown:
        apply_plugin(name, model, processor, forget, retain, {"no_such_option": 1}, progress=False)
    assert "no_such_option" in str(unknown.value) and all(option in str(unknown.value) for option in options)
    with pytest.raises(MmeditError, match=f"bad value for option {options[0]}"):
        apply_plugin(name, model, processor, forget, retain, {options[0]: [1, 2]}, progress=False)
    assert unchanged(model, before)
    moves_declared_objectives(name, model, processor, rows)
    assert unchanged(model, before)
    return delta


def moves_declared_objectives(name: str, model, processor, rows) -> None:
    """A few steps with the plugin's "conformance" preset move each declared objective the declared way by
    its margin: measured on the base model, then with the delta applied (θ₀ = the base weights)."""
    plugin = get(name)
    overrides = dict(plugin.presets.get("conformance", {}))
    config = plugin.configure(overrides)
    objectives = plugin.objectives(config)
    assert objectives or not isinstance(plugin, TrainingPlugin), \
        f"{name}: a gradient method must declare the objectives it moves (objectives())"
    if not objectives:
        return
    forget, retain = rows[:4], rows[4:]
    mapping, parts = model_map(model), set(plugin.parts(config))
    original = {n: p.detach().clone() for n, p in model.named_parameters() if (mapping.part_of(n) or (None,))[0] in parts}
    before = measure(objectives, model, processor, forget, retain, config, original, seed=3)
    delta = apply_plugin(name, model, processor, forget, retain, overrides, seed=3, progress=False)
    with delta.applied(model):
        after = measure(objectives, model, processor, forget, retain, config, original, seed=3)
    wrong = [f"{o.name} {o.direction} by {o.margin}: {before[o.name]:.6g} -> {after[o.name]:.6g}"
             for o in objectives if not o.holds(before[o.name], after[o.name])]
    assert not wrong, f"{name} with {overrides} did not move what it declares: " + "; ".join(wrong)


@pytest.mark.parametrize("name", sorted(available()))
def test_plugin_conforms(name, loaded, rows, tmp_path):
    model, processor = loaded
    conforms(name, model, processor, rows, tmp_path)


# ---- a third-party plugin, installed from a temp dir -------------------------------------------------
def doc_block(language: str, first_line: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    return next(block for block in blocks if block.startswith(first_line))


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """The docs' example package, installed the way pip lays it out: the module plus a dist-info whose
    entry_points.txt comes from the example's pyproject.toml."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "mmedit_refuse.py").write_text(doc_block("python", "# mmedit_refuse.py"), encoding="utf-8")
    project = tomllib.loads(doc_block("toml", "# pyproject.toml"))["project"]
    info = site / f"mmedit_refuse-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    lines = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items())
             for group, entries in project["entry-points"].items()]
    (info / "entry_points.txt").write_text("\n".join(lines))
    monkeypatch.syspath_prepend(str(site))
    return site


def test_third_party_plugin(third_party, rows, tmp_path):
    assert "refuse" in available()
    model_dir = zoo.tiny("llava", root=tmp_path / "zoo")
    model, processor = load(model_dir, device="cpu")
    delta = conforms("refuse", model, processor, rows, tmp_path)
    assert delta.header()["plugin"]["package"] == "mmedit-refuse==0.1.0"

    runner = CliRunner()
    listed = runner.invoke(app, ["plugins"])
    assert listed.exit_code == 0 and all(name in listed.output for name in [*available(), "refuse"])
    shown = runner.invoke(app, ["plugins", "refuse"], env={"COLUMNS": "200"})  # each help on one line
    assert shown.exit_code == 0 and "refusal" in shown.output and "learns for forget" in shown.output

    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    write_jsonl(rows[:4], forget)
    write_jsonl(rows[4:], retain)
    out = tmp_path / "refuse.safetensors"
    args = ["apply", "refuse", str(model_dir), "--forget", str(forget), "--retain", str(retain),
            "--set", "refusal=I cannot say.", "--set", "max_steps=1", "--device", "cpu", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    header = Delta.load(out).header()
    assert header["config"]["refusal"] == "I cannot say." and header["config"]["max_steps"] == 1
    assert header["files"]["forget"]["path"] == str(forget) and header["model_arg"] == str(model_dir)
    assert header["report"]["steps"] == 1

    # One real process: the console entry point finds the package through PYTHONPATH alone.
    process_out = tmp_path / "process.safetensors"
    paths = [str(third_party), *filter(None, [os.environ.get("PYTHONPATH")])]  # keep the caller's own entries
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1")
    process = subprocess.run([sys.executable, "-m", "mmedit.cli.main", *args[:-1], str(process_out)],
                             capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert process_out.read_bytes() == out.read_bytes()
