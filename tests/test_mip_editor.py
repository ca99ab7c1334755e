"""MIP-Editor: the attributions (IG completeness, IFI by hand, the sign that lowers the answer NLL, ties and
dead sites never chosen), batched search == per-sample/per-step loop, the union of samples, a planted
forget chain is found; the edit's design choices (prune zeroes the last producer's rows and bias, RMisU
trains only the path neurons' weight rows from theta0's point of view, unreachable rows stay zero,
restrict=false, the schedule), the ablations, and paths files (save/load, reuse through the API and
`mmedit apply --stats paths=FILE`, table and plot)."""
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmedit import zoo
from mmedit.arch import model_map
from mmedit.cli.main import app
from mmedit.data.batches import IGNORE, make_batches
from mmedit.data.rows import Row, write_jsonl
from mmedit.delta import Delta
from mmedit.errors import MmeditError
from mmedit.plugins import apply_plugin
from mmedit.cli.paths import paths_app
from mmedit.plugins.mip_editor.paths import NeuronPaths
from mmedit.plugins.mip_editor.search import find_paths, layer_attributions, top_neurons
from mmedit.plugins.mip_editor.report import path_table, plot_paths

sys.path.insert(0, str(Path(__file__).parent))
from test_plugins_conformance import make_rows  # noqa: E402


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return make_rows(tmp_path_factory.mktemp("mip-rows"))


@pytest.fixture(scope="module")
def llava():
    return zoo.build("llava")


@pytest.fixture(scope="module")
def biased():
    """Tiny LLaVA whose MLP biases are nonzero (the zoo's start at 0, which would hide a bias edit)."""
    model, processor = zoo.build("llava")
    randomise_biases(model)
    return model, processor


def randomise_biases(model) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("bias") and ".mlp." in name:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.named_parameters()}


def answer_mask(batch) -> torch.Tensor:
    """[rows, positions]: the positions whose next token is an answer token."""
    answer = torch.zeros_like(batch.inputs["attention_mask"], dtype=torch.bool)
    answer[:, :-1] = batch.inputs["labels"][:, 1:] != IGNORE
    return answer


def without_labels(batch) -> dict:
    return {key: value for key, value in batch.inputs.items() if key != "labels"}


def loglik(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[rows]: each row's summed answer-token log-probability (the search's objective, written out here)."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != IGNORE)).sum(dim=1)


# ---- attribution ---------------------------------------------------------------------------------
def test_ig_completeness(llava, rows):
    """Summed IGI attributions of a layer -> F(x) - F(layer's neurons zeroed at the answer positions)."""
    model, processor = llava
    mapping = model_map(model)
    batch = next(make_batches(rows[:3], processor, "text", batch_size=3))
    inputs, answer = without_labels(batch), answer_mask(batch)
    for name in ("llm.0", "llm.1"):
        module = model.get_submodule(mapping.site(name).module)
        with torch.no_grad():
            full = loglik(model(**inputs).logits, batch.inputs["labels"])
            handle = module.register_forward_pre_hook(lambda m, args: (args[0] * ~answer.unsqueeze(-1),))
            baseline = loglik(model(**inputs).logits, batch.inputs["labels"])
            handle.remove()
        change = full - baseline
        coarse = layer_attributions(model, processor, rows[:3], name, steps=4).sum(dim=1)
        fine = layer_attributions(model, processor, rows[:3], name, steps=64).sum(dim=1)
        assert (fine - change).abs().max() < 0.02 * change.abs().max()
        assert (fine - change).abs().max() < (coarse - change).abs().max()


def test_ifi_by_hand(llava, rows):
    """IFI of one vision layer = sum over patches of a * mean_k z_k^2, z the gradient at alpha_k = k/m
    standardised over the layer's neurons, computed here with plain hooks, one step at a time. Its ranking
    is not the activations' (the reference's z over the m steps makes sum_k z_k^2 = m-1 for every neuron,
    which leaves exactly the activation ranking)."""
    model, processor = llava
    mapping = model_map(model)
    module = model.get_submodule(mapping.site("vision.0").module)
    got = layer_attributions(model, processor, rows[:2], "vision.0", steps=4)
    model.eval()
    for sample in range(2):
        batch = next(make_batches(rows[sample:sample + 1], processor, "multimodal", batch_size=1))
        seen = {}
        handle = module.register_forward_pre_hook(lambda m, args: seen.update(a=args[0].detach()))
        with torch.no_grad():
            model(**without_labels(batch))
        handle.remove()
        total = torch.zeros(seen["a"].shape[-1])
        for k in range(4):
            leaf = (k / 4 * seen["a"]).requires_grad_()
            handle = module.register_forward_pre_hook(lambda m, args: (leaf,))
            objective = loglik(model(**without_labels(batch)).logits, batch.inputs["labels"]).sum()
            handle.remove()
            (grad,) = torch.autograd.grad(objective, leaf)
            z = (grad - grad.mean(-1, keepdim=True)) / grad.std(-1, keepdim=True)
            total += (seen["a"] * z ** 2).reshape(-1, total.numel()).sum(0) / 4
        assert torch.allclose(got[sample], total, rtol=1e-4, atol=1e-5)
        activations = seen["a"].reshape(-1, total.numel()).sum(0)
        assert set(total.topk(5).indices.tolist()) != set(activations.topk(5).indices.tolist())


def test_chosen_neurons_lower_the_answer_nll(llava, rows):
    """IGI keeps the top-k by the signed score that raises the answer log-likelihood: zeroing a sample's
    chosen neurons (at its answer positions) lowers its log-likelihood by about their summed score. (The
    reference backpropagates the HF loss and keeps the top-k largest: the neurons that raise the NLL.)"""
    model, processor = llava
    mapping = model_map(model)
    module = model.get_submodule(mapping.site("llm.0").module)
    for row in rows[:3]:
        paths = find_paths(model, processor, [row], parts=("llm",), sites=["llm.0"], top_k=5)
        chosen, score = paths.neurons["llm.0"], paths.scores["llm.0"]
        batch = next(make_batches([row], processor, "text", batch_size=1))
        silence = torch.ones(mapping.site("llm.0").width)
        silence[chosen] = 0
        keep = torch.where(answer_mask(batch).unsqueeze(-1), silence, torch.ones_like(silence))
        with torch.no_grad():
            full = loglik(model(**without_labels(batch)).logits, batch.inputs["labels"])
            handle = module.register_forward_pre_hook(lambda m, args: (args[0] * keep,))
            ablated = loglik(model(**without_labels(batch)).logits, batch.inputs["labels"])
            handle.remove()
        assert chosen.numel() == 5 and bool((score > 0).all())
        drop = float(full - ablated)
        assert drop > 0 and abs(drop - float(score.sum())) < 0.25 * drop


def test_top_neurons_skips_ties():
    """A sample whose attributions are all equal (all 0, or all one value) chooses nothing; a neuron with
    attribution 0 is never chosen, even where it would outrank the others; the rest is plain top-k."""
    own = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                        [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],
                        [0.0, 0.0, 0.0, -1.0, 2.0, 0.0],
                        [0.5, -0.2, 0.9, 0.1, 0.4, -0.7]], dtype=torch.float32)
    path_term = torch.tensor([[1.0], [2.0], [0.5], [-3.0]])
    chosen = top_neurons(own + path_term, own, k=3)
    assert chosen.tolist() == [[False] * 6, [False] * 6,
                               [False, False, False, True, True, False],
                               [True, False, True, False, True, False]]


def test_first_positions_skip_dead_sites(llava, rows):
    """At sequence position 0 the last LLM layer and LLaVA's last vision layer get exactly zero gradients:
    dead sites, reported and never given a path (a stable top-k would pick neurons 0..4 there); the
    edit leaves them alone. A search with nothing but dead sites is one clear error."""
    model, processor = llava
    paths = find_paths(model, processor, rows[:4], positions="first")
    assert set(paths.neurons) == {"vision.0", "llm.0"} and paths.meta["dead_sites"] == ["vision.1", "llm.1"]
    table = path_table(paths)
    assert list(table.columns[0].cells)[-2:] == ["vision.1", "llm.1"]
    assert all("dead site" in cell for cell in list(table.columns[-1].cells)[-2:])
    delta = apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], {"positions": "first", "rmisu": False},
                         progress=False)
    assert delta.header()["report"]["paths"] == paths.summary()
    assert delta.header()["report"]["dead_sites"] == ["vision.1", "llm.1"]
    assert not any(".layers.1.mlp" in name for name in delta.changes), sorted(delta.changes)
    with pytest.raises(MmeditError, match="no site has a usable attribution at the 'first' positions.*llm.1"):
        find_paths(model, processor, rows[:4], parts=("llm",), sites=["llm.1"], positions="first")


def test_zero_attributions_never_chosen(rows):
    """Planted: every llm.0 neuron but two silenced (their up rows zeroed: activation and attribution 0),
    and all of vision.0. With top-k 5 llm.0 gives at most the two live neurons, vision.0 is a dead site,
    and the layers above still get paths."""
    model, processor = zoo.build("llava")
    with torch.no_grad():
        model.model.language_model.layers[0].mlp.up_proj.weight[2:] = 0
        model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.zero_()
        model.model.vision_tower.encoder.layers[0].mlp.fc1.bias.zero_()
    paths = find_paths(model, processor, rows[:4], top_k=5)
    assert set(paths.neurons["llm.0"].tolist()) <= {0, 1}
    assert paths.meta["dead_sites"] == ["vision.0"] and {"vision.1", "llm.1"} <= set(paths.neurons)
    assert all(paths.neurons[name].numel() >= 5 for name in ("vision.1", "llm.1"))


def test_search_restores_model_state(llava, rows):
    """The search runs in eval mode with no parameter requiring grad, and puts modes and flags back, on
    success and on error alike."""
    model, processor = llava

    def flags():
        return [module.training for module in model.modules()], [p.requires_grad for p in model.parameters()]

    original = flags()
    model.train()
    model.model.vision_tower.requires_grad_(False)
    before = flags()
    try:
        find_paths(model, processor, rows[:2], parts=("llm",))
        assert flags() == before
        with pytest.raises(MmeditError, match="no site has a usable attribution"):
            find_paths(model, processor, rows[:2], parts=("llm",), sites=["llm.1"], positions="first")
        assert flags() == before
    finally:
        for module, mode in zip(model.modules(), original[0]):
            module.training = mode
        for parameter, flag in zip(model.parameters(), original[1]):
            parameter.requires_grad_(flag)


def test_union_sums_sample_scores(llava, rows):
    """Per layer the paths of the samples are united: each sample keeps exactly top-k neurons, and a
    neuron's score is the sum of its scores over the samples that chose it."""
    model, processor = llava
    united = find_paths(model, processor, rows[:4])
    alone = [find_paths(model, processor, [row]) for row in rows[:4]]
    shared = 0
    for name in united.neurons:
        expected: dict[int, float] = {}
        for paths in alone:
            assert paths.neurons[name].numel() == 5
            for neuron, score in zip(paths.neurons[name].tolist(), paths.scores[name].tolist()):
                expected[neuron] = expected.get(neuron, 0.0) + score
        shared += 4 * 5 - len(expected)
        assert set(united.neurons[name].tolist()) == set(expected), name
        got = dict(zip(united.neurons[name].tolist(), united.scores[name].tolist()))
        assert all(abs(got[n] - expected[n]) <= 1e-4 * abs(expected[n]) + 1e-6 for n in expected), name
    assert shared > 0  # some neuron is on several samples' paths: a max or a mean would fail


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
# What the edit may touch, per family and part, named here rather than read from the plugin's
# prune_producers / weight_producers, so that a changed choice there fails these tests.
PRUNED = {"llava": {"llm": ("up_proj.weight",), "vision": ("fc1.weight", "fc1.bias")},
          "qwen2_5_vl": {"llm": ("up_proj.weight",), "vision": ("up_proj.weight", "up_proj.bias")}}
TRAINED = {"llm": ("gate_proj.weight", "up_proj.weight"), "vision": ("fc1.weight",)}  # llava


def mlp_params(mapping, sites, leaves: dict) -> set[str]:
    """The parameters `leaves[part]` (e.g. "up_proj.weight") of the MLPs of `sites` (site names)."""
    return {mapping.site(name).module.rsplit(".", 1)[0] + "." + leaf
            for name in sites for leaf in leaves[name.split(".")[0]]}


def edited(model, delta) -> tuple[dict, dict]:
    """(weights before, weights with the delta applied)."""
    before = weights(model)
    with delta.applied(model):
        return before, weights(model)


def changed_rows(before: dict, after: dict) -> dict[str, set[int]]:
    """Per changed parameter: the rows (dim 0) where some element differs."""
    return {name: set((before[name] != after[name]).reshape(before[name].shape[0], -1).any(dim=1)
                      .nonzero().flatten().tolist())
            for name in before if not torch.equal(before[name], after[name])}


def site_rows(mapping, paths, leaves: dict) -> dict[str, set[int]]:
    """Parameter -> the path neurons of its site (the rows an edit of `leaves` may touch)."""
    return {param: set(paths.neurons[name].tolist()) for name in paths.neurons
            for param in mlp_params(mapping, [name], leaves)}


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_prune_zeroes_the_last_producer(family, rows):
    """Pruning zeroes, per path neuron, the rows of its MLP's last weight producer and that producer's bias:
    up_proj of a gated MLP (silu(gate x) * 0 = 0, whatever the gate), fc1 of CLIP's (gelu(0) = 0); never
    gate_proj, whose zeroing would silence the neuron too (Qwen's vision gate has a bias: both would pass
    the silence check). Nothing else changes."""
    model, processor = zoo.build(family)
    randomise_biases(model)
    mapping = model_map(model)
    paths = find_paths(model, processor, rows[:4], model_map=mapping)
    delta = apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], {"rmisu": False}, progress=False,
                         stats={"paths": paths})
    before, after = edited(model, delta)
    expected = site_rows(mapping, paths, PRUNED[family])
    assert changed_rows(before, after) == expected
    for param, neurons in expected.items():
        assert not after[param][sorted(neurons)].any(), param
    report = delta.header()["report"]
    assert report["pruned_elements"] == sum(after[param][sorted(neurons)].numel() for param, neurons in expected.items())
    assert "steps" not in report and "pruned_only" not in report


def test_a_prune_that_does_not_silence_is_refused(biased, rows, monkeypatch):
    """After pruning the path neurons are read on a forget batch: a prune that left fc1's bias (the neuron
    then reads gelu(bias) != 0 at every position) stops the edit with one error."""
    import mmedit.plugins.mip_editor as mip

    model, processor = biased
    monkeypatch.setattr(mip, "prune_producers", lambda site: mip.weight_producers(site)[-1:])
    with pytest.raises(MmeditError, match=r"zeroing \S+fc1.weight does not silence the path neurons of vision"):
        apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], {"rmisu": False}, progress=False)


def test_rmisu_trains_the_path_weight_rows_only(biased, rows):
    """prune=false: RMisU changes exactly the path neurons' rows of every weight producer (gate_proj and
    up_proj; fc1) and nothing else: biases (nonzero here), other rows, other parameters bit-identical.
    It trains from the original rows: no element moves further than Adam's steps can take it."""
    model, processor = biased
    mapping = model_map(model)
    paths = find_paths(model, processor, rows[:4], model_map=mapping)
    delta = apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], {"prune": False}, seed=1,
                         progress=False, stats={"paths": paths})
    before, after = edited(model, delta)
    changed = changed_rows(before, after)
    assert changed == site_rows(mapping, paths, TRAINED)
    report = delta.header()["report"]
    reach = 3 * 5e-4 * report["steps"]  # lr 5e-4; an AdamW step moves an element by at most ~lr
    assert max(float((after[name] - before[name]).abs().max()) for name in changed) <= reach
    assert "pruned_elements" not in report and report["pruned_only"] == []


def test_only_path_rows_change(biased, rows):
    """Prune + RMisU (the defaults): the path neurons' gate_proj and up_proj (fc1) rows change, the zeroed
    up_proj / fc1 rows grow back from zero (one producer zeroed, so the neuron still has a gradient), fc1's
    bias stays at its pruned 0 (biases do not train); nothing else changes. Layer 7 clamps to the last.
    (Two steps: with up at 0 the gate rows get their first gradient on the second.)"""
    model, processor = biased
    mapping = model_map(model)
    paths = find_paths(model, processor, rows[:4], model_map=mapping)
    delta = apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], {"batch_size": 2}, seed=1,
                         progress=False, stats={"paths": paths})
    before, after = edited(model, delta)
    assert changed_rows(before, after) == site_rows(mapping, paths, TRAINED) | site_rows(
        mapping, paths, {"llm": (), "vision": ("fc1.bias",)})
    for name, neurons in paths.neurons.items():
        for param in mlp_params(mapping, [name], {"llm": ("up_proj.weight",), "vision": ("fc1.weight",)}):
            assert bool(after[param][neurons].abs().sum(dim=1).gt(0).all()), param
        for param in mlp_params(mapping, [name], {"llm": (), "vision": ("fc1.bias",)}):
            assert not after[param][neurons].any(), param
    report = delta.header()["report"]
    assert report["layer"] == 1 and report["paths"] == paths.summary() and report["pruned_only"] == []
    assert report["trainable"]["train"] == sum(before[param][sorted(rows_)].numel()
                                               for param, rows_ in site_rows(mapping, paths, TRAINED).items())


def test_prune_survives_where_the_loss_cannot_reach(biased, rows):
    """Rows the RMisU loss cannot reach stay exactly as pruned: steering layer 0, llm.1's path up_proj rows
    stay zero and its gate_proj is untouched; text-only training leaves vision's fc1 rows and biases zero.
    The report lists them as pruned only; the reachable rows did train."""
    model, processor = biased
    mapping = model_map(model)
    paths = find_paths(model, processor, rows[:4], model_map=mapping)
    for options, unreached, trained in (({"layer": 0}, ["llm.1"], "llm.0"),
                                        ({"forms": "text"}, ["vision.0", "vision.1"], "llm.1")):
        delta = apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], {**options, "batch_size": 2},
                             seed=1, progress=False, stats={"paths": paths})
        before, after = edited(model, delta)
        changed = changed_rows(before, after)
        pruned = site_rows(mapping, paths, PRUNED["llava"])
        for name in unreached:
            for param in mlp_params(mapping, [name], TRAINED) | mlp_params(mapping, [name], PRUNED["llava"]):
                assert changed.get(param, set()) == pruned.get(param, set()), param
                if param in pruned:
                    assert not after[param][paths.neurons[name]].any(), param
        assert mlp_params(mapping, [trained], TRAINED) <= set(changed)
        assert delta.header()["report"]["pruned_only"] == unreached


def test_restrict_false_trains_every_producer_row(llava, rows):
    """restrict=false (no prune): every row of every MLP weight producer of the searched parts, LLM layers
    up to l, trains; biases, the projector and everything else stay."""
    model, processor = llava
    mapping = model_map(model)
    paths = find_paths(model, processor, rows[:4], model_map=mapping)
    for layer, sites in ((7, ["vision.0", "vision.1", "llm.0", "llm.1"]), (0, ["vision.0", "vision.1", "llm.0"])):
        delta = apply_plugin("mip_editor", model, processor, rows[:4], rows[4:],
                             {"prune": False, "restrict": False, "layer": layer}, progress=False,
                             stats={"paths": paths})
        before, after = edited(model, delta)
        assert changed_rows(before, after) == {param: set(range(before[param].shape[0]))
                                               for param in mlp_params(mapping, sites, TRAINED)}, layer


def test_theta0_is_the_unpruned_model(llava, rows):
    """The retain term compares with theta0, the unpruned model: after pruning its first value is > 0;
    without pruning the first step runs theta0 itself and it is exactly 0 (beta = 0: retain term only)."""
    model, processor = llava
    paths = find_paths(model, processor, rows[:4])
    first = {prune: apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], {"beta": 0.0, "prune": prune},
                                 progress=False, stats={"paths": paths}).header()["report"]["loss"]["first"]
             for prune in (True, False)}
    assert first[True] > 0 and first[False] == 0


def test_forget_batches_cycled_to_the_retain_length(llava, rows):
    """One step per retain batch, the forget batches cycled: 2 forget rows, 6 retain rows, batch 2 and 2
    epochs make 3 x 2 steps (one per forget batch would be 1 x 2)."""
    model, processor = llava
    paths = find_paths(model, processor, rows[:2])
    delta = apply_plugin("mip_editor", model, processor, rows[:2], rows[2:], {"batch_size": 2, "epochs": 2},
                         progress=False, stats={"paths": paths})
    assert delta.header()["report"]["steps"] == 6


def test_ablations(llava, rows):
    model, processor = llava
    mapping = model_map(model)
    paths = find_paths(model, processor, rows[:4], model_map=mapping)
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
    with pytest.raises(MmeditError, match="already exists"):
        plot_paths(paths, tmp_path / "paths.png")
    assert plot_paths(paths, tmp_path / "paths.png", force=True).stat().st_size > 1000
    assert [file.name for file in tmp_path.iterdir() if file.name.startswith(".")] == []  # no temp files left


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
    (tmp_path / "p.safetensors").unlink()
    again = runner.invoke(paths_app, ["find", str(model_dir), "--forget", str(forget), "--out",
                                      str(tmp_path / "p.safetensors"), "--plot", str(tmp_path / "p.png")])
    assert again.exit_code == 1 and "p.png already exists" in again.output and "path search" not in again.output
    assert not (tmp_path / "p.safetensors").exists()  # refused before the search: nothing written
    found = runner.invoke(paths_app, ["find", str(model_dir), "--forget", str(forget), "--out",
                                      str(tmp_path / "p.safetensors"), "--plot", str(tmp_path / "p.png"),
                                      "--device", "cpu", "--force"])
    assert found.exit_code == 0, found.output
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


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_the_pruned_producer_of_a_gated_neuron_is_up_proj_in_every_family(family):
    """Pruning zeroes the last weight producer of a neuron (prune_producers). For a gated MLP,
    act(gate) * up, that must be up_proj: with gate_proj zeroed too, or instead, RMisU would start at a
    stationary point. The family data lists the producers; this pins their order for every family."""
    from mmedit.plugins.mip_editor import prune_producers, weight_producers

    model, _ = zoo.build(family)
    for site in model_map(model).sites:
        weights = [producer.param for producer in weight_producers(site)]
        pruned = [producer.param for producer in prune_producers(site) if producer.param.endswith("weight")]
        if any("gate_proj" in name for name in weights):
            assert pruned == [name for name in weights if "up_proj" in name], (site.name, weights)
        else:
            assert pruned == weights[-1:], (site.name, weights)
