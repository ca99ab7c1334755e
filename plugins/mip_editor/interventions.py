"""The interventions of the path search: where neurons are scaled (position masks), the traced forward that
scales them, and the shared prompt prefix run once and reused as a key/value cache.

Positions: "answer" (the positions whose next token is an answer token: the last prompt token and the
answer tokens but the last), "all" (non-pad) or "first" (sequence position 0, what the reference code
reads). Vision sites use every patch of the image ("first": the first one).
"""
from __future__ import annotations

import copy

import torch

from mmedit.data.batches import IGNORE
from mmedit.errors import MmeditError

POSITIONS = ("answer", "all", "first")


def model_inputs(inputs: dict) -> dict:
    """A batch's inputs without the labels (the search computes its own objective)."""
    return {key: value for key, value in inputs.items() if key != "labels"}


def unit_rows(units: int, inputs: dict, rows: int) -> torch.Tensor:
    """Which batch row each leading-dim unit of a site's activation belongs to (LLM: units = rows; vision:
    one or more images per row, or Qwen-style flattened patches counted by image_grid_thw)."""
    device = inputs["input_ids"].device
    index = torch.arange(rows, device=device)
    if units == rows:
        return index
    thw = inputs.get("image_grid_thw")
    if thw is not None and thw.shape[0] == rows and int(thw.prod(-1).sum()) == units:
        return index.repeat_interleave(thw.prod(-1))
    sizes = inputs.get("image_sizes")
    if units % rows == 0 and (sizes is None or bool((sizes == sizes[:1]).all())):
        return index.repeat_interleave(units // rows)
    raise MmeditError(f"cannot split vision activations of {units} units between {rows} rows (images of "
                      "different sizes?); search the text side only (--set side=text)")


def position_mask(part: str, positions: str, shape: torch.Size, inputs: dict,
                  rows_of_units: torch.Tensor) -> torch.Tensor:
    """Bool mask over a site's activation shape without the neuron axis: where neurons are scaled and read."""
    if part == "llm":
        real = inputs["attention_mask"].bool()
        if positions == "all":
            return real
        mask = torch.zeros_like(real)
        if positions == "first":
            mask[:, 0] = True
            return mask
        mask[:, :-1] = inputs["labels"][:, 1:] != IGNORE
        return mask
    mask = torch.ones(shape, dtype=torch.bool, device=rows_of_units.device)
    if positions != "first":
        return mask
    if len(shape) > 1:  # [images, patches]: the first patch of each image
        mask[:, 1:] = False
        return mask
    first = torch.ones_like(mask)  # [patches] flattened: the first patch of each row's block
    first[1:] = rows_of_units[1:] != rows_of_units[:-1]
    return first


def scaled_logits(wrapped, inputs: dict, replacements, cache=None) -> torch.Tensor:
    """One traced forward where each (site, value, mask) sets the site's neurons to
    live + mask * (value - live): value where mask is 1, the live activation elsewhere. `cache`: the
    shared prefix's keys and values (inputs then hold only the positions after it)."""
    saved: dict = {}
    extra = {} if cache is None else {"past_key_values": cache, "use_cache": False}
    with wrapped.trace(**model_inputs(inputs), **extra):
        for site, value, mask in replacements:
            envoy = wrapped.get(site.module)
            if site.io == "input":
                live = envoy.input
                envoy.input = live + mask * (value - live)
            else:
                live = envoy.output
                envoy.output = live + mask * (value - live)
        saved["output"] = wrapped.output.save()
    return saved["output"].logits


def prefix_cache(wrapped, inputs: dict, start: int, logits: torch.Tensor):
    """Keys and values of positions [0, start) (which no scaling reaches: attention is causal and the
    scaled positions come later), or None where the model cannot continue from them exactly: the logits
    of a continuation must match the clean pass (`logits`; models with bidirectional prefixes, such as
    PaliGemma's, or cross-attention caches fail this and run whole sequences)."""
    prefix = {key: value[:, :start] for key, value in model_inputs(inputs).items()}
    try:
        with torch.no_grad():
            saved: dict = {}
            with wrapped.trace(**prefix, use_cache=True):
                saved["output"] = wrapped.output.save()
            cache = saved["output"].past_key_values
            with wrapped.trace(**model_inputs(suffix(inputs, start)), past_key_values=repeat_cache(cache, 1),
                               use_cache=False):
                saved["continued"] = wrapped.output.save()
    except Exception:  # noqa: BLE001 - any family the cache path does not serve falls back to full passes
        return None
    continued, expected = saved["continued"].logits.float(), logits[:, start:].float()
    tolerance = (1e-4 if logits.dtype == torch.float32 else 3e-2) * max(1.0, float(expected.abs().max()))
    if continued.shape != expected.shape or float((continued - expected).abs().max()) > tolerance:
        return None
    return cache


def suffix(inputs: dict, start: int) -> dict:
    """The positions from `start` on (the attention mask keeps the prefix: the cache holds it)."""
    length = inputs["input_ids"].shape[1]
    return {key: value if key == "attention_mask" or value.dim() < 2 or value.shape[1] != length
            else value[:, start:] for key, value in inputs.items()}


def repeat_cache(cache, times: int):
    """A copy of `cache` with each row repeated `times` times (the passes stack samples x steps)."""
    repeated = copy.deepcopy(cache)
    if times > 1:
        repeated.batch_repeat_interleave(times)
    return repeated
