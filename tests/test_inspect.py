"""`mmedit inspect` places tensors by the base model's ModelMap (built from its config on the meta device)
when the delta does not place them itself; names no map knows are counted as "other"."""
import pytest
import torch
from typer.testing import CliRunner

from mmedit import zoo
from mmedit.cli.main import app
from mmedit.delta import Delta
from mmedit.loading import load

UP = "model.language_model.layers.1.mlp.up_proj.weight"
FC1 = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
PROJECTOR = "model.multi_modal_projector.linear_1.weight"
EMBEDDINGS = "model.language_model.embed_tokens.weight"
UNKNOWN = "adapter.extra.weight"  # in no part of any map


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return zoo.tiny("llava", root=tmp_path_factory.getbasetemp() / "zoo")


def _unplaced(base, path, provenance=None):
    """A delta built without the model (as from two weight files): its header places nothing."""
    model, _ = load(base, device="cpu")
    weights = dict(model.named_parameters())
    changes = {name: (weights[name].detach(), weights[name].detach() + 1) for name in (UP, FC1, PROJECTOR, EMBEDDINGS)}
    changes[UNKNOWN] = (torch.zeros(3), torch.ones(3))
    Delta.from_changes(changes, provenance=provenance).save(path)
    assert all("part" not in spec for spec in Delta.load(path).header()["tensors"].values())
    return path


def _rows(output: str) -> dict[tuple[str, str], int]:
    """(part, layer) -> tensors, read from the "what it touches" table."""
    rows = {}
    for line in output.split("what it touches")[1].splitlines():
        cells = line.replace("│", " ").split()
        if len(cells) >= 4 and cells[2].isdigit():
            rows[(cells[0], cells[1])] = int(cells[2])
    return rows


def test_model_option_places_by_the_architecture(base, tmp_path):
    delta = _unplaced(base, tmp_path / "d.safetensors")
    runner = CliRunner()
    placed = runner.invoke(app, ["inspect", str(delta), "--model", str(base)], terminal_width=200)
    assert placed.exit_code == 0, placed.output
    assert _rows(placed.output) == {("llm", "1"): 1, ("llm", "-"): 1, ("vision", "0"): 1, ("projector", "0"): 1,
                                    ("other", "-"): 1}
    alone = runner.invoke(app, ["inspect", str(delta)], terminal_width=200)  # no base model known: all "other"
    assert alone.exit_code == 0 and _rows(alone.output) == {("other", "-"): 5} and "--model" in alone.output
    missing = runner.invoke(app, ["inspect", str(delta), "--model", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "cannot map" in missing.output and "nowhere" in missing.output


def test_the_base_model_the_delta_names_places_it(base, tmp_path):
    named = _unplaced(base, tmp_path / "named.safetensors", {"base_model": {"name_or_path": str(base)}})
    shown = CliRunner().invoke(app, ["inspect", str(named)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert _rows(shown.output)[("vision", "0")] == 1 and _rows(shown.output)[("other", "-")] == 1
    gone = _unplaced(base, tmp_path / "gone.safetensors", {"base_model": {"name_or_path": str(tmp_path / "moved")}})
    shown = CliRunner().invoke(app, ["inspect", str(gone)], terminal_width=200)  # named, but not on this machine
    assert shown.exit_code == 0 and _rows(shown.output) == {("other", "-"): 5}, shown.output


def test_provenance_reads_as_text_not_python_dicts(base, tmp_path):
    """inspect and the merged model card say "ga 1.0 (mmedit==0.1.0)", never "{'name': 'ga', ...}"."""
    from mmedit.provenance import describe

    provenance = {"plugin": {"name": "ga", "version": "1.0", "package": "mmedit==0.1.0"}, "seed": 3,
                  "config": {"lr": 1e-05, "parts": "llm", "nested": {"k": 2}},
                  "data": {"forget": {"rows": 150, "sha256": "a475d5d1fd98"}, "retain": {"rows": 9, "sha256": "b7"}}}
    assert describe(provenance["plugin"]) == "ga 1.0 (mmedit==0.1.0)"
    assert describe(provenance["config"]) == "lr=1e-05, nested={k=2}, parts=llm"
    assert describe(provenance["data"]) == "forget 150 rows (sha256 a475d5d1…), retain 9 rows (sha256 b7…)"
    weight = dict(load(base, device="cpu")[0].named_parameters())[UP].detach()
    path = Delta.from_changes({UP: (weight, weight + 1)}, provenance=provenance).save(tmp_path / "d.safetensors")
    shown = CliRunner().invoke(app, ["inspect", str(path)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "plugin: ga 1.0 (mmedit==0.1.0)" in shown.output and "config: lr=1e-05, nested={k=2}, parts=llm" in shown.output
    assert "data: forget 150 rows" in shown.output and "{'" not in shown.output and '{"' not in shown.output
    merged = CliRunner().invoke(app, ["merge", str(base), str(path), "--out", str(tmp_path / "m")])
    assert merged.exit_code == 0, merged.output
    card = (tmp_path / "m" / "README.md").read_text()
    table = card.split("| # | delta |")[1].split("<details>")[0]
    assert "| ga 1.0 (mmedit==0.1.0) |" in table and "{'" not in table
