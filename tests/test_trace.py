"""The nnsight tracer against plain torch hooks + torch.autograd, on a tiny model of every family."""
import subprocess
import sys

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mmedit import zoo
from mmedit.arch import model_map
from mmedit.cli.main import app
from mmedit.data.batches import make_batches
from mmedit.data.rows import Row, write_jsonl
from mmedit.errors import MmeditError
from mmedit.loading import load
from mmedit.trace import TraceStats, trace
from mmedit.trace.tracer import position_groups


JOBS = ["glassblower", "a pilot", "judge", "baker"]


def job_rows(folder, options: bool = False) -> list[Row]:
    """Four people, pictures of four sizes; with `options`, multiple choice over the four jobs."""
    made = []
    for i, answer in enumerate(JOBS):
        image = Image.new("RGB", (32 + 8 * i, 32), (50 * i, 180 - 30 * i, 90))
        image.paste((255, 255, 255), (4, 4, 12 + i, 14))
        image.save(folder / f"p{i}.png")
        made.append(Row(id=f"p{i}", entity=f"Person {i}", image=folder / f"p{i}.png",
                        question="What is this person's job?", text_question=f"What is Person {i}'s job?",
                        answer=answer, options=tuple(JOBS) if options else None, correct=i if options else None,
                        where=f"rows.jsonl:{i + 1}"))
    return made


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return job_rows(tmp_path_factory.mktemp("trace-images"))


@pytest.fixture(scope="module", params=zoo.FAMILIES)
def loaded(request, tmp_path_factory):
    path = zoo.tiny(request.param, root=tmp_path_factory.getbasetemp() / "zoo")
    model, processor = load(path, device="cpu")
    return model, processor


def _hooked(model, sites, inputs):
    """Plain-torch reference: each site's tensor (kept in the graph) and the loss."""
    seen, handles = {}, []
    for site in sites:
        module = model.get_submodule(site.module)
        if site.io == "input":
            handles.append(module.register_forward_pre_hook(lambda m, a, n=site.name: seen.__setitem__(n, a[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, a, o, n=site.name: seen.__setitem__(n, o)))
    try:
        loss = model(**inputs).loss
    finally:
        for handle in handles:
            handle.remove()
    return seen, loss


def test_trace_matches_hooks_and_autograd(loaded, rows):
    model, processor = loaded
    mapping = model_map(model)
    batches = [*make_batches(rows, processor, "multimodal", batch_size=2),
               *make_batches(rows, processor, "text", batch_size=4)]
    stats = trace(model, batches, grads=True, progress=False)

    # Reference: materialise every activation and gradient with hooks, then reduce.
    reference: dict[tuple[str, str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    dead = set()
    for batch in batches:
        sites = [s for s in mapping.sites if "pixel_values" in batch.inputs or s.name not in mapping.image_only]
        seen, loss = _hooked(model, sites, batch.inputs)
        grads = torch.autograd.grad(loss, [seen[s.name] for s in sites], allow_unused=True)
        groups = position_groups(mapping.token_masks(batch.inputs, batch.inputs["labels"]))
        for site, grad in zip(sites, grads):
            value = seen[site.name].detach()
            if grad is None:
                dead.add(site.name)
                grad = torch.full_like(value, float("nan"))
            masks = groups if site.part == "llm" else {"all": torch.ones(value.shape[:-1], dtype=torch.bool)}
            for group, mask in masks.items():
                reference.setdefault((site.name, batch.form, group), []).append((value[mask], grad[mask]))

    assert set(stats.meta["dead_sites"]) == dead
    assert dead <= set(mapping.expected_dead) | dead  # reported, whatever the config says
    for (site, form, group), pieces in reference.items():
        z = torch.cat([p[0] for p in pieces]).double()
        g = torch.cat([p[1] for p in pieces]).double()
        assert stats.count(site, form, group) == z.shape[0]
        if z.shape[0] == 0:
            continue
        torch.testing.assert_close(stats.mean(site, form, group), z.mean(0), rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(stats.var(site, form, group), z.var(0, unbiased=False), rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(stats.active(site, form, group), (z.abs() > 0.1).sum(0).double())
        if site in dead:
            with pytest.raises(MmeditError, match="dead branch"):
                stats.grad_mean_abs(site, form, group)
        else:
            torch.testing.assert_close(stats.grad_mean_abs(site, form, group), g.abs().mean(0), rtol=1e-7, atol=1e-12)
            torch.testing.assert_close(stats.grad_mean_z(site, form, group), (g * z).mean(0), rtol=1e-7, atol=1e-12)
    # Text-only batches never reach the image-only sites.
    assert not any(site in mapping.image_only for site, form, _ in reference if form == "text")
    assert {s["name"] for s in stats.sites} == {s.name for s in mapping.sites}


def test_trace_leaves_the_model_untouched(loaded, rows):
    model, processor = loaded
    batch = next(make_batches(rows, processor, "multimodal", batch_size=2))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(**batch.inputs).logits
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    trace(model, [batch], grads=True, progress=False)
    with torch.no_grad():
        assert torch.equal(model(**batch.inputs).logits, expected)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert not any("forward" in vars(m) or "__nnsight__" in vars(m) for m in model.modules())


def test_fisher_is_mean_squared_batch_gradient(rows):
    model, processor = load(zoo.tiny("llava"), device="cpu")
    batches = list(make_batches(rows, processor, "multimodal", batch_size=2))
    names = ["model.language_model.layers.0.mlp.down_proj.weight", "model.multi_modal_projector.linear_1.weight"]
    stats = trace(model, batches, parts=("llm",), fisher_params=names, progress=False)
    params = dict(model.named_parameters())
    for name in names:
        squares = [torch.autograd.grad(model(**b.inputs).loss, params[name])[0].square() for b in batches]
        torch.testing.assert_close(stats.fisher(name), torch.stack(squares).mean(0), rtol=1e-5, atol=1e-12)


def test_dead_branch_is_reported(tmp_path, rows):
    model, processor = load(zoo.tiny("llava"), device="cpu")
    model.config.vision_feature_layer = -2
    model.model.config.vision_feature_layer = -2
    mapping = model_map(model)
    last = mapping.sites_of("vision")[-1].name
    assert last in mapping.expected_dead
    stats = trace(model, make_batches(rows, processor, "multimodal", batch_size=2), grads=True, progress=False)
    assert stats.meta["dead_sites"] == [last]
    assert stats.mean(last).shape[0] == mapping.site(last).width  # activations still recorded
    with pytest.raises(MmeditError, match="dead branch"):
        stats.grad_mean_abs(last)


def test_bad_trace_arguments(rows):
    model, processor = load(zoo.tiny("llava"), device="cpu")
    batches = list(make_batches(rows, processor, "multimodal", batch_size=2, with_answer=False))
    with pytest.raises(MmeditError, match="labels"):
        trace(model, batches, grads=True, progress=False)
    with pytest.raises(MmeditError, match="unknown part"):
        trace(model, batches, parts=("decoder",), progress=False)
    with pytest.raises(MmeditError, match="nothing was traced"):
        trace(model, [], progress=False)
    with pytest.raises(MmeditError, match="not in the model"):
        trace(model, batches, fisher_params=["no.such.weight"], progress=False)


def test_trace_cli(tmp_path, rows):
    data = tmp_path / "rows.jsonl"
    write_jsonl(rows, data)
    model_dir = str(zoo.tiny("llava"))
    runner = CliRunner()
    out = tmp_path / "stats.safetensors"
    before = torch.get_num_threads()
    result = runner.invoke(app, ["trace", model_dir, "--data", str(data), "--grads", "--out", str(out),
                                 "--plot", str(tmp_path / "heat.png"), "--batch-size", "3", "--threads", "2"])
    threads = torch.get_num_threads()
    torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    assert threads == 2
    assert "llm.1" in result.output and (tmp_path / "heat.png").stat().st_size > 1000
    stats = TraceStats.load(out)
    assert stats.meta["data"]["rows"] == 4 and stats.meta["options"]["grads"]
    assert stats.forms == ["multimodal", "text"]

    again = runner.invoke(app, ["trace", model_dir, "--data", str(data), "--out", str(out)])
    assert again.exit_code == 1 and "exists" in again.output
    bad = runner.invoke(app, ["trace", model_dir, "--data", str(data), "--out", str(tmp_path / "x.st"),
                              "--parts", "vision,decoder"])
    assert bad.exit_code == 1 and "unknown part decoder" in bad.output

    # The installed console script, as a user runs it.
    process = subprocess.run(
        [sys.executable, "-m", "mmedit.cli.main", "trace", model_dir, "--data", str(data), "--forms", "text",
         "--parts", "llm", "--out", str(tmp_path / "text.safetensors"), "--top", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 0, process.stderr
    assert TraceStats.load(tmp_path / "text.safetensors").forms == ["text"]
