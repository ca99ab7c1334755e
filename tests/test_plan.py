"""mmedit plan: the breakdown's arithmetic by hand on the tiny LLaVA, what goes where (CPU, GPU, temporary
files), checkpointing=auto, the plugins' phases, every family built on the meta device, the 7B configs
(parameter counts as published, every plugin within 80 GB with its defaults), check_fits' one line, and
the command line (--json through Typer and as a process; bad input one error line)."""
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from mmedit import plan, zoo
from mmedit.arch import model_map
from mmedit.cli.main import app
from mmedit.data.batches import make_batches
from mmedit.data.rows import write_jsonl
from mmedit.errors import MmeditError
from mmedit.plugins import available, get, originals
from mmedit.plugins.mip_editor import search_rows
from mmedit.plugins.mip_editor.search import find_paths
from mmedit.plugins.mmunlearner import maskable

sys.path.insert(0, str(Path(__file__).parent))
from test_plugins_conformance import make_rows  # noqa: E402

CONFIGS = Path(__file__).parent / "configs"
PUBLISHED = {"llava-1.5-7b-hf": 7_063_427_072, "qwen2.5-vl-7b-instruct": 8_292_166_656}  # the models' parameter counts
# 8 rows a set; batches of 30 positions with an image, 20 without; 4 patches per image; 3 answer tokens a row
SHAPES = plan.Shapes({"forget": 8, "retain": 8}, {(w, f): 30 if f == "multimodal" else 20 for w in ("forget", "retain")
                                                  for f in ("multimodal", "text")}, 4, 3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return zoo.tiny("llava", root=tmp_path_factory.getbasetemp() / "zoo")


@pytest.fixture(scope="module")
def real(tiny):
    model, processor = zoo.build("llava")
    return model, processor


def sized(tiny, dtype="float32", device="cpu"):
    return plan.Sized(plan.read_config(str(tiny)), dtype, device)


def hand_activations(batch_rows: int, tokens: int, images: int, llm: str, vision: str, element: int = 4,
                     head: int = 2 * 4 + 8) -> int:
    """The tiny LLaVA (vision 2 layers 32 x 64, projector 32 -> 64, LM 2 layers 64 x 128 gated, vocab 261)
    by hand from plan.ACTIVATION: positions x (a * width + b * MLP width + 4 * (width // 64 + 2)) per layer,
    plus the head's logits x `head` bytes (the logits, the loss's float32 log-softmax, their gradients)."""
    total = 0
    if vision != "none":
        a, b = plan.ACTIVATION["plain", vision, element]
        positions = images * (4 + 1)  # 4 patches + CLIP's class position
        total += 2 * positions * (a * 32 + b * 64 + 4 * 2)  # two vision layers
        a, b = plan.ACTIVATION["plain", "inputs" if vision == "inputs" else "weights", element]
        total += positions * (a * 32 + b * 64 + 4 * 2)  # the projector
    a, b = plan.ACTIVATION["gated", llm, element]
    total += 2 * batch_rows * tokens * (a * 64 + b * 128 + 4 * 3)
    return total + batch_rows * tokens * 261 * head


def test_ga_breakdown_by_hand(tiny, real):
    """Two phases of a step: the forward (weights, AdamW's state, originals, one forget batch's activations:
    GA needs no retain batch) and the update (the gradients instead, and AdamW's two temporaries)."""
    model, _ = real
    numel = {name: p.numel() for name, p in model.named_parameters()}
    everything = sum(numel.values())
    result = plan.plan_plugin("ga", get("ga").footprint, sized(tiny), SHAPES, get("ga").configure())
    assert result.model.params == everything
    forward, update = (result.on(phase, "cpu") for phase in result.phases)
    assert [phase.name for phase in result.phases] == ["training: forward", "training: update"]
    small = sum(4 * n for n in numel.values() if 4 * n < originals.MIN_SPILL)
    shared = {"weights": 4 * everything, "optimizer": 2 * 4 * everything,  # AdamW: two values per element
              "originals": small, "runtime": plan.RUNTIME["cpu"]}
    assert forward == shared | {"activations": hand_activations(4, 30, 4, "weights", "weights")}
    largest = max(numel.values())
    assert update == shared | {"gradients": 4 * everything, "optimizer": 8 * everything + 2 * 4 * largest}
    assert result.per_device["disk"] == 4 * everything - small  # the originals of 1 MiB and more
    assert result.peak is result.phases[0]  # the tiny model's activations outweigh its gradients
    assert result.peak_bytes == sum(forward.values()) == result.per_device["cpu"]
    assert result.breakdown == {term: forward.get(term, 0) for term in plan.TERMS}


class Summed(type(get("graddiff"))):
    """GradDiff with its two terms summed into one tensor: both batches' activations kept at once."""

    loss_terms = False


def test_a_loss_in_terms_keeps_one_batch_and_rmu_trains_llm_mlps_only(tiny, real):
    model, _ = real
    config = get("graddiff").configure()
    graddiff = plan.plan_plugin("graddiff", get("graddiff").footprint, sized(tiny), SHAPES, config)
    assert graddiff.breakdown["activations"] == hand_activations(4, 30, 4, "weights", "weights")
    everything = sum(p.numel() for p in model.parameters())
    assert graddiff.breakdown["gradients"] == 4 * everything  # the forget term's, while the retain batch runs
    summed = plan.plan_plugin("graddiff", Summed().footprint, sized(tiny), SHAPES, config)
    assert summed.breakdown["activations"] == 2 * hand_activations(4, 30, 4, "weights", "weights")
    rmu = get("rmu")
    result = plan.plan_plugin("rmu", rmu.footprint, sized(tiny), SHAPES, rmu.configure())
    mlps = sum(p.numel() for name, p in model.named_parameters() if ".language_model.layers." in name and ".mlp." in name)
    assert result.breakdown["optimizer"] == 2 * 4 * mlps and result.breakdown["gradients"] == 4 * mlps
    # The vision side does not train: no graph there; the retain states at layer l are kept (8 rows, 30
    # positions, width 64: paired with the 2 forget batches of 4 rows).
    assert result.breakdown["activations"] == hand_activations(4, 30, 4, "weights", "none", head=4)  # logits only
    assert result.breakdown["references"] == 8 * 30 * 64 * 4


def test_graph_modes_and_the_rows_whose_references_are_kept(tiny):
    """Downstream of the first part that trains, gradients only pass through ("inputs"); a paired schedule
    keeps θ₀'s quantities for every anchor row and one partner batch per anchor batch."""
    assert plan.graph_modes({"vision"}, "multimodal") == {"vision": "weights", "projector": "inputs", "llm": "inputs"}
    assert plan.graph_modes({"llm"}, "multimodal") == {"vision": "none", "projector": "none", "llm": "weights"}
    assert plan.graph_modes({"vision", "llm"}, "text") == {"vision": "none", "projector": "none", "llm": "weights"}
    mmu = get("mmunlearner")
    vision = plan.plan_plugin("mmunlearner", mmu.footprint, sized(tiny), SHAPES, mmu.configure({"scope": "vision"}))
    assert vision.phases[-2].terms["activations"] == hand_activations(4, 30, 4, "inputs", "weights")
    uneven = plan.Shapes({"forget": 4, "retain": 12}, SHAPES.tokens, 4, 3)
    rmu = get("rmu").configure()
    result = plan.plan_plugin("rmu", get("rmu").footprint, sized(tiny), uneven, rmu)
    assert result.breakdown["references"] == 4 * 30 * 64 * 4  # one forget batch: one retain batch of 4 rows
    cycled = plan.Shapes({"forget": 12, "retain": 2}, SHAPES.tokens, 4, 3)
    result = plan.plan_plugin("rmu", get("rmu").footprint, sized(tiny), cycled, rmu)
    assert result.breakdown["references"] == 2 * 30 * 64 * 4  # three forget batches: the 2 retain rows cycled
    mip = get("mip_editor").configure({"side": "text"})
    anchored = plan.plan_plugin("mip_editor", get("mip_editor").footprint, sized(tiny), uneven, mip)
    assert anchored.phases[-1].terms["references"] == 12 * 30 * 64 * 4  # anchored on retain: every retain row


def test_on_a_gpu_originals_and_references_are_in_cpu_memory(tiny):
    config = get("kl_min").configure()
    on_cpu = plan.plan_plugin("kl_min", get("kl_min").footprint, sized(tiny), SHAPES, config)
    on_gpu = plan.plan_plugin("kl_min", get("kl_min").footprint, sized(tiny, device="cuda"), SHAPES, config)
    gpu, cpu = on_gpu.per_device["cuda"], on_gpu.per_device["cpu"]
    kept = on_cpu.breakdown["originals"] + on_cpu.per_device["disk"]
    logits = 8 * 3 * 261 * 4  # θ₀'s answer logits of the retain rows paired with the forget batches
    assert on_cpu.breakdown["references"] == logits
    assert cpu == kept + logits and on_gpu.per_device["disk"] == 0
    assert gpu == on_cpu.peak_bytes - kept - logits - plan.RUNTIME["cpu"] + plan.RUNTIME["cuda"]
    assert on_gpu.breakdown["originals"] == 0 and on_gpu.breakdown["references"] == 0


def test_checkpointing_auto_turns_on_only_where_the_plan_would_not_fit(tiny):
    ga = get("ga")
    off = plan.plan_plugin("ga", ga.footprint, sized(tiny), SHAPES, ga.configure(), memory=10**12)
    assert off.breakdown["activations"] == hand_activations(4, 30, 4, "weights", "weights")
    assert off.assumed[-1] == "checkpointing=auto: off"
    tight = plan.plan_plugin("ga", ga.footprint, sized(tiny), SHAPES, ga.configure(), memory=off.peak_bytes)
    assert "checkpointing=auto: on" in tight.assumed[-1]
    # Checkpointed: each layer keeps its input (positions x width x 4 B), the largest layer (an LM layer:
    # 120 positions x (40 * 64 + 16 * 128 + 12)) recomputes at a time, the head as before.
    inputs = 2 * 20 * 32 * 4 + 20 * 32 * 4 + 2 * 120 * 64 * 4
    assert tight.breakdown["activations"] == inputs + 120 * (40 * 64 + 16 * 128 + 12) + 120 * 261 * 16
    forced = plan.plan_plugin("ga", ga.footprint, sized(tiny), SHAPES, ga.configure({"checkpointing": "on"}))
    assert forced.breakdown == tight.breakdown


def test_mmunlearner_phases_hold_two_fisher_sets_at_a_time(tiny, real):
    model, _ = real
    names = maskable(SimpleNamespace(model=model, model_map=model_map(model)), ("vision", "projector", "llm"))
    numel = dict((name, p.numel()) for name, p in model.named_parameters())
    scope = sum(numel[name] for name in names)
    language = sum(numel[name] for name in names if ".language_model." in name)
    mmu = get("mmunlearner")
    result = plan.plan_plugin("mmunlearner", mmu.footprint, sized(tiny), SHAPES, mmu.configure())
    assert [phase.name for phase in result.phases] == ["Fisher (retain)", "Fisher (text)", "Fisher (forget)",
                                                       "training: forward", "training: update"]
    statistics = [result.on(phase, "cpu").get("statistics", 0) for phase in result.phases]
    assert statistics == [4 * scope, 4 * (language + scope), 8 * scope, scope, scope]  # float32 sums; bool masks
    training = result.on(result.phases[-2], "cpu")
    assert training["optimizer"] == 2 * 4 * (scope + sum(int(numel[name] * 0.5) for name in names))


def test_every_family_builds_on_the_meta_device(real):
    for family in zoo.FAMILIES:
        model, _ = zoo.build(family)
        model_size = sum(p.numel() for p in model.parameters())
        on_meta = plan.Sized(model.config, "bfloat16", "cuda")
        shapes = plan.shapes_from_config(on_meta, {"forget": 8, "retain": 8})
        assert on_meta.params == model_size, family
        for result in (plan.plan_trace(on_meta, shapes, grads=True),
                       plan.plan_plugin("ga", get("ga").footprint, on_meta, shapes, get("ga").configure())):
            assert result.breakdown["weights"] == 2 * model_size and result.peak_bytes > 2 * model_size, family


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_7b_configs_fit_80_gb_with_every_plugins_defaults(name):
    model = plan.Sized(plan.read_config(str(CONFIGS / name)), "bfloat16", "cuda")
    assert model.params == PUBLISHED[name]
    shapes = plan.shapes_from_config(model, {"forget": 40, "retain": 40})
    for plugin_name in sorted(available()):
        plugin = get(plugin_name)
        result = plan.plan_plugin(plugin_name, plugin.footprint, model, shapes, plugin.configure(), memory=80 * 10**9)
        assert 2 * model.params < result.peak_bytes <= 80 * 10**9, (plugin_name, plan.human(result.peak_bytes))


def test_shapes_from_rows_are_the_batches_longest(real, tmp_path):
    model, processor = real
    rows = make_rows(tmp_path)
    shapes = plan.shapes_from_rows(plan.Sized(model.config), processor, {"forget": rows[:5], "retain": rows[5:]}, 2)
    for which, part in (("forget", rows[:5]), ("retain", rows[5:])):
        for form in ("multimodal", "text"):
            lengths = [b.inputs["input_ids"].shape[1] for b in make_batches(part, processor, form, batch_size=2)]
            assert shapes.tokens[which, form] == max(lengths)
    assert shapes.patches == 4 and shapes.rows == {"forget": 5, "retain": 3} and not shapes.assumed


def test_check_fits_names_predicted_available_and_what_to_change(tiny):
    result = plan.plan_plugin("ga", get("ga").footprint, sized(tiny), SHAPES, get("ga").configure({"checkpointing": "off"}))
    plan.check_fits(result, result.peak_bytes)  # fits exactly: nothing raised
    with pytest.raises(MmeditError) as error:
        plan.check_fits(result, result.peak_bytes - 1)
    line = str(error.value)
    assert "\n" not in line and plan.human(result.peak_bytes) in line and plan.human(result.peak_bytes - 1) in line
    assert "ga needs about" in line and "lower --batch-size or --set checkpointing=on" in line  # activations lead
    with pytest.raises(MmeditError, match="use --dtype bfloat16 or a larger device"):
        plan.check_fits(result, result.breakdown["weights"] // 2)
    assert plan.parse_bytes("80GB") == 80 * 10**9 and plan.parse_bytes("2GiB") == 2 * 2**30
    with pytest.raises(MmeditError, match="cannot read 'lots' as a size"):
        plan.parse_bytes("lots")


def test_preflight_refuses_before_anything_loads(tiny, monkeypatch):
    """What a command calls before it loads weights: the plan on the resolved device against its free memory."""
    ga = get("ga")
    fine = plan.preflight("ga", str(tiny), device="cpu", footprint=ga.footprint, options=ga.configure())
    assert fine.model.device == "cpu" and fine.peak_bytes <= plan.available_bytes("cpu")
    monkeypatch.setattr(plan, "available_bytes", lambda device: 10 << 20)
    with pytest.raises(MmeditError, match=r"^trace needs about .* on cpu .* 10.0 MiB available; "):
        plan.preflight("trace", str(tiny), device="cpu", grads=True)
    with pytest.raises(MmeditError, match="no plan for 'nope': targets are trace, eval, merge and the plugins"):
        plan.plan_for("nope", str(tiny), device="cpu")


def test_mip_editor_search_chunk_from_the_plan_finds_the_loops_paths(real, tmp_path):
    """search_batch=0: the chunk the plan sizes (below the default 64 here) gives the loop's paths."""
    model, processor = real
    rows = make_rows(tmp_path)
    config = get("mip_editor").configure()
    chunk = search_rows(SimpleNamespace(model=model, processor=processor, forget=rows[:5], retain=rows[5:]), config)
    assert config.steps <= chunk < 64
    batched = find_paths(model, processor, rows[:5], batch_rows=chunk)
    loop = find_paths(model, processor, rows[:5], loop=True)
    assert list(batched.neurons) == list(loop.neurons)
    for name in batched.neurons:
        assert torch.equal(batched.neurons[name], loop.neurons[name]), name
        assert torch.allclose(batched.scores[name], loop.scores[name], rtol=1e-4, atol=1e-6), name


# ---- the command line -----------------------------------------------------------------------------------
def invoke(*args):
    return CliRunner().invoke(app, ["plan", *map(str, args)])


def test_json_through_typer_and_as_a_process(tiny, real, tmp_path):
    model, _ = real
    result = invoke("ga", tiny, "--device", "cpu", "--dtype", "float32", "--memory", "1TB", "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert found["params"] == sum(p.numel() for p in model.parameters())
    assert found["peak_bytes"] == sum(found["breakdown"].values()) == found["per_device"]["cpu"]
    assert set(found["breakdown"]) == set(plan.TERMS) and found["peak_phase"] == "training: forward"
    assert found["memory"] == 10**12 and found["fits"] is True
    done = subprocess.run([sys.executable, "-m", "mmedit.cli.main", "plan", "ga", str(tiny), "--device", "cpu",
                           "--dtype", "float32", "--memory", "1TB", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == found


def test_data_gives_the_lengths_and_the_table_shows_the_peak(tiny, tmp_path):
    rows = make_rows(tmp_path)
    write_jsonl(rows[:4], tmp_path / "forget.jsonl")
    write_jsonl(rows[4:], tmp_path / "retain.jsonl")
    measured = json.loads(invoke("trace", tiny, "--forget", tmp_path / "forget.jsonl", "--retain",
                                 tmp_path / "retain.jsonl", "--device", "cpu", "--grads", "--json").output)
    assumed = json.loads(invoke("trace", tiny, "--device", "cpu", "--grads", "--json").output)
    assert measured["assumed"] == [] and "48 text tokens" in assumed["assumed"][0]
    assert measured["breakdown"]["activations"] != assumed["breakdown"]["activations"]
    table = invoke("mip_editor", tiny, "--device", "cuda", "--memory", "80GB", "--set", "side=text")
    assert table.exit_code == 0 and "(peak)" in table.output and "fits in 74.5 GiB on cuda" in table.output


@pytest.mark.parametrize("args, message", [
    (["nope"], "unknown plugin 'nope'"),
    (["ga", "--set", "nope=1"], "ga: unknown option 'nope'"),
    (["ga", "--set", "lr=fast"], "ga: bad value for option lr"),
    (["trace", "--set", "lr=1"], "--set is for plugin options; trace has none"),
    (["ga", "--dtype", "int8"], "unknown dtype 'int8'"),
    (["ga", "--memory", "lots"], "cannot read 'lots' as a size"),
])
def test_bad_input_is_one_error_line(tiny, args, message):
    result = invoke(args[0], tiny, *args[1:])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output


def test_the_longest_rows_give_every_rows_shapes(real, tmp_path, monkeypatch):
    """The plan encodes only each set's longest rows (plan.longest): the shapes equal those of all rows."""
    import dataclasses

    model, processor = real
    base = make_rows(tmp_path)
    rows = [dataclasses.replace(row, id=f"{row.id}-{k}", question=row.question + " Tell me." * (k % 7),
                                text_question=row.text_question + " Now." * (k % 5), answer=row.answer + " x" * (k % 3))
            for k in range(5) for row in base]
    assert len(plan.longest(rows, "multimodal", 1)) < len(rows)  # only some are encoded
    some = plan.shapes_from_rows(plan.Sized(model.config), processor, {"forget": rows}, 1)
    monkeypatch.setattr(plan, "CANDIDATES", len(rows))
    every = plan.shapes_from_rows(plan.Sized(model.config), processor, {"forget": rows}, 1)
    assert some == every and some.rows == {"forget": 40}


def _data_folder(folder: Path) -> Path:
    folder.mkdir()
    rows = make_rows(folder)
    for name, part in (("forget10", rows[:4]), ("test10", rows[:4]), ("retain90", rows[4:])):
        write_jsonl(part, folder / f"{name}.jsonl")
    return folder


COMMANDS = {  # command -> its arguments after MODEL (data under {d}, outputs under {o})
    "apply": ["apply", "ga", "{m}", "--forget", "{d}/forget10.jsonl", "--retain", "{d}/retain90.jsonl", "--set",
              "max_steps=1", "--out", "{o}/ga.safetensors"],
    "trace": ["trace", "{m}", "--data", "{d}/forget10.jsonl", "--grads", "--out", "{o}/t.safetensors"],
    "eval": ["eval", "{m}", "--data", "{d}", "--out", "{o}/e.json"],
    "merge": ["merge", "{m}", "{o}/ga.safetensors", "--out", "{o}/merged"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_run_the_plan_says_cannot_fit_stops_before_weights_load(command, tiny, tmp_path, monkeypatch):
    """trace, apply, eval and merge plan first: one line with the predicted and available bytes and the
    advice, no weights read, nothing written; --ignore-plan runs it anyway."""
    data, outputs = _data_folder(tmp_path / "data"), tmp_path / "out"
    outputs.mkdir()
    args = [word.format(m=tiny, d=data, o=outputs) for word in COMMANDS[command]] + ["--device", "cpu"]
    monkeypatch.setattr(plan, "available_bytes", lambda device: 1 << 20)
    import mmedit.checkpoint
    import mmedit.loading

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(mmedit.loading, "load", no_weights)
    monkeypatch.setattr(mmedit.checkpoint, "merge", no_weights)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, (result.output, result.exception)
    line = result.output.strip()
    assert "\n" not in line and line.startswith(f"error: {'ga' if command == 'apply' else command} needs about ")
    assert "on cpu" in line and "1.0 MiB available; " in line
    assert not any(outputs.iterdir())
    if command == "apply":  # the plan skipped: the edit runs under the same (patched) 1 MiB
        monkeypatch.undo()
        monkeypatch.setattr(plan, "available_bytes", lambda device: 1 << 20)
        result = CliRunner().invoke(app, [*args, "--ignore-plan"])
        assert result.exit_code == 0, result.output
        assert (outputs / "ga.safetensors").is_file()
