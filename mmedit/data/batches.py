"""Rows -> model inputs, through the processor's own chat template.

A multimodal example is the user turn [image, row.question]; a text example is [row.text_question]
with no image at all (pixel keys left out: some models' generate() crashes on pixel_values=None).
With an answer, the assistant turn is row.answer as the chat template writes it, and eos is appended
when the template does not close the turn with a special token itself. Labels are IGNORE (-100) everywhere
except the answer tokens (and that closing token).

The prompt and prompt + answer are both run through the processor (image-token expansion included) and
the prompt's tokens must be a prefix of the full tokens; otherwise the answer positions would be a guess.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from mmedit.data.rows import Row
from mmedit.errors import MmeditError

FORMS = ("multimodal", "text")
IGNORE = -100  # label of positions the loss skips


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # model(**inputs) works; "labels" included when built with the answer
    form: str  # "multimodal" | "text"
    rows: list[Row]


def _user_turn(row: Row, form: str) -> dict:
    if form == "text":
        return {"role": "user", "content": [{"type": "text", "text": row.text_question}]}
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row.question}]}


def _assistant_turn(answer: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


def _render(processor, conversation: list[dict], generation: bool) -> str:
    if processor.chat_template is not None:
        return processor.apply_chat_template(conversation, add_generation_prompt=generation, tokenize=False)
    if _takes_suffix(processor):
        # PaliGemma has no template: its processor writes "<image>...<bos>question\n" around an image
        # prompt; a text prompt gets the same layout without the image.
        content = conversation[0]["content"]
        question = "".join(item["text"] for item in content if item["type"] == "text")
        if any(item["type"] == "image" for item in content):
            return processor.image_token + question
        return processor.tokenizer.bos_token + question + "\n"
    raise MmeditError(
        f"the {type(processor).__name__} has no chat template; set processor.chat_template "
        "(a Jinja template like the model's instruct version uses)"
    )


def _open_image(row: Row):
    from PIL import Image

    if row.image is None:
        raise MmeditError(f"{row.where}: row {row.id!r} has no image; use the text form for it")
    try:
        with warnings.catch_warnings():  # PIL only warns between its pixel limit and twice that
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(row.image) as image:
                return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # missing, unreadable, truncated, not an image, or a decompression bomb
        raise MmeditError(f"{row.where}: cannot read image {row.image}: {error}") from None


def _takes_suffix(processor) -> bool:
    """Processors with a `suffix` argument (PaliGemma) write prompt + answer themselves: they end the
    prompt with a newline and append eos, so the answer must go through that argument."""
    return "suffix" in inspect.signature(type(processor).__call__).parameters


def _encode(processor, texts: list[str], images, padding_side: str, suffixes=None) -> dict:
    tokenizer = processor.tokenizer
    # Like apply_chat_template(tokenize=True): a template that writes bos itself gets no second one.
    bos = tokenizer.bos_token
    options = dict(
        padding=True,
        padding_side=padding_side,
        return_tensors="pt",
        add_special_tokens=not (bos and all(text.startswith(bos) for text in texts)),
    )
    if images is None:  # processors add nothing to text-only input, and some (PaliGemma) refuse it
        return dict(tokenizer(texts, return_token_type_ids=False, **options))
    if suffixes is not None:
        options["suffix"] = suffixes
    encoded = processor(images=[[image] for image in images], text=texts, **options)
    # Labels are ours to make (PaliGemma's processor returns its own).
    return {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor) and key != "labels"}


def _labels(rows, prompt: dict, full: dict) -> torch.Tensor:
    """IGNORE except where full goes past the prompt; the prompt must be a token prefix of full."""
    labels = full["input_ids"].clone()
    prompt_lengths = prompt["attention_mask"].sum(dim=1).tolist()
    full_lengths = full["attention_mask"].sum(dim=1).tolist()
    for i, row in enumerate(rows):
        n = prompt_lengths[i]
        if n >= full_lengths[i] or not torch.equal(full["input_ids"][i, :n], prompt["input_ids"][i, :n]):
            raise MmeditError(
                f"{row.where}: the prompt's tokens are not a prefix of prompt + answer tokens; "
                "cannot tell where the answer starts (check the processor's chat template)"
            )
        labels[i, :n] = IGNORE
    labels[full["attention_mask"] == 0] = IGNORE
    return labels


def _completion(processor, prompt: str, conversation: list[dict], answer: str, row: Row) -> str:
    """The assistant turn as the template writes it after the prompt, closed by eos if needed."""
    tokenizer = processor.tokenizer
    if processor.chat_template is None:
        completion = answer
    else:
        full = _render(processor, conversation + [_assistant_turn(answer)], generation=False)
        if not full.startswith(prompt):
            raise MmeditError(f"{row.where}: the chat template's prompt is not a prefix of its prompt + answer")
        # Whitespace after the turn's end (Qwen's "<|im_end|>\n", LLaVA's trailing space) is not answer.
        completion = full[len(prompt):].rstrip()
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token and not (ids and ids[-1] in tokenizer.all_special_ids):
        completion += tokenizer.eos_token
    return completion


def _batch(rows: list[Row], processor, form: str, with_answer: bool, padding_side: str, device) -> Batch:
    conversations = [[_user_turn(row, form)] for row in rows]
    prompts = [_render(processor, conversation, generation=True) for conversation in conversations]
    images = [_open_image(row) for row in rows] if form == "multimodal" else None
    prompt_inputs = _encode(processor, prompts, images, padding_side)
    if not with_answer:
        inputs = prompt_inputs
    elif images is not None and _takes_suffix(processor):
        inputs = _encode(processor, prompts, images, padding_side, suffixes=[row.answer for row in rows])
    else:
        completions = [
            _completion(processor, prompt, conversation, row.answer, row)
            for prompt, conversation, row in zip(prompts, conversations, rows)
        ]
        inputs = _encode(processor, [p + c for p, c in zip(prompts, completions)], images, padding_side)
    if with_answer:
        inputs["labels"] = _labels(rows, prompt_inputs, inputs)
    if device is not None:
        inputs = {key: value.to(device) for key, value in inputs.items()}
    return Batch(inputs=inputs, form=form, rows=list(rows))


def _chunks(rows: Sequence[Row], form: str, batch_size: int) -> Iterator[list[Row]]:
    if form not in FORMS:
        raise MmeditError(f"unknown form {form!r}; forms are {', '.join(FORMS)}")
    if batch_size < 1:
        raise MmeditError(f"batch size must be at least 1, got {batch_size}")
    rows = list(rows)
    for start in range(0, len(rows), batch_size):
        yield rows[start : start + batch_size]


def make_batches(
    rows: Sequence[Row], processor, form: str = "multimodal", batch_size: int = 4, with_answer: bool = True, device=None
) -> Iterator[Batch]:
    """Right-padded batches for training and tracing; with_answer adds the answer and its labels."""
    for chunk in _chunks(rows, form, batch_size):
        yield _batch(chunk, processor, form, with_answer, "right", device)


def make_prompts(rows: Sequence[Row], processor, form: str = "multimodal", batch_size: int = 4, device=None) -> Iterator[Batch]:
    """Left-padded prompts without the answer, ready for model.generate(**batch.inputs)."""
    for chunk in _chunks(rows, form, batch_size):
        yield _batch(chunk, processor, form, False, "left", device)
