"""Trace overhead and memory: `python benchmarks/trace_overhead.py [--quick]`.

1. Time per batch on a ~50M-parameter random LLaVA-shaped model (CLIP-style tower, Llama-style LM):
   - bare:   the plain HF forward + loss.backward() (all weight gradients), as a training step does;
   - hooks:  plain torch hooks + torch.autograd.grad to every neuron site + the same statistics
             (the same work as mmedit, without nnsight);
   - mmedit: mmedit.trace.trace(..., grads=True) over every MLP neuron of all three parts.
   Medians of repeated runs, measured in one process, one after the other. `--device cuda` times the
   same on a GPU (CUDA synchronised after each step).
2. Peak RSS of tracing 10 vs 100 vs 1000 examples (with gradients) on a ~7M model of the same shape,
   each in a fresh process: statistics stream, so memory must not grow with the data.
3. `--statistics-only`: the statistics alone, Accumulator.add for the 17 sites of one batch of the ~50M
   model (activations and gradients already computed), median of 20.
Threads: torch's default, or OMP_NUM_THREADS.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

from mmedit.data.batches import IGNORE


def llava_model(hidden=512, layers=8):
    """A random LLaVA-shaped model: hidden 512 x 8 layers on each side is ~60M parameters."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                              num_attention_heads=8, image_size=112, patch_size=16)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=8, vocab_size=8000)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=7999, vision_feature_layer=-1)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def batch_for(model, batch_size=4, text_tokens=48, device="cpu"):
    from mmedit.data.batches import Batch

    image_tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    ids = torch.randint(0, 7000, (batch_size, image_tokens + text_tokens))
    ids[:, 1 : 1 + image_tokens] = model.config.image_token_id
    labels = torch.full_like(ids, IGNORE)
    labels[:, -8:] = ids[:, -8:]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
              "pixel_values": torch.randn(batch_size, 3, 112, 112)}
    inputs = {key: value.to(device) for key, value in inputs.items()}
    return Batch(inputs=inputs, form="multimodal", rows=[])


def bare_step(model, batch):
    model(**batch.inputs).loss.backward()
    model.zero_grad(set_to_none=True)


def site_tensors(model, batch, model_map):
    """Plain torch hooks + torch.autograd.grad: every site's activation and gradient, and the LLM groups."""
    from mmedit.trace.tracer import position_groups

    seen, handles = {}, []
    for site in model_map.sites:
        module = model.get_submodule(site.module)
        handles.append(module.register_forward_pre_hook(lambda m, a, n=site.name: seen.__setitem__(n, a[0])))
    try:
        loss = model(**batch.inputs).loss
    finally:
        for handle in handles:
            handle.remove()
    grads = torch.autograd.grad(loss, [seen[s.name] for s in model_map.sites])
    groups = position_groups(model_map.token_masks(batch.inputs, batch.inputs["labels"]))
    return [seen[s.name] for s in model_map.sites], grads, groups


def accumulate(model_map, values, grads, groups):
    """The statistics of one batch: Accumulator.add for every site."""
    from mmedit.trace.stats import Accumulator

    accumulator = Accumulator()
    for site, value, grad in zip(model_map.sites, values, grads):
        masks = groups if site.part == "llm" else {"all": torch.ones(value.shape[:-1], dtype=torch.bool,
                                                                      device=value.device)}
        accumulator.add(site.name, "multimodal", value, masks, grad)
    return accumulator


def hooks_step(model, batch, model_map):
    accumulate(model_map, *site_tensors(model, batch, model_map))


def timed(steps: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each step, run round-robin so that machine load hits all alike."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():
        step()  # warm-up (nnsight compiles a trace body once)
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def overhead(repeats: int, device: torch.device) -> dict:
    from mmedit.arch import model_map
    from mmedit.trace import trace

    model = llava_model().to(device)
    mapping = model_map(model)
    batch = batch_for(model, device=device)
    per_trace = 4  # batches per trace() call, so per-call setup is amortised as in real use
    seconds = timed({
        "bare_s": lambda: bare_step(model, batch),
        "hooks_s": lambda: hooks_step(model, batch, mapping),
        "mmedit_s": lambda: trace(model, [batch] * per_trace, grads=True, progress=False),
    }, repeats, device)
    seconds["mmedit_s"] /= per_trace
    result = {
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "sites": len(mapping.sites),
        "neurons": sum(site.width for site in mapping.sites),
        "batch": list(batch.inputs["input_ids"].shape),
        **{name: round(value, 4) for name, value in seconds.items()},
    }
    result["mmedit_over_bare"] = round(result["mmedit_s"] / result["bare_s"], 3)
    result["mmedit_over_hooks"] = round(result["mmedit_s"] / result["hooks_s"], 3)
    return result


def statistics_cost(repeats: int, device: torch.device) -> dict:
    """Accumulator.add for the sites of one batch alone (activations and gradients given): its median."""
    from mmedit.arch import model_map

    model = llava_model().to(device)
    mapping = model_map(model)
    values, grads, groups = site_tensors(model, batch_for(model, device=device), mapping)
    values, grads = [v.detach() for v in values], [g.detach() for g in grads]
    seconds = timed({"statistics_s": lambda: accumulate(mapping, values, grads, groups)}, repeats, device)
    return {"sites": len(mapping.sites), "statistics_ms": round(1000 * seconds["statistics_s"], 2)}


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_child(examples: int) -> None:
    """Runs in a fresh process: trace `examples` examples through a ~7M model of the same shape and
    print the peak RSS during tracing above the RSS just before it (Linux: clear_refs resets the peak)."""
    from mmedit.trace import trace

    model = llava_model(hidden=128, layers=4)
    batch_size = 4
    batches = (batch_for(model, batch_size) for _ in range(-(-examples // batch_size)))
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    before = _status_mb("VmRSS")
    trace(model, batches, grads=True, progress=False)
    peak = _status_mb("VmHWM")
    print(json.dumps({"examples": examples, "rss_before_mb": round(before), "peak_rss_mb": round(peak),
                      "trace_added_mb": round(peak - before, 1)}))


def memory(sizes) -> list[dict]:
    results = []
    for examples in sizes:
        output = subprocess.run([sys.executable, __file__, "--memory-child", str(examples)], check=True,
                                capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--memory-only", action="store_true", help="skip the timing part")
    parser.add_argument("--statistics-only", action="store_true",
                        help="time only Accumulator.add for the sites of one batch (median of 20)")
    parser.add_argument("--device", default="cpu", help="where the timing part runs: cpu, cuda or cuda:N "
                        "(the memory part measures CPU RSS and runs on CPU only)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_rss_child(args.memory_child)
        return
    torch.manual_seed(0)
    device = torch.device(args.device)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(json.dumps({"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                                 f"torch {torch.__version__}{gpu}"}), flush=True)
    if args.statistics_only:
        print(json.dumps({"statistics": statistics_cost(20, device)}), flush=True)
        return
    if not args.memory_only:
        print(json.dumps({"overhead": overhead(3 if args.quick else 7, device)}, indent=2), flush=True)
    if device.type == "cpu":
        print(json.dumps({"memory": memory((10, 100, 1000))}, indent=2), flush=True)


if __name__ == "__main__":
    main()
