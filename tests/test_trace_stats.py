"""Streaming statistics equal the statistics of the fully materialised activations."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmedit import safefile
from mmedit.data import batches
from mmedit.errors import MmeditError
from mmedit.trace import FORMS
from mmedit.trace.stats import Accumulator, TraceStats
from mmedit.trace.tracer import last_prompt_position, position_groups


def _stream(chunks, masks, grads=None, tau=0.1):
    accumulator = Accumulator(tau)
    for index, (chunk, mask) in enumerate(zip(chunks, masks)):
        grad = None if grads is None else grads[index]
        accumulator.add("llm.0", "multimodal", chunk, {"all": mask}, grad)
    return accumulator.result({"sites": [{"name": "llm.0"}]})


@settings(max_examples=40, deadline=None)
@given(
    batches=st.integers(1, 5),
    tokens=st.integers(1, 9),
    width=st.integers(1, 6),
    shift=st.floats(-50, 50),
    seed=st.integers(0, 10_000),
)
def test_streamed_equals_materialised(batches, tokens, width, shift, seed):
    generator = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(2, tokens, width, generator=generator) * 3 + shift for _ in range(batches)]
    grads = [torch.randn(2, tokens, width, generator=generator) for _ in range(batches)]
    masks = [torch.rand(2, tokens, generator=generator) > 0.3 for _ in range(batches)]
    masks[0][0, 0] = True  # at least one position
    stats = _stream(chunks, masks, grads)

    z = torch.cat([c[m] for c, m in zip(chunks, masks)]).double()
    g = torch.cat([c[m] for c, m in zip(grads, masks)]).double()
    close = dict(rtol=1e-10, atol=1e-10)  # float64 from the float32 values: rounding only
    assert stats.count("llm.0") == z.shape[0]
    torch.testing.assert_close(stats.mean("llm.0"), z.mean(0), **close)
    torch.testing.assert_close(stats.mean_abs("llm.0"), z.abs().mean(0), **close)
    torch.testing.assert_close(stats.var("llm.0"), z.var(0, unbiased=False), **close)
    torch.testing.assert_close(stats.sum_sq("llm.0"), z.square().sum(0), **close)
    torch.testing.assert_close(stats.active("llm.0"), (z.abs() > 0.1).sum(0).double())
    torch.testing.assert_close(stats.grad_mean_abs("llm.0"), g.abs().mean(0), **close)
    torch.testing.assert_close(stats.grad_mean_sq("llm.0"), g.square().mean(0), **close)
    torch.testing.assert_close(stats.grad_mean_z("llm.0"), (g * z).mean(0), **close)


def test_merge_equals_one_pass():
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(1, 5, 3, generator=generator) for _ in range(4)]
    masks = [torch.ones(1, 5, dtype=torch.bool)] * 4
    whole = _stream(chunks, masks)
    merged = _stream(chunks[:2], masks[:2]).merge(_stream(chunks[2:], masks[2:]))
    for key in whole.tensors:
        torch.testing.assert_close(merged.tensors[key], whole.tensors[key])


def _relative_error(streamed: torch.Tensor, exact: torch.Tensor) -> float:
    return ((streamed - exact).abs() / exact).max().item()


@pytest.mark.parametrize("mean, std, batch_count, positions", [(1e3, 0.1, 6, 1000), (10.0, 0.1, 8, 4096)])
def test_variance_is_exact_far_from_zero(mean, std, batch_count, positions):
    """mean/std = 1e4 and the issue's mean/std = 100 over 8 x 4,096, streamed and merged from two halves.
    Relative errors of the variance: float32 batch sums 4e1 and 6e-3, float32 batch moments 7e-5 and 1e-6;
    E[z^2] - E[z]^2 even in float64 5e-8 (mean/std = 1e4); centred float64 batch moments merged by Chan
    et al. ~4e-12 (the shifted group's mean offset from the batch shift costs float64 epsilon x offset x
    mean / std^2)."""
    generator = torch.Generator().manual_seed(1)
    chunks = [torch.randn(1, positions, 8, generator=generator) * std + mean for _ in range(batch_count)]
    masks = [torch.rand(1, positions, generator=generator) > 0.2 for _ in range(batch_count)]
    halves = [torch.rand(1, positions, generator=generator) > 0.5 for _ in range(batch_count)]
    chunks[1][0, halves[1][0]] += 3 * std  # a group whose mean sits away from the batch shift
    exact = {}
    for group, picked in (("all", masks), ("half", [m & h for m, h in zip(masks, halves)])):
        z = torch.cat([c[m] for c, m in zip(chunks, picked)]).double()
        exact[group] = z.var(0, unbiased=False)  # two-pass float64 reference

    def stream(indices):
        accumulator = Accumulator()
        for i in indices:
            accumulator.add("llm.0", "multimodal", chunks[i], {"all": masks[i], "half": masks[i] & halves[i]})
        return accumulator.result({"sites": [{"name": "llm.0"}]})

    middle = batch_count // 2
    whole = stream(range(batch_count))
    merged = stream(range(middle)).merge(stream(range(middle, batch_count)))
    for stats in (whole, merged):
        for group, variance in exact.items():
            assert _relative_error(stats.var("llm.0", group=group), variance) < 1e-10


def test_gradient_means_count_positions_with_gradients():
    """A site that gets gradients in only some batches: gradient means divide by those batches' positions."""
    generator = torch.Generator().manual_seed(2)
    chunks = [torch.randn(2, 6, 3, generator=generator) for _ in range(4)]
    grads = [torch.randn(2, 6, 3, generator=generator) if i % 2 else None for i in range(4)]
    masks = [torch.rand(2, 6, generator=generator) > 0.3 for _ in range(4)]
    stats = _stream(chunks, masks, grads)
    with_grads = [i for i, grad in enumerate(grads) if grad is not None]
    z = torch.cat([chunks[i][masks[i]] for i in with_grads]).double()
    g = torch.cat([grads[i][masks[i]] for i in with_grads]).double()
    counted = stats.tensors["llm.0/multimodal/all/grad_n"].item()
    assert counted == g.shape[0] < stats.count("llm.0")
    close = dict(rtol=1e-12, atol=0.0)
    for streamed in (stats, _stream(chunks[:2], masks[:2], grads[:2]).merge(_stream(chunks[2:], masks[2:], grads[2:]))):
        torch.testing.assert_close(streamed.grad_mean_abs("llm.0"), g.abs().mean(0), **close)
        torch.testing.assert_close(streamed.grad_mean_sq("llm.0"), g.square().mean(0), **close)
        torch.testing.assert_close(streamed.grad_mean_z("llm.0"), (g * z).mean(0), **close)
        assert streamed.count("llm.0") == sum(m.sum().item() for m in masks)


def test_forms_have_one_definition():
    assert FORMS is batches.FORMS


def test_old_format_is_one_clear_error(tmp_path):
    old = tmp_path / "old.safetensors"
    safefile.save(old, {"llm.0/multimodal/all/n": torch.ones(1)}, "mmedit_trace", {"format": "mmedit.trace/1"})
    with pytest.raises(MmeditError, match="unsupported trace format .*mmedit.trace/2"):
        TraceStats.load(old)


def test_save_load_round_trip(tmp_path):
    masks = [torch.ones(1, 4, dtype=torch.bool)] * 2
    stats = _stream([torch.randn(1, 4, 3), torch.randn(1, 4, 3)], masks, [torch.randn(1, 4, 3), None])
    path = stats.save(tmp_path / "s.safetensors")
    loaded = TraceStats.load(path)
    assert loaded.meta == stats.meta
    assert all(torch.equal(loaded.tensors[k], v) for k, v in stats.tensors.items())
    with pytest.raises(MmeditError, match="exists"):
        stats.save(path)
    stats.save(path, force=True)


def test_bad_files(tmp_path):
    with pytest.raises(MmeditError, match="not found"):
        TraceStats.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(MmeditError, match="not a readable safetensors"):
        TraceStats.load(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, plain)
    with pytest.raises(MmeditError, match="not an mmedit trace file"):
        TraceStats.load(plain)


def test_missing_statistics_name_the_site():
    stats = _stream([torch.randn(1, 4, 3)], [torch.ones(1, 4, dtype=torch.bool)])
    with pytest.raises(MmeditError, match="llm.7"):
        stats.mean("llm.7")
    stats.meta["dead_sites"] = ["llm.0"]
    with pytest.raises(MmeditError, match="dead branch"):
        stats.grad_mean_abs("llm.0")


def test_position_groups():
    pad = torch.tensor([[False, False, False, False, True], [False, False, False, False, False]])
    image = torch.tensor([[False, True, False, False, False], [False, True, True, False, False]])
    answer = torch.tensor([[False, False, False, True, False], [False, False, False, False, False]])
    groups = position_groups({"pad": pad, "image": image, "text": ~pad & ~image, "answer": answer})
    # Row 0: last prompt token precedes the first answer token; row 1 has no answer: last real token.
    assert groups["last"].nonzero().tolist() == [[0, 2], [1, 4]]
    assert groups["all"].sum() == 9 and groups["image"].sum() == 3 and groups["answer"].sum() == 1
    assert not last_prompt_position(~pad, answer)[0, 4]
