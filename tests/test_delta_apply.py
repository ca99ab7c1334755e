"""Applying and reverting deltas on models: verification, all-or-nothing, wrapped models, builders."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mmedit
from mmedit.delta import Change, Delta, applied_stack, base_name
from mmedit.delta.change import adds_nonfinite, bits
from mmedit.errors import MmeditError


def tiny_llama(seed=0, tie=False, dtype=torch.float32):
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=40, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def snapshot(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def same(first, second):
    return first.keys() == second.keys() and all(torch.equal(bits(first[k]), bits(second[k])) for k in first)


def edit(model, seed=1):
    """Prune neurons 3 and 7 of layer 0, nudge a few attention weights and all of a norm."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        mlp.up_proj.weight[[3, 7]] = 0
        mlp.gate_proj.weight[[3, 7]] = 0
        mlp.down_proj.weight[:, [3, 7]] = 0
        q = model.model.layers[1].self_attn.q_proj.weight.view(-1)
        q[torch.randint(0, q.numel(), (5,), generator=generator)] += 0.5
        model.model.norm.weight.mul_(1.5)
    return model


@pytest.fixture(scope="module")
def models():
    base = tiny_llama()
    edited = edit(tiny_llama())
    return base, edited, Delta.from_models(base, edited, provenance={"plugin": "test"})


def test_from_models_apply_revert_and_context(models):
    base, edited, delta = models
    assert {name.split(".")[-2] for name in delta.changes} == {"up_proj", "gate_proj", "down_proj", "q_proj", "norm"}
    assert delta.provenance["base_model"]["model_type"] == "llama"
    model, before = tiny_llama(), snapshot(tiny_llama())
    delta.apply(model)
    assert same(snapshot(model), snapshot(edited))
    delta.revert(model)
    assert same(snapshot(model), before)
    with pytest.raises(RuntimeError, match="boom"):
        with delta.applied(model) as inside:
            assert same(snapshot(inside), snapshot(edited))
            raise RuntimeError("boom")
    assert same(snapshot(model), before)


def test_zeroed_rows_builder_matches_the_diff(models):
    base, edited, diffed = models
    layer = "model.layers.0.mlp."
    pruned = Delta.zeroed_rows(tiny_llama(), {f"{layer}up_proj.weight": [7, 3], f"{layer}gate_proj.weight": [3, 7],
                                              f"{layer}down_proj.weight": torch.tensor([3, 7])},
                               axes={f"{layer}down_proj.weight": 1}, provenance={"plugin": "prune"})
    for name, change in pruned.changes.items():
        assert change.kind == "zeroed_rows" and change.index.tolist() == [3, 7]
        assert torch.equal(change.old, diffed.changes[name].old)
    with pytest.raises(MmeditError, match="index out of range"):
        Delta.zeroed_rows(tiny_llama(), {f"{layer}up_proj.weight": [32]})
    with pytest.raises(MmeditError, match="not in the model"):
        Delta.zeroed_rows(tiny_llama(), {"nope.weight": [0]})


@pytest.mark.parametrize("break_model, message", [
    (lambda m: m.model.norm.weight.data.add_(1), "model.norm.weight does not hold the delta's original values"),
    (lambda m: delattr(m.model, "norm"), "parameter model.norm.weight is not in the model"),
    (lambda m: setattr(m.model.norm, "weight", torch.nn.Parameter(torch.ones(17))), r"float32\[17\] in the model"),
    (lambda m: setattr(m.model.norm, "weight", torch.nn.Parameter(torch.ones(16, dtype=torch.float64))),
     r"float64\[16\] in the model"),
])
def test_wrong_model_is_refused_and_left_untouched(models, break_model, message):
    _, _, delta = models
    model = tiny_llama()
    break_model(model)
    before = snapshot(model)
    with pytest.raises(MmeditError, match=message):
        delta.apply(model)
    assert same(snapshot(model), before)  # tensors listed before model.norm.weight were verified, not written


def test_wrong_base_model_is_refused(models):
    _, _, delta = models
    other = tiny_llama(seed=5)
    before = snapshot(other)
    with pytest.raises(MmeditError, match="does not fit this model.*wrong base model"):
        delta.apply(other)
    assert same(snapshot(other), before)
    with pytest.raises(MmeditError, match="cannot revert.*not applied"):
        delta.revert(tiny_llama())


def test_failure_while_writing_rolls_back(models, monkeypatch):
    _, _, delta = models
    model = tiny_llama()
    before = snapshot(model)
    real, calls = Change.write, []

    def flaky(self, tensor, index, values):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        real(self, tensor, index, values)

    monkeypatch.setattr(Change, "write", flaky)
    with pytest.raises(RuntimeError, match="device lost"):
        delta.apply(model)
    assert same(snapshot(model), before)


def test_reverting_a_covered_delta_out_of_order_is_refused():
    """Issue 17 #15: B changes row 1 of w except the element A changed, and stores the whole row, so its
    values cover A's element unchanged. Values alone let A be reverted first, after which B no longer fits;
    the model's record of what was applied to it refuses that."""
    model = torch.nn.Module()
    model.register_parameter("w", torch.nn.Parameter(torch.arange(16.0).reshape(4, 4), requires_grad=False))
    base = model.w.detach().clone()
    after_a = base.clone()
    after_a[1, 0] = -1
    after_b = after_a.clone()
    after_b[1, 1:] = -2
    a = Delta.from_changes({"w": (base, after_a)}, provenance={"plugin": "a"})
    b = Delta.from_changes({"w": (after_a, after_b)}, provenance={"plugin": "b"})
    assert b.changes["w"].kind == "rows" and b.changes["w"].old[0, 0] == b.changes["w"].new[0, 0] == -1
    a.apply(model)
    b.apply(model)
    with pytest.raises(MmeditError, match=r"cannot revert delta \(in memory\): the last delta applied .* must be "
                                          "reverted first; nothing was changed"):
        a.revert(model)
    assert torch.equal(model.w, after_b)
    b.revert(model)
    assert torch.equal(model.w, after_a)
    a.revert(model)
    assert torch.equal(bits(model.w), bits(base))
    with b.applied(a.apply(model)):  # the record follows the context manager and survives a refusal
        with pytest.raises(MmeditError, match="must be reverted first"):
            a.revert(model)
    a.revert(model)
    assert torch.equal(bits(model.w), bits(base))


def test_nonfinite_new_values_need_permission():
    model = tiny_llama()
    weight = model.model.norm.weight.detach()
    poisoned = weight.clone()
    poisoned[2] = float("nan")
    with pytest.raises(MmeditError, match="NaN/inf in 1 finite element"):
        Delta.from_changes({"model.norm.weight": (weight, poisoned)})
    delta = Delta.from_changes({"model.norm.weight": (weight, poisoned)}, allow_nonfinite=True)
    before = snapshot(model)
    with pytest.raises(MmeditError, match="allow-nonfinite"):
        delta.apply(model)
    assert same(snapshot(model), before)
    delta.apply(model, allow_nonfinite=True)
    assert torch.isnan(model.model.norm.weight[2])
    delta.revert(model)
    assert same(snapshot(model), before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_nonfinite_bit_test_matches_isfinite(dtype):
    ints = bits(torch.empty(0, dtype=dtype)).dtype
    info = torch.iinfo(ints)
    values = torch.randint(info.min, info.max, (20000,), dtype=torch.int64).to(ints).view(dtype)
    exact = values.double() if dtype.itemsize == 1 else values
    assert adds_nonfinite(torch.zeros_like(values), values) == int((~torch.isfinite(exact)).sum()) > 0
    assert adds_nonfinite(values, values) == 0


def test_base_names_unwrap_wrappers():
    assert base_name("module.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert base_name("_fsdp_wrapped_module.model._checkpoint_wrapped_module.layers.0._orig_mod.w") == "model.layers.0.w"
    assert base_name("model.norm.weight") == "model.norm.weight"


class DataParallelLike(torch.nn.Module):
    """Names its child `module`, as DDP and FSDP do."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_peft_and_ddp_wrapped_models(models):
    from peft import LoraConfig, get_peft_model

    base, edited, delta = models
    # Edit the attention projections LoRA wraps, so the delta lands on `...q_proj.base_layer.weight`.
    target = tiny_llama()
    with torch.no_grad():
        target.model.layers[1].self_attn.q_proj.weight[0] += 1
        target.model.layers[0].self_attn.v_proj.weight[:, 2] = 0
    lora_delta = Delta.from_models(tiny_llama(), target)
    assert set(lora_delta.changes) == {"model.layers.1.self_attn.q_proj.weight",
                                       "model.layers.0.self_attn.v_proj.weight"}

    wrapped = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = snapshot(wrapped)
    lora_delta.apply(wrapped)
    inner = wrapped.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight
    assert torch.equal(inner, target.model.layers[1].self_attn.q_proj.weight)
    delta.apply(wrapped)
    # A delta built from two wrapped models has the same base names, and applies to the wrapped one.
    again = Delta.from_models(get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])),
                              wrapped)
    assert set(again.changes) == set(delta.changes) | set(lora_delta.changes)
    after = snapshot(wrapped)
    delta.revert(wrapped)
    lora_delta.revert(wrapped)
    assert same(snapshot(wrapped), before)
    again.apply(wrapped)
    assert same(snapshot(wrapped), after)
    again.revert(wrapped)
    assert same(snapshot(wrapped), before)

    parallel = DataParallelLike(tiny_llama())
    delta.apply(parallel)
    assert same({k.removeprefix("module."): v for k, v in snapshot(parallel).items()}, snapshot(edited))


def test_tied_weights_are_diffed_once():
    base, edited = tiny_llama(tie=True), tiny_llama(tie=True)
    with torch.no_grad():
        edited.model.embed_tokens.weight[4] = 0
    delta = Delta.from_models(base, edited)
    assert list(delta.changes) == ["model.embed_tokens.weight"]
    delta.apply(base)
    assert torch.equal(base.lm_head.weight[4], torch.zeros(16))


def test_mmedit_load_applies_all_or_nothing(tmp_path, models):
    _, edited, delta = models
    delta.save(tmp_path / "a.safetensors")
    model = mmedit.load(tiny_llama(), deltas=[tmp_path / "a.safetensors"])
    assert same(snapshot(model), snapshot(edited))
    fresh = tiny_llama()
    before = snapshot(fresh)
    with pytest.raises(MmeditError, match="does not fit"):
        mmedit.load(fresh, deltas=[delta, delta])  # the second one no longer fits; the first is reverted
    assert same(snapshot(fresh), before)

    # Two deltas stacked on the same tensor, then one that does not fit: the two are reverted last-first
    # (the other order is refused by the stack check and would leave them applied), the error is the misfit.
    first, second = tiny_llama(), tiny_llama()
    with torch.no_grad():
        second.model.embed_tokens.weight[3] += 1
    third = copy.deepcopy(second)
    with torch.no_grad():
        third.model.embed_tokens.weight[3] += 1
    stacked = [Delta.from_models(first, second), Delta.from_models(second, third)]
    with pytest.raises(MmeditError, match="does not fit"):
        mmedit.load(fresh, deltas=[*stacked, delta, delta])
    assert same(snapshot(fresh), before) and applied_stack(fresh) == []


def test_bf16_model_keeps_dtype_and_bits():
    base, edited = tiny_llama(dtype=torch.bfloat16), edit(tiny_llama(dtype=torch.bfloat16))
    delta = Delta.from_models(base, edited)
    assert {change.dtype for change in delta.changes.values()} == {torch.bfloat16}
    before = snapshot(base)
    with delta.applied(base):
        assert same(snapshot(base), snapshot(edited))
    assert same(snapshot(base), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_model_is_edited_in_place(models):
    _, edited, delta = models
    model = tiny_llama().cuda()
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    delta.apply(model)
    assert all(p.device.type == "cuda" and p.data_ptr() == pointers[n] for n, p in model.named_parameters())
    assert same({k: v.cpu() for k, v in snapshot(model).items()}, snapshot(edited))
    delta.revert(model)
    assert same({k: v.cpu() for k, v in snapshot(model).items()}, snapshot(tiny_llama()))
    assert Delta.from_models(tiny_llama().cuda(), edited.cuda(), provenance={"plugin": "test"}).checksum == delta.checksum
