"""CUDA paths, each checked against the same work on the CPU. Skipped where there is no GPU (CI has none);
on a GPU machine: `python -m pytest tests/test_gpu.py`."""
import json
import os
import subprocess
import sys

import pytest
import torch
from test_plugins_conformance import conforms, make_rows, state, unchanged
from typer.testing import CliRunner

from mmedit import zoo
from mmedit.arch import model_map
from mmedit.cli.main import app
from mmedit.data.batches import make_batches
from mmedit.data.rows import write_jsonl
from mmedit.delta import Delta
from mmedit.loading import load
from mmedit.plugins import apply_plugin, available, get
from mmedit.plugins.mip_editor.search import find_paths
from mmedit.trace import trace

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

FAMILIES = ("llava", "qwen2_5_vl", "idefics3")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return make_rows(tmp_path_factory.mktemp("gpu-rows"))


@pytest.fixture(scope="module", params=FAMILIES)
def model_dir(request, tmp_path_factory):
    return zoo.tiny(request.param, root=tmp_path_factory.getbasetemp() / "zoo")


@pytest.fixture(autouse=True)
def full_precision_convolutions():
    """cuDNN convolutions (patch embeddings) default to TF32, ~1e-3 relative error: compare in fp32."""
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = allowed


def test_trace_on_gpu_equals_cpu(model_dir, rows):
    cpu_model, processor = load(model_dir, device="cpu")
    gpu_model, _ = load(model_dir, device="cuda")
    batches = [*make_batches(rows, processor, "multimodal", batch_size=4),
               *make_batches(rows, processor, "text", batch_size=8)]
    mapping = model_map(cpu_model)
    fisher = [name for name, _ in cpu_model.named_parameters()
              if (mapping.part_of(name) or (None,))[0] == "llm" and "mlp" in name][:2]  # text batches reach these
    on_cpu = trace(cpu_model, batches, grads=True, fisher_params=fisher, progress=False)
    before = state(gpu_model)
    on_gpu = trace(gpu_model, batches, grads=True, fisher_params=fisher, progress=False)
    assert unchanged(gpu_model, before)
    assert all(p.device.type == "cuda" for p in gpu_model.parameters())
    assert on_gpu.tensors.keys() == on_cpu.tensors.keys() and on_gpu.meta["dead_sites"] == on_cpu.meta["dead_sites"]
    for key, expected in on_cpu.tensors.items():
        got = on_gpu.tensors[key]
        assert got.device.type == "cpu" and got.dtype == expected.dtype, key
        if key.endswith("/active"):  # a count of |z| > tau: values at the threshold may land either side
            assert float((got - expected).abs().max()) <= 2, key
        else:
            scale = max(1.0, float(expected.abs().max()))
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5 * scale,
                                       msg=lambda message, key=key: f"{key}: {message}")


@pytest.mark.parametrize("name", sorted(available()))
def test_plugin_conforms_on_gpu(name, model_dir, rows, tmp_path):
    """The whole conformance contract (parts, provenance, exact revert, same seed -> same bytes) with the
    model on the GPU, and the GPU edit against the same edit made on the CPU: the same tensors change;
    at least 99 % of their weights agree within two optimiser steps' worth."""
    model, processor = load(model_dir, device="cuda")
    conforms(name, model, processor, rows, tmp_path)
    plugin = get(name)
    short = {"max_steps": 2} if "max_steps" in {f.name for f in plugin.options()} else {}
    forget, retain = rows[:4], rows[4:]
    on_gpu = apply_plugin(name, model, processor, forget, retain, short, seed=3, progress=False)
    cpu_model, _ = load(model_dir, device="cpu")
    on_cpu = apply_plugin(name, cpu_model, processor, forget, retain, short, seed=3, progress=False)
    assert on_gpu.changes.keys() == on_cpu.changes.keys()
    lr = float(plugin.configure(short).__dict__.get("lr", 0.0))
    edited = {}
    for delta, label in ((on_gpu, "gpu"), (on_cpu, "cpu")):
        copy, _ = load(model_dir, device="cpu")
        Delta.load(delta.save(tmp_path / f"{name}-{label}.safetensors")).apply(copy)  # GPU deltas load on CPU
        edited[label] = dict(copy.named_parameters())
    for key in on_cpu.changes:
        # 2 Adam steps move a weight by at most ~2 lr, and device rounding can flip the sign of a tiny
        # gradient; a selection (MANU's top alpha %, MIP-Editor's top-k) can swap near-tied neurons
        close = (edited["gpu"][key] - edited["cpu"][key]).abs() <= 4 * lr + 1e-5
        assert close.float().mean() >= 0.99, f"{key}: {1 - close.float().mean():.2%} of the weights differ"


def test_paths_on_gpu_batched_equal_loop_and_cpu(rows, tmp_path):
    model_dir = zoo.tiny("llava", root=tmp_path / "zoo")
    cpu_model, processor = load(model_dir, device="cpu")
    gpu_model, _ = load(model_dir, device="cuda")
    options = dict(steps=3, top_k=3)
    batched = find_paths(gpu_model, processor, rows, **options)
    loop = find_paths(gpu_model, processor, rows, loop=True, **options)
    on_cpu = find_paths(cpu_model, processor, rows, **options)
    assert list(batched.neurons) == list(loop.neurons) == list(on_cpu.neurons)
    assert batched.meta["shared_prefix"]["llm"]["cached"] >= 1  # the key/value cache path ran on the GPU too
    for site in batched.neurons:
        for other in (loop, on_cpu):
            assert set(batched.neurons[site].tolist()) == set(other.neurons[site].tolist()), site
            torch.testing.assert_close(batched.scores[site].sort().values, other.scores[site].sort().values,
                                       rtol=1e-3, atol=1e-5)


def test_bfloat16_on_gpu(rows, tmp_path):
    """bf16 weights on the GPU: trace statistics stay float64 and finite; an edit reverts bit for bit."""
    model, processor = load(zoo.tiny("llava", root=tmp_path / "zoo"), device="cuda", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    stats = trace(model, make_batches(rows, processor, "multimodal", batch_size=4), grads=True, progress=False)
    assert all(t.dtype in (torch.float64, torch.float32) and bool(t.isfinite().all()) for t in stats.tensors.values())
    before = state(model)
    delta = apply_plugin("ga", model, processor, rows[:4], rows[4:], {"max_steps": 3, "lr": 1e-3}, progress=False)
    assert unchanged(model, before) and delta.changes
    assert all(change.dtype == torch.bfloat16 for change in delta.changes.values())
    delta.apply(model)
    assert not unchanged(model, before)
    delta.revert(model)
    assert unchanged(model, before)


def test_cli_on_gpu(rows, tmp_path):
    """trace, apply and merge with --device cuda through Typer; `mmedit demo --fast --device cuda` (trace,
    every plugin, eval) as a real process."""
    model_dir = zoo.tiny("llava", root=tmp_path / "zoo")
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    write_jsonl(rows[:4], forget)
    write_jsonl(rows[4:], retain)
    runner = CliRunner()
    traced = runner.invoke(app, ["trace", str(model_dir), "--data", str(forget), "--device", "cuda",
                                 "--out", str(tmp_path / "trace.safetensors")])
    assert traced.exit_code == 0, traced.output
    delta_file = tmp_path / "mmu.safetensors"
    applied = runner.invoke(app, ["apply", "mmunlearner", str(model_dir), "--forget", str(forget), "--retain",
                                  str(retain), "--set", "max_steps=2", "--device", "cuda", "--out", str(delta_file)])
    assert applied.exit_code == 0, applied.output
    merged = runner.invoke(app, ["merge", str(model_dir), str(delta_file), "--device", "cuda",
                                 "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    edited, _ = load(tmp_path / "merged", device="cpu")
    base, _ = load(model_dir, device="cpu")
    Delta.load(delta_file).apply(base)
    assert all(torch.equal(p, dict(edited.named_parameters())[n]) for n, p in base.named_parameters())

    env = dict(os.environ, OMP_NUM_THREADS="1", MMEDIT_CACHE=str(tmp_path / "cache"))
    demo = subprocess.run([sys.executable, "-m", "mmedit.cli.main", "demo", "--fast", "--device", "cuda",
                           "--out", str(tmp_path / "demo")], capture_output=True, text=True, timeout=900, env=env)
    assert demo.returncode == 0, demo.stderr
    record = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert record["settings"]["device"] == "cuda"
    assert not [method["error"] for method in record["methods"] if method.get("error")]
