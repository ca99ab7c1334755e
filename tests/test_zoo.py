"""The tiny-model zoo: every family builds small, reloads offline, is deterministic and cached atomically;
`mmedit zoo` saves one."""
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mmedit import zoo
from mmedit.arch import family
from mmedit.cli.main import app
from mmedit.errors import MmeditError
from mmedit.loading import load


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "zoo"


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_tiny_builds_small_and_reloads(family, root):
    path = zoo.tiny(family, root=root)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert json.loads((path / "config.json").read_text())["model_type"] == family
    model, processor = load(path, device="cpu")
    assert model.config.model_type == family and not model.training
    assert 50_000 <= sum(p.numel() for p in model.parameters()) <= 400_000
    assert processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is this?"}]}],
        add_generation_prompt=True, tokenize=False,
    ).count("Who is this?") == 1
    assert zoo.tiny(family, root=root) == path  # cached


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    first = load_file(zoo.tiny("llava", root=tmp_path / "a") / "model.safetensors")
    again = load_file(zoo.tiny("llava", root=tmp_path / "b") / "model.safetensors")
    other = load_file(zoo.tiny("llava", root=tmp_path / "a", seed=1) / "model.safetensors")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)
    # the global RNG is left alone
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.build("llava")
    assert torch.equal(torch.rand(3), expected)


def test_cache_honours_mmedit_cache_and_leaves_no_temp_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("MMEDIT_CACHE", str(tmp_path))
    assert zoo.cache_root() == tmp_path / "zoo"
    path = zoo.tiny("llava")
    assert path.parent == tmp_path / "zoo"
    assert [p.name for p in (tmp_path / "zoo").iterdir()] == [path.name]


def test_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(zoo, "build", explode)
    with pytest.raises(MmeditError, match="disk full"):
        zoo.tiny("llava", root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unknown_family():
    with pytest.raises(MmeditError, match="no tiny model for 'bert'"):
        zoo.tiny("bert")


def test_recipes_are_kept_apart_from_the_architectures():
    """Each recipe is its own data file next to an architecture entry that holds no recipe."""
    assert set(zoo.FAMILIES) == {path.stem for path in zoo.RECIPES.glob("*.json")} and len(zoo.FAMILIES) == 10
    for name in zoo.FAMILIES:
        assert "tiny" not in family(name) and "config" in zoo._recipe(name)


def test_cli_zoo_saves_a_loadable_model(tmp_path):
    out = tmp_path / "tiny-llava"
    result = CliRunner().invoke(app, ["zoo", "llava", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output.replace("\n", "")
    model, _ = load(out, device="cpu")
    assert model.config.model_type == "llava"
    again = CliRunner().invoke(app, ["zoo", "llava", "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.output
    forced = CliRunner().invoke(app, ["zoo", "llava", "--out", str(out), "--force", "--seed", "3"])
    assert forced.exit_code == 0, forced.output
    bad = CliRunner().invoke(app, ["zoo", "bert", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "no tiny model for 'bert'" in bad.output


def test_cli_zoo_onto_a_file_is_one_clear_error(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    for extra in ([], ["--force"]):
        result = CliRunner().invoke(app, ["zoo", "llava", "--out", str(target), *extra])
        assert result.exit_code == 1
        assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1, result.output
    assert "not a directory" in result.output and target.read_text() == "mine"
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]  # no temp folder left
