"""Writing files safely, once for all of mmedit: `atomic_file` and `atomic_dir` (temp + fsync + rename,
umask permissions, never a partial output) and mmedit's artifact files (trace statistics, neuron paths):
safetensors + one JSON header, read back with one clear error for anything that is not the kind asked.

    with atomic_file("out.json", force=False) as temp:   # write temp; it is renamed over out.json on exit
        temp.write_text(text)
    save_figure(figure, "plot.png", force=False)         # a matplotlib figure, written so and closed
    with atomic_dir("tiny-llava", force=True) as temp:   # fill temp; it replaces tiny-llava in one rename
        model.save_pretrained(temp)
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mmedit.errors import MmeditError, first_line

if TYPE_CHECKING:  # safefile stays importable without torch (the data and zoo commands use it)
    import torch


def make_ordinary(path: str | Path) -> None:
    """Give a temp file or folder and everything in it (mkstemp/mkdtemp, and some writers, make them
    private) the permissions a plain open() or mkdir would have given them under the current umask,
    before it is renamed into place."""
    mask = _umask()
    for item in [Path(path), *(Path(path).rglob("*") if os.path.isdir(path) else [])]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only be read by
    setting it, which would briefly expose files other threads create)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)  # the safe fallback: anything created meanwhile is private, not open
    os.umask(mask)
    return mask


def parse_json(text: str, what: str):
    """json.loads with one MmeditError naming `what` for malformed JSON, or JSON nested too deeply to read
    (Python's parser recurses: 100k levels would be a RecursionError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise MmeditError(f"{what} is not valid JSON ({error.msg}, line {error.lineno})") from None
    except RecursionError:
        raise MmeditError(f"{what} is not readable JSON (nested too deeply)") from None


def check_writable(path: str | Path, force: bool = False) -> Path:
    """Refuse early what atomic_file/atomic_dir would refuse late: an existing `path` without force, or
    a parent folder that cannot take a new file."""
    path = Path(path)
    if path.exists() and not force:
        raise MmeditError(f"{path} already exists; pass --force to replace it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not _can_create_in(parent):
        raise MmeditError(f"cannot write {path}: {parent} is not a writable folder")
    return path


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in `folder`, tried for real: os.access answers yes for root on a
    folder root may not write (sysfs), and knows nothing of ACLs or network file systems."""
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".mmedit-probe.")
    except OSError:
        return False
    os.close(handle)
    os.unlink(probe)
    return True


def _fsync_dir(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)  # make the rename itself durable
    finally:
        os.close(handle)


def _fsync_tree(root: Path) -> None:
    for file in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _temp_prefix(path: Path) -> str:
    """.NAME.PID. : a temp file or folder names the process writing it, so a later run can tell its own
    kind's leftovers (a killed writer's) from a live writer's."""
    return f".{path.name}.{os.getpid()}."


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temps that writers of `path` killed mid-write (SIGKILL, power loss) left beside it: those
    whose process is gone. A live writer's temp is left alone. Returns what was removed."""
    removed = []
    for item in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = item.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
            removed.append(item)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


@contextlib.contextmanager
def atomic_file(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block ends it is fsynced, given umask permissions and
    renamed over `path`. On any error (disk full, Ctrl-C) the temp file goes and `path` is as it was;
    errors other than MmeditError and KeyboardInterrupt become one MmeditError naming `path`."""
    path = check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(handle)
    temp = Path(temp)
    try:
        yield temp
        _fsync_tree(temp)
        make_ordinary(temp)
        if path.exists() and not force:  # created meanwhile by another process: never replace it silently
            raise MmeditError(f"{path} already exists (written by another process meanwhile); nothing replaced")
        os.replace(temp, path)
        _fsync_dir(path.parent)
    except Exception as error:
        raise _one_line(error, path) from error
    finally:
        temp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `path`; when the block ends its files are fsynced and it replaces
    `path` in one rename (an existing `path`, allowed by force, is exchanged atomically and removed)."""
    path = check_writable(path, force)
    if path.exists() and not path.is_dir():
        raise MmeditError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))
    try:
        yield temp
        _fsync_tree(temp)
        make_ordinary(temp)
        if path.exists() and not force:
            raise MmeditError(f"{path} already exists (written by another process meanwhile); nothing replaced")
        swap_dir(temp, path)
        _fsync_dir(path.parent)
    except Exception as error:
        raise _one_line(error, path) from error
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def save_figure(figure, path: str | Path, *, force: bool = False, dpi: int = 120) -> Path:
    """Write a matplotlib figure as PNG through atomic_file and close it, written or not."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_file(path, force=force) as temp:
            figure.savefig(temp, dpi=dpi, format="png")
    finally:
        plt.close(figure)
    return path


def swap_dir(new: Path, target: Path) -> None:
    """Rename folder `new` to `target`; an existing target is exchanged atomically (Linux renameat2) and
    the old tree removed."""
    if not target.exists():
        os.rename(new, target)
        return
    if not _exchange(new, target):  # no renameat2: two renames, the old tree kept until the new one is in
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, backup)
        os.rename(new, target)
        new = backup
    shutil.rmtree(new)  # after the exchange `new` holds the old tree


def _exchange(first: Path, second: Path) -> bool:
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


def _one_line(error: BaseException, path: Path) -> BaseException:
    return error if isinstance(error, MmeditError) else MmeditError(f"could not write {path}: {first_line(error)}")


def save(path: str | Path, tensors: dict[str, torch.Tensor], key: str, header: dict, force: bool = False) -> Path:
    """Write tensors + header (JSON under metadata[key]); an existing file needs force."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_file(path, force=force) as temporary:
        save_file({name: value.contiguous() for name, value in tensors.items()}, temporary,
                  {key: json.dumps(header, sort_keys=True)})
    return path


def load(path: str | Path, key: str, format: str, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header without its "format", tensors) of a file written by save with header["format"] == format.
    `what` names the kind of file in errors ("trace statistics", "MIP-Editor paths")."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MmeditError(f"{what} file not found: {path}")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise MmeditError(f"{path}: not a readable safetensors file ({error})") from None
    if key not in metadata:
        raise MmeditError(f"{path}: not an mmedit {what} file (no '{key}' header)")
    header = parse_json(metadata[key], f"{path}: the {what} header")
    if header.pop("format", None) != format:
        raise MmeditError(f"{path}: unsupported {what} format (this mmedit reads {format})")
    return header, tensors
