"""CPU threads: 1 vs 2 torch threads for the CLI's two kinds of work (an eval forward pass without gradients,
a training step with them) on LLaVA models from the embedded one to ~60M parameters. It decides the CLI's
`--threads 0` rule (one thread below cli.common.SMALL_MODEL parameters); results in BENCHMARKS.md.

    python benchmarks/threads.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

# name -> (text hidden, text intermediate, text layers, vision hidden, vision intermediate, vision layers)
SIZES = {"5m": (256, 688, 4, 128, 512, 2), "20m": (512, 1376, 5, 256, 1024, 3), "60m": (768, 2048, 8, 384, 1536, 4)}


def models():
    """(name, model, processor): the embedded model, the zoo's tiny LLaVA, then larger random LLaVAs."""
    from mmedit import zoo
    from mmedit.bench.model import embedded
    from mmedit.loading import load

    yield ("embedded", *load(embedded(progress=False).model, device="cpu"))
    yield ("zoo tiny", *zoo.build("llava"))
    recipe = json.loads((zoo.RECIPES / "llava.json").read_text())["config"]
    for name, (hidden, inner, layers, v_hidden, v_inner, v_layers) in SIZES.items():
        text = copy.deepcopy(recipe["text_config"]) | {"hidden_size": hidden, "intermediate_size": inner,
                                                        "num_hidden_layers": layers, "num_attention_heads": 8,
                                                        "num_key_value_heads": 4}
        model, processor = zoo.build("llava")  # for its tokenizer's ids, then the same config scaled
        text |= {key: getattr(model.config.text_config, key) for key in ("vocab_size", "pad_token_id",
                                                                         "bos_token_id", "eos_token_id")}
        vision = copy.deepcopy(recipe["vision_config"]) | {"hidden_size": v_hidden, "intermediate_size": v_inner,
                                                            "num_hidden_layers": v_layers, "num_attention_heads": 4}
        yield (name, *zoo.build("llava", config={"text_config": text, "vision_config": vision}))


def timed(work, repeats: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    from mmedit.bench.profiles import generate
    from mmedit.data import read_rows
    from mmedit.data.batches import make_batches

    bench = generate(Path(tempfile.mkdtemp()) / "bench", n_people=10, seed=0)
    rows = read_rows(bench.root / "retain90.jsonl")
    table = Table("model", "params", "work", "1 thread (s)", "2 threads (s)", "2 threads faster by",
                  title="CPU threads: median seconds per step")
    for name, model, processor in models():
        params = sum(p.numel() for p in model.parameters())
        evaluation = next(make_batches(rows[:16], processor, "multimodal", batch_size=16))
        training = next(make_batches(rows[:4], processor, "multimodal", batch_size=4, with_answer=True))

        def forward():
            with torch.no_grad():
                model(**evaluation.inputs)

        def step():
            model.zero_grad(set_to_none=True)
            model(**training.inputs).loss.backward()

        for work, run in (("eval forward x16", forward), ("train step x4", step)):
            seconds = {}
            for count in (1, 2):
                torch.set_num_threads(count)
                seconds[count] = timed(run, args.repeats)
            table.add_row(name, f"{params / 1e6:.1f}M", work, f"{seconds[1]:.4f}", f"{seconds[2]:.4f}",
                          f"{seconds[1] / seconds[2]:.2f}x")
    Console().print(table)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}; {platform.platform()}; {torch.get_num_interop_threads()} interop threads; "
          f"load average {open('/proc/loadavg').read().split()[:3] if Path('/proc/loadavg').exists() else '?'}")


if __name__ == "__main__":
    main()
