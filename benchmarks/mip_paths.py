"""MIP-Editor path search: batched (samples x steps per traced pass) vs the straightforward loop.

Both run `mmedit.plugins.mip_editor.search.find_paths` on the same model and rows; the loop is
`loop=True`: one sample, one interpolation step and one layer per forward + backward (what the reference
code does, minus its position-0 reading). The model is a random-weight LLaVA from the tiny zoo recipe,
widened to ~50M parameters (LM 512 wide x 8 layers, vision 384 x 8 layers, 64 px images, 16 patches);
the rows are synthetic portraits with byte-level questions (about 60 tokens with the answer).
Both searches must find the same paths (checked: same neurons, scores within 1e-4).

    python benchmarks/mip_paths.py                       # 16 forget rows, m = 4, both sides
    python benchmarks/mip_paths.py --samples 8 --threads 1 --json out.json   # steadiest on a shared machine
    python benchmarks/mip_paths.py --device cuda        # on a GPU: wall time, CUDA synchronised
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from mmedit import zoo
from mmedit.data.rows import Row
from mmedit.plugins.mip_editor.search import find_paths

JOBS = ["glassblower", "pilot", "judge", "baker", "cartographer", "beekeeper", "luthier", "ferry captain"]


def build_model(seed: int = 0):
    base, _ = zoo.build("llava", seed=seed)
    text = base.config.text_config.to_dict()
    text.update(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8)
    vision = base.config.vision_config.to_dict()
    vision.update(hidden_size=384, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=6,
                  image_size=64, patch_size=16)
    model, processor = zoo.build("llava", seed=seed, config={"text_config": text, "vision_config": vision,
                                                             "image_seq_length": 16})
    processor.image_processor.size = {"shortest_edge": 64}
    processor.image_processor.crop_size = {"height": 64, "width": 64}
    processor.image_seq_length = 16
    return model, processor


def make_rows(folder: Path, count: int) -> list[Row]:
    rows = []
    for i in range(count):
        image = Image.new("RGB", (64, 64), (20 + 13 * i % 200, 180 - 11 * i % 150, 90))
        image.paste((255, 255, 255), (8 + i % 20, 8, 28 + i % 20, 30))
        path = folder / f"p{i}.png"
        image.save(path)
        name = f"Person {i:02d}"
        rows.append(Row(id=f"p{i}", entity=name, image=path, question="What is the occupation of this person?",
                        text_question=f"What is the occupation of {name}?", answer=JOBS[i % len(JOBS)],
                        where=f"bench:{i}"))
    return rows


def timed(function, device: torch.device):
    """(result, wall seconds, CPU seconds of this process). On a shared machine the CPU time is the
    steadier measure: other jobs stretch the wall time of whichever variant they overlap. On a GPU the
    wall time (after synchronising) is the measure."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16, help="forget rows")
    parser.add_argument("--steps", type=int, default=4, help="interpolation steps m")
    parser.add_argument("--batch-rows", type=int, default=64, help="rows (samples x steps) per batched pass")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--sides", default="llm,vision", help="parts to search")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # cuDNN convolutions (the patch embedding) default to TF32 on GPUs, with algorithms picked per batch
    # size: the one-row loop and the batched passes would then round differently. Compare in full fp32.
    torch.backends.cudnn.allow_tf32 = False
    model, processor = build_model()
    model.to(device)
    parameters = sum(p.numel() for p in model.parameters())
    parts = tuple(part.strip() for part in args.sides.split(","))
    with tempfile.TemporaryDirectory() as folder:
        rows = make_rows(Path(folder), args.samples)
        options = dict(parts=parts, steps=args.steps, top_k=5)
        find_paths(model, processor, rows[:2], **options)  # warm-up: nnsight compiles the trace bodies once
        results = {}
        for part in parts:
            run = options | {"parts": (part,)}
            variants = {"batched": dict(batch_rows=args.batch_rows, share_prefix=True)}
            if part == "llm":  # the text side also shares the prompt prefix; time it without, too
                variants["batched, no shared prefix"] = dict(batch_rows=args.batch_rows, share_prefix=False)
            found = {name: timed(lambda kw=kw: find_paths(model, processor, rows, **run, **kw), device)
                     for name, kw in variants.items()}
            loop, loop_s, loop_cpu = timed(lambda: find_paths(model, processor, rows, loop=True, **run), device)
            layers = len(loop.neurons)
            chunks = -(-args.samples // max(1, args.batch_rows // args.steps))
            results[part] = {"layers": layers, "path_neurons": loop.count(), "loop_s": round(loop_s, 2),
                             "loop_cpu_s": round(loop_cpu, 2),
                             "loop_passes": args.samples * (1 + layers * args.steps),  # clean + m per layer, per sample
                             "batched_passes": chunks * (1 + layers), "variants": {}}
            for name, (batched, seconds, cpu) in found.items():
                same = list(batched.neurons) == list(loop.neurons) and all(
                    torch.equal(batched.neurons[n], loop.neurons[n])
                    and torch.allclose(batched.scores[n], loop.scores[n], rtol=1e-4, atol=1e-6) for n in loop.neurons)
                # neurons in one search's paths but not the other's (near-ties can flip under other rounding)
                differing = sum(len(set(batched.neurons.get(n, torch.tensor([])).tolist())
                                    ^ set(loop.neurons.get(n, torch.tensor([])).tolist()))
                                for n in {*loop.neurons, *batched.neurons})
                results[part]["variants"][name] = {"seconds": round(seconds, 2), "cpu_s": round(cpu, 2),
                                                   "speedup": round(loop_s / seconds, 1),
                                                   "cpu_speedup": round(loop_cpu / cpu, 1), "same_paths": same,
                                                   "differing_neurons": differing,
                                                   "shared_prefix": batched.meta["shared_prefix"].get(part)}
    record = {"load_average": os.getloadavg(), "parameters": parameters, "samples": args.samples,
              "steps": args.steps, "batch_rows": args.batch_rows,
              "threads": torch.get_num_threads(), "machine": platform.platform(), "results": results,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__}
    print(f"model: {parameters / 1e6:.1f}M parameters (LLaVA: LM 512 x 8, vision 384 x 8); {args.samples} forget rows, "
          f"m = {args.steps}, top-k 5, {args.batch_rows} rows per batched pass, {torch.get_num_threads()} threads, "
          f"device {record['device']}")
    print("| side | layers | loop passes | loop CPU (wall) | variant | passes | CPU (wall) | speed-up CPU (wall) "
          "| same paths |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---|")
    for part, r in results.items():
        for name, v in r["variants"].items():
            print(f"| {part} | {r['layers']} | {r['loop_passes']} | {r['loop_cpu_s']:.1f} s ({r['loop_s']:.1f} s) | "
                  f"{name} | {r['batched_passes']} | {v['cpu_s']:.1f} s ({v['seconds']:.1f} s) | "
                  f"{v['cpu_speedup']:.1f}x ({v['speedup']:.1f}x) | {v['same_paths']} ({v['differing_neurons']} differ) |")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
