"""`mmedit trace`'s presentation (mmedit.cli.trace_report): the heatmap PNG is written atomically and an
existing file is only replaced with --force (refused before any tracing)."""
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmedit import zoo
from mmedit.cli.main import app
from mmedit.cli.trace_report import heatmap, top_table
from mmedit.data.rows import Row, write_jsonl
from mmedit.errors import MmeditError
from mmedit.trace import TraceStats

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """(model folder, data file, statistics file) from one `mmedit trace` run."""
    folder = tmp_path_factory.mktemp("trace-report")
    rows = []
    for i, answer in enumerate(["glassblower", "a pilot", "judge"]):
        Image.new("RGB", (32, 32), (60 * i, 200 - 50 * i, 90)).save(folder / f"p{i}.png")
        rows.append(Row(id=f"p{i}", entity=f"Person {i}", image=folder / f"p{i}.png", question="Job?",
                        text_question=f"Person {i}'s job?", answer=answer))
    write_jsonl(rows, folder / "rows.jsonl")
    model = zoo.tiny("llava", root=tmp_path_factory.getbasetemp() / "zoo")
    stats = folder / "stats.safetensors"
    result = CliRunner().invoke(app, ["trace", str(model), "--data", str(folder / "rows.jsonl"), "--out", str(stats),
                                      "--grads", "--top", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return model, folder / "rows.jsonl", stats


def test_plot_onto_an_existing_file_needs_force(traced, tmp_path):
    model, data, _ = traced
    plot, out = tmp_path / "mine.png", tmp_path / "stats.safetensors"
    plot.write_bytes(b"my own picture")
    command = ["trace", str(model), "--data", str(data), "--out", str(out), "--plot", str(plot), "--device", "cpu"]
    refused = CliRunner().invoke(app, command)
    assert refused.exit_code == 1 and refused.output.startswith("error:") and "--force" in refused.output
    assert len(refused.output.strip().splitlines()) == 1, refused.output
    assert plot.read_bytes() == b"my own picture" and not out.exists()  # refused before tracing anything
    forced = CliRunner().invoke(app, [*command, "--force"])
    assert forced.exit_code == 0, forced.output
    assert plot.read_bytes().startswith(PNG) and out.is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine.png", "stats.safetensors"]  # no temp files


def test_heatmap_and_table_of_saved_statistics(traced, tmp_path):
    stats = TraceStats.load(traced[2])
    path = heatmap(stats, "multimodal", "all", tmp_path / "heat.png")
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 1000
    with pytest.raises(MmeditError, match="already exists"):
        heatmap(stats, "text", "all", path)
    table = top_table(stats, "multimodal", "answer", 2)
    sites = [cell for cell in table.columns[0]._cells if cell]
    assert sites == [site["name"] for site in stats.sites] and table.columns[-1].header == "|g|"
