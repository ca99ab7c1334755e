"""Trace time on 1 process vs N processes (torchrun, gloo on the CPU): `python benchmarks/distributed.py`.

The model is benchmarks/memory.py's random LLaVA-shaped one (default 40m, float32), saved to a folder with
its processor; the rows are that file's 112 px rows, repeated to SMALL and LARGE rows. Each run is the
command a user types, one torch thread per process:

    mmedit trace MODEL --data rows.jsonl --grads --threads 1 --out one.safetensors
    torchrun --standalone --nproc-per-node N -m mmedit trace ... --threads 1 --out n.safetensors

Wall time includes process start and model load, the same on every rank: the trace's own time is the
difference between the LARGE and the SMALL data set, and the speed-up is that difference's ratio. The two
outputs are compared (max relative difference of the unsigned sums, and of the signed ones against their
tensor's scale). Prints a table; --json FILE writes the figures with command, commit and machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory  # noqa: E402  (the model and rows of the memory benchmark)

SMALL, LARGE, BATCH = 8, 128, 4
SIGNED = ("/sum", "/grad_sum_z")


def build(folder: Path, size: str) -> tuple[Path, dict[int, Path]]:
    import torch
    from transformers import LlavaForConditionalGeneration

    from mmedit.data.rows import write_jsonl

    made = memory.processor()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(memory.config(size, made))
    model.save_pretrained(folder / "model")
    made.save_pretrained(folder / "model")
    base = memory.rows(folder)
    files = {}
    for count in (SMALL, LARGE):
        files[count] = folder / f"rows{count}.jsonl"
        write_jsonl([base[i % len(base)] for i in range(count)], files[count])
    return folder / "model", files


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=3600)
    if done.returncode:
        said = [line for line in done.stderr.splitlines() if line.startswith("error:")] or [done.stderr[-4000:]]
        raise SystemExit(f"{' '.join(command)} failed:\n" + "\n".join(said))
    return time.perf_counter() - start


def trace_command(model: Path, data: Path, out: Path) -> list[str]:
    return ["trace", str(model), "--data", str(data), "--grads", "--threads", "1", "--batch-size", str(BATCH),
            "--top", "0", "--device", "cpu", "--out", str(out), "--force"]


def difference(one: Path, other: Path) -> float:
    from mmedit.trace import TraceStats

    a, b = TraceStats.load(one), TraceStats.load(other)
    worst = 0.0
    for key, value in a.tensors.items():
        x, y = value.double(), b.tensors[key].double()
        scale = x.abs().max() if key.endswith(SIGNED) else x.abs()
        worst = max(worst, float(((x - y).abs() / scale.clamp_min(1e-300)).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="40m", choices=sorted(memory.SIZES))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        model, files = build(folder, options.size)
        walls = {}
        for count, data in files.items():
            walls[1, count] = timed([sys.executable, "-m", "mmedit", *trace_command(model, data, folder / f"1-{count}.st")])
            walls[options.processes, count] = timed(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={options.processes}",
                 "-m", "mmedit", *trace_command(model, data, folder / f"n-{count}.st")])
        worst = difference(folder / f"1-{LARGE}.st", folder / f"n-{LARGE}.st")
    one = walls[1, LARGE] - walls[1, SMALL]
    many = walls[options.processes, LARGE] - walls[options.processes, SMALL]
    result = {"size": options.size, "processes": options.processes, "rows": [SMALL, LARGE], "batch_size": BATCH,
              "wall_s": {f"{p} process(es), {c} rows": round(t, 2) for (p, c), t in walls.items()},
              "trace_s": {"1": round(one, 2), str(options.processes): round(many, 2)},
              "speedup": round(one / many, 2), "max_relative_difference": worst,
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).parent).stdout.strip(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
              "command": " ".join(["python", "benchmarks/distributed.py", *sys.argv[1:]])}
    from rich.console import Console
    from rich.table import Table

    table = Table("run", "wall s", title=f"mmedit trace --grads, {options.size} float32, 1 thread per process")
    for name, wall in result["wall_s"].items():
        table.add_row(name, f"{wall:.1f}")
    Console().print(table)
    Console().print(f"trace time ({LARGE} - {SMALL} rows): 1 process {one:.1f} s, {options.processes} processes "
                    f"{many:.1f} s: {one / many:.2f}x; max relative difference {worst:.1e}")
    if options.json:
        options.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
