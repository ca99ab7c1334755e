"""The memory-lean mechanisms against the straightforward path they replace, on tiny fp32 models: the same
losses and the same delta (within 1e-6), and the sizes of what they hold (asserted on tensor sizes).

- compact rows / element trainables vs full-tensor AdamW with masked gradients (MIP-Editor, MMUnlearner);
- a loss yielded in terms (one batch's activations at a time) vs the sum of its terms;
- θ₀ quantities precomputed once per batch vs a θ₀ pass with swapped weights at every step (KL-Min, NPO,
  RMU, MIP-Editor with the adaptive target);
- originals kept only for what changes (and spilled to a temp file) vs every declared tensor kept whole;
- gradient checkpointing on vs off;
- a trace with gradients that makes no parameter gradient vs one where every parameter requires one.
"""
import math
import sys
from pathlib import Path

import pytest
import torch

from mmedit import zoo
from mmedit.arch import model_map
from mmedit.data.batches import make_batches
from mmedit.plugins import Selection, Trainer, TrainingPlugin, apply_plugin, get
from mmedit.plugins import mmunlearner, originals, training
from mmedit.plugins.training import Trainable
from mmedit.trace import trace

sys.path.insert(0, str(Path(__file__).parent))
from test_plugins_conformance import make_rows  # noqa: E402


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return make_rows(tmp_path_factory.mktemp("lean-rows"))


@pytest.fixture(scope="module")
def llava():
    model, processor = zoo.build("llava")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # nonzero biases, so that a bias edit would show
        for name, tensor in model.named_parameters():
            if name.endswith("bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model, processor


class Straightforward(Trainer):
    """The loop before the memory work: every selected parameter trained whole by its kind's AdamW, its
    gradient masked to the selection (+0.0 outside) before clipping."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trainables = {kind: [Trainable(name, self.params[name], None, None, None) for name in selection.masks]
                           for kind, selection in self.selections.items()}
        self.kind = None

    def run(self):
        names = {name for selection in self.selections.values() for name in selection.masks}
        handles = [self.params[name].register_hook(lambda grad, name=name: self._masked(name, grad)) for name in names]
        try:
            return super().run()
        finally:
            for handle in handles:
                handle.remove()

    def _masked(self, name, grad):
        mask = self.selections[self.kind].masks.get(name)
        return grad if mask is None else grad.masked_fill(~mask, 0.0)

    def _step(self, index, step, optimizer, lr):
        self.kind = step.kind
        super()._step(index, step, optimizer, lr)


def per_step_reference(monkeypatch):
    """The θ₀ path before the memory work: no precomputation; each step's θ₀ quantities come from a θ₀ pass
    (the original weights swapped in) at that step."""
    monkeypatch.setattr(Trainer, "prepare", lambda self, plan=None: None)

    def step_for(self, kind, forget, retain):
        def reference(which, chunk):
            return self.method.references(self, self.encode(*chunk), which) or {}
        return training.Step(kind, forget, retain, self.encode, reference)

    monkeypatch.setattr(Trainer, "step_for", step_for)


def edited(model, delta) -> dict[str, torch.Tensor]:
    with delta.applied(model):
        return {name: tensor.detach().clone() for name, tensor in model.named_parameters()}


def assert_same_edit(model, lean, plain, exact=False):
    assert set(lean.changes) == set(plain.changes) and lean.changes
    a, b = edited(model, lean), edited(model, plain)
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    first = (lean.header()["report"]["loss"], plain.header()["report"]["loss"])
    assert first[0]["first"] == pytest.approx(first[1]["first"], rel=1e-6, abs=1e-7)
    assert first[0]["last"] == pytest.approx(first[1]["last"], rel=1e-5, abs=1e-6)


# ---- compact trainables ------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"grad_clip": 1e-3}])  # with clipping active at every step too
def test_mip_editor_rows_train_as_the_masked_full_tensors(llava, rows, monkeypatch, options):
    model, processor = llava
    overrides = {"lr": 5e-3, "epochs": 2, **options}
    lean = apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], overrides, progress=False)
    monkeypatch.setattr(training, "Trainer", Straightforward)
    plain = apply_plugin("mip_editor", model, processor, rows[:4], rows[4:], overrides, progress=False)
    assert_same_edit(model, lean, plain)


def test_mmunlearner_masks_train_as_the_masked_full_tensors(llava, rows, monkeypatch):
    model, processor = llava
    overrides = {"lr": 1e-3, "epochs": 2}
    lean = apply_plugin("mmunlearner", model, processor, rows[:4], rows[4:], overrides, progress=False)
    monkeypatch.setattr(mmunlearner, "Trainer", Straightforward)
    plain = apply_plugin("mmunlearner", model, processor, rows[:4], rows[4:], overrides, progress=False)
    assert_same_edit(model, lean, plain)


class RowsGA(TrainingPlugin):
    """Gradient ascent on two rows of one LLM weight, and on an element mask of another."""

    name, description, needs_retain = "rows-ga", "Test plugin.", False

    def __init__(self, rows_of: str, elements_of: str):
        self.rows_of, self.elements_of = rows_of, elements_of

    def selections(self, trainer, config):
        params = trainer.params
        mask = torch.zeros_like(params[self.elements_of], dtype=torch.bool)
        mask.view(-1)[::3] = True
        masks = dict(Selection.rows(trainer.model, {self.rows_of: (0, [1, 4])}).masks)
        return {"train": Selection(masks | {self.elements_of: mask})}

    def loss(self, trainer, step):
        return -trainer.forward(step.forget).nll


def test_compact_gradients_and_optimizer_state_are_selection_sized(llava, rows, monkeypatch):
    """AdamW's state and the gradients it steps are as large as the selection: 2 rows, and the masked
    elements; the parameters' own .grad never survives a step."""
    model, processor = llava
    llm = [name for name in model_map(model).parameters("llm") if name.endswith("proj.weight")]
    rows_of, elements_of = llm[0], llm[1]
    shapes, grads = [], []
    step = torch.optim.AdamW.step

    def spying(self, *args, **kwargs):
        grads.extend(tuple(p.grad.shape) for group in self.param_groups for p in group["params"])
        result = step(self, *args, **kwargs)
        shapes.extend((tuple(state["exp_avg"].shape), tuple(state["exp_avg_sq"].shape)) for state in self.state.values())
        assert model.get_parameter(rows_of).grad is None and model.get_parameter(elements_of).grad is None
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", spying)
    monkeypatch.setattr("mmedit.plugins.apply.get", lambda name: RowsGA(rows_of, elements_of))
    delta = apply_plugin("rows-ga", model, processor, rows[:4], None, {"lr": 1e-3, "max_steps": 1}, progress=False)
    width = model.get_parameter(rows_of).shape[1]
    selected = math.ceil(model.get_parameter(elements_of).numel() / 3)
    assert grads == [(2, width), (selected,)]
    assert shapes == [((2, width), (2, width)), ((selected,), (selected,))]
    # Only those rows and elements moved: the delta holds rows 1 and 4, and elements 0, 3, 6, ...
    rows_change, elements_change = delta.changes[rows_of], delta.changes[elements_of]
    assert rows_change.kind == "rows" and rows_change.index.tolist() == [1, 4]
    assert elements_change.kind == "elements" and bool((elements_change.index % 3 == 0).all())


@pytest.mark.parametrize("name, method", [("graddiff", None), ("mip_editor", "RMisU")])
def test_a_loss_in_terms_equals_its_sum(llava, rows, monkeypatch, name, method):
    """Terms backpropagated one at a time (one batch's activations at a time; a compact selection's
    gathered gradient summed over the terms) give the edit of their sum backpropagated once."""
    from mmedit.plugins import mip_editor

    model, processor = llava
    overrides = {"lr": 5e-3 if method else 1e-3, "epochs": 2, "batch_size": 2}
    lean = apply_plugin(name, model, processor, rows[:4], rows[4:], overrides, progress=False)
    owner = getattr(mip_editor, method) if method else type(get(name))
    terms = owner.loss
    monkeypatch.setattr(owner, "loss", lambda self, trainer, step: sum(terms(self, trainer, step)))
    summed = apply_plugin(name, model, processor, rows[:4], rows[4:], overrides, progress=False)
    assert_same_edit(model, lean, summed)


# ---- θ₀ quantities -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, overrides", [
    ("kl_min", {"lr": 1e-3, "epochs": 2}),
    ("npo", {"lr": 1e-3, "epochs": 2}),
    ("rmu", {"lr": 1e-3, "epochs": 2}),
    ("mip_editor", {"lr": 5e-3, "epochs": 2, "target": "adaptive"}),
])
def test_precomputed_references_equal_per_step_theta0_passes(llava, rows, monkeypatch, name, overrides):
    model, processor = llava
    seen = []
    run = Trainer.run

    def recording(self):
        result = run(self)
        seen.append(list(self.losses))
        return result

    monkeypatch.setattr(Trainer, "run", recording)
    lean = apply_plugin(name, model, processor, rows[:4], rows[4:], overrides, progress=False)
    per_step_reference(monkeypatch)
    plain = apply_plugin(name, model, processor, rows[:4], rows[4:], overrides, progress=False)
    assert_same_edit(model, lean, plain, exact=True)
    assert len(seen) == 2 and seen[0] == seen[1] and len(seen[0]) > 1


def test_kl_min_keeps_only_the_retain_answer_logits(llava, rows):
    """KL-Min keeps θ₀'s answer logits of the retain batches only, in the model's dtype."""
    model, processor = llava
    from mmedit.plugins.base import Job
    from mmedit.plugins.originals import Originals

    mapping = model_map(model)
    declared = {n: p for n, p in model.named_parameters() if (mapping.part_of(n) or (None,))[0] == "llm"}
    job = Job(model, processor, mapping, rows[:4], rows[4:], rows, 0, False, Originals(declared))
    trainer = Trainer(job, get("kl_min").configure({"batch_size": 2}), get("kl_min"))
    trainer.prepare()
    assert {which for (which, _), found in trainer._references.items() if found} == {"retain"}
    for (which, (chunk, form)), found in trainer._references.items():
        if which == "forget":
            continue
        batch = trainer.encode(chunk, form)
        answers = int((batch.inputs["labels"][:, 1:] != -100).sum())
        assert set(found) == {"logits"} and found["logits"].shape == (answers, model.config.text_config.vocab_size)
        assert found["logits"].dtype == next(model.parameters()).dtype


# ---- originals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ga", "manu", "mip_editor", "mmunlearner"])
def test_kept_originals_give_the_delta_of_a_whole_snapshot(llava, rows, monkeypatch, name, tmp_path):
    """Lean keeping (spilled to a temp file: MIN_SPILL lowered so the tiny tensors go to disk) gives the
    same delta bytes as keeping every declared tensor whole in memory, and the model is restored."""
    model, processor = llava
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    overrides = {} if name == "manu" else {"max_steps": 2, "lr": 1e-3}
    monkeypatch.setattr(originals, "MIN_SPILL", 1)
    spilled = []
    store = originals.Originals._store

    def counting(self, values):
        where = store(self, values)
        spilled.append(isinstance(where, Path))
        return where

    monkeypatch.setattr(originals.Originals, "_store", counting)
    lean = apply_plugin(name, model, processor, rows[:4], rows[4:], overrides, progress=False)
    assert spilled and all(spilled)
    monkeypatch.setattr(type(get(name)), "keeps_originals", False)
    monkeypatch.setattr(originals, "MIN_SPILL", 1 << 60)
    whole = apply_plugin(name, model, processor, rows[:4], rows[4:], overrides, progress=False)
    assert lean.save(tmp_path / "lean.safetensors").read_bytes() == whole.save(tmp_path / "whole.safetensors").read_bytes()
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_lean_keeping_copies_only_what_changes(llava, rows, monkeypatch):
    """MANU keeps the pruned rows, not its declared parts: the kept bytes are the delta's original values."""
    model, processor = llava
    kept = {}
    restore = originals.Originals.restore

    def measuring(self):
        kept.update(self.bytes())
        return restore(self)

    monkeypatch.setattr(originals.Originals, "restore", measuring)
    delta = apply_plugin("manu", model, processor, rows[:4], rows[4:], progress=False)
    old = sum(change.old.numel() * change.old.element_size() for change in delta.changes.values())
    declared = sum(p.numel() * p.element_size() for p in model.parameters())
    assert kept["memory"] + kept["disk"] == old < declared / 20


def test_a_change_without_keep_is_refused_and_named(llava, rows):
    model, processor = llava

    class Careless(TrainingPlugin):
        name, description, needs_retain = "careless", "Test plugin.", False

        def edit(self, job, config):
            with torch.no_grad():
                job.model.get_parameter(job.model_map.parameters("llm")[0]).mul_(2.0)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mmedit.plugins.apply.get", lambda name: Careless())
        with pytest.raises(Exception, match="without keeping its original values first"):
            apply_plugin("careless", model, processor, rows[:4], None, progress=False)
    name = model_map(model).parameters("llm")[0]
    with torch.no_grad():  # the guard names the bug; it cannot undo it
        model.get_parameter(name).copy_(before[name])


# ---- checkpointing and the trace -----------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_edit(llava, rows):
    model, processor = llava
    options = {"lr": 1e-3, "max_steps": 3, "batch_size": 2}
    plain = apply_plugin("graddiff", model, processor, rows[:4], rows[4:], options, progress=False)
    checkpointed = apply_plugin("graddiff", model, processor, rows[:4], rows[4:], options | {"checkpointing": "on"},
                                progress=False)
    assert_same_edit(model, checkpointed, plain)
    assert not any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(model), "supports_gradient_checkpointing", False)
        with pytest.raises(Exception, match="checkpointing=on, but LlavaForConditionalGeneration does not support"):
            apply_plugin("graddiff", model, processor, rows[:4], rows[4:], options | {"checkpointing": "on"},
                         progress=False)


def test_trace_with_gradients_makes_no_parameter_gradient(llava, rows, monkeypatch):
    """The same statistics as a trace where every parameter requires a gradient, and no parameter does
    during the lean one (none gets a .grad, none keeps tensors for one)."""
    from contextlib import nullcontext

    import mmedit.trace.tracer as tracer

    model, processor = llava
    flags = []
    handle = model.get_submodule(model_map(model).residual[0]).register_forward_hook(
        lambda module, args, output: flags.append(any(p.requires_grad for p in model.parameters())))

    def batches():
        return make_batches(rows[:4], processor, "multimodal", batch_size=2)

    try:
        lean = trace(model, batches(), grads=True, progress=False)
        assert flags and not any(flags)
        assert all(p.grad is None for p in model.parameters())
        monkeypatch.setattr(tracer, "graph_roots", lambda model, params: nullcontext())
        for p in model.parameters():
            p.requires_grad_(True)
        plain = trace(model, batches(), grads=True, progress=False)
    finally:
        handle.remove()
    assert lean.tensors.keys() == plain.tensors.keys()
    for key in lean.tensors:
        torch.testing.assert_close(lean.tensors[key], plain.tensors[key], rtol=1e-6, atol=1e-9, msg=key)
