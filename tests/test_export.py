"""`mmedit export DELTA --peft OUT`: the PEFT LoRA adapter is the delta. On three families, row and
zeroed-row changes (with biases, embeddings and patch convolutions) across vision, projector and LLM load
with PeftModel.from_pretrained and give the merged model's logits; merge_and_unload gives Delta.apply's
weights; a MANU delta (zeroed CLIP fc1 rows and biases) exports exactly; element and dense changes are
refused, or with --rank approximated with the relative error printed; bad input is one line, nothing written."""
import re
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from typer.testing import CliRunner

from mmedit import zoo
from mmedit.arch import PARTS, model_map
from mmedit.bench.profiles import generate
from mmedit.cli.main import app
from mmedit.data import read_rows
from mmedit.data.batches import make_batches
from mmedit.delta import Delta
from mmedit.errors import MmeditError
from mmedit.export import to_peft
from mmedit.loading import load

FAMILIES = ("llava", "qwen2_5_vl", "idefics3")
ROWS = ("rows", "zeroed_rows")


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory):
    """Each family's tiny model with random biases (the zoo's are zero, and zeroing a zero is no edit),
    as checkpoint folders under this root: {family}/ and {family}-other/ (other weights, same shapes)."""
    root = tmp_path_factory.mktemp("bases")
    for family in FAMILIES:
        for suffix, seed in (("", 0), ("-other", 1)):
            model, processor = load(zoo.tiny(family, root=root / "zoo", seed=seed), device="cpu", dtype="float32")
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if name.endswith(".bias"):
                        parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
            model.save_pretrained(root / f"{family}{suffix}")
            processor.save_pretrained(root / f"{family}{suffix}")
    return root


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    bench = generate(tmp_path_factory.mktemp("bench"), n_people=10, seed=0).root
    return read_rows(bench / "forget10.jsonl")[:2] + read_rows(bench / "retain90.jsonl")[:4]


def fresh(family, zoo_root):
    return load(zoo_root / family, device="cpu", dtype="float32")


def row_delta(model, seed=0) -> Delta:
    """Per part, the first site's neurons 1 and 4: zeroed (weights and biases) in the vision tower and the
    projector, new random rows in the LLM; the columns of the module reading them; two rows of every
    embedding and patch convolution."""
    generator, params, changes = torch.Generator().manual_seed(seed), dict(model.named_parameters()), {}

    def put(name, index, axis, zero=False):
        old = params[name].detach()
        new = old.clone()
        view = new.movedim(axis, 0)
        view[index] = 0 if zero else torch.randn(view[index].shape, generator=generator)
        changes[name] = (old, new)

    mapping = model_map(model)
    for part in PARTS:
        site = mapping.sites_of(part)[0]
        for producer in site.producers:
            put(producer.param, [1, 4], producer.axis, zero=part != "llm")
        if site.io == "input":
            put(f"{site.module}.weight", [0, 2], 1)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.Conv2d, torch.nn.Conv3d)):
            put(f"{name}.weight", [0, 3], 0)
    return Delta.from_changes(changes, model=model)


def logits(model, rows, processor):
    with torch.no_grad():
        return torch.cat([model(**batch.inputs).logits.reshape(-1)
                          for form in ("multimodal", "text")
                          for batch in make_batches(rows, processor, form, batch_size=3)])


def compare(family, zoo_root, delta, adapter, rows) -> float:
    """Max |logit difference| between the adapter (PeftModel) and the merged model (Delta.apply); also
    checks merge_and_unload gives Delta.apply's weights and that the edit moves the logits at all."""
    merged, processor = fresh(family, zoo_root)
    base_logits = logits(merged, rows, processor)
    delta.apply(merged)
    expected = logits(merged, rows, processor)
    assert (expected - base_logits).abs().max() > 1e-3  # the edit is visible: the comparison means something
    peft_model = PeftModel.from_pretrained(fresh(family, zoo_root)[0], adapter).eval()
    difference = float((logits(peft_model, rows, processor) - expected).abs().max())
    assert difference <= 1e-5, difference
    unloaded = {name: p.detach() for name, p in peft_model.merge_and_unload().named_parameters()}
    applied = {name: p.detach() for name, p in merged.named_parameters()}
    assert sorted(unloaded) == sorted(applied)
    worst = max(float((unloaded[name] - applied[name]).abs().max()) for name in applied)
    assert worst <= 1e-6, worst
    return difference


@pytest.mark.parametrize("family", FAMILIES)
def test_row_changes_across_parts_are_the_adapter_exactly(family, zoo_root, rows, tmp_path):
    model, _ = fresh(family, zoo_root)
    delta = row_delta(model)
    assert {change.kind for change in delta.changes.values()} <= set(ROWS)
    assert {where[0] for where in delta.where.values() if where} == set(PARTS)
    assert any(change.axis == 1 for change in delta.changes.values())
    assert any(name.endswith(".bias") for name in delta.changes)  # zeroed with their vision neurons
    result = to_peft(delta, tmp_path / "adapter", base=model)
    # Rank k per module: k changed slices; biases stored whole.
    for name, change in delta.changes.items():
        module, _, attribute = name.rpartition(".")
        if attribute == "weight":
            assert result.ranks[module] == change.index.numel()
    assert result.biases == sorted(name for name in delta.changes if name.endswith(".bias"))
    assert result.errors == {}
    difference = compare(family, zoo_root, delta, tmp_path / "adapter", rows)
    print(f"{family}: max |logit difference| {difference:.3g}")


def test_embedding_columns_export_exactly(zoo_root, rows, tmp_path):
    """Changed columns (axis 1) of the token embedding: the transposed construction, saved contiguously."""
    model, _ = fresh("llava", zoo_root)
    name = "model.language_model.embed_tokens.weight"
    old = dict(model.named_parameters())[name].detach()
    new = old.clone()
    new[:, [5, 2]] = torch.randn(new.shape[0], 2, generator=torch.Generator().manual_seed(3))
    delta = Delta.from_changes({name: (old, new)}, model=model)
    assert delta.changes[name].axis == 1
    to_peft(delta, tmp_path / "adapter", base=model)
    assert compare("llava", zoo_root, delta, tmp_path / "adapter", rows) <= 1e-5


def test_manu_zeroed_clip_fc1_rows_and_biases_export_exactly(zoo_root, rows, tmp_path):
    from mmedit.plugins import apply_plugin

    model, processor = fresh("llava", zoo_root)
    delta = apply_plugin("manu", model, processor, rows[:2], rows[2:], {"alpha": 10.0}, progress=False)
    fc1_biases = [name for name, change in delta.changes.items()
                  if re.fullmatch(r"model\.vision_tower\.encoder\.layers\.\d+\.mlp\.fc1\.bias", name)]
    assert fc1_biases and all(delta.changes[name].kind == "zeroed_rows" for name in fc1_biases)
    path = delta.save(tmp_path / "manu.safetensors")
    result = CliRunner().invoke(app, ["export", str(path), "--peft", str(tmp_path / "manu"),
                                      "--base", str(zoo_root / "llava")])
    assert result.exit_code == 0, result.output
    assert "exact" in result.output
    compare("llava", zoo_root, delta, tmp_path / "manu", rows)


def scattered_delta(model) -> Delta:
    """Five scattered elements of an LLM query projection and every element of the projector's second
    linear: element and dense changes."""
    generator, params = torch.Generator().manual_seed(3), dict(model.named_parameters())
    query, dense = "model.language_model.layers.0.self_attn.q_proj.weight", "model.multi_modal_projector.linear_2.weight"
    new_query = params[query].detach().clone()
    new_query[[0, 9, 17, 33, 60], [5, 12, 40, 2, 63]] += 3.0
    new_dense = params[dense].detach() + 0.05 * torch.randn(params[dense].shape, generator=generator)
    return Delta.from_changes({query: (params[query].detach(), new_query), dense: (params[dense].detach(), new_dense)},
                              model=model)


def test_element_and_dense_changes_are_refused_or_approximated_with_the_true_error(zoo_root, rows, tmp_path):
    model, _ = fresh("llava", zoo_root)
    delta = scattered_delta(model)
    assert sorted(change.kind for change in delta.changes.values()) == ["dense", "elements"]
    path = delta.save(tmp_path / "scattered.safetensors")
    base = str(zoo_root / "llava")
    refused = CliRunner().invoke(app, ["export", str(path), "--peft", str(tmp_path / "no"), "--base", base])
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1
    assert "model.language_model.layers.0.self_attn.q_proj.weight: a elements change has no exact low-rank form" \
        in refused.output and not (tmp_path / "no").exists()

    shown = CliRunner().invoke(app, ["export", str(path), "--peft", str(tmp_path / "svd"), "--base", base,
                                     "--rank", "2"], terminal_width=300)
    assert shown.exit_code == 0, shown.output
    printed = {name: float(value) for name, value in
               re.findall(r"^(\S+): truncated SVD, relative Frobenius error (\S+)$", shown.output, flags=re.M)}
    assert sorted(printed) == sorted(delta.changes)
    unloaded = dict(PeftModel.from_pretrained(fresh("llava", zoo_root)[0], tmp_path / "svd")
                    .merge_and_unload().named_parameters())
    original = dict(fresh("llava", zoo_root)[0].named_parameters())
    edited, _ = fresh("llava", zoo_root)
    edited = dict(delta.apply(edited).named_parameters())
    for name, error in printed.items():
        true = float(((unloaded[name] - edited[name]).norm() / (edited[name] - original[name]).norm()).detach())
        assert error == pytest.approx(true, rel=5e-3, abs=1e-6), name
        assert 0.05 < true < 1  # rank 2 of a rank-5 and a full-rank difference: approximate, not exact
    worst = max(printed, key=printed.get)
    assert f"worst relative error {shown.output.split('worst relative error ')[1].split()[0]} ({worst})" in shown.output

    # With enough rank the SVD is the change itself: the adapter gives the merged model's logits again.
    result = to_peft(delta, tmp_path / "full", base=model, rank=64)
    assert max(result.errors.values()) < 1e-6
    compare("llava", zoo_root, delta, tmp_path / "full", rows)


def one_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(zoo_root, tmp_path):
    llava, _ = fresh("llava", zoo_root)
    delta_path = row_delta(llava).save(tmp_path / "llava.safetensors")
    qwen_path = row_delta(fresh("qwen2_5_vl", zoo_root)[0]).save(tmp_path / "qwen.safetensors")
    base = str(zoo_root / "llava")
    target = tmp_path / "adapter"

    def run(*arguments):
        return CliRunner().invoke(app, ["export", *map(str, arguments)], terminal_width=400)

    line = one_line(run(qwen_path, "--peft", target, "--base", base))
    assert "does not fit" in line and "model.visual." in line
    other_weights = str(zoo_root / "llava-other")  # same architecture, other weights
    assert "does not hold the delta's original values" in one_line(run(delta_path, "--peft", target,
                                                                          "--base", other_weights))
    assert "no such delta file" in one_line(run(tmp_path / "missing.safetensors", "--peft", target, "--base", base))
    assert "--rank must be at least 1" in one_line(run(delta_path, "--peft", target, "--base", base, "--rank", "0"))
    assert not target.exists()

    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert "already exists; pass --force" in one_line(run(delta_path, "--peft", target, "--base", base))
    assert sorted(path.name for path in target.iterdir()) == ["keep.txt"]
    assert run(delta_path, "--peft", target, "--base", base, "--force").exit_code == 0
    assert sorted(path.name for path in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_without_base_the_header_names_it_and_partial_biases_need_it(zoo_root, rows, tmp_path):
    model, _ = fresh("llava", zoo_root)
    delta = row_delta(model)
    assert delta.provenance["base_model"]["name_or_path"] == str(zoo_root / "llava")
    with pytest.raises(MmeditError, match=r"fc1\.bias: the adapter stores whole biases .* pass --base MODEL"):
        to_peft(delta, tmp_path / "partial", rank=None)
    assert not (tmp_path / "partial").exists()
    weights_only = Delta({name: change for name, change in delta.changes.items() if not name.endswith(".bias")},
                         delta.provenance)
    to_peft(weights_only, tmp_path / "header")
    to_peft(weights_only, tmp_path / "based", base=model)
    from safetensors.torch import load_file

    header, based = load_file(tmp_path / "header" / "adapter_model.safetensors"), \
        load_file(tmp_path / "based" / "adapter_model.safetensors")
    assert sorted(header) == sorted(based) and all(torch.equal(header[key], based[key]) for key in header)
    compare("llava", zoo_root, weights_only, tmp_path / "header", rows)


def test_config_scaling_is_one_for_every_module(zoo_root, tmp_path):
    """PEFT's scaling alpha / r is 1 per module and globally (readers that ignore rank_pattern, like vLLM)."""
    import json

    model, _ = fresh("llava", zoo_root)
    result = to_peft(row_delta(model), tmp_path / "adapter", base=model)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == max(result.ranks.values()) and not config["use_rslora"]
    assert config["rank_pattern"] == config["alpha_pattern"] == {re.escape(m): r for m, r in result.ranks.items()}
    assert config["bias"] == "all" and config["modules_to_save"] is None
    peft_model = PeftModel.from_pretrained(fresh("llava", zoo_root)[0], tmp_path / "adapter")
    layers = {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules()
              if hasattr(module, "scaling") and "default" in getattr(module, "r", {})}
    assert sorted(layers) == sorted(result.ranks)
    assert all(layers[m].scaling["default"] == 1 and layers[m].r["default"] == r for m, r in result.ranks.items())


def test_the_command_runs_as_a_subprocess(zoo_root, tmp_path):
    model, _ = fresh("llava", zoo_root)
    path = row_delta(model).save(tmp_path / "d.safetensors")
    base = str(zoo_root / "llava")
    command = [sys.executable, "-m", "mmedit.cli.main", "export", str(path), "--base", base, "--peft"]
    done = subprocess.run([*command, str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and "wrote" in done.stdout
    again = subprocess.run([*command, str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'out'} already exists; pass --force to replace it"]


def test_tied_weights_are_refused(zoo_root, tmp_path):
    """A tensor two modules share (embeddings tied to lm_head) would get two LoRAs that merge twice."""
    model, _ = fresh("llava", zoo_root)
    embeddings = model.get_submodule("model.language_model.embed_tokens")
    model.lm_head.weight = embeddings.weight
    name = "model.language_model.embed_tokens.weight"
    new = embeddings.weight.detach().clone()
    new[[3, 7]] = 1.0
    delta = Delta.from_changes({name: (embeddings.weight.detach(), new)})
    with pytest.raises(MmeditError, match=r"shared by model\.language_model\.embed_tokens and lm_head \(tied"):
        to_peft(delta, tmp_path / "tied", base=model)
    assert not (tmp_path / "tied").exists()
