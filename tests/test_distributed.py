"""`torchrun --nproc-per-node 2 -m mmedit trace ...` on the CPU (gloo): the statistics equal one process's
up to float64 summation order; rank 0 writes, once; an error or a killed rank leaves no file. Every run is
a subprocess with a timeout, so a hung rendezvous fails the test instead of CI."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmedit import distributed, zoo
from mmedit.data.rows import write_jsonl
from mmedit.errors import MmeditError
from mmedit.trace import TraceStats

from test_plugins_conformance import make_rows  # noqa: E402

TIMEOUT = 240  # seconds a whole torchrun may take here
SIGNED = ("/sum", "/grad_sum_z")  # sums that cancel: compared against their tensor's scale


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    rows = make_rows(folder, 10)
    write_jsonl(rows, folder / "rows.jsonl")
    return zoo.tiny("llava", root=tmp_path_factory.getbasetemp() / "zoo"), folder, rows


def command(model, data, out, *extra) -> list[str]:
    return ["trace", str(model), "--data", str(data), "--grads", "--batch-size", "3", "--device", "cpu", "--top", "0",
            "--out", str(out), *extra]


def torchrun(arguments, processes: int = 2, **options) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc-per-node={processes}", "-m", "mmedit", *arguments],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, **options)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL) if hasattr(os, "killpg") else process.kill()
        raise
    return process.returncode, out, err


def test_two_ranks_trace_what_one_process_traces(setup, tmp_path):
    model, folder, _ = setup
    one = subprocess.run([sys.executable, "-m", "mmedit", *command(model, folder / "rows.jsonl", tmp_path / "one.st")],
                         capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    code, out, err = finish(torchrun(command(model, folder / "rows.jsonl", tmp_path / "two.st"),
                                     start_new_session=True))
    assert code == 0, err
    assert out.count("statistics: ") == 1  # rank 0 reports (and writes), once
    alone, together = TraceStats.load(tmp_path / "one.st"), TraceStats.load(tmp_path / "two.st")
    assert alone.tensors.keys() == together.tensors.keys() and any(k.startswith("fisher") is False for k in alone.tensors)
    for key, value in alone.tensors.items():
        ours, theirs = value.double(), together.tensors[key].double()
        scale = ours.abs().max().clamp_min(1e-300) if key.endswith(SIGNED) else ours.abs().clamp_min(1e-300)
        assert float(((ours - theirs).abs() / scale).max()) <= 1e-12, key
    assert together.meta["batches"] == alone.meta["batches"] == {"multimodal": 4, "text": 4}
    assert together.meta["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert together.meta["dead_sites"] == alone.meta["dead_sites"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.st", "two.st"]  # no stray temporary files


def test_an_error_on_one_rank_fails_the_run_and_writes_nothing(setup, tmp_path):
    """Rank 1's batch (rows 4-6 of batches of 3) holds a picture that is not an image."""
    model, folder, rows = setup
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    data = tmp_path / "rows.jsonl"
    write_jsonl([row if index != 4 else type(row)(**{**row.__dict__, "image": broken}) for index, row in enumerate(rows)],
                data)
    code, out, err = finish(torchrun(command(model, data, tmp_path / "out.st"), start_new_session=True))
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors and "broken.png" in errors[0], err
    assert not (tmp_path / "out.st").exists()


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun worker `rank` (its environment's RANK), a child of the agent `parent` (not one of
    the worker's own short-lived children, which inherit its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environment = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environment and int(stat[1]) == parent:  # a worker: the agent's child
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc").is_dir() or not hasattr(signal, "SIGSTOP"), reason="needs /proc and SIGSTOP")
def test_a_rank_killed_mid_run_leaves_no_output(setup, tmp_path):
    """Rank 1 is stopped (SIGSTOP) as soon as it runs, so that rank 0, which cannot finish without rank 1's
    share, is left waiting for it; then rank 1 is killed. torchrun stops rank 0 and fails; no file."""
    model, folder, _ = setup
    process = torchrun(command(model, folder / "rows.jsonl", tmp_path / "out.st"), start_new_session=True)
    deadline, victim = time.monotonic() + TIMEOUT / 2, None
    while victim is None and time.monotonic() < deadline and process.poll() is None:
        victim = _rank_pid(process.pid, 1)
        time.sleep(0.05)
    assert victim is not None, "rank 1 never started"
    os.kill(victim, signal.SIGSTOP)
    time.sleep(3)  # rank 0 goes on as far as it can without rank 1
    assert process.poll() is None and not (tmp_path / "out.st").exists()
    os.kill(victim, signal.SIGKILL)
    code, _, err = finish(process)
    assert code != 0, err
    assert not (tmp_path / "out.st").exists() and not list(tmp_path.glob(".out.st*"))


def test_shard_deals_whole_batches_round_robin(monkeypatch):
    rows = list(range(10))
    assert distributed.shard(rows, 3) == rows  # one process: everything
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shares.append(distributed.shard(rows, 3))
    assert shares == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9]]  # batches 0, 2 and 1, 3 of one process's 4
    monkeypatch.setattr(distributed, "world_size", lambda: 5)
    with pytest.raises(MmeditError, match="5 processes, but the 10 rows make only 4 batch"):
        distributed.shard(rows, 3)


def test_one_process_needs_no_process_group():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_writer()
    assert distributed.gather({"x": torch.ones(1)})[0]["x"].item() == 1.0
    assert distributed.combine(2, lambda a, b: a + b) == 2 and distributed.device("auto") == "auto"


def test_commands_that_do_not_share_their_work_refuse_a_launch(setup, tmp_path):
    """Every rank running the whole of `apply` (and writing the same file) is refused on every rank."""
    model, folder, _ = setup
    code, _, err = finish(torchrun(["apply", "ga", str(model), "--forget", str(folder / "rows.jsonl"), "--device", "cpu",
                                    "--out", str(tmp_path / "ga.safetensors")], start_new_session=True))
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors and errors[0] == ("error: mmedit apply runs on one process; under torchrun only trace shares its "
                                    "work among the ranks (docs/distributed.md)"), err
    assert not (tmp_path / "ga.safetensors").exists()
