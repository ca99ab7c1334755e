"""`mmedit diff | inspect | merge | revert` on saved tiny models of two families, and bad input through
the CLI: one red line, exit status 1, nothing written or changed."""
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mmedit import zoo
from mmedit.cli.main import app
from mmedit.delta import Delta
from mmedit.loading import load_model

runner = CliRunner()


def mmedit(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def files(directory):
    return {path.name: path.read_bytes() for path in sorted(Path(directory).iterdir())}


def refused(result, message):
    """The CLI contract for bad input: exit 1, one line on stderr naming the problem."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def checkpoints(request, tmp_path_factory):
    """base/ (a tiny model with a README), edited/ (elements nudged), a prune delta, a regrow delta of the
    same elements to apply after it, and the work dir."""
    work = tmp_path_factory.mktemp(request.param)
    base = work / "base"
    shutil.copytree(zoo.tiny(request.param, root=tmp_path_factory.getbasetemp() / "zoo"), base)
    (base / "README.md").write_text(f"# tiny {request.param}\n")
    model = load_model(base)
    names = [name for name, p in model.named_parameters() if name.endswith("mlp.down_proj.weight")]
    up = names[0].replace("down_proj", "up_proj")
    prune = Delta.zeroed_rows(model, {up: [1, 4], names[0]: [1, 4]}, axes={names[0]: 1},
                              provenance={"plugin": "prune", "seed": 0})
    prune.save(work / "prune.safetensors")
    pruned = dict(model.named_parameters())[up].detach().index_fill(0, torch.tensor([1, 4]), 0)
    regrow = {up: (pruned, pruned.index_fill(0, torch.tensor([1, 4]), 0.5))}  # the rows prune zeroed, regrown
    Delta.from_changes(regrow, provenance={"plugin": "regrow"}).save(work / "regrow.safetensors")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a masked update elsewhere: a vision weight and the last LLM down_proj
        vision = next(p for name, p in model.named_parameters() if "visual" in name or "vision" in name
                      if p.dim() == 2 and p.numel() >= 64)
        for weight in (vision, dict(model.named_parameters())[names[-1]]):
            flat = weight.view(-1)
            flat[torch.randperm(flat.numel(), generator=generator)[:20]] += 0.25
    model.save_pretrained(work / "edited")
    return work, request.param


def test_diff_inspect_merge_revert_round_trip(checkpoints):
    work, family = checkpoints
    base = work / "base"
    assert mmedit("diff", base, work / "edited", "--out", work / "nudge.safetensors").exit_code == 0
    nudge = Delta.load(work / "nudge.safetensors")
    assert nudge.touched == 40 and {c.kind for c in nudge.changes.values()} == {"elements"}

    shown = mmedit("inspect", work / "prune.safetensors")
    assert shown.exit_code == 0 and "plugin: prune" in shown.stdout and "llm" in shown.stdout
    assert "checksum ok" in shown.stdout and f"({family})" in shown.stdout

    merged = work / "merged"
    result = mmedit("merge", base, work / "prune.safetensors", work / "nudge.safetensors", "--out", merged)
    assert result.exit_code == 0, result.output
    expected = load_model(base)
    for delta in (Delta.load(work / "prune.safetensors"), nudge):
        delta.apply(expected)
    got = load_model(merged)
    assert all(torch.equal(a, b) for a, b in zip(expected.state_dict().values(), got.state_dict().values()))
    before, after = files(base), files(merged)
    assert {name: data for name, data in after.items() if name not in ("model.safetensors", "README.md")} == \
        {name: data for name, data in before.items() if name not in ("model.safetensors", "README.md")}
    card = (merged / "README.md").read_text()
    assert card.startswith(f"# tiny {family}\n") and "`prune.safetensors` | prune" in card
    assert "nudge.safetensors" in card

    back = work / "back"
    result = mmedit("revert", merged, work / "prune.safetensors", work / "nudge.safetensors", "--out", back)
    assert result.exit_code == 0, result.output
    assert files(back) == before  # weights, config, processor files and README: byte for byte

    in_place = work / "in-place"
    shutil.copytree(merged, in_place)
    assert mmedit("revert", in_place, work / "nudge.safetensors", "--in-place").exit_code == 0  # partly
    partly = (in_place / "README.md").read_text()
    assert "prune.safetensors" in partly and "nudge.safetensors" not in partly
    assert mmedit("revert", in_place, work / "prune.safetensors", "--in-place").exit_code == 0
    assert files(in_place) == before
    assert not any(path.name.startswith(".") for path in work.iterdir())  # no temp dirs left


def test_stacked_merge_is_reverted_last_first(checkpoints, tmp_path):
    """prune, then regrow on the same elements: revert takes the deltas as they were merged and undoes regrow
    first; any other order is refused and writes nothing. The README record says which delta is on top;
    without it the values decide. Merged and reverted weights get the umask's permissions."""
    work, _ = checkpoints
    base, prune, regrow = work / "base", work / "prune.safetensors", work / "regrow.safetensors"
    merged, wrong, back = tmp_path / "merged", tmp_path / "wrong", tmp_path / "back"
    previous = os.umask(0o022)
    try:
        assert mmedit("merge", base, prune, regrow, "--out", merged).exit_code == 0
        refused(mmedit("revert", merged, regrow, prune, "--out", wrong), "regrow.safetensors (sha256:")
        refused(mmedit("revert", merged, prune, "--out", wrong), "which must be reverted first")
        assert mmedit("revert", merged, prune, regrow, "--out", back).exit_code == 0
    finally:
        os.umask(previous)
    assert not wrong.exists() and files(back) == files(base)
    assert [stat.S_IMODE((folder / "model.safetensors").stat().st_mode) for folder in (merged, back)] == [0o644] * 2

    (merged / "README.md").unlink()
    refused(mmedit("revert", merged, regrow, prune, "--out", wrong), "does not hold the delta's new values")
    assert mmedit("revert", merged, prune, regrow, "--out", back, "--force").exit_code == 0
    assert files(back) == {name: data for name, data in files(base).items() if name != "README.md"}


def test_bad_input_through_the_cli(checkpoints, tmp_path):
    work, _ = checkpoints
    base, prune = work / "base", work / "prune.safetensors"
    before = files(base)
    out = tmp_path / "out"

    refused(mmedit("merge", base, tmp_path / "nope.safetensors", "--out", out), "no such delta file")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(prune.read_bytes()[:-10])
    refused(mmedit("merge", base, damaged, "--out", out), "not a readable safetensors file")
    refused(mmedit("inspect", damaged), "damaged.safetensors")
    refused(mmedit("merge", base, prune, prune, "--out", out), "does not hold the delta's original values")
    other = tmp_path / "other.safetensors"
    Delta.from_changes({"model.weight": (torch.zeros(3), torch.ones(3))}).save(other)
    refused(mmedit("merge", base, other, "--out", out), "parameter model.weight is not in the model")
    assert not out.exists() and not list(tmp_path.glob(".out*"))

    out.mkdir()
    refused(mmedit("merge", base, prune, "--out", out), "already exists")
    refused(mmedit("revert", base, prune), "--in-place")
    refused(mmedit("revert", base, prune, "--in-place"), "does not hold the delta's new values")
    refused(mmedit("diff", base, work / "edited", "--out", prune), "already exists")
    refused(mmedit("diff", base, base, "--out", tmp_path / "same.safetensors"), "identical weights")
    refused(mmedit("merge", tmp_path / "missing", prune, "--out", tmp_path / "x"), "model path not found")
    partial = tmp_path / "partial"  # a checkpoint missing a weight: transformers would fill it in at random
    shutil.copytree(base, partial)
    weights = load_file(partial / "model.safetensors")
    dropped = sorted(weights)[-1]
    kept = {key: value for key, value in weights.items() if key != dropped}
    save_file(kept, partial / "model.safetensors", metadata={"format": "pt"})
    refused(mmedit("merge", partial, prune, "--out", tmp_path / "x"), "checkpoint lacks or mis-shapes weight")
    assert files(base) == before


def test_nonfinite_edit_needs_permission(tmp_path):
    base, poisoned = tmp_path / "base.safetensors", tmp_path / "poisoned.safetensors"
    save_file({"w": torch.ones(4, 4)}, base)
    save_file({"w": torch.ones(4, 4).index_fill(0, torch.tensor([1]), float("inf"))}, poisoned)
    refused(mmedit("diff", base, poisoned, "--out", tmp_path / "d.safetensors"), "NaN/inf")
    assert mmedit("diff", base, poisoned, "--out", tmp_path / "d.safetensors", "--allow-nonfinite").exit_code == 0
    assert Delta.load(tmp_path / "d.safetensors").changes["w"].kind == "rows"


def test_console_script(tmp_path):
    weight = torch.arange(12.0).reshape(3, 4)
    Delta.from_changes({"w": (weight, weight.index_fill(1, torch.tensor([2]), 0))}).save(tmp_path / "d.safetensors")
    script = Path(sys.executable).with_name("mmedit")
    shown = subprocess.run([script, "inspect", tmp_path / "d.safetensors", "--tensors"], capture_output=True, text=True)
    assert shown.returncode == 0 and "zeroed_rows (axis 1)" in shown.stdout, shown.stderr
    missing = subprocess.run([script, "inspect", tmp_path / "missing.safetensors"], capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0
    assert "no such delta file" in missing.stderr
