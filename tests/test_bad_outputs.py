"""Every command that writes: an output it cannot write (read-only folder, a parent that is a file, a full
disk) is one `error:` line and exit 1, refused before the model loads where it can be known in advance,
and leaves nothing behind (no output, no temp file, the existing files unchanged)."""
import errno
import hashlib
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmedit import zoo
from mmedit.bench.profiles import generate
from mmedit.cli.main import app
from mmedit.delta import Delta
from mmedit.loading import load

UP = "model.language_model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, a small benchmark, a delta and the model with it merged."""
    root = tmp_path_factory.mktemp("world")
    base = zoo.tiny("llava", root=tmp_path_factory.getbasetemp() / "zoo")
    bench = generate(root / "bench", n_people=10, seed=0).root
    weight = dict(load(base, device="cpu")[0].named_parameters())[UP].detach()
    new = weight.clone()
    new[[1, 4]] += 1  # two rows: a delta every command takes, `export` included
    delta = Delta.from_changes({UP: (weight, new)}).save(root / "d.safetensors")
    merged = root / "merged"
    assert CliRunner().invoke(app, ["merge", str(base), str(delta), "--out", str(merged)]).exit_code == 0
    return {"base": base, "bench": bench, "delta": delta, "merged": merged}


def commands(world, target: Path, scratch: Path) -> dict[str, list[str]]:
    """Each command with its output (or plot) at `target`; other outputs go to `scratch`."""
    base, bench, delta = str(world["base"]), world["bench"], str(world["delta"])
    forget, retain = str(bench / "forget10.jsonl"), str(bench / "retain90.jsonl")
    out = str(target)
    return {
        "zoo": ["zoo", "llava", "--out", out],
        "data synth": ["data", "synth", "--out", out, "--people", "4"],
        "trace": ["trace", base, "--data", forget, "--limit", "2", "--out", out],
        "trace --plot": ["trace", base, "--data", forget, "--limit", "2", "--out", str(scratch / "ok.st"),
                         "--plot", out],
        "eval": ["eval", base, "--data", str(bench), "--limit-people", "1", "--out", out],
        "eval --plot": ["eval", base, "--data", str(bench), "--limit-people", "1", "--out",
                        str(scratch / "ok.json"), "--plot", out],
        "apply": ["apply", "ga", base, "--forget", forget, "--retain", retain, "--set", "max_steps=1", "--out", out],
        "paths find": ["paths", "find", base, "--forget", forget, "--steps", "1", "--out", out],
        "merge": ["merge", base, delta, "--out", out],
        "revert": ["revert", str(world["merged"]), delta, "--out", out],
        "diff": ["diff", base, str(world["merged"]), "--out", out],
        "export": ["export", delta, "--peft", out, "--base", base],
        "attack": ["attack", base, "--delta", delta, "--data", str(bench), "--attacks", "quantize", "--out", out],
        "attack --plot": ["attack", base, "--delta", delta, "--data", str(bench), "--attacks", "quantize",
                          "--out", str(scratch / "ok-attack.json"), "--plot", out],
        "zoo embedded": ["zoo", "embedded", "--out", out],
    }


def snapshot(*folders: Path) -> dict[str, str]:
    return {str(file): hashlib.sha256(file.read_bytes()).hexdigest()
            for folder in folders for file in sorted(folder.rglob("*")) if file.is_file()}


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot create files in: chmod 555, or (root ignores modes) /sys."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    candidates = [folder] + ([Path("/sys")] if Path("/sys").is_dir() else [])
    for candidate in candidates:
        try:
            (candidate / ".mmedit-writable").touch()
        except OSError:
            yield candidate
            break
        (candidate / ".mmedit-writable").unlink()
    else:
        pytest.skip("no folder here refuses this user's writes")
    folder.chmod(0o755)


NAMES = ["zoo", "data synth", "trace", "trace --plot", "eval", "eval --plot", "apply", "paths find", "merge",
         "revert", "diff", "export", "attack", "attack --plot", "zoo embedded"]


@pytest.mark.parametrize("name", NAMES)
def test_unwritable_or_impossible_output_is_refused_before_the_model_loads(world, unwritable, tmp_path, name,
                                                                            monkeypatch):
    import mmedit.checkpoint
    import mmedit.loading

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(mmedit.loading, "load", loaded)
    monkeypatch.setattr(mmedit.checkpoint, "load_model", loaded)
    (tmp_path / "a-file").write_text("not a folder")
    for target in (unwritable / "mmedit-out" / "x", tmp_path / "a-file" / "x"):
        before = snapshot(world["base"], world["merged"], world["bench"])
        result = CliRunner().invoke(app, commands(world, target, tmp_path)[name])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot write ") and "not a writable folder" in lines[0], \
            result.output
        assert not target.exists() and snapshot(world["base"], world["merged"], world["bench"]) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_revert_in_place_of_a_read_only_model_is_refused(world, tmp_path):
    copy = tmp_path / "merged"
    copy.mkdir()
    for file in world["merged"].iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    before = snapshot(copy)
    copy.chmod(0o555)
    try:
        result = CliRunner().invoke(app, ["revert", str(copy), str(world["delta"]), "--in-place"])
    finally:
        copy.chmod(0o755)
    assert result.exit_code == 1 and "not a writable folder" in result.output.strip().splitlines()[-1]
    assert snapshot(copy) == before


@pytest.mark.parametrize("name", NAMES)
def test_a_full_disk_is_one_line_and_leaves_nothing(world, tmp_path, name, monkeypatch):
    """ENOSPC when the finished output is flushed (where a full disk shows up last): one line, no output,
    no temp file beside it, inputs unchanged."""
    import mmedit.safefile

    def full(root):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root))

    monkeypatch.setattr(mmedit.safefile, "_fsync_tree", full)
    folder = tmp_path / "disk"
    folder.mkdir()
    target = folder / "x"
    before = snapshot(world["base"], world["merged"], world["bench"])
    result = CliRunner().invoke(app, commands(world, target, tmp_path)[name])
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: could not write ") and "No space left on device" in last, result.output
    assert list(folder.iterdir()) == [] and snapshot(world["base"], world["merged"], world["bench"]) == before


@pytest.mark.parametrize("name", ["merge", "revert", "diff", "trace", "eval", "apply"])
def test_truncated_weights_are_one_line(world, tmp_path, name):
    """A model.safetensors cut short (an interrupted download or copy): one line naming the model."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in world["base"].iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    arguments = commands({**world, "base": broken, "merged": broken}, tmp_path / "out", tmp_path)[name]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot load {broken}") and "incomplete metadata" in last, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["trace", "apply", "eval", "paths find"])
def test_image_dir_takes_the_parquet_images_on_every_command_that_reads_data(world, tmp_path, name):
    """--image-dir: the images embedded in parquet files go there, not beside the (maybe read-only) files."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(world["bench"] / "parquet", data)
    forget, retain = str(data / "forget_10.parquet"), str(data / "retain_90.parquet")
    base, images = str(world["base"]), tmp_path / "images"
    arguments = {
        "trace": ["trace", base, "--data", forget, "--limit", "2", "--out", str(tmp_path / "t.st")],
        "apply": ["apply", "ga", base, "--forget", forget, "--retain", retain, "--set", "max_steps=1",
                  "--out", str(tmp_path / "d.safetensors")],
        "eval": ["eval", base, "--data", str(data), "--limit-people", "1", "--out", str(tmp_path / "r.json")],
        "paths find": ["paths", "find", base, "--forget", forget, "--steps", "1", "--out", str(tmp_path / "p.st")],
    }[name]
    result = CliRunner().invoke(app, [*arguments, "--image-dir", str(images)])
    assert result.exit_code == 0, result.output
    assert any(images.iterdir()) and not list(data.glob("*.images"))
