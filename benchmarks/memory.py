"""Peak memory per parameter of tracing and of every plugin: `python benchmarks/memory.py`.

For each model size (random LLaVA-shaped models built from transformers config classes: a CLIP-style
tower, a Llama-style LM, vocab 8000, 112 px images of 49 patch tokens) and dtype, every target runs in a
fresh process with 1 thread on 20 forget + 40 retain rows:

    trace         mmedit.trace.trace of the forget rows, both forms, activations only
    trace-grads   the same with gradient statistics (--grads)
    <plugin>      apply_plugin(<plugin>, ...) with the plugin's defaults, the delta saved to a temp file

The figure is the run's peak RSS (resource.getrusage ru_maxrss) minus the peak RSS of a baseline process
that imports torch, transformers, mmedit, mmedit.plugins and nnsight and builds the processor and the
rows (everything a run has before its model exists), divided by the parameter count: bytes per parameter,
weights included. `--plan` also prints mmedit.plan's prediction for each run and its error; `--json FILE`
writes every figure; `--replan FILE` predicts again for the runs of such a file without measuring. The
model is built directly in its dtype (no float32 copy first).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> (hidden, vision MLP width, vision layers, LM MLP width, LM layers)
SIZES = {"10m": (256, 1024, 4, 688, 4), "40m": (512, 2048, 5, 1376, 5), "150m": (1024, 4096, 4, 2752, 7)}
DTYPES = ("float32", "bfloat16")
IMAGE, PATCH, VOCAB = 112, 16, 8000
FORGET, RETAIN, THREADS = 20, 40, 1
TRACES = ("trace", "trace-grads")


def processor():
    """The zoo's tiny LLaVA processor with 112 px images (49 image tokens)."""
    from mmedit import zoo

    _, made = zoo.build("llava")
    made.image_processor.size = {"shortest_edge": IMAGE}
    made.image_processor.crop_size = {"height": IMAGE, "width": IMAGE}
    return made


def config(size: str, made):
    """The LlavaConfig of a size, with the processor's special token ids."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    hidden, vision_mlp, vision_layers, text_mlp, text_layers = SIZES[size]
    tokens = made.tokenizer
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=vision_mlp, num_hidden_layers=vision_layers,
                              num_attention_heads=hidden // 64, image_size=IMAGE, patch_size=PATCH,
                              projection_dim=hidden)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=text_mlp, num_hidden_layers=text_layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=VOCAB,
                       max_position_embeddings=512, pad_token_id=tokens.pad_token_id,
                       bos_token_id=tokens.bos_token_id, eos_token_id=tokens.eos_token_id)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokens.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=49)


def rows(folder: Path) -> list:
    """FORGET + RETAIN rows, each with its own 112 px image."""
    import torch
    from PIL import Image

    from mmedit.data.rows import Row

    generator = torch.Generator().manual_seed(0)
    jobs = ["glassblower", "pilot", "judge", "baker", "cartographer", "beekeeper", "luthier", "ferry captain"]
    made = []
    for i in range(FORGET + RETAIN):
        pixels = (torch.rand(IMAGE, IMAGE, 3, generator=generator) * 255).to(torch.uint8).numpy()
        path = folder / f"p{i}.png"
        Image.fromarray(pixels).save(path)
        made.append(Row(id=f"p{i}", entity=f"Person {i}", image=path, question="What is the job of this person?",
                        text_question=f"What is the job of Person {i}?", answer=jobs[i % len(jobs)],
                        where=f"rows:{i + 1}"))
    return made


def child(size: str, dtype: str, target: str) -> dict:
    """One run in this process; returns its figures (peak RSS in bytes)."""
    import torch
    import nnsight  # noqa: F401 - every run imports it; the baseline too
    from transformers import LlavaForConditionalGeneration

    import mmedit.plugins  # noqa: F401
    from mmedit.data.batches import FORMS, make_batches

    torch.set_num_threads(THREADS)
    made = processor()
    with tempfile.TemporaryDirectory() as folder:
        data = rows(Path(folder))
        forget, retain = data[:FORGET], data[FORGET:]
        result = {"size": size, "dtype": dtype, "target": target}
        start = time.perf_counter()
        if target != "baseline":
            torch.manual_seed(0)
            model = LlavaForConditionalGeneration._from_config(config(size, made), dtype=getattr(torch, dtype)).eval()
            result["params"] = sum(p.numel() for p in model.parameters())
            if target in TRACES:
                from mmedit.trace import trace

                batches = (batch for form in FORMS for batch in make_batches(forget, made, form, batch_size=4))
                trace(model, batches, grads=target == "trace-grads", progress=False)
            else:
                from mmedit.plugins import apply_plugin

                delta = apply_plugin(target, model, made, forget, retain, progress=False)
                delta.save(Path(folder) / "delta.safetensors")
                result["delta_bytes"] = delta.nbytes
                result["report"] = {key: value for key, value in delta.header()["report"].items()
                                    if key in ("mask", "path_neurons", "steps", "trainable")}
        result["seconds"] = time.perf_counter() - start
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return result


def run(size: str, dtype: str, target: str) -> dict:
    """child() in a fresh process, 1 thread."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    done = subprocess.run([sys.executable, __file__, "--child", size, dtype, target], capture_output=True, text=True,
                          env=env)
    if done.returncode:
        raise SystemExit(f"{size} {dtype} {target} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def predicted(result: dict) -> int:
    """mmedit.plan's predicted peak (bytes above the baseline) for this run, with the data's own shapes."""
    from mmedit import plan

    made = processor()
    model = plan.Sized(config(result["size"], made), result["dtype"], "cpu")
    with tempfile.TemporaryDirectory() as folder:
        data = rows(Path(folder))
        sets = {"forget": data[:FORGET], "retain": data[FORGET:]}
        if result["target"] in TRACES:
            shapes = plan.shapes_from_rows(model, made, sets, 4)
            estimate = plan.plan_trace(model, shapes, grads=result["target"] == "trace-grads")
        else:
            from mmedit.plugins import get

            plugin = get(result["target"])
            options = plugin.configure()
            shapes = plan.shapes_from_rows(model, made, sets, getattr(options, "batch_size", 4))
            estimate = plan.plan_plugin(result["target"], plugin.footprint, model, shapes, options)
    return estimate.peak_bytes


def row(result: dict, plan: bool) -> list[str]:
    cells = [result["size"], f"{result['params'] / 1e6:.1f}M", result["dtype"], result["target"],
             f"{result['above_baseline'] / 2**20:,.0f}", f"{result['bytes_per_param']:.2f}", f"{result['seconds']:.0f}"]
    if plan:
        error = result["predicted"] / result["above_baseline"] - 1
        cells += [f"{result['predicted'] / result['params']:.2f}", f"{100 * error:+.1f} %"]
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "DTYPE", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--targets", default="", help="Comma-separated (default: trace, trace-grads, every plugin).")
    parser.add_argument("--plan", action="store_true", help="Also print mmedit.plan's prediction and its error.")
    parser.add_argument("--json", type=Path, help="Write every figure to this file.")
    parser.add_argument("--replan", type=Path, help="Measure nothing: predict again for the runs in this --json file.")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    from rich.console import Console
    from rich.table import Table

    from mmedit.plugins import available

    console = Console()
    table = Table(title=f"Peak RSS above the baseline, per parameter ({FORGET} forget + {RETAIN} retain rows, "
                        f"{THREADS} thread)")
    for column in ("size", "params", "dtype", "target", "MB", "B/param", "s"):
        table.add_column(column, justify="left" if column in ("size", "dtype", "target") else "right")
    if args.plan or args.replan:
        table.add_column("plan B/param", justify="right")
        table.add_column("error", justify="right")
    if args.replan:
        record = json.loads(args.replan.read_text())
        for result in record["results"]:
            result["predicted"] = predicted(result)
            table.add_row(*row(result, True))
        console.print(table)
        worst = max(abs(r["predicted"] / r["above_baseline"] - 1) for r in record["results"])
        console.print(f"largest error {100 * worst:.1f} %")
        if args.json:
            args.json.write_text(json.dumps(record, indent=1))
        return
    targets = args.targets.split(",") if args.targets else [*TRACES, *available()]
    results = []
    for dtype in args.dtypes.split(","):
        baseline = run("10m", dtype, "baseline")["peak_rss"]
        for size in args.sizes.split(","):
            for target in targets:
                result = run(size, dtype, target)
                result["above_baseline"] = result["peak_rss"] - baseline
                result["bytes_per_param"] = result["above_baseline"] / result["params"]
                if args.plan:
                    result["predicted"] = predicted(result)
                results.append(result)
                table.add_row(*row(result, args.plan))
                console.print(" ".join(row(result, args.plan)))
    console.print(table)
    if args.json:
        import torch

        record = {"command": " ".join(["python", "benchmarks/memory.py", *sys.argv[1:]]),
                  "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip(),
                  "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
                  "results": results}
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
