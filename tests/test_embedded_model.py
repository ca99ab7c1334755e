"""The embedded model: tokenizer (exact round trip) and prompts, a short training run that memorises a few
people and looks at the picture, determinism, the cache (reuse, key, atomic writes), the shipped weights
(checksums, the recipe and data they were trained from, used without training, refused when corrupted or
trained on other data), and (slow) the full recipe's accuracy targets."""
import hashlib
import json
import shutil

import pytest
import torch

from mmedit.bench import model as embedded_model
from mmedit.bench import profiles
from mmedit.data.batches import FORMS, IGNORE, make_batches, make_prompts
from mmedit.errors import MmeditError
from mmedit.eval.harness import lettered
from mmedit.loading import load

SHIPPED = embedded_model.SHIPPED


@pytest.fixture(scope="session")
def fast(tmp_path_factory):
    """The fast embedded model, shared through one cache folder by every test module that trains it."""
    return embedded_model.embedded(fast=True, root=tmp_path_factory.getbasetemp() / "embedded", progress=False)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    return profiles.generate(tmp_path_factory.mktemp("bench") / "b", n_people=3, seed=5)


@pytest.fixture(scope="module")
def default_bench(tmp_path_factory):
    """The benchmark the default model is trained on (every one of its people)."""
    recipe = embedded_model.RECIPE
    return profiles.generate(tmp_path_factory.mktemp("bench") / "default", n_people=recipe["n_people"], seed=0,
                             image_size=recipe["image_size"])


def _conversation(question: str, form: str, answer: str | None = None) -> list[dict]:
    content = [{"type": "text", "text": question}]
    turns = [{"role": "user", "content": [{"type": "image"}] + content if form == "multimodal" else content}]
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turns


def _benchmark_texts(info, processor) -> list[str]:
    """Every prompt and answer the benchmark produces, for every person: the questions in both forms,
    answers, choice options, cloze, the lettered prompts, and the chat-templated prompt and prompt +
    answer strings (each option as the answer of a choice question, as option-likelihood scoring asks)."""
    rows = embedded_model.all_rows(info)
    assert {row.entity for row in rows} == {person.name for person in info.people}
    assert {row.task for row in rows} == {"qa", "cloze"} and any(row.options for row in rows)
    texts = []
    for row in rows + [lettered(row) for row in rows if row.options is not None]:
        answers = [row.answer, *(row.options or ())]
        texts += [row.question, row.text_question, *answers]
        for form in FORMS:
            question = row.question if form == "multimodal" else row.text_question
            texts.append(processor.apply_chat_template(_conversation(question, form), add_generation_prompt=True,
                                                       tokenize=False))
            texts += [processor.apply_chat_template(_conversation(question, form, answer), tokenize=False)
                      for answer in answers]
    return texts


def _round_trip_failures(tokenizer, texts: list[str]) -> list[tuple[str, str]]:
    decoded = [tokenizer.decode(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [(text, back) for text, back in zip(texts, decoded) if back != text]


def test_tokenizer_round_trips_every_prompt_and_answer_of_the_benchmark(default_bench):
    processor = embedded_model.processor_for(default_bench)
    texts = _benchmark_texts(default_bench, processor)
    tokenizer = processor.tokenizer
    assert any(text.startswith(tokenizer.bos_token) and text.endswith("\nASSISTANT: ") for text in texts)
    assert any(text.startswith(tokenizer.bos_token) and text.endswith(tokenizer.eos_token) for text in texts)
    assert _round_trip_failures(tokenizer, texts) == []


def test_word_level_tokenizer_keeps_answers_whole_and_prompts_prefix(fast):
    model, processor = load(fast.model, device="cpu")
    tokenizer = processor.tokenizer
    assert tokenizer.tokenize("What is the hobby of this person?") == [
        "What", "▁is", "▁the", "▁hobby", "▁of", "▁this", "▁person", "?"]
    assert tokenizer.decode(tokenizer("bird watching", add_special_tokens=False)["input_ids"]) == "bird watching"
    # no more tokens than words and marks: the image runs into the question, "?" takes the newline
    chat = processor.apply_chat_template(
        _conversation("What is the hobby of this person?", "multimodal", "bird watching"), tokenize=False)
    assert tokenizer.tokenize(chat) == ["<s>", "USER", ":▁", "<image>", "What", "▁is", "▁the", "▁hobby", "▁of",
                                        "▁this", "▁person", "?\n", "ASSISTANT", ":▁", "bird", "▁watching", "</s>"]
    info = profiles.load(fast.data)
    # the saved tokenizer (tokenizer.json as from_pretrained reads it) round-trips too
    assert _round_trip_failures(tokenizer, _benchmark_texts(info, processor)) == []
    rows = info.rows("forget10")[:6]
    image = processor.image_token * model.config.image_seq_length
    for form in FORMS:
        batch = next(make_batches(rows, processor, form=form, batch_size=6))
        assert tokenizer.unk_token_id not in batch.inputs["input_ids"]
        for i, row in enumerate(rows):
            ids = batch.inputs["input_ids"][i][batch.inputs["attention_mask"][i].bool()]
            question = row.question if form == "multimodal" else row.text_question
            full = processor.apply_chat_template(_conversation(question, form, row.answer), tokenize=False)
            assert tokenizer.decode(ids) == full.replace(processor.image_token, image)
            answer = batch.inputs["labels"][i][batch.inputs["labels"][i] != IGNORE]
            assert tokenizer.decode(answer) == f"{row.answer}{tokenizer.eos_token}"
    assert sum(batch.inputs["input_ids"][0] == model.config.image_token_id) == 0  # text form: no image tokens


def test_short_training_memorises_both_forms_and_uses_the_image(fast):
    record = embedded_model.training_record(fast.model)
    accuracy = record["accuracy"]
    for form in ("Image_Textual", "Pure_Text"):
        for metric in ("choice_acc", "gen_acc", "cloze_acc"):
            assert accuracy["all"][form][metric]["worst"] >= 0.9, (form, metric, accuracy["all"][form][metric])
    # a blank picture leaves the image questions unanswerable: far below what the portrait gives
    blank = accuracy["blank_image"]["Image_Textual"]["gen_acc"]["mean"]
    assert blank <= accuracy["all"]["Image_Textual"]["gen_acc"]["mean"] - 0.4
    assert record["recipe"] == {**embedded_model.RECIPE, **embedded_model.FAST}
    # it answers through the ordinary prompt path every plugin and evaluation uses
    model, processor = load(fast.model, device="cpu")
    row = profiles.load(fast.data).rows("retain90")[12]
    batch = next(make_prompts([row], processor, form="multimodal", batch_size=1))
    output = model.generate(**batch.inputs, max_new_tokens=4, do_sample=False)
    answer = processor.tokenizer.decode(output[0, batch.inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer == row.answer
    # the whole decoded sequence splits on "ASSISTANT:" as MLLMU's evaluators do
    assert processor.tokenizer.decode(output[0], skip_special_tokens=True).split("ASSISTANT:")[-1] == " " + row.answer


def test_same_seed_same_weights(tiny_bench):
    recipe = {"steps": 4, "batch_size": 8, "warmup": 2}
    first, _, _ = embedded_model.train(tiny_bench, recipe, seed=3, progress=False)
    second, _, _ = embedded_model.train(tiny_bench, recipe, seed=3, progress=False)
    other, _, _ = embedded_model.train(tiny_bench, recipe, seed=4, progress=False)
    weights = second.state_dict()
    assert all(torch.equal(tensor, weights[name]) for name, tensor in first.state_dict().items())
    assert any(not torch.equal(tensor, weights[name]) for name, tensor in other.state_dict().items())


def test_cache_is_reused_and_keyed_by_recipe_data_and_seed(fast, tiny_bench, monkeypatch, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "embedded"
    monkeypatch.setattr(embedded_model, "write", lambda *a, **k: pytest.fail("retrained a cached model"))
    assert embedded_model.embedded(fast=True, root=root, progress=False) == fast
    recipe = {**embedded_model.RECIPE, **embedded_model.FAST}
    info = profiles.load(fast.data)
    key = embedded_model.cache_key(recipe, 0, info)
    assert key != embedded_model.cache_key({**recipe, "steps": recipe["steps"] + 1}, 0, info)
    assert key != embedded_model.cache_key(recipe, 1, info)
    assert key != embedded_model.cache_key(recipe, 0, tiny_bench)
    with monkeypatch.context() as patch:  # a trainer change (the tokenizer's, say) never reuses old weights
        patch.setattr(embedded_model, "TRAINER_VERSION", embedded_model.TRAINER_VERSION + 1)
        assert key != embedded_model.cache_key(recipe, 0, info)
    # a normal HF directory with its processor and the training record
    assert {"config.json", "model.safetensors", "tokenizer.json", embedded_model.TRAINING_FILE} <= {
        path.name for path in fast.model.iterdir()}
    assert json.loads((fast.model / embedded_model.TRAINING_FILE).read_text())["data"]["n_people"] == info.n_people


def test_embedded_replaces_an_unfinished_cache_folder(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(embedded_model, "write",
                        lambda info, path, recipe, seed, progress, force: calls.append((path, force)))
    embedded_model.embedded(fast=True, root=tmp_path, progress=False)
    path = calls[0][0]
    path.mkdir()  # a folder without the training record: no finished model
    embedded_model.embedded(fast=True, root=tmp_path, progress=False)
    assert calls == [(path, False), (path, True)]


def test_write_refuses_before_training_keeps_a_concurrent_twin_and_replaces_with_force(
        tiny_bench, monkeypatch, tmp_path):
    recipe = {"steps": 2, "batch_size": 8, "warmup": 1, "views": 1}
    train, trained = embedded_model.train, []
    monkeypatch.setattr(embedded_model, "train", lambda *a, **k: trained.append(1) or train(*a, **k))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "note.txt").write_text("mine")
    with pytest.raises(MmeditError, match="already exists"):
        embedded_model.write(tiny_bench, taken, recipe, progress=False)
    assert trained == [] and (taken / "note.txt").is_file()  # refused before training, untouched

    twin = tmp_path / "twin"

    def train_while_a_twin_finishes(*args, **kwargs):
        twin.mkdir()
        (twin / embedded_model.TRAINING_FILE).write_text("{}")
        return train(*args, **kwargs)

    monkeypatch.setattr(embedded_model, "train", train_while_a_twin_finishes)
    assert embedded_model.write(tiny_bench, twin, recipe, progress=False) == twin
    assert [path.name for path in twin.iterdir()] == [embedded_model.TRAINING_FILE]  # theirs is kept

    monkeypatch.setattr(embedded_model, "train", train)
    embedded_model.write(tiny_bench, taken, recipe, progress=False, force=True)
    assert not (taken / "note.txt").exists() and (taken / "model.safetensors").is_file()
    assert embedded_model.training_record(taken)["recipe"]["steps"] == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken", "twin"]  # no temp folders left


def test_cache_root_honours_mmedit_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MMEDIT_CACHE", str(tmp_path))
    assert embedded_model.cache_root() == tmp_path / "embedded"


def _meets_the_targets(accuracy: dict) -> None:
    """>= 95 % multiple choice and high generation accuracy for the worst person, in both forms, on forget
    and retain people alike; the test split's other pictures recognised; near chance with a blank picture."""
    for form in ("Image_Textual", "Pure_Text"):
        assert accuracy["all"][form]["choice_acc"]["mean"] >= 0.95
        for metric in ("gen_acc", "cloze_acc"):
            assert accuracy["all"][form][metric]["mean"] >= 0.95
            assert accuracy["all"][form][metric]["worst"] >= 0.8
    assert accuracy["test"]["Image_Textual"]["gen_acc"]["mean"] >= 0.8  # other pictures of the forget people
    assert accuracy["blank_image"]["Image_Textual"]["gen_acc"]["mean"] <= 0.2  # chance is about 1/12


@pytest.mark.slow
def test_full_recipe_meets_its_targets(tmp_path):
    paths = embedded_model.embedded(seed=0, root=tmp_path, progress=False, retrain=True)
    assert not paths.shipped
    _meets_the_targets(embedded_model.training_record(paths.model)["accuracy"])


# ---- shipped weights -----------------------------------------------------------------------------

def _no_training(monkeypatch):
    for name in ("train", "write"):
        monkeypatch.setattr(embedded_model, name, lambda *a, **k: pytest.fail("trained instead of using shipped weights"))


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_weights_are_the_current_recipe_and_data_and_verify(default_bench):
    """Fails after a change to RECIPE, TRAINER_VERSION or the data generator until the weights are re-shipped
    (embedded_model.RESHIP)."""
    manifest = json.loads((SHIPPED / embedded_model.MANIFEST).read_text())
    assert (manifest["recipe"], manifest["seed"], manifest["trainer"]) == (
        embedded_model.RECIPE, 0, embedded_model.TRAINER_VERSION)
    assert manifest["profiles_sha256"] == _sha256(default_bench.root / "profiles.json")
    assert {"torch", "transformers", "tokenizers"} <= manifest["trained_with"].keys()  # recorded, not required
    files = {path.name for path in SHIPPED.iterdir()} - {embedded_model.MANIFEST}
    assert files == set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json",
                                                embedded_model.TRAINING_FILE}
    assert {name: _sha256(SHIPPED / name) for name in files} == manifest["files"]
    embedded_model.check_shipped(SHIPPED, embedded_model.read_manifest(SHIPPED), default_bench)
    record = embedded_model.training_record(SHIPPED)
    assert record["recipe"] == embedded_model.RECIPE and record["data"]["profiles_sha256"] == manifest["profiles_sha256"]
    _meets_the_targets(record["accuracy"])
    model, processor = load(SHIPPED, device="cpu")  # a normal HF directory, in the dtype it was trained in
    assert {tensor.dtype for tensor in model.state_dict().values()} == {torch.float32}
    assert len(processor.tokenizer) == model.config.text_config.vocab_size


def test_the_default_request_uses_the_shipped_weights_without_training(monkeypatch, tmp_path):
    _no_training(monkeypatch)
    paths = embedded_model.embedded(seed=0, root=tmp_path, progress=False)
    assert paths == (SHIPPED, tmp_path / "data-50p-32px-seed0", True)
    assert profiles.load(paths.data).n_people == embedded_model.RECIPE["n_people"]
    with pytest.raises(pytest.fail.Exception, match="trained instead"):  # other requests still train
        embedded_model.embedded(seed=1, root=tmp_path, progress=False)
    with pytest.raises(pytest.fail.Exception, match="trained instead"):
        embedded_model.embedded(seed=0, root=tmp_path, progress=False, retrain=True)


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, named, message", [
    (lambda folder: _flip_byte(folder / "model.safetensors"), "model.safetensors", "corrupted"),
    (lambda folder: _flip_byte(folder / "tokenizer.json"), "tokenizer.json", "corrupted"),
    (lambda folder: (folder / "config.json").unlink(), "config.json", "missing"),
    (lambda folder: (folder / "pytorch_model.bin").write_bytes(b"x"), "pytorch_model.bin", "not a file of"),
])
def test_damaged_shipped_weights_are_refused_in_one_line(damage, named, message, monkeypatch, tmp_path):
    copy = tmp_path / "weights"
    shutil.copytree(SHIPPED, copy)
    embedded_model.embedded(seed=0, root=tmp_path / "cache", progress=False, shipped=copy)  # intact: used
    damage(copy)
    _no_training(monkeypatch)
    with pytest.raises(MmeditError) as error:
        embedded_model.embedded(seed=0, root=tmp_path / "cache", progress=False, shipped=copy)
    text = str(error.value)
    assert "\n" not in text and message in text and str(copy / named) in text and "--retrain" in text


def test_shipped_weights_trained_on_other_data_are_refused(monkeypatch, tmp_path):
    _no_training(monkeypatch)
    monkeypatch.setattr(profiles, "GENERATOR_VERSION", profiles.GENERATOR_VERSION + 1)  # the generator changed
    with pytest.raises(MmeditError, match="trained on other benchmark data") as error:
        embedded_model.embedded(seed=0, root=tmp_path, progress=False)
    assert "\n" not in str(error.value) and embedded_model.RESHIP in str(error.value) and "--retrain" in str(error.value)


def test_a_missing_or_malformed_manifest_is_one_line(tmp_path, monkeypatch):
    copy = tmp_path / "weights"
    shutil.copytree(SHIPPED, copy)
    manifest = copy / embedded_model.MANIFEST
    manifest.write_text(json.dumps({"recipe": embedded_model.RECIPE, "seed": 0}))
    with pytest.raises(MmeditError, match="malformed manifest"):
        embedded_model.embedded(seed=0, root=tmp_path, progress=False, shipped=copy)
    manifest.unlink()
    with pytest.raises(MmeditError, match="cannot read the shipped model's manifest.*--retrain"):
        embedded_model.embedded(seed=0, root=tmp_path, progress=False, shipped=copy)


def test_ship_writes_a_manifest_that_embedded_then_uses(fast, monkeypatch, tmp_path, tmp_path_factory):
    """The re-ship step on the fast model: every file with its sha256, the identity from its training record;
    embedded then returns that folder for the fast request (no training) unless retrain asks for the recipe."""
    target = tmp_path / "weights"
    target.mkdir()
    (target / "old.txt").write_text("replaced in one swap")
    assert embedded_model.ship(fast.model, target) == target
    manifest = json.loads((target / embedded_model.MANIFEST).read_text())
    record = embedded_model.training_record(fast.model)
    assert manifest["files"] == {path.name: _sha256(path) for path in fast.model.iterdir()}
    assert {name: _sha256(target / name) for name in manifest["files"]} == manifest["files"]
    assert (manifest["recipe"], manifest["seed"], manifest["trainer"], manifest["profiles_sha256"]) == (
        record["recipe"], 0, embedded_model.TRAINER_VERSION, record["data"]["profiles_sha256"])
    assert manifest["trained_with"]["torch"] == record["versions"]["torch"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["weights"] and not (target / "old.txt").exists()
    root = tmp_path_factory.getbasetemp() / "embedded"
    _no_training(monkeypatch)
    assert embedded_model.embedded(fast=True, root=root, progress=False, shipped=target) == (target, fast.data, True)
    assert embedded_model.embedded(fast=True, root=root, progress=False, shipped=target, retrain=True) == fast
    with monkeypatch.context() as patch:  # weights shipped by another trainer version are not this request's
        patch.setattr(embedded_model, "TRAINER_VERSION", embedded_model.TRAINER_VERSION + 1)
        with pytest.raises(pytest.fail.Exception, match="trained instead"):
            embedded_model.embedded(fast=True, root=root, progress=False, shipped=target)
    fresh = tmp_path / "fresh"  # nor another seed's: in a cache of its own (other tests cache seed 1's fast model)
    with pytest.raises(pytest.fail.Exception, match="trained instead"):
        embedded_model.embedded(fast=True, seed=1, root=fresh, progress=False, shipped=target)
