"""The delta file: encodings, header, checksum, the documented plain-Python reader, atomic writes and
every kind of bad file."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmedit.delta import Delta
from mmedit.delta import fileformat
from mmedit.errors import MmeditError

DOC = Path(__file__).resolve().parents[1] / "docs" / "delta-format.md"


def pair(dtype=torch.float32):
    torch.manual_seed(0)
    base = {"up.weight": torch.randn(32, 8).to(dtype), "down.weight": torch.randn(8, 32).to(dtype),
            "norm.weight": torch.randn(8).to(dtype), "head.weight": torch.randn(16, 16).to(dtype),
            "same.weight": torch.randn(4, 4).to(dtype)}
    new = {name: tensor.clone() for name, tensor in base.items()}
    new["up.weight"][[3, 17]] = 0  # pruned neurons: rows of up, columns of down
    new["down.weight"][:, [3, 17]] = 0
    new["norm.weight"] += 1  # every element
    new["head.weight"].view(-1)[[5, 100, 201]] += 1  # a few elements
    return base, new


def saved(tmp_path, name="d.safetensors", **provenance):
    base, new = pair()
    delta = Delta.from_changes({k: (base[k], new[k]) for k in base}, provenance=provenance or {"plugin": "test"})
    return delta.save(tmp_path / name), delta


def rewrite(path, text=None, tensors=None):
    """Rewrite a safetensors file with other metadata text and/or tensors (no resealing)."""
    with safe_open(path, "pt") as opened:
        metadata, stored = opened.metadata(), {key: opened.get_tensor(key) for key in opened.keys()}
    metadata["mmedit"] = text(metadata["mmedit"]) if text else metadata["mmedit"]
    save_file(tensors(stored) if tensors else stored, path, metadata=metadata)


def test_smallest_encoding_per_tensor():
    base, new = pair(torch.bfloat16)
    delta = Delta.from_changes({k: (base[k], new[k]) for k in base})
    kinds = {name: (change.kind, change.axis) for name, change in delta.changes.items()}
    assert kinds == {"up.weight": ("zeroed_rows", 0), "down.weight": ("zeroed_rows", 1), "norm.weight": ("dense", 0),
                     "head.weight": ("elements", 0)}  # same.weight is unchanged, so absent
    assert delta.changes["head.weight"].index.tolist() == [5, 100, 201]
    assert all(change.dtype == torch.bfloat16 for change in delta.changes.values())
    assert delta.touched == 2 * 8 + 2 * 8 + 8 + 3


def test_rows_beat_elements_when_rows_are_dense():
    base = torch.arange(64.0).reshape(8, 8)
    new = base.clone()
    new[2] += 1
    change = Delta.from_changes({"w": (base, new)}).changes["w"]
    assert (change.kind, change.index.tolist(), change.new.tolist()) == ("rows", [2], [new[2].tolist()])


def test_file_layout_header_and_int32_indices(tmp_path):
    path, delta = saved(tmp_path, plugin="prune", config={"ratio": 0.02}, seed=3, data={"forget": "sha256:ab"})
    tensors = load_file(path)
    assert set(tensors) == {"up.weight/index", "up.weight/old", "down.weight/index", "down.weight/old",
                            "norm.weight/new", "norm.weight/old", "head.weight/index", "head.weight/new",
                            "head.weight/old"}
    assert tensors["head.weight/index"].dtype == torch.int32
    header = json.loads(safe_open(path, "pt").metadata()["mmedit"])
    assert header["format"] == "mmedit.delta" and header["format_version"] == 1
    assert header["plugin"] == "prune" and header["config"] == {"ratio": 0.02} and header["seed"] == 3
    assert {"torch", "transformers", "safetensors", "python"} <= set(header["libraries"])
    assert header["tensors"]["down.weight"] == {"kind": "zeroed_rows", "shape": [8, 32], "dtype": "float32",
                                                "touched": 16, "axis": 1}
    assert header["counts"]["tensors"] == 4 and header["counts"]["elements"] == delta.touched
    assert header["checksum"] == delta.checksum == Delta.load(path).checksum
    assert header == delta.header()


def test_documented_plain_python_reader(tmp_path):
    path, delta = saved(tmp_path)
    code = re.search(r"```python\n(import hashlib.*?)```", DOC.read_text(), re.S).group(1)
    namespace = {}
    exec(code, namespace)
    header, tensors = namespace["read_delta"](path)
    assert header["checksum"] == delta.checksum
    dtype, shape, raw = tensors["head.weight/new"]
    assert (dtype, shape) == ("F32", [3]) and raw == delta.changes["head.weight"].new.numpy().tobytes()
    rewrite(path, tensors=lambda t: {**t, "head.weight/new": t["head.weight/new"] + 1})
    with pytest.raises(ValueError, match="checksum"):
        namespace["read_delta"](path)


def test_save_refuses_to_overwrite(tmp_path):
    path, delta = saved(tmp_path)
    before = path.read_bytes()
    with pytest.raises(MmeditError, match="already exists"):
        delta.save(path)
    assert path.read_bytes() == before
    delta.save(path, overwrite=True)
    with pytest.raises(MmeditError, match="cannot write .*d.safetensors is not a writable folder"):
        delta.save(path / "inside.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]  # no temp files left
    assert Delta.load(delta.save(tmp_path / "new" / "d.safetensors")).checksum == delta.checksum  # folder made


def resealed(path, edit):
    """The delta file with its header edited and its checksum computed anew: valid as a file, wrong inside."""
    header, tensors = fileformat.read(path)
    edit(header)
    header.pop("checksum")
    fileformat.write(path, tensors, fileformat.seal(header, tensors), overwrite=True)


@pytest.mark.parametrize("edit, message", [
    (lambda h: next(iter(h["tensors"].values())).update(part={"evil": 1}), "is malformed \\(part \\{'evil': 1\\}"),
    (lambda h: next(iter(h["tensors"].values())).update(part="llm", layer="one"), "is malformed \\(part 'llm', layer 'one'"),
    (lambda h: next(iter(h["tensors"].values())).update(shape="big"), "is malformed \\(bad dtype or shape"),
    (lambda h: h.update(tensors=[]), "has no tensor table"),
])
def test_resealed_headers_with_wrong_fields_are_refused(tmp_path, edit, message):
    """A re-sealed delta (checksum right, fields wrong) is one clear error in Delta.load, which inspect, merge,
    revert and eval all read through."""
    path, _ = saved(tmp_path)
    resealed(path, edit)
    with pytest.raises(MmeditError, match=message) as error:
        Delta.load(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(b"\x00" * 5), "not a readable safetensors"),
    (lambda path: path.write_bytes(path.read_bytes()[:-7]), "not a readable safetensors"),
    (lambda path: path.write_bytes(b"garbage" * 100), "not a readable safetensors"),
    (lambda path: rewrite(path, tensors=lambda t: {**t, "up.weight/old": t["up.weight/old"].neg()}), "checksum"),
    (lambda path: rewrite(path, text=lambda s: s.replace('"plugin": "test"', '"plugin": "evil"')), "checksum"),
    (lambda path: rewrite(path, text=lambda s: s.replace('"axis": 1', '"axis": 0')), "checksum"),
    (lambda path: rewrite(path, text=lambda s: s.replace('"format_version": 1', '"format_version": 7')),
     "format version 7"),
    (lambda path: rewrite(path, text=lambda s: s[:-3]), "not valid JSON"),
    (lambda path: rewrite(path, text=lambda s: s.replace('"format_version": 1', '"format_version": 1, "deep": '
                                                                  + "[" * 100_000 + "]" * 100_000, 1)), "nested too deeply"),
    (lambda path: save_file({"weight": torch.zeros(2)}, path), "not an mmedit delta"),
    (lambda path: save_file({"weight": torch.zeros(2)}, path, metadata={"mmedit": '{"format": "x"}'}),
     "not an mmedit delta"),
    (lambda path: path.unlink(), "no such delta file"),
])
def test_bad_files_are_refused(tmp_path, damage, message):
    path, _ = saved(tmp_path)
    damage(path)
    with pytest.raises(MmeditError, match=message) as error:
        Delta.load(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_structure_is_checked_even_with_a_valid_checksum(tmp_path):
    path, delta = saved(tmp_path)
    header, tensors = delta.header(), dict(delta._file_tensors())
    del header["checksum"]
    missing = {key: value for key, value in tensors.items() if key != "up.weight/index"}
    fileformat.write(tmp_path / "a.safetensors", missing, fileformat.seal(header, missing))
    with pytest.raises(MmeditError, match="up.weight/index is missing"):
        Delta.load(tmp_path / "a.safetensors")
    extra = {**tensors, "stray/new": torch.zeros(1)}
    fileformat.write(tmp_path / "b.safetensors", extra, fileformat.seal(header, extra))
    with pytest.raises(MmeditError, match="'stray/new' is not described"):
        Delta.load(tmp_path / "b.safetensors")
    unsorted = {**tensors, "head.weight/index": torch.tensor([100, 5, 201], dtype=torch.int32)}
    fileformat.write(tmp_path / "c.safetensors", unsorted, fileformat.seal(header, unsorted))
    with pytest.raises(MmeditError, match="indices must be increasing"):
        Delta.load(tmp_path / "c.safetensors")
    header["tensors"]["norm.weight"]["dtype"] = "float16"
    fileformat.write(tmp_path / "e.safetensors", tensors, fileformat.seal(header, tensors))
    with pytest.raises(MmeditError, match="norm.weight.*expected torch.float16"):
        Delta.load(tmp_path / "e.safetensors")


# A child process that writes a new delta over an old one and dies (or runs out of space) mid-write.
_WRITER = textwrap.dedent("""
    import os, resource, signal, sys, torch
    import safetensors.torch
    from mmedit.delta import Delta
    path, how = sys.argv[1], sys.argv[2]
    delta = Delta.from_changes({"w": (torch.zeros(512, 512), torch.ones(512, 512))})
    if how == "disk-full":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    else:
        real = safetensors.torch.save_file
        def crash(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as handle:
                handle.truncate(1000)
            os._exit(9)
        import mmedit.delta.fileformat as ff
        ff.save_file = crash
    delta.save(path, overwrite=True)
""")


@pytest.mark.parametrize("how, status", [("disk-full", 1), ("crash", 9)])
def test_interrupted_write_keeps_the_old_file(tmp_path, how, status):
    path, _ = saved(tmp_path)
    before = path.read_bytes()
    result = subprocess.run([sys.executable, "-c", _WRITER, str(path), how], capture_output=True, text=True)
    assert result.returncode == status, result.stderr
    if how == "disk-full":
        assert "could not write" in result.stderr
        assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]  # temp file removed
    assert path.read_bytes() == before
    delta = Delta.load(path)
    if how == "crash":  # the killed writer's temp file is left; the next write of the same file removes it
        left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(left) == 1 and left[0].name.startswith(f".{path.name}.")
        live = tmp_path / f".{path.name}.{os.getpid()}.writing.tmp"  # a live writer's: kept
        live.write_bytes(b"")
        delta.save(path, overwrite=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name])


def test_provenance_must_be_json_and_not_reserved():
    with pytest.raises(MmeditError, match="not JSON"):
        Delta({}, {"config": object()})
    with pytest.raises(MmeditError, match="reserved"):
        Delta({}, {"checksum": "x"})


def test_written_files_get_the_umask_permissions(tmp_path):
    """Deltas, trace statistics and reports are written through private temp files; what lands is an
    ordinary file (0644 under umask 022), not a 0600 one."""
    import os
    import stat

    from mmedit import zoo
    from mmedit.eval.report import write_json
    from mmedit.trace.stats import Accumulator

    accumulator = Accumulator()
    accumulator.add("llm.0", "text", torch.ones(2, 3), {"all": torch.ones(2, dtype=torch.bool)})
    old = torch.zeros(4, 4)
    previous = os.umask(0o022)
    try:
        written = [Delta.from_changes({"w": (old, old + 1)}).save(tmp_path / "d.safetensors"),
                   accumulator.result({}).save(tmp_path / "t.safetensors"),
                   write_json({"a": 1}, tmp_path / "r.json")]
        folder = zoo.write("llava", tmp_path / "tiny")  # a folder swapped in from a temp dir
    finally:
        os.umask(previous)
    assert [stat.S_IMODE(path.stat().st_mode) for path in written] == [0o644] * 3
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
