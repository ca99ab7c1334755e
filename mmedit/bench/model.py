"""The embedded default model: a tiny LLaVA that mmedit trains to memorise the synthetic profiles.

    paths = embedded(seed=0)               # the shipped weights (verified), or trained on first use
    model, processor = mmedit.loading.load(paths.model)
    info = mmedit.bench.profiles.load(paths.data)

The model is a normal LLaVA directory: a CLIP-style vision tower (64 wide, 2 layers, 4 image tokens of a
32 px portrait), a two-layer projector and a Llama-style LM (128 wide, 2 layers), with a word-level
tokenizer over the benchmark's words that decodes back exactly, and the zoo's USER/ASSISTANT chat
template. It learns every person's ten attributes in both forms (portrait + "this person", and the name)
from the short-answer and cloze rows (loss on the answer tokens only); multiple choice is scored by option
likelihood, which those answers teach (see `training_rows` for why lettered prompts are not trained).
Image questions show the canonical portrait or, half of the time, a random re-render (pose, lighting,
background), so the background colour is no shortcut to a person and the test split's other pictures are
recognised.

Training is budgeted in steps, never seconds, and is deterministic given the seed on one machine, but not
across machines. So mmedit ships the model its recipe trained (RECIPE, seed 0) as package data in
`weights/` (SHIPPED), with `manifest.json`: the sha256 of every file, what it was trained from (recipe,
seed, the benchmark's profiles.json sha256, TRAINER_VERSION) and the library versions it was trained
with. `embedded` uses it for that request, after checking every checksum and that the benchmark generated
now is the one it was trained on; anything else (the FAST recipe, other seeds, `retrain=True`) is
trained and cached under $MMEDIT_CACHE (default ~/.cache/mmedit)/embedded, keyed by a hash of the
recipe, the benchmark files and the library versions, written atomically (mmedit.safefile.atomic_dir),
with `mmedit-training.json` beside the weights: the recipe, the data hash, versions, timings and the
accuracies measured after training. After a change to the recipe, the trainer or the data generator,
re-ship with RESHIP (tests/test_embedded_model.py fails until then).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from mmedit.bench import portraits, profiles
from mmedit.data.batches import FORMS, IGNORE, make_batches
from mmedit.data.rows import Row
from mmedit.errors import MmeditError
from mmedit.provenance import file_sha256

TRAINER_VERSION = 3  # part of the cache key: bump it whenever a code change alters the trained weights
TRAINING_FILE = "mmedit-training.json"
SHIPPED = Path(__file__).with_name("weights")  # the model RECIPE trained at seed 0, shipped as package data
MANIFEST = "manifest.json"  # in SHIPPED: every file's sha256 and what the weights were trained from
RESHIP = 'python -c "from mmedit.bench import model; model.ship(model.embedded(retrain=True).model)"'
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "image": "<image>"}
SPACE = "\u2581"  # "▁", the Metaspace mark standing for a space inside a token

# Everything that decides the weights besides the data and the seed; hashed into the cache key.
RECIPE = {
    "n_people": 50,
    "image_size": 32,
    "vision": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
    "text": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
    "steps": 1200,
    "batch_size": 64,
    # of each batch: image questions, the rest text ones. The text form is learnt in a few hundred
    # steps, the image form is the slow part (measured: 0.625 reaches 100 % on every person with 93 %
    # on the test split's other pictures at 1200 steps; 0.5 needs 1500 for 99.6 %, 0.75 generalises worse;
    # with the round-tripping tokenizer, seed 0: 100 % and 97 %. Other seeds vary with any tokenizer:
    # the worst person's image questions at seeds 1 and 2 are at 50 % and 70 % with this one, 100 % and
    # 20 % with the old word-only one)
    "image_share": 0.625,
    "lr": 1e-3,
    "warmup": 100,
    "weight_decay": 0.01,
    "views": 24,  # random re-renders per person, drawn once
    "augmented": 0.5,  # share of image questions that show a re-render instead of the portrait
    # One intra-op thread: on a busy 2-core machine two threads wait on each other (measured here: 2 s
    # per step instead of 0.1 s), while ops this small have little to split. It also keeps the weights
    # independent of the machine's core count.
    "threads": 1,
}
# A smoke-test recipe: a handful of people, a few hundred steps (tests, `mmedit demo --fast`).
FAST = {"n_people": 6, "steps": 200, "batch_size": 32, "warmup": 20, "views": 8}


class Embedded(NamedTuple):
    model: Path  # HF model directory (weights, processor, mmedit-training.json)
    data: Path  # the synthetic benchmark it was trained on (mmedit.bench.profiles.load reads it)
    shipped: bool = False  # the weights shipped with mmedit (True) or trained here from the recipe


# ---- tokenizer, processor, model -----------------------------------------------------------------

def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    # Spaces become "▁" and stay in the tokens, so decoding can put them back: a word takes the space
    # before it, a punctuation mark the space or newline after it, any other whitespace is a token of its
    # own. "this person born?\nASSISTANT: " -> "this", "▁person", "▁born", "?\n", "ASSISTANT", ":▁".
    # A prompt ending in ": " is then a token prefix of prompt + answer (a word-attached space would make
    # it "▁" alone in the prompt and "▁Lisbon" in the full text), a word keeps one token wherever a space
    # precedes it, and a prompt has no more tokens than words and punctuation marks.
    pieces = rf"{SPACE}?\w+|[^\w\s{SPACE}][{SPACE}\n]?|\s|{SPACE}"  # word, mark, other whitespace
    split = pre_tokenizers.Split(Regex(pieces), behavior="isolated")
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=False), split])


def build_tokenizer(texts):
    """A word-level tokenizer knowing every word of `texts` plus the special tokens (ids in sorted order),
    whose decode gives back exactly the text it encoded (spaces and newlines included)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    splitter = _pre_tokenizer()
    words = sorted({word for text in texts for word, _ in splitter.pre_tokenize_str(text)})
    specials = list(SPECIAL_TOKENS.values())
    vocab = {token: index for index, token in enumerate(specials + [w for w in words if w not in specials])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    backend.pre_tokenizer = splitter
    # "▁" back to a space and the tokens joined as they are ("never": no leading space is dropped)
    backend.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never", split=False)
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{f"{key}_token": SPECIAL_TOKENS[key] for key in ("pad", "bos", "eos", "unk")},
        extra_special_tokens={"image_token": SPECIAL_TOKENS["image"]},
    )


def build_processor(tokenizer, image_size: int):
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    from mmedit.zoo import chat_template

    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=_patch(image_size),
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        # the image tokens run straight into the question, one token fewer than with a newline between
        chat_template=chat_template(SPECIAL_TOKENS["image"]))


def processor_for(info: profiles.BenchInfo):
    """The processor the embedded model is trained with: a tokenizer over every text of `info`."""
    return build_processor(build_tokenizer(_texts(all_rows(info))), info.image_size)


def _patch(image_size: int) -> int:
    return image_size // 2  # a 2 x 2 grid: four image tokens, the cheapest that still sees a face


def build_model(tokenizer, recipe: dict, seed: int):
    from transformers import AutoConfig, AutoModelForImageTextToText

    ids = {key: tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS[key]) for key in ("pad", "bos", "eos")}
    config = AutoConfig.for_model(
        "llava",
        vision_config={"model_type": "clip_vision_model", "image_size": recipe["image_size"],
                       "patch_size": _patch(recipe["image_size"]), **recipe["vision"]},
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), "max_position_embeddings": 256,
                     "num_key_value_heads": recipe["text"]["num_attention_heads"], "tie_word_embeddings": False,
                     **{f"{key}_token_id": value for key, value in ids.items()}, **recipe["text"]},
        image_token_index=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"]),
        image_seq_length=4,
        vision_feature_layer=-1,  # the last vision layer feeds the LM: no dead branch to trace or edit
        vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.pad_token_id = ids["pad"]
    model.generation_config.eos_token_id = ids["eos"]
    return model


# ---- training data -------------------------------------------------------------------------------

def training_rows(rows: list[Row]) -> list[Row]:
    """The rows the model learns: short answers and cloze, in both forms.

    Multiple-choice rows ask the same questions as the short-answer rows, and the harness scores them by
    option likelihood, which the short answers already teach. The lettered prompt (the letter of the right
    option) is not trained: measured here, a two-layer LM stays at chance on it with 50 people after 600
    steps of 16 prompts with rotated options, since matching the recalled answer against the listed
    options needs more depth than the answer itself; it would also double the sequence length.
    """
    return [row for row in rows if row.options is None]


@dataclasses.dataclass
class _Example:
    ids: torch.Tensor
    labels: torch.Tensor
    person: int | None  # index into the view pool for image examples, None for text ones


def _tokenise(rows: list[Row], processor, form: str, person_index: dict[str, int]) -> list[_Example]:
    """Each example's token ids and labels, once, through make_batches itself (so training sees exactly
    the prompts every plugin and evaluation builds); the pixels are swapped in per step."""
    examples = []
    for batch in make_batches(rows, processor, form=form, batch_size=256):
        mask = batch.inputs["attention_mask"].bool()
        for i, row in enumerate(batch.rows):
            examples.append(_Example(batch.inputs["input_ids"][i][mask[i]], batch.inputs["labels"][i][mask[i]],
                                     person_index[row.entity] if form == "multimodal" else None))
    return examples


def _view_pool(info: profiles.BenchInfo, processor, views: int, seed: int) -> torch.Tensor:
    """[people, 1 + views, 3, H, W]: each person's canonical portrait, then `views` random re-renders."""
    pool = []
    for person in info.people:
        rng = random.Random(f"mmedit-embedded:{seed}:views:{person.id}")
        images = [portraits.portrait(person.look, info.image_size)]
        images += [portraits.augment(person.look, rng, info.image_size) for _ in range(views)]
        pool.append(processor.image_processor(images, return_tensors="pt")["pixel_values"])
    return torch.stack(pool)


class _Sampler:
    """Endless epochs over examples, each epoch in a fresh seeded order."""

    def __init__(self, examples: list[_Example], rng: random.Random):
        self.examples, self.rng, self.order = examples, rng, []

    def draw(self, count: int) -> list[_Example]:
        drawn = []
        for _ in range(count):
            if not self.order:
                self.order = list(range(len(self.examples)))
                self.rng.shuffle(self.order)
            drawn.append(self.examples[self.order.pop()])
        return drawn


def _inputs(examples: list[_Example], pool: torch.Tensor, rng: random.Random, pad: int,
            augmented: float) -> dict[str, torch.Tensor]:
    """Right-padded batch; image examples show a re-render with probability `augmented`, else the portrait."""
    length = max(len(example.ids) for example in examples)
    ids = torch.full((len(examples), length), pad, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = example.ids, example.labels, 1
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    people = [example.person for example in examples if example.person is not None]
    if people:  # pixel rows in the order of the examples' image tokens
        views = [rng.randrange(1, pool.shape[1]) if rng.random() < augmented else 0 for _ in people]
        inputs["pixel_values"] = pool[people, views]
    return inputs


@contextlib.contextmanager
def threads(count: int):
    """torch's intra-op thread count set to `count` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _lr(step: int, recipe: dict) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < recipe["warmup"]:
        return recipe["lr"] * (step + 1) / recipe["warmup"]
    done = (step - recipe["warmup"]) / max(1, recipe["steps"] - recipe["warmup"])
    return recipe["lr"] * 0.5 * (1 + math.cos(math.pi * done))


def train(info: profiles.BenchInfo, recipe: dict | None = None, seed: int = 0, progress: bool = True):
    """(model, processor, log) trained on every profile of `info` in both forms; deterministic per seed.
    Each step takes `batch_size` examples, `image_share` of them image questions, the rest text ones."""
    recipe = {**RECIPE, **(recipe or {})}
    with threads(recipe["threads"]):
        return _train(info, recipe, seed, progress)


def _train(info: profiles.BenchInfo, recipe: dict, seed: int, progress: bool):
    from mmedit.progress import track

    processor = processor_for(info)
    tokenizer = processor.tokenizer
    model = build_model(tokenizer, {**recipe, "image_size": info.image_size}, seed)
    started = time.perf_counter()
    person_index = {person.name: index for index, person in enumerate(info.people)}
    rng = random.Random(f"mmedit-embedded:{seed}:batches")
    samplers = [_Sampler(_tokenise(training_rows(all_rows(info)), processor, form, person_index), rng)
                for form in FORMS]  # image questions, then text ones (the order `counts` follows)
    pool = _view_pool(info, processor, recipe["views"], seed)
    prepared = time.perf_counter() - started

    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"], fused=True)
    image = round(recipe["batch_size"] * recipe["image_share"])
    counts = (image, recipe["batch_size"] - image)  # per sampler: image questions, text questions
    model.train()
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in track(range(recipe["steps"]), "training the embedded model", enabled=progress):
            for group in optimiser.param_groups:
                group["lr"] = _lr(step, recipe)
            examples = [example for sampler, count in zip(samplers, counts) for example in sampler.draw(count)]
            loss = model(**_inputs(examples, pool, rng, tokenizer.pad_token_id, recipe["augmented"])).loss
            if not torch.isfinite(loss):
                raise MmeditError(f"training the embedded model: non-finite loss at step {step}")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            losses.append(loss.item())
    model.eval()
    log = {"prepare_s": round(prepared, 2), "train_s": round(time.perf_counter() - started - prepared, 2),
           "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 5)}
    return model, processor, log


def all_rows(info: profiles.BenchInfo) -> list[Row]:
    """Every person's rows with the training portrait (forget and retain sets of one split together)."""
    percent = profiles.FORGET_PERCENTS[0]
    forget, retain, _ = profiles.split_names(percent)
    return info.rows(forget) + info.rows(retain)


def _texts(rows: list[Row]) -> list[str]:
    from mmedit.eval.harness import lettered

    # the chat template's text around the turns (zoo.chat_template), after a question ending in "?" and
    # one ending in "."; the lettered prompts are not trained but stay free of <unk>, so `mmedit eval`
    # can still ask them
    texts = ["USER: ?\nASSISTANT: ", "USER: .\nASSISTANT: "]
    for row in rows:
        texts += [row.question, row.text_question, row.answer]
        if row.options is not None:
            texts += [lettered(row).question, lettered(row).text_question]
    return texts


# ---- measuring, saving, caching ------------------------------------------------------------------

def measure(model, processor, info: profiles.BenchInfo, progress: bool = True) -> dict:
    """Accuracies of the trained model, through the evaluation harness: every person's training questions
    (mean and worst person), the test split's other pictures, and the image questions with a blank grey
    picture (near chance if the model really looks at the image)."""
    from PIL import Image

    from mmedit.eval.harness import by_entity, evaluate, summarise

    _, _, test = profiles.split_names(profiles.FORGET_PERCENTS[0])
    rows = all_rows(info)
    with tempfile.TemporaryDirectory() as folder:
        blank = Path(folder) / "blank.png"
        Image.new("RGB", (info.image_size, info.image_size), (128, 128, 128)).save(blank)
        options = dict(batch_size=64, max_new_tokens=4, letters=False, progress=progress)
        records = evaluate(model, processor, {"all": rows, "test": info.rows(test)},
                           description="measuring the embedded model", **options)
        records += evaluate(model, processor, {"blank_image": [dataclasses.replace(row, image=blank) for row in rows]},
                            forms=("multimodal",), description="measuring with a blank image", **options)
    means, people = summarise(records), by_entity(records)
    result = {}
    for split, forms in means.items():
        for form, values in forms.items():
            worst = {metric: min(people[split][form][metric].items(), key=lambda item: item[1])
                     for metric in values}
            result.setdefault(split, {})[form] = {
                metric: {"mean": round(value, 4), "worst": round(worst[metric][1], 4), "worst_person": worst[metric][0]}
                for metric, value in values.items()}
    return result


def cache_root() -> Path:
    """$MMEDIT_CACHE/embedded, else ~/.cache/mmedit/embedded."""
    base = os.environ.get("MMEDIT_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "mmedit") / "embedded"


def _versions() -> dict:
    import importlib.metadata

    from mmedit.provenance import library_versions

    return library_versions() | {"tokenizers": importlib.metadata.version("tokenizers"), "trainer": TRAINER_VERSION}


def cache_key(recipe: dict, seed: int, info: profiles.BenchInfo) -> str:
    """Hash of what decides the weights: recipe, seed, the benchmark's files and the library versions."""
    blob = json.dumps([recipe, seed, _data_sha256(info), _versions()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def write(info: profiles.BenchInfo, path: str | Path, recipe: dict | None = None, seed: int = 0,
          progress: bool = True, force: bool = False) -> Path:
    """Train on `info` and save model, processor and mmedit-training.json to `path` in one rename
    (safefile.atomic_dir). An existing `path` is refused before training unless force replaces it; if
    another process finishes `path` while this one trains, theirs is kept."""
    from mmedit.safefile import atomic_dir, check_writable

    recipe = {**RECIPE, **(recipe or {})}
    path = check_writable(path, force)
    with threads(recipe["threads"]):
        model, processor, log = train(info, recipe, seed, progress)
        started = time.perf_counter()
        accuracy = measure(model, processor, info, progress)
    record = {
        "what": "the embedded tiny LLaVA, trained by mmedit.bench.model on the synthetic profiles",
        "recipe": recipe, "seed": seed,
        "data": {"root": str(info.root), "n_people": info.n_people, "seed": info.seed,
                 "profiles_sha256": _data_sha256(info)},
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "training": log | {"measure_s": round(time.perf_counter() - started, 2)},
        "accuracy": accuracy,
    }
    try:
        with atomic_dir(path, force=force) as temp:
            model.save_pretrained(temp)
            processor.save_pretrained(temp)
            (temp / TRAINING_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    except MmeditError:
        if force or not (path / TRAINING_FILE).is_file():  # not a finished twin from a concurrent run
            raise
    return path


def embedded(seed: int = 0, fast: bool = False, root: str | Path | None = None, progress: bool = True,
             retrain: bool = False, shipped: str | Path | None = None) -> Embedded:
    """The benchmark (generated on first use under root, see cache_root) and the model for it: the
    shipped weights when they were trained from this request (RECIPE, seed 0), else the model trained
    from the recipe here, on first use, then cached.

    fast: a few people and a few hundred steps (tests and smoke runs), cached separately.
    retrain: train from the recipe even where weights are shipped.
    shipped: the folder of shipped weights (default SHIPPED)."""
    recipe = {**RECIPE, **(FAST if fast else {})}
    root = Path(root) if root is not None else cache_root()
    info = profiles.generate(root / f"data-{recipe['n_people']}p-{recipe['image_size']}px-seed{seed}",
                             n_people=recipe["n_people"], seed=seed, image_size=recipe["image_size"])
    if not retrain:
        folder = Path(shipped) if shipped is not None else SHIPPED
        manifest = read_manifest(folder)
        if {key: manifest[key] for key in _identity(recipe, seed)} == _identity(recipe, seed):
            check_shipped(folder, manifest, info)
            return Embedded(model=folder, data=info.root, shipped=True)
    path = root / f"model-seed{seed}-{cache_key(recipe, seed, info)[:12]}"
    if not (path / TRAINING_FILE).is_file():  # a folder there without the record is unfinished: replace it
        write(info, path, recipe, seed, progress, force=path.exists())
    return Embedded(model=path, data=info.root)


# ---- shipped weights -----------------------------------------------------------------------------

def _identity(recipe: dict, seed: int) -> dict:
    """What decides the weights besides the data, as the manifest records it."""
    return {"recipe": recipe, "seed": seed, "trainer": TRAINER_VERSION}


def _data_sha256(info: profiles.BenchInfo) -> str:
    return file_sha256(info.root / "profiles.json")  # it holds the sha256 of every other benchmark file


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a shipped-weights folder, checked for the keys `embedded` reads."""
    from mmedit.safefile import parse_json

    path = Path(folder) / MANIFEST
    try:
        manifest = parse_json(path.read_text(encoding="utf-8"), str(path))
    except OSError as error:
        raise MmeditError(f"{path}: cannot read the shipped model's manifest ({error.strerror}); reinstall "
                          "mmedit, or `mmedit demo --retrain` trains the model from the recipe") from None
    keys = ["recipe", "seed", "trainer", "profiles_sha256", "files"]
    if not isinstance(manifest, dict) or not all(key in manifest for key in keys) \
            or not isinstance(manifest["files"], dict):
        raise MmeditError(f"{path}: malformed manifest (needs {', '.join(keys)})")
    return manifest


def check_shipped(folder: str | Path, manifest: dict, info: profiles.BenchInfo) -> None:
    """Refuse shipped weights trained on other benchmark data, or whose files are not exactly the ones the
    manifest lists with those sha256 (missing, extra, corrupted): one MmeditError line naming the file."""
    folder = Path(folder)
    data = _data_sha256(info)
    if manifest["profiles_sha256"] != data:
        raise MmeditError(
            f"{folder}: the shipped embedded model was trained on other benchmark data (profiles.json sha256 "
            f"{manifest['profiles_sha256'][:12]}, generated now {data[:12]}): the data generator changed, so the "
            f"weights must be re-shipped ({RESHIP}); `mmedit demo --retrain` trains from the recipe meanwhile")
    rebuild = "reinstall mmedit, or `mmedit demo --retrain` rebuilds the model from the recipe"
    extra = sorted(path.name for path in folder.iterdir() if path.name != MANIFEST and path.name not in manifest["files"])
    if extra:
        raise MmeditError(f"{folder / extra[0]}: not a file of the shipped embedded model (not in {MANIFEST}); "
                          f"remove it, or {rebuild}")
    for name, digest in sorted(manifest["files"].items()):
        path = folder / name
        if not path.is_file():
            raise MmeditError(f"{path}: missing from the shipped embedded model; {rebuild}")
        if file_sha256(path) != digest:
            raise MmeditError(f"{path}: corrupted (its sha256 is not the one in {MANIFEST}); {rebuild}")


def ship(model_dir: str | Path, target: str | Path = SHIPPED) -> Path:
    """Copy a model folder `write` made to `target` (default SHIPPED), replacing it in one swap, with the
    manifest: every file's sha256, what the weights were trained from (from the training record) and the
    library versions they were trained with. `RESHIP` is the one-line command for the default model."""
    from mmedit.safefile import atomic_dir

    model_dir = Path(model_dir)
    record = training_record(model_dir)
    with atomic_dir(target, force=True) as temp:
        files = {}
        for path in sorted(model_dir.iterdir()):
            if not path.is_file():
                raise MmeditError(f"{path}: a model folder to ship holds files only")
            shutil.copyfile(path, temp / path.name)
            files[path.name] = file_sha256(temp / path.name)
        manifest = {
            "what": "the embedded tiny LLaVA as mmedit.bench.model's recipe trained it, shipped so that every "
                    "machine starts from the same weights",
            "recipe": record["recipe"], "seed": record["seed"], "trainer": record["versions"]["trainer"],
            "profiles_sha256": record["data"]["profiles_sha256"],
            "trained_with": record["versions"] | {"machine": record["machine"]},
            "files": files,
        }
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return Path(target)


def training_record(model_dir: str | Path) -> dict:
    """The mmedit-training.json of an embedded model directory."""
    path = Path(model_dir) / TRAINING_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise MmeditError(f"{path}: cannot read the training record ({error})") from None
