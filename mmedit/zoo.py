"""Tiny random-weight models, one per supported family, built locally (no hub access).

`tiny(family)` returns a normal HF model directory (config, model.safetensors, processor and tokenizer
files) that `AutoModelForImageTextToText.from_pretrained` and `AutoProcessor.from_pretrained` load
offline. Each family's recipe is mmedit/zoo_recipes/FAMILY.json (test recipes, kept apart from the
architecture entries in mmedit/arch/families/): config keyword arguments, the special tokens its
processor expects, the processor and image-processor classes with small sizes, and the text the chat
template writes for an image.

The tokenizer is byte-level with no merges (one token per byte plus the special tokens): it covers any
text, decodes back exactly, and keeps a prompt's tokens a prefix of prompt + answer.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

from mmedit.errors import MmeditError
from mmedit.safefile import atomic_dir

RECIPES = Path(__file__).parent / "zoo_recipes"
FAMILIES = tuple(sorted(path.stem for path in RECIPES.glob("*.json")))  # the families with a tiny model

# A plain USER/ASSISTANT template; @BOS@ and @IMAGE@ are filled per family. Turns are joined by a
# newline written *before* the next turn, so an assistant turn ends on eos and nothing after it.
_CHAT_TEMPLATE = (
    "@BOS@{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}@IMAGE@{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '\\nASSISTANT: ' }}{% endif %}"
)


def chat_template(image_text: str, bos: bool = True) -> str:
    """The plain USER/ASSISTANT template, writing `image_text` for an image (and bos first if asked)."""
    return _CHAT_TEMPLATE.replace("@BOS@", "{{ bos_token }}" if bos else "").replace("@IMAGE@", image_text)


def _recipe(family: str) -> dict:
    if family not in FAMILIES:
        raise MmeditError(f"no tiny model for {family!r}; families: {', '.join(FAMILIES)}")
    path = RECIPES / f"{family}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise MmeditError(f"tiny-model recipe {path}: cannot read JSON ({error})") from None


def _tokenizer(tokens: dict):
    """Byte-level BPE without merges, plus the family's special tokens, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    named = {key: tokens[key] for key in ("pad", "bos", "eos", "unk") if key in tokens}
    specials = list(dict.fromkeys([*named.values(), *tokens.get("extra", {}).values(), *tokens.get("more", [])]))
    vocab = {token: index for index, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=named.get("unk")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{f"{key}_token": value for key, value in named.items()},
        extra_special_tokens=tokens.get("extra", {}),
        additional_special_tokens=tokens.get("more", []),
    )


def _set(config: dict, dotted: str, value) -> None:
    *parents, key = dotted.split(".")
    for parent in parents:
        config = config.setdefault(parent, {})
    config[key] = value


def build(family: str, seed: int = 0, config: dict | None = None):
    """(model, processor) of the tiny `family` model, in memory. `config` overrides top-level config keys
    (e.g. {"vision_feature_layer": -2}). Same seed, same weights."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText

    from mmedit.loading import without_video

    recipe = _recipe(family)
    tokenizer = _tokenizer(recipe["tokens"])
    # The processor first: some (PaliGemma) add tokens that the model's vocabulary must cover.
    processor_class = without_video(getattr(transformers, recipe["processor"]["class"]))
    components = {
        name: getattr(transformers, spec["class"])(**spec.get("kwargs", {}))
        for name, spec in recipe.get("components", {}).items()
        if name in processor_class.get_attributes()  # the video processor only where torchvision is
    }
    template = recipe.get("chat_template") or chat_template(recipe["image_text"], recipe.get("template_bos", True))
    processor = processor_class(
        tokenizer=tokenizer, chat_template=template, **components, **recipe["processor"].get("kwargs", {})
    )

    kwargs = copy.deepcopy(recipe["config"])
    # The LM's vocabulary and special ids come from the tokenizer; token_ids adds the family's own ids.
    _set(kwargs, "text_config.vocab_size", len(tokenizer))
    for key in ("pad", "bos", "eos"):
        token = recipe["tokens"].get(key)
        _set(kwargs, f"text_config.{key}_token_id", None if token is None else tokenizer.convert_tokens_to_ids(token))
    for dotted, token in recipe.get("token_ids", {}).items():
        _set(kwargs, dotted, tokenizer.convert_tokens_to_ids(token))
    kwargs.update(config or {})
    model_config = AutoConfig.for_model(family, **kwargs)
    # `init` re-initialises parameters, chosen by their last name component, that transformers starts at
    # zero and that would cut the image off a random model's output: mllama's cross-attention gates
    # ({"value": c}), gemma3's projection ({"std": s}).
    init = recipe.get("init", {})
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(model_config)
        for name, parameter in model.named_parameters():
            how = init.get(name.rsplit(".", 1)[-1])
            if how is not None and "value" in how:
                parameter.fill_(how["value"])
            elif how is not None:
                parameter.normal_(0.0, how["std"])
    model.eval()
    return model, processor


def write(family: str, path: str | Path, seed: int = 0, force: bool = False, progress: bool = False) -> Path:
    """Save the tiny model to the folder `path` atomically (safefile.atomic_dir); an existing one needs
    force, and the old folder goes only once the new one is complete."""
    from mmedit.progress import phase

    _recipe(family)  # an unknown family fails before anything is written
    path = Path(path)
    with atomic_dir(path, force=force) as temp:
        with phase(f"building a tiny {family}", progress):
            model, processor = build(family, seed)
        with phase(f"writing {path}", progress):
            model.save_pretrained(temp)
            processor.save_pretrained(temp)
    return path


def cache_root() -> Path:
    """$MMEDIT_CACHE/zoo, else ~/.cache/mmedit/zoo."""
    base = os.environ.get("MMEDIT_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "mmedit") / "zoo"


def tiny(family: str, root: str | Path | None = None, seed: int = 0) -> Path:
    """Directory of the tiny `family` model, built on first use and cached under root (see cache_root).

    The directory name carries a hash of the recipe, the chat template and the transformers version, so
    a changed recipe never returns a stale model.
    """
    import transformers

    recipe = _recipe(family)
    key = json.dumps([recipe, _CHAT_TEMPLATE, transformers.__version__], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()
    root = Path(root) if root is not None else cache_root()
    path = root / f"{family}-seed{seed}-{digest[:10]}"
    if not path.is_dir():
        try:
            write(family, path, seed)
        except (MmeditError, OSError):
            if not path.is_dir():  # another process finished it first: use theirs
                raise
    return path
