"""Big-model dispatch (issue 12 item 3): a model loaded with a device map (transformers/accelerate hooks,
modules offloaded to "disk" or, with accelerate's cpu_offload, to CPU memory beside their execution device)
gives the same statistics, deltas and evaluation as the plain model, and deltas change each parameter where
it lives (an offloaded one in its hook's weights map; the checkpoint file is never written).

On this machine there is one device, the CPU: the maps put some modules on "cpu" and offload others, so
every path runs through accelerate's hooks (checked: hf_device_map, _hf_hook, meta parameters)."""
import gc
import hashlib
import json

import pytest
import torch
from typer.testing import CliRunner

from mmedit import zoo
from mmedit.checkpoint import merge
from mmedit.cli.main import app
from mmedit.data.batches import make_batches
from mmedit.data.rows import write_jsonl
from mmedit.delta import Delta
from mmedit.errors import MmeditError
from mmedit.eval.harness import evaluate
from mmedit.loading import input_device, load, offloaded_values, read_device_map
from mmedit.plan import parse_max_memory, plan_for, preflight, weights_per_device
from mmedit.plugins import apply_plugin
from mmedit.trace import trace

from test_trace import job_rows  # noqa: E402

runner = CliRunner()
LLM = "model.language_model"
# whole blocks: the projector and the second decoder layer offloaded to disk, the rest on the CPU
DISK = {"model.vision_tower": "cpu", "model.multi_modal_projector": "disk", f"{LLM}.embed_tokens": "cpu",
        f"{LLM}.layers.0": "cpu", f"{LLM}.layers.1": "disk", f"{LLM}.norm": "cpu", f"{LLM}.rotary_emb": "cpu",
        "lm_head": "cpu"}
# every attention block offloaded to disk, the MLPs (the neurons MANU prunes), projector and norms resident
ATTENTION = {"model.vision_tower.embeddings": "cpu", "model.vision_tower.pre_layrnorm": "cpu",
             "model.vision_tower.post_layernorm": "cpu", "model.multi_modal_projector": "cpu",
             f"{LLM}.embed_tokens": "cpu", f"{LLM}.norm": "cpu", f"{LLM}.rotary_emb": "cpu", "lm_head": "cpu"}
for _layer in range(2):
    for _tower, _norms in (("model.vision_tower.encoder", ("layer_norm1", "layer_norm2")),
                           (LLM, ("input_layernorm", "post_attention_layernorm"))):
        ATTENTION[f"{_tower}.layers.{_layer}.self_attn"] = "disk"
        ATTENTION |= {f"{_tower}.layers.{_layer}.{module}": "cpu" for module in ("mlp", *_norms)}
DOWN = f"{LLM}.layers.1.mlp.down_proj.weight"  # offloaded to disk by DISK
PROJECTOR = "model.multi_modal_projector.linear_1.weight"  # offloaded to disk by DISK


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return zoo.tiny("llava", root=tmp_path_factory.getbasetemp() / "zoo")


@pytest.fixture(scope="module")
def plain(tiny):
    return load(tiny, device="cpu")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return job_rows(tmp_path_factory.mktemp("dispatch-images"), options=True)


def dispatched(tiny, device_map=DISK):
    """The tiny model loaded with `device_map`, checked to run through accelerate's hooks."""
    model, processor = load(tiny, device_map=device_map)
    assert model.hf_device_map == device_map and hasattr(model, "_hf_hook")
    beside_gpu = any(type(device) is int for device in device_map.values())  # then "cpu" is offload too
    offloaded = [name for name, device in device_map.items() if device == "disk" or beside_gpu and device == "cpu"]
    for name in offloaded:
        module = model.get_submodule(name)
        assert all(p.is_meta for p in module.parameters()) and any(
            hasattr(m, "_hf_hook") for m in module.modules())
    return model, processor


def cpu_offloaded(tiny, module: str):
    """The tiny model with accelerate's cpu_offload on one module (execution device cpu): its parameters on
    meta, their values in a plain dict weights map, the tensors the model held."""
    from accelerate import cpu_offload

    model, processor = load(tiny, device="cpu")
    cpu_offload(model.get_submodule(module), execution_device=torch.device("cpu"))
    assert all(p.is_meta for p in model.get_submodule(module).parameters())
    return model, processor


def values(model) -> dict[str, torch.Tensor]:
    """Every parameter's values where they live (an offloaded one's from its weights map), as copies."""
    return {name: offloaded_values(model, p, name).detach().clone() for name, p in model.named_parameters()}


def logits(model, processor, rows):
    batch = next(make_batches(rows, processor, "multimodal", batch_size=len(rows), with_answer=True))
    with torch.no_grad():
        return model(**{k: v.to(input_device(model)) for k, v in batch.inputs.items()}).logits


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_delta(model, names=(DOWN, PROJECTOR, f"{LLM}.layers.0.mlp.up_proj.weight"), seed=3) -> Delta:
    """A delta changing a few rows of each named parameter (offloaded ones included), made on `model`."""
    generator, changes = torch.Generator().manual_seed(seed), {}
    for name in names:
        old = offloaded_values(model, model.get_parameter(name), name).detach()
        new = old.clone()
        new[1:4] += torch.randn(new[1:4].shape, generator=generator)
        changes[name] = (old, new)
    return Delta.from_changes(changes, provenance={"what": "test edit"}, model=model)


# ---- dispatch, forward, tracing -------------------------------------------------------------------------
def test_dispatched_forward_and_values_equal_the_plain_model(tiny, plain, rows):
    model, processor = dispatched(tiny)
    assert input_device(model) == torch.device("cpu")
    assert model.get_parameter(DOWN).is_meta  # offloaded: its values are in the hook's weights map
    assert all(torch.equal(values(model)[name], p) for name, p in plain[0].named_parameters())
    assert torch.equal(logits(model, processor, rows), logits(*plain, rows))


def test_trace_with_gradients_gives_the_plain_statistics(tiny, plain, rows):
    """Exact: on one device the hooks only move tensors to where they already are (no arithmetic differs)."""
    model, processor = dispatched(tiny)
    stats = []
    for each, proc in (plain, (model, processor)):
        batches = list(make_batches(rows, proc, form="multimodal", batch_size=2, with_answer=True))
        stats.append(trace(each, batches, grads=True, progress=False))
    assert stats[0].tensors.keys() == stats[1].tensors.keys() and stats[0].tensors
    for key, tensor in stats[0].tensors.items():
        assert torch.equal(tensor, stats[1].tensors[key]), key
    assert stats[0].meta["dead_sites"] == stats[1].meta["dead_sites"]
    # tracing left accelerate's hooks in place: the offloaded modules still load their weights
    assert hasattr(model.get_submodule(f"{LLM}.layers.1.mlp.down_proj"), "_old_forward")
    assert torch.equal(logits(model, processor, rows), logits(*plain, rows))


# ---- deltas where the parameters live ------------------------------------------------------------------
def test_apply_and_revert_write_where_each_parameter_lives(tiny, plain, rows):
    model, processor = dispatched(tiny)
    before, checkpoint = values(model), sha256(tiny / "model.safetensors")
    delta = edit_delta(plain[0])
    with delta.applied(plain[0]):
        expected = logits(*plain, rows)
        edited = {name: p.detach().clone() for name, p in plain[0].named_parameters()}
    delta.apply(model)
    assert model.get_parameter(DOWN).is_meta  # still offloaded: the new values are in its weights map
    assert all(torch.equal(values(model)[name], tensor) for name, tensor in edited.items())
    assert torch.equal(logits(model, processor, rows), expected)  # the forward sees the edit
    delta.revert(model)
    after = values(model)
    assert all(torch.equal(after[name].view(torch.int32), tensor.view(torch.int32)) for name, tensor in before.items())
    assert torch.equal(logits(model, processor, rows), logits(*plain, rows))
    assert sha256(tiny / "model.safetensors") == checkpoint  # disk offload never writes the checkpoint


def test_cpu_offloaded_weights_map_is_changed_in_place(tiny, plain, rows):
    layer = f"{LLM}.layers.1.mlp"
    model, processor = cpu_offloaded(tiny, layer)
    held = model.get_submodule(f"{layer}.down_proj")._hf_hook.weights_map
    delta = edit_delta(plain[0], names=(DOWN,))
    with delta.applied(plain[0]):
        expected = logits(*plain, rows)
    before = held["weight"].clone()
    with delta.applied(model):
        assert not torch.equal(held["weight"], before)  # the weights map's own tensor holds the edit
        assert torch.equal(logits(model, processor, rows), expected)
    assert torch.equal(held["weight"].view(torch.int32), before.view(torch.int32))


def test_tied_weights_offloaded_to_disk_change_together(tmp_path):
    """PaliGemma ties lm_head to the input embeddings; both modules offloaded to disk read the same file
    entry, so the edited embedding must reach both (the logits of the edited plain model, exactly)."""
    path = zoo.tiny("paligemma", root=tmp_path / "zoo")
    plain, _ = load(path, device="cpu")
    embeddings = f"{LLM}.embed_tokens.weight"
    model, _ = dispatched(path, {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
                                 f"{LLM}.embed_tokens": "disk", f"{LLM}.layers": "cpu", f"{LLM}.norm": "cpu",
                                 f"{LLM}.rotary_emb": "cpu", "lm_head": "disk"})
    assert model.lm_head.weight is model.get_parameter(embeddings) and model.lm_head.weight.is_meta
    old = plain.get_parameter(embeddings).detach()
    new = old.clone()
    new[3:9] += 1.0
    delta = Delta.from_changes({embeddings: (old, new)}, model=plain)
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with delta.applied(plain):
            expected = plain(input_ids=ids).logits
        with delta.applied(model):
            assert torch.equal(model(input_ids=ids).logits, expected)
        assert torch.equal(model(input_ids=ids).logits, base)


def test_a_meta_tensor_no_hook_holds_is_refused(plain):
    with torch.device("meta"):
        bare = torch.nn.Linear(3, 2)
    delta = Delta.from_changes({"weight": (torch.zeros(2, 3), torch.ones(2, 3))})
    with pytest.raises(MmeditError, match="weight is on the meta device and no accelerate hook holds"):
        delta.apply(bare)


def test_mmedit_load_with_deltas_and_a_device_map(tiny, plain, rows, tmp_path):
    import mmedit

    path = edit_delta(plain[0]).save(tmp_path / "edit.safetensors")
    model = mmedit.load(tiny, deltas=[path], device_map=DISK)
    assert model.hf_device_map == DISK and model.get_parameter(DOWN).is_meta
    with Delta.load(path).applied(plain[0]):
        assert all(torch.equal(values(model)[name], p) for name, p in plain[0].named_parameters())


def test_merge_with_a_device_map_writes_the_plain_bytes(tiny, plain, tmp_path):
    path = edit_delta(plain[0]).save(tmp_path / "edit.safetensors")
    merge(tiny, [path], tmp_path / "plain", progress=False)
    merge(tiny, [path], tmp_path / "mapped", device="auto", placement={"device_map": DISK}, progress=False)
    files = sorted(item.name for item in (tmp_path / "plain").iterdir())
    assert files == sorted(item.name for item in (tmp_path / "mapped").iterdir()) and "model.safetensors" in files
    for name in files:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "mapped" / name).read_bytes(), name


# ---- plugins --------------------------------------------------------------------------------------------
def test_manu_gives_the_same_delta_with_attention_offloaded(tiny, plain, rows):
    model, processor = dispatched(tiny, ATTENTION)
    options = {"parts": "llm,vision"}
    deltas = [apply_plugin("manu", each, proc, rows[:2], rows[2:], options, progress=False)
              for each, proc in (plain, (model, processor))]
    assert deltas[0].changes and deltas[0].checksum == deltas[1].checksum


def same_training(plain, mapped, name, options, rows) -> None:
    """`name` on the plain and the dispatched model: the same touched elements and originals, new values
    within 1e-6 (float32; on one device in fact the same arithmetic), and the dispatched model unchanged."""
    deltas = [apply_plugin(name, each, proc, rows[:2], rows[2:], options, progress=False) for each, proc in (plain, mapped)]
    assert deltas[0].changes.keys() == deltas[1].changes.keys() and deltas[0].changes
    for key, change in deltas[0].changes.items():
        other = deltas[1].changes[key]
        assert change.kind == other.kind and torch.equal(change.old, other.old)
        assert (change.index is None) == (other.index is None) and (change.index is None or torch.equal(change.index, other.index))
        assert torch.allclose(change.new_values(), other.new_values(), rtol=0, atol=1e-6), key
    assert all(torch.equal(values(mapped[0])[n], p) for n, p in plain[0].named_parameters())


def test_rmu_trains_resident_mlps_through_offloaded_attention(tiny, plain, rows):
    """RMU trains the MLPs of layers 0..1 while both attention blocks are offloaded to disk: the loss's
    gradient passes through the hooks' onloaded attention weights."""
    options = {"layer": 1, "forms": "text", "max_steps": 2, "lr": 1e-3, "batch_size": 2}
    same_training(plain, dispatched(tiny, ATTENTION), "rmu", options, rows)


@pytest.mark.parametrize("name", ["ga", "graddiff", "npo", "kl_min"])
def test_training_plugins_on_a_dispatched_model(tiny, plain, rows, name):
    """The LLM trains (text rows) on a model whose vision tower and projector are offloaded to disk."""
    vision_off = {"model.vision_tower": "disk", "model.multi_modal_projector": "disk", LLM: "cpu", "lm_head": "cpu"}
    options = {"parts": "llm", "forms": "text", "max_steps": 2, "lr": 1e-3, "batch_size": 2}
    same_training(plain, dispatched(tiny, vision_off), name, options, rows)


def test_mip_editor_through_offloaded_attention(tiny, plain, rows):
    """MIP-Editor's path search, pruning and row-restricted training of the LLM's MLPs, attention offloaded."""
    options = {"side": "text", "forms": "text", "layer": 1, "max_steps": 2, "batch_size": 2}
    same_training(plain, dispatched(tiny, ATTENTION), "mip_editor", options, rows)


def test_fisher_of_an_offloaded_parameter_is_refused(tiny, rows):
    """MMUnlearner's saliency needs every weight of its scope resident: a Fisher parameter on meta is one line."""
    model, processor = dispatched(tiny, ATTENTION)
    batches = make_batches(rows, processor, form="text", batch_size=2, with_answer=True)
    with pytest.raises(MmeditError, match=r"Fisher parameter not in the model, or offloaded .*layers\.0\.self_attn"):
        trace(model, batches, fisher_params=[f"{LLM}.layers.0.self_attn.q_proj.weight"], progress=False)


def test_training_the_projector_through_offloaded_attention(tiny, plain, rows):
    options = {"parts": "projector", "max_steps": 2, "lr": 1e-3, "batch_size": 2}
    same_training(plain, dispatched(tiny, ATTENTION), "ga", options, rows)


def test_training_an_offloaded_parameter_is_refused_in_one_line(tiny, plain, rows):
    model, processor = dispatched(tiny, ATTENTION)
    with pytest.raises(MmeditError, match=r"self_attn\.\w+_proj\.weight is offloaded by the device map .* "
                                          "--max-memory or a --device-map"):
        apply_plugin("ga", model, processor, rows[:2], rows[2:], {"parts": "llm", "max_steps": 1}, progress=False)
    assert all(torch.equal(values(model)[n], p) for n, p in plain[0].named_parameters())  # nothing changed


def test_evaluation_is_the_same(tiny, plain, rows):
    model, processor = dispatched(tiny)
    options = dict(batch_size=2, max_new_tokens=3, progress=False)
    assert evaluate(*plain, {"forget": rows}, **options) == evaluate(model, processor, {"forget": rows}, **options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (benchmarks/gpu_check.sh runs it)")
def test_gpu_map_with_cpu_offload(tiny, plain, rows, monkeypatch):
    """On a GPU: modules on cuda:0, the projector and the second decoder layer offloaded to CPU memory. The
    forward and the statistics match the CPU model to float tolerance (other kernels); a delta applies and
    reverts bit for bit on the GPU parameters and in the offloaded ones' CPU weights maps."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the patch embedding in float32 as on the CPU
    gpu_map = {name: "cpu" if device == "disk" else 0 for name, device in DISK.items()}
    model, processor = dispatched(tiny, gpu_map)
    assert input_device(model) == torch.device("cuda:0") and model.get_parameter(DOWN).is_meta
    assert model.get_parameter(f"{LLM}.layers.0.mlp.up_proj.weight").device.type == "cuda"
    assert torch.allclose(logits(model, processor, rows).cpu(), logits(*plain, rows), rtol=1e-4, atol=1e-4)
    stats = []
    for each, proc in (plain, (model, processor)):
        batches = list(make_batches(rows, proc, form="multimodal", batch_size=2, with_answer=True))
        stats.append(trace(each, batches, grads=True, progress=False))
    for key, tensor in stats[0].tensors.items():  # "active" counts |z| > tau: a value at tau may flip by one
        tolerance = dict(rtol=0, atol=1.0) if key.endswith("/active") else dict(rtol=1e-3, atol=1e-5)
        assert torch.allclose(tensor, stats[1].tensors[key].cpu(), **tolerance), key
    before = values(model)
    delta = edit_delta(plain[0])
    with delta.applied(model):
        assert offloaded_values(model, model.get_parameter(DOWN), DOWN).device.type == "cpu"
        assert not torch.equal(values(model)[DOWN], before[DOWN])
    after = values(model)
    assert all(torch.equal(after[name].cpu().view(torch.int32), t.cpu().view(torch.int32)) for name, t in before.items())


# ---- the plan ---------------------------------------------------------------------------------------------
def test_plan_splits_the_weights_as_the_map_does(tiny, plain):
    mapped = plan_for("trace", str(tiny), device="cpu", grads=True, device_map=DISK)
    alone = plan_for("trace", str(tiny), device="cpu", grads=True)
    disk = sum(p.numel() * 4 for name, p in plain[0].named_parameters()
               if name.startswith(("model.multi_modal_projector.", f"{LLM}.layers.1.")))
    total = sum(p.numel() * 4 for p in plain[0].parameters())
    assert mapped.placement == {"cpu": total - disk, "disk": disk}
    # a backward through the offloaded layers holds their weights (autograd saves them) until it has passed
    assert mapped.per_device["disk"] == disk and mapped.per_device["cpu"] == alone.per_device["cpu"]
    forward = plan_for("eval", str(tiny), device="cpu", device_map=DISK)  # no backward: one layer at a time
    assert forward.per_device["cpu"] == plan_for("eval", str(tiny), device="cpu").per_device["cpu"] - disk
    assert mapped.to_json()["device_map"] == mapped.placement
    for strategy in ("sequential", "auto"):  # as transformers places the modules when it loads the model
        planned = plan_for("eval", str(tiny), device="cpu", device_map=strategy, max_memory={"cpu": 400_000})
        loaded, _ = load(tiny, device_map=strategy, max_memory={"cpu": 400_000})
        assert planned.placement == weights_per_device(planned.model, loaded.hf_device_map)
        assert 0 < planned.placement["cpu"] <= 400_000 and planned.placement["disk"] == total - planned.placement["cpu"]


def test_preflight_checks_each_device_of_the_map(tiny, monkeypatch):
    import mmedit.plan

    free = mmedit.plan.available_bytes
    monkeypatch.setattr(mmedit.plan, "available_bytes", lambda label: 1_000_000 if label == "cpu" else free(label))
    with pytest.raises(MmeditError, match=r"trace needs about .* on cpu with this device map \(.* of weights\), "
                                          r"976.6 KiB available; move modules off cpu"):
        preflight("trace", str(tiny), device="auto", device_map="sequential", max_memory={"cpu": 400_000})
    monkeypatch.undo()
    assert preflight("trace", str(tiny), device="auto", device_map=DISK).per_device["disk"] > 0


def test_cli_plan_with_a_device_map(tiny, plain, files):
    result = runner.invoke(app, ["plan", "trace", str(tiny), "--grads", "--device-map", str(files / "map.json"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    expected = plan_for("trace", str(tiny), device="cpu", grads=True, device_map=DISK)
    assert found["device_map"] == expected.placement and found["per_device"] == expected.per_device
    assert found["fits"]["cpu"] is True and "disk" not in found["fits"]
    table = runner.invoke(app, ["plan", "ga", str(tiny), "--device-map", "sequential", "--max-memory", "0=400KB,cpu=1GB"])
    assert table.exit_code == 0 and "per device (execution on cuda:0)" in table.output  # a plan for GPUs not here
    assert "cuda:0" in table.output and "390.6 KiB" in table.output  # the bound, beside the weights placed


def test_max_memory_syntax():
    assert parse_max_memory("0=20GiB, cuda:1=1e9,cpu=60GB,disk=1TB") == {
        0: 20 << 30, 1: 10**9, "cpu": 60 * 10**9, "disk": 10**12}
    for bad in ("0:20GiB", "gpu=1GB", "cpu=lots", "", "cpu=1GB,cpu=2GB"):
        with pytest.raises(MmeditError, match="--max-memory"):
            parse_max_memory(bad)


# ---- the CLI ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tiny, plain, rows, tmp_path_factory):
    """rows.jsonl, a data folder (forget10 / retain90), the DISK map as map.json and a delta (edit.safetensors)."""
    folder = tmp_path_factory.mktemp("dispatch-cli")
    write_jsonl(rows, folder / "rows.jsonl")
    (folder / "data").mkdir()
    write_jsonl(rows[:2], folder / "data" / "forget10.jsonl")
    write_jsonl(rows[2:], folder / "data" / "retain90.jsonl")
    (folder / "map.json").write_text(json.dumps(DISK))
    edit_delta(plain[0]).save(folder / "edit.safetensors")
    return folder


def test_cli_trace_with_a_strategy_and_max_memory(tiny, files, tmp_path, monkeypatch):
    """sequential with a small CPU bound offloads the later modules to disk, into a temporary folder that
    is removed afterwards; the statistics (with gradients) are the plain run's, exactly."""
    import tempfile

    from mmedit.trace import TraceStats

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    common = ["trace", str(tiny), "--data", str(files / "rows.jsonl"), "--grads", "--forms", "multimodal",
              "--top", "0", "--batch-size", "2"]
    plain = runner.invoke(app, common + ["--out", str(tmp_path / "plain.safetensors"), "--device", "cpu"])
    mapped = runner.invoke(app, common + ["--out", str(tmp_path / "mapped.safetensors"), "--device-map",
                                          "sequential", "--max-memory", "cpu=400KB"])
    assert plain.exit_code == 0 and mapped.exit_code == 0, mapped.output
    assert "device map: 2 module(s) on cpu, 2 module(s) on disk (offloaded)" in mapped.output
    first, second = (TraceStats.load(tmp_path / f"{name}.safetensors") for name in ("plain", "mapped"))
    assert first.tensors.keys() == second.tensors.keys()
    assert all(torch.equal(tensor, second.tensors[key]) for key, tensor in first.tensors.items())
    gc.collect()  # the model of the in-process run is freed (a real run's process ends)
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary offload folder went with the model


def test_cli_apply_with_a_map_file(tiny, files, tmp_path):
    (tmp_path / "attention.json").write_text(json.dumps(ATTENTION))
    common = ["apply", "manu", str(tiny), "--forget", str(files / "rows.jsonl"), "--retain",
              str(files / "rows.jsonl"), "--set", "parts=llm,vision"]
    plain = runner.invoke(app, common + ["--out", str(tmp_path / "plain.safetensors"), "--device", "cpu"])
    mapped = runner.invoke(app, common + ["--out", str(tmp_path / "mapped.safetensors"), "--device-map",
                                          str(tmp_path / "attention.json")])
    assert plain.exit_code == 0 and mapped.exit_code == 0, mapped.output
    first, second = (Delta.load(tmp_path / f"{name}.safetensors") for name in ("plain", "mapped"))
    assert first.changes and first.checksum == second.checksum


def test_cli_eval_and_merge_with_a_map(tiny, plain, files, tmp_path):
    data, delta = files / "data", files / "edit.safetensors"
    reports = []
    for name, extra in (("plain", ["--device", "cpu"]), ("mapped", ["--device-map", str(files / "map.json")])):
        result = runner.invoke(app, ["eval", str(tiny), "--data", str(data), "--delta", str(delta), "--batch-size",
                                     "2", "--max-new-tokens", "3", "--out", str(tmp_path / f"{name}.json"), *extra])
        assert result.exit_code == 0, result.output
        reports.append(json.loads((tmp_path / f"{name}.json").read_text()))
    assert reports[0]["results"] == reports[1]["results"]
    assert reports[0]["comparison"] == reports[1]["comparison"]
    assert reports[1]["settings"]["placed"] == {key: str(value) for key, value in DISK.items()}
    for name, extra in (("plain", []), ("mapped", ["--device-map", str(files / "map.json")])):
        result = runner.invoke(app, ["merge", str(tiny), str(delta), "--out", str(tmp_path / f"merged-{name}"), *extra])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "merged-plain" / "model.safetensors").read_bytes() == \
        (tmp_path / "merged-mapped" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("content, extra, message", [
    ({"model.vision_tower": "gpu", "": "cpu"}, [], "-> 'gpu': a device is cpu, disk, a GPU index N"),
    ({"model.no_such_module": "cpu", "": "cpu"}, [], "names 'model.no_such_module', which is no module"),
    ([["model", "cpu"]], [], "must be a JSON object"),
    ("{not json", [], "device map"),
    ({"model.vision_tower": 0, "": "cpu"}, ["--device", "cpu"], "--device cpu contradicts the device map, which "
                                                                 "puts modules on GPU 0"),
    ({"": "cpu"}, ["--max-memory", "cpu=1GB"], "--max-memory bounds a --device-map strategy; a device map file"),
    (None, ["--device-map", "sequential", "--max-memory", "cpu:1GB"], "write DEVICE=SIZE pairs"),
    (None, ["--max-memory", "cpu=1GB"], "--max-memory bounds a --device-map strategy (auto, balanced, sequential)"),
    (None, ["--offload-dir", "somewhere"], "--offload-dir is where --device-map offloads to disk"),
    (None, ["--device-map", "everywhere"], "neither auto, balanced, sequential nor a JSON file"),
    (None, ["--device-map", "balanced", "--device", "cuda:1"], "contradicts --device-map balanced, which picks"),
    pytest.param({"model.vision_tower": "cuda:3", "": "cpu"}, [], "the device map uses GPU 3, but this machine has",
                 marks=pytest.mark.skipif(torch.cuda.device_count() > 3, reason="this machine has a GPU 3")),
])
@pytest.mark.parametrize("command", ["trace", "apply", "eval", "merge"])
def test_cli_bad_placement_is_one_line_and_writes_nothing(tiny, files, tmp_path, content, extra, message, command):
    if content is not None:
        (tmp_path / "bad.json").write_text(content if isinstance(content, str) else json.dumps(content))
        extra = ["--device-map", str(tmp_path / "bad.json"), *extra]
    rows = str(files / "rows.jsonl")
    out = tmp_path / "out.safetensors"
    args = {"trace": ["trace", str(tiny), "--data", rows, "--out", str(out)],
            "apply": ["apply", "manu", str(tiny), "--forget", rows, "--retain", rows, "--out", str(out)],
            "eval": ["eval", str(tiny), "--data", str(files / "data"), "--out", str(out)],
            "merge": ["merge", str(tiny), str(files / "edit.safetensors"), "--out", str(tmp_path / "merged")]}[command]
    result = runner.invoke(app, args + extra)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in " ".join(result.output.split()), \
        result.output
    assert not out.exists() and not (tmp_path / "merged").exists()


def test_read_device_map_normalises_gpus(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"a": "cuda", "b": "cuda:1", "c": 2, "d": "cpu", "e": "disk"}))
    assert read_device_map(tmp_path / "map.json") == {"a": 0, "b": 1, "c": 2, "d": "cpu", "e": "disk"}
    assert read_device_map("balanced") == "balanced"
