"""The package as installed: every source package listed, the data files (the shipped embedded model
included) in a built wheel, light import, console script, --help examples."""
import hashlib
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmedit.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {"mmedit": "mmedit", "plugins": "mmedit.plugins", "cli": "mmedit.cli"}


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for folder, name in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *relative)))
    assert found == set(config["packages"])


def test_every_data_file_is_package_data():
    """A wheel carries the family entries and the zoo recipes: every non-Python file is matched."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mmedit"]
    data = [path.relative_to(ROOT / "mmedit") for path in (ROOT / "mmedit").rglob("*")
            if path.is_file() and path.suffix not in (".py", ".pyc")]
    assert {"arch/families", "zoo_recipes", "bench/weights"} <= {path.parent.as_posix() for path in data}
    assert [path for path in data if not any(path.match(pattern) for pattern in patterns)] == []


def test_a_built_wheel_carries_the_shipped_embedded_model(tmp_path):
    """A non-editable install has the weights: the wheel built from a copy of the source (so nothing is
    written into the checkout) holds every file the manifest lists, byte for byte."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in MAPPING:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("mmedit_unlearn-*.whl")
    folder = "mmedit/bench/weights"
    with zipfile.ZipFile(wheel) as archive:
        manifest = json.loads(archive.read(f"{folder}/manifest.json"))
        shipped = {name[len(folder) + 1:] for name in archive.namelist() if name.startswith(f"{folder}/")}
        assert shipped == {*manifest["files"], "manifest.json"} and "model.safetensors" in shipped
        for name, digest in manifest["files"].items():
            assert hashlib.sha256(archive.read(f"{folder}/{name}")).hexdigest() == digest, name


def test_import_mmedit_stays_light():
    code = "import sys, mmedit; print('torch' in sys.modules, 'nnsight' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.split() == ["False", "False"]


def _commands(group=app):
    import typer.main

    command = typer.main.get_command(group)
    for name, sub in command.commands.items():
        if hasattr(sub, "commands"):
            yield from ((f"{name} {inner}", c) for inner, c in sub.commands.items())
        else:
            yield name, sub


@pytest.mark.parametrize("name", [name for name, _ in _commands()])
def test_every_command_has_help_with_an_example(name):
    result = CliRunner().invoke(app, [*name.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


def test_console_script_runs():
    script = Path(sys.executable).parent / "mmedit"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "trace" in result.stdout and "apply" in result.stdout


def test_the_distribution_is_mmedit_unlearn_and_imports_as_mmedit():
    """PyPI's "mmedit" is OpenMMLab's toolbox: mmedit's distribution has its own name, and provenance
    reads mmedit's version from it (not from whatever "mmedit" distribution is installed)."""
    import importlib.metadata

    import mmedit
    from mmedit.provenance import library_versions

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"] == mmedit.DISTRIBUTION
    assert importlib.metadata.version(mmedit.DISTRIBUTION) == mmedit.__version__ == library_versions()["mmedit"]
    assert mmedit.DISTRIBUTION in (ROOT / "README.md").read_text()
