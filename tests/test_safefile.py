"""mmedit.safefile: the one writer of files and folders. A writer that finds its output created by another
process meanwhile replaces nothing; a killed writer's temp folder is cleared by the next write."""
import os
import subprocess
import sys

import pytest

from mmedit.errors import MmeditError
from mmedit.safefile import atomic_dir, atomic_file, parse_json


def test_an_output_created_meanwhile_is_never_replaced(tmp_path):
    """Two `mmedit merge ... --out cc` at once: the one that renames second fails, the first's output stays."""
    for writer, make in ((atomic_file, lambda p: p.write_text("other")), (atomic_dir, lambda p: p.mkdir())):
        target = tmp_path / f"out-{writer.__name__}"
        with pytest.raises(MmeditError, match=r"already exists \(written by another process meanwhile\); nothing replaced"):
            with writer(target) as temp:
                (temp / "x").write_text("mine") if temp.is_dir() else temp.write_text("mine")
                make(target)  # the other process finishes first
        assert (target.read_text() == "other") if target.is_file() else list(target.iterdir()) == []
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_killed_writers_temp_folder_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "model"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".model.{int(dead.stdout)}.abcd.tmp"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "weights").write_bytes(b"x" * 1000)
    live = tmp_path / f".model.{os.getpid()}.efgh.tmp"
    live.mkdir()
    with atomic_dir(target) as temp:
        (temp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", live.name])


def test_parse_json_is_one_line():
    assert parse_json('{"a": [1]}', "x") == {"a": [1]}
    with pytest.raises(MmeditError, match=r"^thing is not valid JSON \(Expecting value, line 1\)$"):
        parse_json("[1,", "thing")
    with pytest.raises(MmeditError, match=r"^thing is not readable JSON \(nested too deeply\)$"):
        parse_json("[" * 100_000 + "]" * 100_000, "thing")
