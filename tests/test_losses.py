"""Formula tests: every loss term of mmedit.plugins.losses against a hand computation on small tensors
whose answer changes with the sign or the direction, and every built-in gradient method's whole loss
against an independent transcription of its paper's formula, at a point where θ ≠ θ₀ (so that a term
computed on the wrong model, with the wrong sign or in the wrong direction gives another number)."""
import copy
import math

import pytest
import torch

from mmedit import zoo
from mmedit.arch import model_map
from mmedit.data.batches import make_batches
from mmedit.loading import load
from mmedit.plugins import Job, Originals, get, losses
from mmedit.plugins.mip_editor import RMisU
from mmedit.plugins.mmunlearner import maskable
from mmedit.plugins.training import Trainer

from test_plugins_conformance import make_rows

IGNORE = -100
EPSILON = 1e-15  # MMUnlearner's ratio guard (methods.md), written here, not imported from the plugin
SEED = 5  # the job's seed: u must come from it


def log_softmax(row):
    top = max(row)
    total = math.log(sum(math.exp(x - top) for x in row)) + top
    return [x - total for x in row]


# ---- the terms, by hand ---------------------------------------------------------------------------------
def test_answer_and_sequence_nll():
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.5, 1.5, -1.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]],
                           [[0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [2.0, 2.0, 0.0]]])
    labels = torch.tensor([[IGNORE, 1, 2, IGNORE], [IGNORE, IGNORE, 0, IGNORE]])
    # position t predicts labels[t + 1]: row 0 scores label 1 at t=0 and label 2 at t=1; row 1 label 0 at t=1.
    a = -log_softmax([2.0, 0.0, 1.0])[1]
    b = -log_softmax([0.5, 1.5, -1.0])[2]
    c = -log_softmax([3.0, 0.0, 0.0])[0]
    assert losses.answer_nll(logits, labels).item() == pytest.approx((a + b + c) / 3, rel=1e-6)
    assert losses.sequence_nll(logits, labels).tolist() == pytest.approx([(a + b) / 2, c], rel=1e-6)
    assert losses.answer_logits(logits, labels).tolist() == [[2.0, 0.0, 1.0], [0.5, 1.5, -1.0], [3.0, 0.0, 0.0]]


def test_kl_to_reference_is_base_first():
    p_ref, p = [0.9, 0.1], [0.5, 0.5]
    forward = sum(r * math.log(r / q) for r, q in zip(p_ref, p))  # KL(p_θ₀ ‖ p_θ) = 0.368
    reverse = sum(q * math.log(q / r) for r, q in zip(p_ref, p))  # KL(p_θ ‖ p_θ₀) = 0.511: the other direction
    logits = torch.tensor([p]).log()
    reference = torch.tensor([p_ref]).log()
    value = losses.kl_to_reference(logits, reference).item()
    assert value == pytest.approx(forward, rel=1e-6) and abs(value - reverse) > 0.1
    # Token mean over rows: two identical rows give the same value, an equal row adds nothing.
    two = losses.kl_to_reference(torch.cat([logits, reference]), torch.cat([reference, reference])).item()
    assert two == pytest.approx(forward / 2, rel=1e-6)


def test_npo():
    nll, ref, beta = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.5]), 0.4
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    hand = -(2 / beta) * (math.log(sigmoid(beta * 1.0)) + math.log(sigmoid(beta * -0.5))) / 2
    assert losses.npo(nll, ref, beta).item() == pytest.approx(hand, rel=1e-6)
    # It falls as the edited model's NLL rises above the reference's (the margin's sign).
    assert losses.npo(nll + 1, ref, beta) < losses.npo(nll, ref, beta)


def test_misdirection_terms():
    u = losses.random_direction(4, seed=7)
    again = losses.random_direction(4, seed=7)
    assert torch.equal(u, again) and u.norm().item() == pytest.approx(1.0) and bool((u > 0).all())
    assert not torch.equal(u, losses.random_direction(4, seed=8))
    states = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    fixed = losses.fixed_target(u, 10.0, states)
    assert fixed.shape == states.shape and torch.allclose(fixed[1], 10 * u)
    adaptive = losses.adaptive_target(states, u, 0.5)
    assert torch.allclose(adaptive[0], 0.5 * u) and torch.allclose(adaptive[1], 1.0 * u)
    target = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert losses.misdirection(states, target).item() == pytest.approx((1 + 1 + 4) / 8)
    assert losses.retain_state(states, target).item() == pytest.approx((1 + 1 + 4) / 8)


# ---- each method's whole loss, independently transcribed --------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, processor = load(zoo.tiny("llava", root=tmp_path_factory.getbasetemp() / "zoo"), device="cpu")
    rows = make_rows(tmp_path_factory.mktemp("loss-rows"))
    return model, processor, rows


def perturbed(model, names, seed=0):
    """θ: the model with noise on `names`; θ₀: a deep copy of the original. Returns (θ model, θ₀ model)."""
    base = copy.deepcopy(model)
    edited = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    params = dict(edited.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].add_(torch.randn(params[name].shape, generator=generator) * 0.05)
    return edited, base


def trainer_for(name, edited, base, processor, rows, overrides=None, method=None):
    plugin = get(name)
    config = plugin.configure(overrides)
    mapping = model_map(edited)
    base_params = dict(base.named_parameters())
    declared = {n: p for n, p in edited.named_parameters() if (mapping.part_of(n) or (None,))[0] in plugin.parts(config)}
    original = Originals(declared, given={n: base_params[n].detach() for n in declared})  # θ₀: the base model
    job = Job(edited, processor, mapping, rows[:4], rows[4:], rows, SEED, False, original)
    return Trainer(job, config, method or plugin), plugin, config


def step(trainer, rows, kind="train", form="multimodal"):
    """A step on rows[:4] (forget) and rows[4:] (retain), with its θ₀ quantities (Trainer.prepare)."""
    entry = (kind, (tuple(rows[:4]), form), (tuple(rows[4:]), form))
    trainer.prepare([entry])
    return trainer.step_for(*entry)


def total(loss) -> float:
    """A loss's value: a tensor, or the sum of the terms a plugin yields one batch at a time."""
    return loss.item() if torch.is_tensor(loss) else sum(term.item() for term in loss)


def inputs(processor, rows, form="multimodal"):
    return next(make_batches(rows, processor, form, batch_size=len(rows))).inputs


def hand_nll(model, batch, per_row=False):
    """Answer NLL by hand: log-softmax, pick the label of the next position, mean over answer tokens."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.float()
    labels = batch["labels"][:, 1:]
    picked = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    answer = labels != IGNORE
    nll = -(picked * answer)
    return nll.sum(1) / answer.sum(1) if per_row else nll.sum() / answer.sum()


def hand_states(model, batch, layer):
    """Hidden states after decoder layer `layer` at non-pad positions, read with a plain hook."""
    kept = {}
    module = model.get_submodule(model_map(model).residual[layer])
    handle = module.register_forward_hook(lambda m, a, out: kept.setdefault("h", out[0] if isinstance(out, tuple) else out))
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    finally:
        handle.remove()
    return kept["h"][batch["attention_mask"].bool()].float()


def llm_names(model):
    return [n for n, _ in model.named_parameters() if (model_map(model).part_of(n) or (None,))[0] == "llm"]


def test_ga_graddiff_kl_min_npo_losses(setup):
    model, processor, rows = setup
    edited, base = perturbed(model, llm_names(model))
    forget, retain = inputs(processor, rows[:4]), inputs(processor, rows[4:])
    with torch.no_grad():
        nll_f, nll_r = hand_nll(edited, forget).item(), hand_nll(edited, retain).item()
        # KL(p_θ₀ ‖ p_θ) per retain answer token, by hand.
        answer = retain["labels"][:, 1:] != IGNORE
        log_p = edited(**{k: v for k, v in retain.items() if k != "labels"}).logits[:, :-1][answer].log_softmax(-1)
        log_0 = base(**{k: v for k, v in retain.items() if k != "labels"}).logits[:, :-1][answer].log_softmax(-1)
        kl = (log_0.exp() * (log_0 - log_p)).sum(-1).mean().item()
        beta = 0.4
        margin = hand_nll(edited, forget, per_row=True) - hand_nll(base, forget, per_row=True)
        npo = (-(2 / beta) * torch.nn.functional.logsigmoid(beta * margin).mean()).item()
    expected = {"ga": -nll_f, "graddiff": -nll_f + nll_r, "kl_min": -nll_f + nll_r + kl, "npo": npo}
    assert kl > 1e-4 and abs(margin).min() > 1e-4  # θ ≠ θ₀: a term on the wrong model would show
    for name, value in expected.items():
        trainer, plugin, _ = trainer_for(name, edited, base, processor, rows)
        with torch.no_grad():
            got = total(plugin.loss(trainer, step(trainer, rows)))
        assert got == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_rmu_and_mip_editor_losses(setup):
    model, processor, rows = setup
    edited, base = perturbed(model, llm_names(model))
    forget, retain = inputs(processor, rows[:4]), inputs(processor, rows[4:])
    layer = len(model_map(model).residual) - 1  # default l = 7, clamped to the depth
    with torch.no_grad():
        h_f, h_r, h_0 = hand_states(edited, forget, layer), hand_states(edited, retain, layer), hand_states(base, retain, layer)
        h_0f = hand_states(base, forget, layer)
    u = torch.rand(h_f.shape[-1], generator=torch.Generator().manual_seed(SEED))
    u = u / u.norm()
    mse = lambda a, b: ((a - b) ** 2).mean().item()  # noqa: E731
    keep = mse(h_r, h_0)
    assert keep > 1e-6
    # RMU: MSE(h(x_f), c·u) + α·MSE(h(x_r), h_θ₀(x_r)), c = 10, α = 1200.
    trainer, plugin, _ = trainer_for("rmu", edited, base, processor, rows)
    with torch.no_grad():
        assert total(plugin.loss(trainer, step(trainer, rows))) == pytest.approx(mse(h_f, 10 * u) + 1200 * keep, rel=1e-5)
    # MIP-Editor's RMisU: β·MSE(h(x_f), target) + α·MSE(h(x_r), h_θ₀(x_r)), α = β = 0.5; fixed and adaptive.
    names = llm_names(model)
    for overrides, target in (({}, 10 * u), ({"target": "adaptive", "lam": 2.0}, 2.0 * h_0f.norm(dim=-1, keepdim=True) * u)):
        trainer, _, _ = trainer_for("mip_editor", edited, base, processor, rows, overrides, RMisU("mip_editor", None, names))
        with torch.no_grad():
            got = total(trainer.method.loss(trainer, step(trainer, rows)))
        assert got == pytest.approx(0.5 * mse(h_f, target) + 0.5 * keep, rel=1e-5), overrides


def test_mmunlearner_loss_and_saliency_mask(setup):
    model, processor, rows = setup
    edited, base = perturbed(model, llm_names(model))
    trainer, plugin, config = trainer_for("mmunlearner", edited, base, processor, rows)
    forget, retain = inputs(processor, rows[:4]), inputs(processor, rows[4:])
    with torch.no_grad():
        assert plugin.loss(trainer, step(trainer, rows, "forget")).item() == pytest.approx(-hand_nll(edited, forget).item(), rel=1e-5)
        assert plugin.loss(trainer, step(trainer, rows, "retain")).item() == pytest.approx(hand_nll(edited, retain).item(), rel=1e-5)

    # The mask, from Fisher computed by hand (one batch per set here: batch_size 4, 4 rows each):
    # m = (F_forget + eps) / (F_preserve + eps) >= tau, F_preserve = retain VQA (vision, projector) or the
    # mean of retain VQA and the text form of all rows (LLM).
    params = dict(edited.named_parameters())
    names = maskable(trainer.job, plugin.parts(config))

    def fisher(batches):
        squares = []
        for batch in batches:
            grads = torch.autograd.grad(hand_nll(edited, batch), [params[n] for n in names], allow_unused=True)
            squares.append([torch.zeros_like(params[n]) if g is None else g.square() for n, g in zip(names, grads)])
        return [sum(column) / len(batches) for column in zip(*squares)]

    for p in edited.parameters():
        p.requires_grad_(True)
    text = [inputs(processor, rows[i:i + 4], "text") for i in range(0, len(rows), 4)]
    f_forget, f_retain, f_llm = fisher([forget]), fisher([retain]), fisher([retain, *text])
    masks = trainer.selections["forget"].masks
    selected = 0
    for index, name in enumerate(names):
        preserve = f_llm[index] if model_map(edited).part_of(name)[0] == "llm" else f_retain[index]
        hand = (f_forget[index] + EPSILON) / (preserve + EPSILON) >= config.tau
        assert torch.equal(masks[name].cpu(), hand), f"{name}: the saliency mask disagrees with the hand formula"
        selected += int(hand.sum())
    assert 0 < selected < sum(params[n].numel() for n in names)  # a real selection, not all or nothing
