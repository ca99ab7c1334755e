"""MIP-Editor: IG completeness, batched search == per-sample/per-step loop, a planted forget chain is found,
only path rows change (pruned rows the loss cannot reach stay zero), the ablations, and paths files
(save/load, reuse through the API and `mmedit apply --stats paths=FILE`, table and plot)."""
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmedit import zoo
from mmedit.arch import model_map
from mmedit.cli.main import app
from mmedit.data.batches import make_batches
from mmedit.data.rows import Row, write_jsonl
from mmedit.delta import Delta
from mmedit.errors import MmeditError
from mmedit.plugins import apply_plugin
from mmedit.plugins.mip_editor import prune_producers, weight_producers
from mmedit.plugins.mip_editor.__main__ import app as paths_app
from mmedit.plugins.mip_editor.paths import IGNORE, NeuronPaths, answer_loglik, find_paths, layer_attributions
from mmedit.plugins.mip_editor.report import path_table, plot_paths

sys.path.insert(0, str(Path(__file__).parent))
from test_plugins_conformance import make_rows  # noqa: E402


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return make_rows(tmp_path_factory.mktemp("mip-rows"))


@pytest.fixture(scope="module")
def llava():
    return zoo.build("llava")


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.named_parameters()}


# ---- attribution ---------------------------------------------------------------------------------
def test_ig_completeness(llava, rows):
    """Summed IGI attributions of a layer -> F(x) - F(layer's neurons zeroed at the answer positions)."""
    model, processor = llava
    mapping = model_map(model)
    batch = next(make_batches(rows[:3], processor, "text", batch_size=3))
    inputs = {key: value for key, value in batch.inputs.items() if key != "labels"}
    answer = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    answer[:, :-1] = batch.inputs["labels"][:, 1:] != IGNORE
    for name in ("llm.0", "llm.1"):
        module = model.get_submodule(mapping.site(name).module)
        with torch.no_grad():
            full = answer_loglik(model(**inputs).logits, batch.inputs["labels"])
            handle = module.register_forward_pre_hook(lambda m, args: (args[0] * ~answer.unsqueeze(-1),))
            baseline = answer_loglik(model(**inputs).logits, batch.inputs["labels"])
            handle.remove()
        change = full - baseline
        coarse = layer_attributions(model, processor, rows[:3], name, steps=4).sum(dim=1)
        fine = layer_attributions(model, processor, rows[:3], name, steps=64).sum(dim=1)
        assert (fine - change).abs().max() < 0.02 * change.abs().max()
        assert (fine - change).abs().max() < (coarse - change).abs().max()


@pytest.mark.parametrize("family,positions", [("llava", "answer"), ("qwen2_5_vl", "answer"), ("llava", "first")])
def test_batched_equals_loop(family, positions, rows):
    """Samples x steps stacked into passes (two chunks here) give the paths and scores of the plain
    one-sample, one-step, one-layer loop, on both sides (Qwen: flattened vision patches)."""
    model, processor = zoo.build(family)
    batched = find_paths(model, processor, rows[:5], batch_rows=8, positions=positions)
    loop = find_paths(model, processor, rows[:5], loop=True, positions=positions)
    assert list(batched.neurons) == list(loop.neurons)
    assert {name.split(".")[0] for name in batched.neurons} == {"llm", "vision"}
    for name in batched.neurons:
        assert torch.equal(batched.neurons[name], loop.neurons[name]), name
        assert torch.allclose(batched.scores[name], loop.scores[name], rtol=1e-4, atol=1e-6), name
        assert 5 <= batched.neurons[name].numel() <= 25  # top-5 per sample, united over 5 samples


def _plant_chain(model, processor, forget, retain, first: int, second: int) -> None:
    """LLM neuron `first` (layer 0) reads the direction that tells the forget rows' answer positions from
    the retain ones and writes a direction d; neuron `second` (layer 1) reads d and writes v, the one
    unembedding direction the forget answers' tokens are given. z * silu(z) >= 0, so both neurons are
    quiet off their direction. Scales keep the chain out of saturation (IG with m = 4 stays faithful)."""
    layers = model.model.language_model.layers

    def mlp_inputs(group):
        batch = next(make_batches(group, processor, "text", batch_size=len(group)))
        seen = {}
        handle = layers[0].mlp.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
        model(**{key: value for key, value in batch.inputs.items() if key != "labels"})
        handle.remove()
        answer = torch.zeros_like(batch.inputs["attention_mask"], dtype=torch.bool)
        answer[:, :-1] = batch.inputs["labels"][:, 1:] != IGNORE
        return seen["x"][answer]

    with torch.no_grad():
        read = mlp_inputs(forget).mean(0) - mlp_inputs(retain).mean(0)
        read /= read.norm()
        direction = torch.randn(read.numel(), generator=torch.Generator().manual_seed(0))
        direction /= direction.norm()
        tokens = sorted({token for row in forget for token in processor.tokenizer(
            row.answer + processor.tokenizer.eos_token, add_special_tokens=False)["input_ids"]})
        v = model.lm_head.weight[tokens].sum(0)
        v /= v.norm()
        model.lm_head.weight[tokens] = v / len(tokens) ** 0.5
        layers[0].mlp.gate_proj.weight[first] = 0.5 * read
        layers[0].mlp.up_proj.weight[first] = 0.5 * read
        layers[0].mlp.down_proj.weight[:, first] = 0.05 * direction
        layers[1].mlp.gate_proj.weight[second] = 0.5 * direction
        layers[1].mlp.up_proj.weight[second] = 0.5 * direction
        layers[1].mlp.down_proj.weight[:, second] = 0.2 * v


def test_planted_chain_is_found():
    model, processor = zoo.build("llava")

    def people(names, answers, prefix):
        return [Row(id=f"{prefix}{i}", entity=name, image=None, question="What is the job of this person?",
                    text_question=f"What is the job of {name}?", answer=answer, where=f"{prefix}:{i}")
                for i, (name, answer) in enumerate(zip(names, answers))]

    forget = people(["Anna Bell", "Dora Lee", "Ella Mae", "Lena Hart"], ["zzzz"] * 4, "f")
    retain = people(["Ida Moss", "Tom Reed", "Ben Holt", "Ada Wren"], ["glassblower", "pilot", "judge", "baker"], "r")
    _plant_chain(model, processor, forget, retain, first=17, second=101)
    # Every forget sample's top-1 path is the chain.
    found = find_paths(model, processor, forget, parts=("llm",), top_k=1)
    assert found.neurons["llm.0"].tolist() == [17] and found.neurons["llm.1"].tolist() == [101]
    # Its own attribution dwarfs every other neuron's.
    own = layer_attributions(model, processor, forget, "llm.0", steps=4)
    assert bool((own[:, 17] > 50 * torch.cat([own[:, :17], own[:, 18:]], dim=1).abs().max(dim=1).values).all())
    # Forget-only: on the retain rows the first neuron is not on any path.
    assert 17 not in find_paths(model, processor, retain, parts=("llm",), top_k=3).neurons["llm.0"].tolist()


# ---- the edit ---------------------------------------------------------------------------------------
def _changed(model, delta) -> dict[str, torch.Tensor]:
    before = weights(model)
    with delta.applied(model):
        after = weights(model)
    return {name: before[name] != after[name] for name in before if not torch.equal(before[name], after[name])}, after


def _path_rows(mapping, paths) -> dict[str, set]:
    allowed = {}
    for name, neurons in paths.neurons.items():
        for producer in mapping.site(name).producers:
            allowed.setdefault(producer.param, (producer.axis, set()))[1].update(neurons.tolist())
    return allowed


def test_only_path_rows_change(llava, rows):
    model, processor = llava
    mapping = model_map(model)
    paths = find_paths(model, processor, rows[:4], model_map=mapping)
    delta = apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], seed=1, progress=False,
                         stats={"paths": paths})
    changed, after = _changed(model, delta)
    allowed = _path_rows(mapping, paths)
    assert changed and set(changed) <= set(allowed)
    for name, mask in changed.items():
        axis, neurons = allowed[name]
        touched = mask.movedim(axis, 0).reshape(mask.shape[axis], -1).any(dim=1).nonzero().flatten().tolist()
        assert set(touched) <= neurons, name
    # Pruned rows were re-grown by RMisU (up_proj / fc1 rows leave zero); biases never train.
    regrown = [after[p.param][paths.neurons[name]].abs().sum() for name in paths.neurons
               for p in prune_producers(mapping.site(name)) if not p.param.endswith("bias")]
    assert all(total > 0 for total in regrown)
    for name in paths.neurons:
        for producer in prune_producers(mapping.site(name)):
            if producer.param.endswith("bias"):
                assert not after[producer.param][paths.neurons[name]].any()
    report = delta.header()["report"]
    assert report["paths"] == paths.summary() and report["trainable"]["train"] > 0


def test_prune_survives_where_the_loss_cannot_reach(llava, rows):
    """Steering layer 0: the llm.1 path rows stay exactly zero; text-only training leaves vision pruned."""
    model, processor = llava
    mapping = model_map(model)
    paths = find_paths(model, processor, rows[:4], model_map=mapping)
    for options, pruned_sites in (({"layer": 0}, ["llm.1"]), ({"forms": "text"}, ["vision.0", "vision.1"])):
        delta = apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], options, seed=1, progress=False,
                             stats={"paths": paths})
        _, after = _changed(model, delta)
        for name in pruned_sites:
            for producer in prune_producers(mapping.site(name)):
                assert not after[producer.param].index_select(producer.axis, paths.neurons[name]).any(), name
        assert set(pruned_sites) <= set(delta.header()["report"]["pruned_only"])


def test_ablations(llava, rows):
    model, processor = llava
    mapping = model_map(model)
    paths = find_paths(model, processor, rows[:4], model_map=mapping)
    # Prune only: exactly the zeroed last-producer rows (and biases) of the path neurons.
    pruned = apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], {"rmisu": False}, progress=False,
                          stats={"paths": paths})
    changed, after = _changed(model, pruned)
    expected = {p.param for name in paths.neurons for p in prune_producers(mapping.site(name))}
    assert {name for name in expected if not name.endswith("bias")} <= set(changed) <= expected  # zoo biases start at 0
    assert "rmisu" not in pruned.header()["report"] and "steps" not in pruned.header()["report"]
    # RMisU without path restriction (and no prune): whole MLP producer weights move, nothing else.
    free = apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], {"prune": False, "restrict": False},
                        progress=False, stats={"paths": paths})
    changed, _ = _changed(model, free)
    producers = {p.param for site in mapping.sites if site.part in ("vision", "llm") for p in weight_producers(site)}
    assert set(changed) <= producers
    assert sum(int(mask.sum()) for mask in changed.values()) > 4 * paths.count() * 64
    adaptive = apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], {"target": "adaptive", "side": "text"},
                            progress=False, stats={"paths": paths})
    assert {mapping.part_of(name)[0] for name in adaptive.changes} == {"llm"}
    with pytest.raises(MmeditError, match="prune/rmisu"):
        apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], {"prune": False, "rmisu": False})


# ---- paths files -----------------------------------------------------------------------------------
def test_paths_file_roundtrip_and_reuse(llava, rows, tmp_path):
    model, processor = llava
    paths = find_paths(model, processor, rows[:4])
    file = paths.save(tmp_path / "paths.safetensors")
    loaded = NeuronPaths.load(file)
    assert list(loaded.neurons) == list(paths.neurons) and loaded.meta["options"] == paths.meta["options"]
    assert all(torch.equal(loaded.neurons[n], paths.neurons[n]) and torch.equal(loaded.scores[n], paths.scores[n])
               for n in paths.neurons)
    with pytest.raises(MmeditError, match="exists"):
        paths.save(file)
    # Reuse: the same delta as a fresh search, whether given as object or as file.
    fresh = apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], seed=2, progress=False)
    reused = apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], seed=2, progress=False,
                          stats={"paths": file})
    assert fresh.checksum == reused.checksum
    # Paths that do not fit the model are refused.
    wrong = NeuronPaths({"llm.0": torch.tensor([10_000])}, {"llm.0": torch.tensor([1.0], dtype=torch.float64)}, {})
    with pytest.raises(MmeditError, match="out of range"):
        apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], stats={"paths": wrong})
    with pytest.raises(MmeditError, match="qwen2_5_vl"):
        apply_plugin("mip_editor", model, processor, rows[:4], rows[4:],
                     stats={"paths": NeuronPaths(paths.neurons, paths.scores, {"family": "qwen2_5_vl"})})
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(MmeditError, match="not a readable safetensors"):
        NeuronPaths.load(tmp_path / "junk.safetensors")
    # Table and plot.
    table = path_table(paths, top=3)
    assert table.row_count == len(paths.neurons)
    assert plot_paths(paths, tmp_path / "paths.png").stat().st_size > 1000


def test_paths_cli_and_apply_stats(rows, tmp_path):
    model_dir = zoo.tiny("llava", root=tmp_path / "zoo")
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    write_jsonl(rows[:4], forget)
    write_jsonl(rows[4:], retain)
    runner = CliRunner()
    found = runner.invoke(paths_app, ["find", str(model_dir), "--forget", str(forget), "--out",
                                      str(tmp_path / "p.safetensors"), "--plot", str(tmp_path / "p.png"),
                                      "--device", "cpu"])
    assert found.exit_code == 0, found.output
    assert "llm.1" in found.output and (tmp_path / "p.png").is_file()
    shown = runner.invoke(paths_app, ["show", str(tmp_path / "p.safetensors")])
    assert shown.exit_code == 0 and "vision.0" in shown.output
    out = tmp_path / "d.safetensors"
    applied = runner.invoke(app, ["apply", "mip_editor", str(model_dir), "--forget", str(forget),
                                  "--retain", str(retain), "--stats", f"paths={tmp_path / 'p.safetensors'}",
                                  "--device", "cpu", "--out", str(out)])
    assert applied.exit_code == 0, applied.output
    header = Delta.load(out).header()
    assert header["files"]["stats/paths"]["path"] == str(tmp_path / "p.safetensors")
    assert header["report"]["paths"] == NeuronPaths.load(tmp_path / "p.safetensors").summary()
    # a trace file where a paths file belongs: one error line, nothing written
    traced = runner.invoke(app, ["trace", str(model_dir), "--data", str(forget), "--device", "cpu",
                                 "--out", str(tmp_path / "t.safetensors")])
    assert traced.exit_code == 0, traced.output
    wrong = runner.invoke(app, ["apply", "mip_editor", str(model_dir), "--forget", str(forget), "--retain",
                                str(retain), "--stats", f"paths={tmp_path / 't.safetensors'}", "--device", "cpu",
                                "--out", str(tmp_path / "e.safetensors")])
    assert wrong.exit_code == 1 and "expected a paths file" in wrong.output and "got TraceStats" in wrong.output
    assert not (tmp_path / "e.safetensors").exists()
