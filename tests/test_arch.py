"""ModelMap on every tiny family: sites exist, widths match real activations, producers really produce,
parts partition the parameters, token masks match what the model does with the image."""
import copy
import json
import types

import pytest
import torch
from PIL import Image

from mmedit import zoo
from mmedit.arch import FAMILIES, PARTS, model_map, register_family
from mmedit.arch.registry import family
from mmedit.data.batches import IGNORE, make_batches
from mmedit.data.rows import Row
from mmedit.errors import MmeditError
from mmedit.loading import load


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    made = []
    for i, (answer, size) in enumerate([("glassblower", (40, 30)), ("a pilot", (24, 48)), ("judge", (33, 33))]):
        image = Image.new("RGB", size, (60 * i, 200 - 50 * i, 90))
        image.paste((255, 255, 255), (2, 2, 10, 12))
        image.save(folder / f"p{i}.png")
        made.append(
            Row(id=f"p{i}", entity=f"Person {i}", image=folder / f"p{i}.png", question="What is this person's job?",
                text_question=f"What is Person {i}'s job?", answer=answer, where=f"rows.jsonl:{i + 1}")
        )
    return made


@pytest.fixture(scope="module", params=zoo.FAMILIES)
def loaded(request, tmp_path_factory, rows):
    """model, processor, map, a multimodal batch, and what one forward over it showed (_capture)."""
    path = zoo.tiny(request.param, root=tmp_path_factory.getbasetemp() / "zoo")
    model, processor = load(path, device="cpu")
    mm = model_map(model)
    batch = next(make_batches(rows, processor, "multimodal", batch_size=3))
    return model, processor, mm, batch, _capture(model, mm, batch.inputs)


def _capture(model, mm, inputs) -> dict:
    """One plain forward with hooks: each site's neuron tensor (by site name), the residual-stream
    outputs ("residual") and the keyword arguments the LLM was called with ("llm_kwargs")."""
    seen, handles = {"residual": []}, []

    def keep(name, value):
        seen[name] = value.detach().clone()

    for site in mm.sites:
        module = model.get_submodule(site.module)
        if site.io == "input":
            handles.append(module.register_forward_pre_hook(lambda mod, args, name=site.name: keep(name, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda mod, args, out, name=site.name: keep(name, out)))
    for path in mm.residual:
        hook = lambda mod, args, out: seen["residual"].append(out[0] if isinstance(out, tuple) else out)
        handles.append(model.get_submodule(path).register_forward_hook(hook))
    llm = model.get_submodule(mm.part_modules("llm")[0])
    hook = lambda mod, args, kwargs: seen.__setitem__("llm_kwargs", kwargs)
    handles.append(llm.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_sites_in_execution_order_with_real_widths(loaded):
    model, _, mm, _, seen = loaded
    parts = [site.part for site in mm.sites]
    assert parts == sorted(parts, key=PARTS.index)
    assert len(mm.sites_of("projector")) == 1 and len(mm.sites_of("vision")) >= 2 and len(mm.sites_of("llm")) == 2
    params = dict(model.named_parameters())
    for site in mm.sites:
        assert mm.site(site.name) is site
        assert site.name in seen, f"{site.module} did not run"
        assert seen[site.name].shape[-1] == site.width, site
        for producer in site.producers:
            assert params[producer.param].shape[producer.axis] == site.width
    assert mm.residual == tuple(site.module.rsplit(".mlp.", 1)[0] for site in mm.sites_of("llm"))


def test_zeroing_producers_silences_exactly_that_neuron(loaded):
    model, _, mm, batch, _ = loaded
    params = dict(model.named_parameters())
    saved = {name: value.detach().clone() for name, value in params.items()}
    try:
        with torch.no_grad():
            for site in mm.sites:
                for producer in site.producers:
                    params[producer.param].select(producer.axis, 1).zero_()
        activations = _capture(model, mm, batch.inputs)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
    for site in mm.sites:
        value = activations[site.name]
        assert torch.all(value[..., 1] == 0), site.name
        assert value[..., 0].abs().sum() > 0 and value[..., 2].abs().sum() > 0, site.name


def test_text_batches_run_exactly_the_sites_that_need_no_image(loaded, rows):
    model, processor, mm, _, _ = loaded
    text = next(make_batches(rows, processor, "text", batch_size=3))
    ran = set(_capture(model, mm, text.inputs)) & {site.name for site in mm.sites}
    assert ran == {site.name for site in mm.sites} - set(mm.image_only)
    assert {site.name for site in mm.sites_of("vision") + mm.sites_of("projector")} <= set(mm.image_only)


def test_parts_partition_parameters(loaded):
    model, _, mm, _, _ = loaded
    names = [name for name, _ in model.named_parameters()]
    by_part = {part: mm.parameters(part) for part in PARTS}
    assert sorted(sum(by_part.values(), [])) == sorted(names)
    for part, owned in by_part.items():
        assert owned, part
        for name in owned:
            assert mm.part_of(name)[0] == part
            assert any(name.startswith(root + ".") or name == root for root in mm.part_modules(part))
    for site in mm.sites:
        for producer in site.producers:
            assert mm.part_of(producer.param) == (site.part, site.layer)
    assert mm.part_of("not.a.parameter") is None


def test_token_masks_match_the_image_features_the_model_inserts(loaded):
    model, processor, mm, batch, seen = loaded
    ids = batch.inputs["input_ids"]
    masks = mm.token_masks(batch.inputs)
    assert set(masks) == {"image", "text", "answer", "pad"}
    assert torch.equal(masks["pad"], batch.inputs["attention_mask"] == 0)
    assert not (masks["image"] & masks["text"]).any() and torch.equal(masks["image"] | masks["text"], ~masks["pad"])
    embeds = seen["llm_kwargs"].get("inputs_embeds")
    if embeds is not None:
        # Positions whose LM input is not the token's own embedding are where image features went in.
        replaced = (embeds != model.get_submodule(mm.part_modules("llm")[0]).get_input_embeddings()(ids)).any(-1)
        assert replaced.any() and torch.equal(masks["image"], replaced)
    else:  # cross-attention family (mllama): the LM reads token ids; one <|image|> token per image
        assert masks["image"].sum(1).tolist() == [1] * len(batch.rows)
    for i, row in enumerate(batch.rows):
        answer = processor.tokenizer.decode(ids[i][masks["answer"][i]], skip_special_tokens=True)
        assert answer == row.answer
    assert not mm.token_masks(batch.inputs, labels=torch.full_like(ids, IGNORE))["answer"].any()


def test_residual_stream_is_the_decoder_layer_output(loaded):
    model, _, mm, batch, seen = loaded
    hidden = model.config.get_text_config().hidden_size
    assert len(seen["residual"]) == len(mm.residual)
    for tensor in seen["residual"]:
        assert tensor.shape == (*batch.inputs["input_ids"].shape, hidden)


def test_expected_dead_follows_vision_feature_layer():
    live, _ = zoo.build("llava")
    assert model_map(live).expected_dead == ()
    dead, _ = zoo.build("llava", config={"vision_feature_layer": -2})
    assert model_map(dead).expected_dead == ("vision.1",)
    both, _ = zoo.build("llava", config={"vision_feature_layer": [-3, -2]})
    assert model_map(both).expected_dead == ("vision.1",)


def test_unknown_model_type_names_the_supported_ones():
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="bert"))
    with pytest.raises(MmeditError, match="unsupported model_type 'bert'.*llava"):
        model_map(fake)
    with pytest.raises(MmeditError, match="expected a transformers model"):
        model_map(torch.nn.Linear(2, 2))


def _isolate_registry(monkeypatch):
    monkeypatch.setattr("mmedit.arch.registry.FAMILIES", dict(FAMILIES))
    monkeypatch.setattr("mmedit.arch.registry._loaded_env", set())


def _renamed(model_type: str) -> dict:
    entry = copy.deepcopy(family("llava"))
    entry["model_type"] = model_type
    return entry


def test_register_family_adds_a_family(monkeypatch):
    _isolate_registry(monkeypatch)
    model, _ = zoo.build("llava")
    model.config.model_type = "my_llava"
    with pytest.raises(MmeditError, match="unsupported"):
        model_map(model)
    register_family(_renamed("my_llava"))  # an architecture alone: no tiny-model recipe needed
    mm = model_map(model)
    assert mm.family == "my_llava" and len(mm.sites) == 5
    with pytest.raises(MmeditError, match="no tiny model for 'my_llava'"):
        zoo.build("my_llava")
    with pytest.raises(MmeditError, match="parts"):
        register_family({"model_type": "broken", "parts": {}})
    recipe = _renamed("with_recipe") | {"tiny": {"config": {}}}  # test recipes live in mmedit/zoo_recipes
    with pytest.raises(MmeditError, match="register_family \\(with_recipe\\): unknown key 'tiny'"):
        register_family(recipe)


def test_mmedit_families_directory_adds_a_family(tmp_path, monkeypatch):
    _isolate_registry(monkeypatch)
    (tmp_path / "mine.json").write_text(json.dumps(_renamed("env_llava")))
    monkeypatch.setenv("MMEDIT_FAMILIES", str(tmp_path))
    assert family("env_llava")["model_type"] == "env_llava"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.json").write_text("{not json")
    monkeypatch.setenv("MMEDIT_FAMILIES", str(tmp_path / "bad"))
    with pytest.raises(MmeditError, match="x.json"):
        family("llava")


def test_unresolvable_paths_are_one_line_errors(monkeypatch):
    _isolate_registry(monkeypatch)
    entry = _renamed("moved")
    entry["parts"]["llm"]["layers"] = [["model.nowhere.layers", "also.not.here"]]
    register_family(entry)
    model, _ = zoo.build("llava")
    model.config.model_type = "moved"
    with pytest.raises(MmeditError, match="model.nowhere.layers, also.not.here"):
        model_map(model)
