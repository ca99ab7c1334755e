"""Property tests: random edits over random dtypes, shapes and sparsity round-trip exactly.

Values are random *bits* (NaN payloads, -0.0, inf, subnormals included), so every comparison is bitwise.
Together they cover more than 1000 random edited tensors.
"""
import copy

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mmedit.delta import Delta
from mmedit.delta.change import bits
from mmedit.errors import MmeditError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool]
PATTERNS = ["rows", "zero_rows", "columns", "elements", "dense"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def random_tensor(shape, dtype, generator):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    ints = bits(torch.empty(0, dtype=dtype)).dtype
    info = torch.iinfo(ints)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=torch.int64).to(ints).view(dtype)


def flipped(tensor):
    """Every element changed: one bit flipped."""
    return ~tensor if tensor.dtype == torch.bool else (bits(tensor) ^ 1).view(tensor.dtype)


def edited(base, pattern, density, generator):
    new = base.clone()
    if pattern == "dense":
        return random_tensor(base.shape, base.dtype, generator)
    if pattern == "elements" or base.dim() == 0:
        mask = torch.rand(base.shape, generator=generator) < density
        bits(new)[mask] = bits(flipped(base))[mask]
        return new
    axis = base.dim() - 1 if pattern == "columns" else 0
    rows = (torch.rand(base.shape[axis], generator=generator) < density).nonzero().flatten()
    values = base.index_select(axis, rows)
    values = torch.zeros_like(values) if pattern == "zero_rows" else flipped(values)
    bits(new).index_copy_(axis, rows, bits(values))
    return new


def module_with(tensors):
    module = torch.nn.Module()
    for name, tensor in tensors.items():
        module.register_buffer(name, tensor.clone())
    return module


def state(module):
    return {name: tensor.clone() for name, tensor in module.named_buffers()}


def same(first, second):
    return first.keys() == second.keys() and all(
        first[key].dtype == second[key].dtype and torch.equal(bits(first[key]), bits(second[key])) for key in first
    )


def same_change(a, b):
    pairs = [(a.old, b.old), (a.new, b.new), (a.index, b.index)]
    return (a.kind, a.shape, a.dtype, a.axis) == (b.kind, b.shape, b.dtype, b.axis) and all(
        (x is None and y is None)
        or (x is not None and y is not None and x.dtype == y.dtype and torch.equal(bits(x), bits(y)))
        for x, y in pairs
    )


tensor_spec = st.tuples(
    st.sampled_from(DTYPES),
    st.lists(st.integers(1, 9), min_size=0, max_size=3),
    st.sampled_from(PATTERNS),
    st.sampled_from([0.02, 0.1, 0.3, 0.6, 0.9]),
)


@settings(max_examples=400, **SETTINGS)
@given(specs=st.lists(tensor_spec, min_size=3, max_size=3), seed=st.integers(0, 2**31 - 1))
def test_save_load_apply_revert_roundtrip(tmp_path_factory, specs, seed):
    generator = torch.Generator().manual_seed(seed)
    base, new = {}, {}
    for number, (dtype, shape, pattern, density) in enumerate(specs):
        name = f"p{number}"
        base[name] = random_tensor(shape, dtype, generator)
        new[name] = edited(base[name], pattern, density, generator)
    delta = Delta.from_changes({name: (base[name], new[name]) for name in base}, provenance={"seed": seed},
                               allow_nonfinite=True)
    for name, change in delta.changes.items():  # the chosen encoding is never larger than dense or elements
        item, changed = base[name].element_size(), int((bits(base[name]) != bits(new[name])).sum())
        stored = sum(t.numel() * t.element_size() for t in change.file_tensors(name).values())
        assert stored <= min(2 * base[name].numel() * item, changed * (4 + 2 * item))
        event(f"kind {change.kind}" + (f" axis {change.axis}" if change.axis else ""))
    assert all(name in delta.changes for name in base if not torch.equal(bits(base[name]), bits(new[name])))

    path = tmp_path_factory.mktemp("d") / "delta.safetensors"
    delta.save(path)
    loaded = Delta.load(path)
    assert loaded.changes.keys() == delta.changes.keys()
    assert all(same_change(loaded.changes[name], delta.changes[name]) for name in delta.changes)
    assert loaded.provenance["seed"] == seed and loaded.checksum == delta.checksum

    model = module_with(base)
    loaded.apply(model, allow_nonfinite=True)
    assert same(state(model), new)
    loaded.revert(model)
    assert same(state(model), base)


def stack_of_deltas(base, count, patterns, overlap, generator):
    """`count` deltas applied one on another: each edits w by a random pattern; with `overlap`, every one
    also sets the same elements to values no other state has (base ^ number of deltas applied)."""
    shared = torch.rand(base["w"].shape, generator=generator) < (0.5 if overlap else 0.0)
    shared.view(-1)[0] = overlap
    states, deltas = [base], []
    for number, pattern in enumerate(patterns[:count], 1):
        state = {"v": flipped(states[-1]["v"]) if number == 1 else states[-1]["v"].clone(),
                 "w": edited(states[-1]["w"], pattern, 0.4, generator)}
        bits(state["w"])[shared] = bits(base["w"])[shared] ^ number
        deltas.append(Delta.from_changes({k: (states[-1][k], state[k]) for k in base}, allow_nonfinite=True,
                                         provenance={"number": number}))
        states.append(state)
    return deltas, states


@settings(max_examples=150, **SETTINGS)
@given(dtype=st.sampled_from([dtype for dtype in DTYPES if dtype != torch.bool]),
       shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), count=st.integers(2, 4),
       patterns=st.lists(st.sampled_from(PATTERNS), min_size=4, max_size=4), overlap=st.booleans(),
       seed=st.integers(0, 2**31 - 1), data=st.data())
def test_stacked_deltas_revert_only_last_first(dtype, shape, count, patterns, overlap, seed, data):
    """Apply k deltas, then revert in a random order: any delta but the last applied is refused and leaves
    the model as it was; the last one restores the state before it, bit for bit. On the model itself the
    stack it keeps decides, whatever the deltas touch; on a copy (stack unknown) the values do, which
    needs deltas that change the same elements (`overlap`)."""
    generator = torch.Generator().manual_seed(seed)
    base = {"v": random_tensor([4], dtype, generator), "w": random_tensor(shape, dtype, generator)}
    deltas, states = stack_of_deltas(base, count, patterns, overlap, generator)

    model = module_with(base)
    if overlap:
        later = data.draw(st.integers(1, count - 1), label="applied too early")
        with pytest.raises(MmeditError, match=" w does not hold the delta's original values"):
            deltas[later].apply(model, allow_nonfinite=True)
        assert same(state(model), base)  # v, checked first, would have fit: all or nothing
    for delta, expected in zip(deltas, states[1:]):
        delta.apply(model, allow_nonfinite=True)
        assert same(state(model), expected)

    targets = [(model, "must be reverted first")] + [(copy.deepcopy(model), "new values")] * overlap
    for target, refusal in targets:
        applied = list(range(count))
        while applied:  # each pass over a random order reverts at least the last delta applied
            for chosen in data.draw(st.permutations(applied), label="revert order"):
                before = state(target)
                if chosen != applied[-1]:
                    with pytest.raises(MmeditError, match=refusal):
                        deltas[chosen].revert(target)
                    assert same(state(target), before)
                    continue
                deltas[chosen].revert(target)
                applied.pop()
                assert same(state(target), states[len(applied)])
