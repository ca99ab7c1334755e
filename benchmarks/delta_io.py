"""Delta I/O benchmark: apply/revert time vs bytes touched, and delta size vs a full checkpoint.

Models are stacks of random bf16 MLP blocks (up [4096, 1024] and down [1024, 4096], 8.4M parameters per
block) built with plain torch: 6 blocks (~50M parameters) and 60 blocks (~503M). The deltas that
measure apply/revert touch the same tensors (blocks 0-3) in both models, so equal times on both mean
the cost follows the bytes touched, not the model size.

    python benchmarks/delta_io.py                 # both models, prints markdown tables
    python benchmarks/delta_io.py --json out.json # also write the raw figures
    python benchmarks/delta_io.py --threads 1     # steadier on a shared machine
    python benchmarks/delta_io.py --device cuda   # apply/revert on GPU-resident weights (CUDA synchronised)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mmedit.delta import Delta

HIDDEN, FFN, DTYPE = 1024, 4096, torch.bfloat16


def random_model(blocks: int, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList()
    for _ in range(blocks):
        block = torch.nn.Module()
        for name, shape in (("up", (FFN, HIDDEN)), ("down", (HIDDEN, FFN))):
            weight = torch.randn(shape, generator=generator).to(DTYPE)
            block.register_parameter(name, torch.nn.Parameter(weight, requires_grad=False))
        model.layers.append(block)
    return model


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach() for name, param in model.named_parameters()}


def noise_like(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(tensor.shape, generator=generator).to(tensor.dtype)


def row_delta(model, rows: int, blocks: int = 4) -> Delta:
    """New values for `rows` rows of `up` in each of the first `blocks` blocks (row-sparse)."""
    generator, params, changes = torch.Generator().manual_seed(1), weights(model), {}
    for block in range(blocks):
        old = params[f"layers.{block}.up"]
        new, index = old.clone(), torch.randperm(FFN, generator=generator)[:rows]
        new[index] = noise_like(new[index], generator)
        changes[f"layers.{block}.up"] = (old, new)
    return Delta.from_changes(changes)


def element_delta(model, density: float, blocks: int = 4) -> Delta:
    """New values for a random `density` of the elements of up and down in the first `blocks` blocks."""
    generator, params, changes = torch.Generator().manual_seed(2), weights(model), {}
    for block in range(blocks):
        for name in ("up", "down"):
            old = params[f"layers.{block}.{name}"]
            new, mask = old.clone(), torch.rand(old.shape, generator=generator) < density
            new[mask] = noise_like(new[mask], generator)
            changes[f"layers.{block}.{name}"] = (old, new)
    return Delta.from_changes(changes)


def dense_delta(model, tensors: int) -> Delta:
    """Every element of the first `tensors` weights changed (negated)."""
    params = weights(model)
    names = [f"layers.{block}.{name}" for block in range(4) for name in ("up", "down")][:tensors]
    return Delta.from_changes({name: (params[name], params[name].neg()) for name in names})


def timed(function, repeat: int) -> float:
    """Median wall time in ms."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def synchronize(model: torch.nn.Module) -> None:
    """Wait for the model's queued GPU work, so that timers see it (no-op on CPU)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def apply_revert(models: dict, delta: Delta, directory: Path, repeat: int) -> dict:
    """The same delta on every model, interleaved so that all models see the same machine load."""
    path = delta.save(directory / "delta.safetensors", overwrite=True)
    result = {"touched_bytes": delta.touched * DTYPE.itemsize, "file_bytes": path.stat().st_size,
              "load_ms": timed(lambda: Delta.load(path), repeat),
              # the first apply of a delta built in memory computes its checksum (the model's stack holds it)
              "checksum_ms": timed(lambda: Delta(delta.changes, delta.provenance).checksum, repeat)}
    times = {label: {"apply": [], "revert": []} for label in models}
    delta.apply(next(iter(models.values())))  # warm-up; also the one-off NaN/inf scan and checksum
    delta.revert(next(iter(models.values())))
    for _ in range(repeat):
        for label, model in models.items():
            synchronize(model)
            start = time.perf_counter()
            delta.apply(model)
            synchronize(model)
            middle = time.perf_counter()
            delta.revert(model)
            synchronize(model)
            times[label]["apply"].append((middle - start) * 1000)
            times[label]["revert"].append((time.perf_counter() - middle) * 1000)
    for label, measured in times.items():
        result[label] = {key: statistics.median(values) for key, values in measured.items()}
    return result


def sizes(model, directory: Path) -> dict:
    """Delta size vs the full safetensors checkpoint for a 2 %-of-neurons pruning and a 1 % masked update."""
    checkpoint = directory / "full.safetensors"
    save_file(weights(model), checkpoint)
    full = checkpoint.stat().st_size
    checkpoint.unlink()
    generator, params = torch.Generator().manual_seed(3), weights(model)
    blocks = len(model.layers)

    neurons = {block: torch.randperm(FFN, generator=generator)[: round(0.02 * FFN)] for block in range(blocks)}
    start = time.perf_counter()
    prune = Delta.zeroed_rows(model, {f"layers.{b}.{n}": rows for b, rows in neurons.items() for n in ("up", "down")},
                              axes={f"layers.{b}.down": 1 for b in range(blocks)})
    prune_s = time.perf_counter() - start

    changes = {}
    for name, old in params.items():
        new, mask = old.clone(), torch.rand(old.shape, generator=generator) < 0.01
        new[mask] = noise_like(new[mask], generator)
        changes[name] = (old, new)
    start = time.perf_counter()
    masked = Delta.from_changes(changes)
    masked_s = time.perf_counter() - start
    del changes

    result = {"full_bytes": full}
    for label, delta, seconds in (("prune_2pct_neurons", prune, prune_s), ("masked_1pct_weights", masked, masked_s)):
        path = delta.save(directory / f"{label}.safetensors")
        result[label] = {"file_bytes": path.stat().st_size, "touched": delta.touched, "build_s": seconds,
                         "kinds": sorted({change.kind for change in delta.changes.values()})}
        path.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[6, 60], help="model sizes, in MLP blocks")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="where the models' weights live: cpu, cuda or cuda:N "
                        "(deltas are built and saved from CPU copies)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    device = torch.device(args.device)
    gpu = f", weights on {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                         f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load}{gpu}",
              "runs": {}, "sizes": {}}
    print(f"machine: {report['machine']}\n")
    with tempfile.TemporaryDirectory() as temp:
        directory = Path(temp)
        # Same seed: the first blocks of every model are identical, so one delta fits them all.
        models = {}
        for blocks in args.blocks:
            model = random_model(blocks)
            models[f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M"] = model
        smallest = next(iter(models.values()))
        placed = models if device.type == "cpu" else {
            label: copy.deepcopy(model).to(device) for label, model in models.items()}
        for label, make in [
            ("rows: 8 rows x 4", lambda: row_delta(smallest, 8)),
            ("rows: 128 rows x 4", lambda: row_delta(smallest, 128)),
            ("rows: 2048 rows x 4", lambda: row_delta(smallest, 2048)),
            ("elements: 0.1 % of 8", lambda: element_delta(smallest, 0.001)),
            ("elements: 1 % of 8", lambda: element_delta(smallest, 0.01)),
            ("elements: 10 % of 8", lambda: element_delta(smallest, 0.1)),
            ("dense: 1 tensor", lambda: dense_delta(smallest, 1)),
            ("dense: 8 tensors", lambda: dense_delta(smallest, 8)),
        ]:
            report["runs"][label] = apply_revert(placed, make(), directory, args.repeat)
        for label, model in models.items():
            report["sizes"][label] = sizes(model, directory)
    print_tables(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def print_tables(report: dict) -> None:
    models = list(report["sizes"])
    print("| delta (bf16, blocks 0-3) | touched | file | load | checksum | " + " | ".join(
        f"apply {m} | revert {m}" for m in models) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|---:|" * len(models))
    for label, run in report["runs"].items():
        cells = " | ".join(f"{run[m]['apply']:.2f} ms | {run[m]['revert']:.2f} ms" for m in models)
        sizes_cells = (f"{mib(run['touched_bytes'])} | {mib(run['file_bytes'])} | {run['load_ms']:.2f} ms | "
                       f"{run['checksum_ms']:.2f} ms")
        print(f"| {label} | {sizes_cells} | {cells} |")
    print("\n| model | full checkpoint | edit | kinds | delta file | ratio | build |")
    print("|---|---:|---|---|---:|---:|---:|")
    for m in models:
        size = report["sizes"][m]
        for label in ("prune_2pct_neurons", "masked_1pct_weights"):
            entry = size[label]
            print(f"| {m} | {mib(size['full_bytes'])} | {label} | {', '.join(entry['kinds'])} | "
                  f"{mib(entry['file_bytes'])} | {100 * entry['file_bytes'] / size['full_bytes']:.2f} % | "
                  f"{entry['build_s']:.1f} s |")


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3f} MiB" if nbytes < 2**20 else f"{nbytes / 2**20:.1f} MiB"


if __name__ == "__main__":
    main()
