"""The shared training loop's mechanics, each pinned so that reversing it fails: the learning-rate schedule,
the seeded shuffling, masking before clipping, the non-finite guards, row selections, the objectives'
directions, the published defaults, and NPO's separately loaded reference."""
import dataclasses
import math

import pytest
import torch

from mmedit import zoo
from mmedit.arch import model_map
from mmedit.errors import MmeditError
from mmedit.loading import load
from mmedit.plugins import Job, Objective, Originals, Selection, Trainer, TrainingPlugin, apply_plugin, get
from mmedit.plugins.training import BaselineConfig

from test_plugins_conformance import make_rows


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return load(zoo.tiny("llava", root=tmp_path_factory.getbasetemp() / "zoo"), device="cpu")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return make_rows(tmp_path_factory.mktemp("trainer-rows"))


class Probe(TrainingPlugin):
    """GA with a hook: `hook(trainer, step)` may replace the loss."""

    name, version, description = "probe", "1", "A test method."

    def __init__(self, loss=None, selections=None):
        self._loss, self._selections = loss, selections

    def selections(self, trainer, config):
        return self._selections(trainer) if self._selections else super().selections(trainer, config)

    def loss(self, trainer, step):
        return self._loss(trainer, step) if self._loss else -trainer.forward(step.forget).nll


def trainer(model, processor, rows, method=None, seed=0, **options):
    mapping = model_map(model)
    parts = ("vision", "projector", "llm")
    declared = {n: p for n, p in model.named_parameters() if (mapping.part_of(n) or (None,))[0] in parts}
    job = Job(model, processor, mapping, rows[:4], rows[4:], rows, seed, False, Originals(declared))
    return Trainer(job, BaselineConfig(**options), method or Probe())


@pytest.fixture
def restored(llava):
    """The model's weights put back after a test that trains it directly (not through apply_plugin)."""
    model, _ = llava
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    yield
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])


def recorded_lrs(monkeypatch) -> list[float]:
    """The learning rate of each step, as one of the trainables' AdamW (the first) saw it."""
    seen, first = [], []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        first[:] = first or [self]
        if self is first[0]:
            seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    return seen


@pytest.mark.parametrize("decay", ["linear", "constant"])
def test_learning_rate_schedule(llava, rows, monkeypatch, restored, decay):
    model, processor = llava
    seen = recorded_lrs(monkeypatch)
    trainer(model, processor, rows, lr=1e-3, batch_size=2, epochs=2, lr_decay=decay).run()
    steps = 4  # 4 forget rows in batches of 2, two epochs
    expected = [1e-3 * (1 - i / steps) for i in range(steps)] if decay == "linear" else [1e-3] * steps
    assert seen == pytest.approx(expected, rel=1e-12)


def test_shuffling_is_seeded_per_epoch_and_set(llava, rows):
    model, processor = llava
    first = trainer(model, processor, rows, batch_size=1, epochs=2)
    ids = lambda chunks: [(tuple(r.id for r in chunk), form) for chunk, form in chunks]  # noqa: E731
    assert ids(first.chunks("forget", "both", 0)) == ids(trainer(model, processor, rows, batch_size=1)
                                                         .chunks("forget", "both", 0))  # same seed, same order
    assert ids(first.chunks("forget", "both", 0)) != ids(first.chunks("forget", "both", 1))  # epochs differ
    other = trainer(model, processor, rows, seed=1, batch_size=1)
    assert ids(first.chunks("forget", "both", 0)) != ids(other.chunks("forget", "both", 0))  # seeds differ
    # The chunks of the two forms are shuffled together, not all of one form first, for some seed.
    forms = [[form for _, form in trainer(model, processor, rows, seed=s, batch_size=1).chunks("forget", "both", 0)]
             for s in range(4)]
    assert any(order != sorted(order) and order != sorted(order, reverse=True) for order in forms)


def test_only_the_selected_rows_are_clipped(llava, rows, monkeypatch, restored):
    """A row selection trains a compact tensor of its rows: the clipped norm covers those rows' gradient
    only (rows-sized tensors, the full gradient already freed)."""
    model, processor = llava
    name = model_map(model).parameters("llm")[0]
    width = model.get_parameter(name).shape[1]

    def rows_only(t):
        return {"train": Selection.rows(t.model, {name: (0, [0, 1])})}

    total_norm = torch.nn.utils.get_total_norm
    seen = []

    def checking(grads, *args, **kwargs):
        seen.extend(tuple(grad.shape) for grad in grads)
        assert model.get_parameter(name).grad is None
        return total_norm(grads, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", checking)
    trainer(model, processor, rows, Probe(selections=rows_only), lr=1e-3, grad_clip=1e-3, max_steps=1).run()
    assert seen == [(2, width)], "the clipped norm covered more than the selected rows"


def test_clipping_scales_the_gradients_as_clip_grad_norm(llava, rows, monkeypatch, restored):
    """The step's gradients (all its trainables') are scaled by min(1, max_norm / (norm + 1e-6)) exactly as
    torch.nn.utils.clip_grad_norm_ scales them."""
    model, processor = llava
    before, stepped = [], []
    total_norm, step = torch.nn.utils.get_total_norm, torch.optim.AdamW.step

    def capturing(grads, *args, **kwargs):
        before[:] = [grad.clone() for grad in grads]
        return total_norm(grads, *args, **kwargs)

    def stepping(self, *args, **kwargs):
        stepped.extend(p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", capturing)
    monkeypatch.setattr(torch.optim.AdamW, "step", stepping)
    trainer(model, processor, rows, lr=1e-3, grad_clip=1e-3, max_steps=1).run()
    holders = [torch.nn.Parameter(torch.empty_like(grad)) for grad in before]
    for holder, grad in zip(holders, before):
        holder.grad = grad.clone()
    monkeypatch.undo()
    torch.nn.utils.clip_grad_norm_(holders, 1e-3)
    assert len(stepped) == len(holders) > 1
    assert all(torch.equal(got, holder.grad) for got, holder in zip(stepped, holders))
    assert not all(torch.equal(got, grad) for got, grad in zip(stepped, before))  # the clip was active


def test_an_infinite_loss_stops_the_run(llava, rows, restored):
    model, processor = llava

    def infinite(t, step):  # finite gradients, infinite value: only the loss guard can see it
        return -t.forward(step.forget).nll + math.inf

    with pytest.raises(MmeditError, match="the loss is inf at step 1"):
        trainer(model, processor, rows, Probe(loss=infinite), max_steps=1).run()


def test_a_non_finite_gradient_stops_the_run(llava, rows, restored):
    model, processor = llava

    def nan_gradient(t, step):  # a finite value (0 added) whose gradient is 0 * inf = nan
        first = next(iter(t.selections["train"].masks))
        return -t.forward(step.forget).nll + torch.sqrt(t.params[first].sum() * 0.0)

    with pytest.raises(MmeditError, match="the gradient norm is nan at step 1"):
        trainer(model, processor, rows, Probe(loss=nan_gradient), max_steps=1).run()


def test_non_finite_weights_stop_the_run(llava, rows, monkeypatch, restored):
    model, processor = llava
    step = torch.optim.AdamW.step

    def poisoning(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = math.nan
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning)
    with pytest.raises(MmeditError, match="training put NaN/inf into .*nothing written"):
        trainer(model, processor, rows, max_steps=1).run()


def test_row_selections_check_axis_and_indices(llava):
    model, _ = llava
    name = model_map(model).parameters("llm")[0]
    rows = model.get_parameter(name).shape[0]
    with pytest.raises(MmeditError, match=f"row selection: {name} has no axis 5"):
        Selection.rows(model, {name: (5, [0])})
    with pytest.raises(MmeditError, match=f"index {rows} is out of range for axis 0 of {name}"):
        Selection.rows(model, {name: (0, [0, rows])})
    with pytest.raises(MmeditError, match="option lr must be a positive number"):
        get("ga").configure({"lr": "1e39"})


def test_objective_directions():
    up, down, kept = (Objective("x", lambda p, c: 0.0, direction, 0.5) for direction in ("up", "down", "kept"))
    assert up.holds(1.0, 1.5) and not up.holds(1.0, 1.4) and not up.holds(1.0, 0.0)
    assert down.holds(1.0, 0.5) and not down.holds(1.0, 0.6) and not down.holds(1.0, 2.0)
    assert kept.holds(1.0, 1.5) and kept.holds(1.0, 0.0) and not kept.holds(1.0, 1.6)
    with pytest.raises(MmeditError, match="direction must be one of up, down, kept"):
        Objective("x", lambda p, c: 0.0, "sideways", 0.1)


# The papers' defaults (../shared/methods.md): a plugin's defaults must be these.
PAPER_DEFAULTS = {
    "ga": {"lr": 1e-5, "batch_size": 4, "epochs": 1, "grad_clip": 1.0, "lr_decay": "linear", "forms": "multimodal"},
    "graddiff": {"lr": 1e-5, "batch_size": 4, "epochs": 1, "grad_clip": 1.0},
    "kl_min": {"lr": 1e-5, "batch_size": 4, "epochs": 1, "grad_clip": 1.0},
    "npo": {"lr": 1e-5, "batch_size": 4, "epochs": 1, "grad_clip": 1.0, "beta": 0.4, "ref": ""},
    "rmu": {"lr": 5e-5, "batch_size": 4, "epochs": 1, "grad_clip": 1.0, "layer": 7, "c": 10.0, "alpha": 1200.0},
    "mmunlearner": {"lr": 1e-5, "batch_size": 4, "epochs": 1, "grad_clip": 1.0, "tau": 1.0, "scope": "both"},
    "manu": {"alpha": 2.0, "tau": 0.1, "preset": "paper", "soft": 0.0, "positions": "all"},
    "mip_editor": {"lr": 5e-4, "lr_decay": "linear", "batch_size": 6, "epochs": 1, "grad_clip": 0.0, "steps": 4,
                   "top_k": 5, "layer": 7, "alpha": 0.5, "beta": 0.5, "c": 10.0, "target": "fixed", "lam": 1.0,
                   "positions": "answer", "prune": True, "rmisu": True, "restrict": True},
}


@pytest.mark.parametrize("name", sorted(PAPER_DEFAULTS))
def test_defaults_are_the_papers(name):
    config = dataclasses.asdict(get(name).configure())
    assert {key: config[key] for key in PAPER_DEFAULTS[name]} == PAPER_DEFAULTS[name]


def test_mmunlearner_ratio_guard_is_the_papers():
    """m = (F_T + 1e-15) / (F_P + 1e-15) >= tau: a larger guard would pull small-Fisher weights towards 1."""
    from mmedit.plugins import mmunlearner

    assert mmunlearner.EPSILON == 1e-15


def test_npo_uses_the_reference_model_it_is_given(llava, rows, tmp_path):
    """ref=DIR: the NPO margin is against that model, not θ₀. At step one θ = θ₀, so against θ₀ the
    loss is exactly (2/β)·ln 2; against another model it is not, and the edit differs."""
    model, processor = llava
    other, other_processor = load(zoo.tiny("llava", root=tmp_path / "zoo", seed=1), device="cpu")
    other.save_pretrained(tmp_path / "ref")
    other_processor.save_pretrained(tmp_path / "ref")
    options = {"max_steps": 2, "batch_size": 2}
    own = apply_plugin("npo", model, processor, rows[:4], None, options, progress=False)
    against = apply_plugin("npo", model, processor, rows[:4], None, options | {"ref": str(tmp_path / "ref")},
                           progress=False)
    assert own.header()["report"]["loss"]["first"] == pytest.approx(2 / 0.4 * math.log(2))
    assert abs(against.header()["report"]["loss"]["first"] - 2 / 0.4 * math.log(2)) > 1e-3
    assert any(not torch.equal(own.changes[n].new, against.changes[n].new) for n in own.changes)


def test_plugins_do_not_leave_the_model_in_train_mode(llava, rows, restored):
    """The trainer restores train/eval flags and requires_grad (mmedit.modelstate.preserved)."""
    model, processor = llava
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    trainer(model, processor, rows, max_steps=1).run()
    assert not any(module.training for module in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
