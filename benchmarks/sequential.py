"""Sequential unlearning on the embedded model: `mmedit sequential METHOD` with K requests (default 5: one
forget person per request) for every installed method, with its embedded preset where it has one (MANU and
MIP-Editor have none: their defaults, as `mmedit demo` runs them), once per seed; then per method and
request the forgetting of the groups edited so far, of the current group and the retain accuracy, each as
mean ± sample standard deviation over the seeds, and the one-shot union's. Results in BENCHMARKS.md.

    python benchmarks/sequential.py --out bench-sequential [--seeds 0,1,2] [--requests 5] [--methods ga,npo]

Every run is its own `mmedit sequential` process with one torch thread (the machine is shared); the seed
picks the groups (the order in which the people are asked for), the retain sample and the edits' own
randomness, on the shipped model (seed 0). An existing run folder is reused, so an interrupted
measurement resumes; --force runs everything again.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

VIEWS = (("done", "forget_done"), ("current", "forget_current"), ("retain", "retain"))
FORMS = (("VQA", "Image_Textual"), ("QA", "Pure_Text"))
METRIC = "choice_acc"


def runs(methods: list[str], seeds: list[int]) -> list[tuple[str, list[str], int]]:
    """(method, its preset arguments, seed) for every run."""
    from mmedit.plugins import get

    return [(name, ["--preset", "embedded"] if "embedded" in get(name).presets else [], seed)
            for name in methods for seed in seeds]


def run_one(method: str, preset: list[str], seed: int, requests: int, folder: Path, force: bool) -> dict:
    """One `mmedit sequential` process (reused when its report exists); its report plus wall seconds."""
    from mmedit.bench.model import embedded

    report = folder / "sequential.json"
    if report.is_file() and not force:
        return json.loads(report.read_text())
    paths = embedded(progress=False)
    command = [sys.executable, "-m", "mmedit.cli.main", "sequential", method, str(paths.model),
               "--forget", str(paths.data / "forget10.jsonl"), "--retain", str(paths.data / "retain90.jsonl"),
               "--requests", str(requests), "--seed", str(seed), *preset, "--threads", "1", "--out", str(folder),
               "--force"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{method} seed {seed} failed:\n{done.stderr.strip()}")
    record = json.loads(report.read_text())
    record["wall_s"] = round(wall, 1)
    report.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _value(table: dict, view: str, form: str) -> float | None:
    return table.get(view, {}).get(form, {}).get(METRIC)


def _spread(values: list[float]) -> dict | None:
    values = [value for value in values if value is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def aggregate(records: list[dict]) -> dict:
    """{"base": cells, "requests": [cells per request], "union": cells, "wall_s": spread}, each cell
    {view/form: {mean, sd, n}} of the headline metric over the records (seeds)."""
    def cells(tables: list[dict]) -> dict:
        return {f"{view}/{form}": _spread([_value(table, key, name) for table in tables])
                for view, key in VIEWS for form, name in FORMS}

    requests = records[0]["requests"]
    return {
        "base": cells([record["base"] | {"forget_done": record["base"].get("forget_later", {})}
                       for record in records]),
        "requests": [cells([record["sequence"][index]["results"]["edited"] for record in records])
                     for index in range(requests)],
        "union": cells([record["union"]["results"]["edited"] for record in records]),
        "wall_s": _spread([record.get("wall_s") for record in records]),
    }


def _cell(cell: dict | None) -> str:
    if cell is None:
        return "-"
    return f"{100 * cell['mean']:.0f}" + ("" if cell["sd"] is None else f" ± {100 * cell['sd']:.0f}")


def markdown(summary: dict, requests: int, seeds: list[int]) -> str:
    """Per form: methods x (base, request 1..K, union), cells "forget done / retain" (%) as mean ± sd."""
    lines = []
    for form, _ in FORMS:
        lines += [f"{form}: {METRIC} (%) of the forget people edited so far / of the retain people, mean ± sd over "
                  f"seeds {', '.join(map(str, seeds))}", "",
                  "| method | base | " + " | ".join(f"after {k}" for k in range(1, requests + 1)) +
                  " | union (one shot) | current group after each request | wall s |",
                  "|---|" + "---:|" * (requests + 4)]
        for method, result in summary.items():
            def pair(cells: dict) -> str:
                return f"{_cell(cells[f'done/{form}'])} / {_cell(cells[f'retain/{form}'])}"

            current = ", ".join(f"{100 * cells[f'current/{form}']['mean']:.0f}" for cells in result["requests"])
            lines.append(f"| {method} | {pair(result['base'])} | " + " | ".join(pair(c) for c in result["requests"])
                         + f" | {pair(result['union'])} | {current} | {_cell_s(result['wall_s'])} |")
        lines.append("")
    return "\n".join(lines)


def _cell_s(cell: dict | None) -> str:
    return "-" if cell is None else f"{cell['mean']:.0f}"


def main() -> None:
    from mmedit.plugins import available

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-sequential"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--methods", default=None, help="comma-separated (default: every installed plugin)")
    parser.add_argument("--force", action="store_true", help="run again even where a report exists")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    methods = args.methods.split(",") if args.methods else list(available())
    by_method: dict[str, list[dict]] = {}
    for method, preset, seed in runs(methods, seeds):
        record = run_one(method, preset, seed, args.requests, args.out / method / f"seed-{seed}", args.force)
        by_method.setdefault(method, []).append(record)
        print(f"{method} seed {seed}: {record.get('wall_s', '?')} s", flush=True)
    summary = {method: aggregate(records) for method, records in by_method.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    text = markdown(summary, args.requests, seeds)
    record = {"format": "mmedit.sequential-benchmark", "requests": args.requests, "seeds": seeds, "metric": METRIC,
              "methods": summary, "commit": commit, "machine": {"platform": platform.platform(),
                                                                "cpus": os.cpu_count(), "load": os.getloadavg()},
              "settings": {method: records[0]["overrides"] for method, records in by_method.items()}}
    (args.out / "summary.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
