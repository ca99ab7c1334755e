"""`mmedit report` (mmedit.eval.html): one self-contained HTML file from a trace, deltas, eval and attack
reports. The page is parsed with the stdlib's html.parser: every section is there, every delta is named,
the atlas's numbers are the deltas' own counts per part and layer (and per neuron, counted here
independently), nothing is fetched from the network, text from the artifacts is escaped; bad inputs are
one error line with nothing written. Where Debian's chromium is installed the page is also rendered."""
import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmedit import zoo
from mmedit.bench.profiles import generate
from mmedit.cli.main import app
from mmedit.data import read_rows
from mmedit.data.batches import make_batches
from mmedit.delta import Delta
from mmedit.eval.html import atlas
from mmedit.eval.html.page import SECTIONS
from mmedit.loading import load
from mmedit.provenance import file_sha256
from mmedit.trace import trace

CHROMIUM = Path("/usr/bin/chromium")
EVIL = '<script>alert("x")</script><img src=http://evil.example/x.png onerror=alert(1)>'
VISION_FC1 = "model.vision_tower.encoder.layers.0.mlp.fc1"
LLM_MLP = "model.language_model.layers.1.mlp"
PROJECTOR = "model.multi_modal_projector"


class Page(HTMLParser):
    """Tags with their attributes, and the text, of one HTML document."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def with_attr(self, name: str) -> list[dict]:
        return [attrs for _, attrs in self.tags if name in attrs]

    @property
    def all_text(self) -> str:
        return "".join(self.text)


def run(arguments: list[str]):
    return CliRunner().invoke(app, [str(argument) for argument in arguments])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny LLaVA, a benchmark, a traced file, two deltas (MANU-like zeroed neurons; element and dense
    edits with a malicious provenance) and the eval and attack reports of the first."""
    root = tmp_path_factory.mktemp("html-report")
    model_dir = zoo.tiny("llava", root=tmp_path_factory.getbasetemp() / "zoo")
    bench = generate(root / "bench", n_people=10, seed=0).root
    model, processor = load(model_dir, device="cpu")
    rows = read_rows(bench / "forget10.jsonl")[:6]
    batches = [*make_batches(rows, processor, form="multimodal", batch_size=3),
               *make_batches(rows, processor, form="text", batch_size=3)]
    stats = trace(model, batches, grads=True, meta={"data": {"path": EVIL}}, progress=False)
    stats.save(root / "trace.safetensors")
    pruned = {f"{VISION_FC1}.weight": [1, 5, 7], f"{VISION_FC1}.bias": [1, 5, 7], f"{LLM_MLP}.gate_proj.weight": [0, 9],
              f"{LLM_MLP}.up_proj.weight": [0, 9], f"{PROJECTOR}.linear_1.weight": [3]}
    Delta.zeroed_rows(model, pruned, provenance={"plugin": {"name": "manu", "version": "1.0"}}).save(
        root / "manu.safetensors")
    weights = dict(model.named_parameters())
    changed = {}
    for name, edit in ((f"{LLM_MLP}.down_proj.weight", lambda w: w.index_fill(1, torch.tensor([2, 4]), 0.5)),
                       (f"{PROJECTOR}.linear_2.weight", lambda w: w + 1.0),  # dense: every neuron
                       ("model.language_model.layers.0.self_attn.q_proj.weight", lambda w: w * 2)):
        changed[name] = (weights[name].detach().clone(), edit(weights[name].detach().clone()))
    changed[f"{VISION_FC1}.weight"] = (weights[f"{VISION_FC1}.weight"].detach().clone(),
                                       weights[f"{VISION_FC1}.weight"].detach().clone().index_put(
                                           (torch.tensor([10, 10, 20]), torch.tensor([0, 3, 1])), torch.tensor(9.0)))
    Delta.from_changes(changed, model=model, provenance={"plugin": {"name": EVIL, "version": EVIL}}).save(
        root / "evil.safetensors")
    result = run(["eval", model_dir, "--delta", root / "manu.safetensors", "--data", bench, "--limit-people", "1",
                  "--no-letters", "--device", "cpu", "--out", root / "eval.json"])
    assert result.exit_code == 0, result.output
    result = run(["attack", model_dir, "--delta", root / "manu.safetensors", "--data", bench, "--attacks",
                  "quantize,leakage", "--retain-people", "1", "--device", "cpu", "--out", root / "attack.json"])
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def report(made):
    out = made / "report.html"
    result = run(["report", "--trace", made / "trace.safetensors", "--delta", made / "manu.safetensors",
                  "--delta", made / "evil.safetensors", "--eval", made / "eval.json", "--attack", made / "attack.json",
                  "--out", out])
    assert result.exit_code == 0, result.output
    return out


def test_every_section_and_every_input_is_there(made, report):
    page = Page(report.read_text(encoding="utf-8"))
    ids = {attrs["id"] for attrs in page.with_attr("id")}
    assert set(SECTIONS) <= ids
    text = page.all_text
    for name in ("trace.safetensors", "manu.safetensors", "evil.safetensors", "eval.json", "attack.json"):
        assert name in text
        assert file_sha256(made / name) in text  # provenance: every input's sha256
    assert {"vision", "projector", "llm"} <= {attrs["id"].removeprefix("part-") for attrs in page.with_attr("id")}
    assert [attrs["data-method"] for attrs in page.with_attr("data-method")] == ["manu [eval.json]"]
    assert [attrs["data-report"] for attrs in page.with_attr("data-report")] == ["attack.json"]
    assert text.count("quantize") >= 2 and "Leakage across forms" in text
    strips = [attrs for tag, attrs in page.tags if tag == "svg" and attrs.get("class") == "strip"]
    assert len(strips) == 5  # one per traced site: vision.0, vision.1, projector.0, llm.0, llm.1


def test_atlas_numbers_are_the_deltas_counts(made, report):
    page = Page(report.read_text(encoding="utf-8"))
    for index, name in enumerate(("manu.safetensors", "evil.safetensors")):
        counts = Delta.load(made / name).counts()
        shown = {attrs["data-layer"]: int(attrs["data-elements"]) for attrs in page.with_attr("data-elements")
                 if attrs.get("data-delta") == str(index) and "data-layer" in attrs}
        layered = {key: value for key, value in shown.items() if not key.endswith(".-")}
        assert layered == counts["layers"]
        parts = {attrs["data-part"]: int(attrs["data-elements"]) for attrs in page.with_attr("data-elements")
                 if attrs.get("data-delta") == str(index) and "data-part" in attrs}
        assert parts == {part: tally["elements"] for part, tally in counts["parts"].items()}
        assert sum(shown.values()) == counts["elements"]


def neurons_shown(page: Page, index: int) -> dict[str, int]:
    return {attrs["data-layer"]: int(attrs["data-neurons"]) for attrs in page.with_attr("data-neurons")
            if attrs.get("data-delta") == str(index)}


def test_atlas_neurons_are_the_touched_rows_and_columns(report):
    page = Page(report.read_text(encoding="utf-8"))
    # zeroed rows 1, 5, 7 of fc1 (and its bias); 0, 9 of gate and up; projector row 3
    assert neurons_shown(page, 0) == {"vision.0": 3, "llm.1": 2, "projector.0": 1}
    # evil: down_proj columns 2, 4 (the consumer); linear_2 dense: all 64 projector neurons; fc1 elements in
    # rows 10 and 20; q_proj is no neuron's producer (counted in llm.0's elements, no neurons)
    assert neurons_shown(page, 1) == {"llm.1": 2, "projector.0": 64, "vision.0": 2, "llm.0": 0}


def test_rates_and_recoveries_are_the_reports(made, report):
    page = Page(report.read_text(encoding="utf-8"))
    comparison = json.loads((made / "eval.json").read_text())["comparison"]["edited"]
    shown = {(a["data-split"], a["data-form"], a["data-metric"]): a["data-rate"] for a in page.with_attr("data-rate")}
    expected = {(split, form, metric): values.get("retention", values.get("forgetting_rate"))
                for split, forms in comparison.items() for form, by_metric in forms.items()
                for metric, values in by_metric.items()}
    assert shown.keys() == expected.keys() and len(shown) >= 20
    assert all(shown[key] == ("" if value is None else str(value)) for key, value in expected.items())
    assert any(split == "retain" for split, _, _ in shown) and any(split == "forget" for split, _, _ in shown)
    quantize = json.loads((made / "attack.json").read_text())["attacks"]["quantize"]["variants"]
    recovered = {(a["data-variant"], a["data-form"]): a["data-recovery"] for a in page.with_attr("data-recovery")}
    assert recovered == {(variant, form): "" if value["choice_acc"] is None else str(value["choice_acc"])
                         for variant, found in quantize.items() for form, value in found["recovery"].items()}


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama", "gemma3"])
def test_atlas_finds_the_neurons_of_other_families(made, tmp_path_factory, family):
    """Rows 0 and width-1 of every producer the model map names (Qwen2-VL's merger, Mllama's projector
    that is its own site, Gemma 3's projection weight read along axis 1) are two neurons of every site."""
    from mmedit.arch import model_map

    model, processor = load(zoo.tiny(family, root=tmp_path_factory.getbasetemp() / "zoo"), device="cpu")
    rows = read_rows(made / "bench" / "forget10.jsonl")[:2]
    stats = trace(model, make_batches(rows, processor, form="multimodal", batch_size=2), progress=False)
    weights, changes = dict(model.named_parameters()), {}
    for site in model_map(model).sites:
        for producer in site.producers:
            old = weights[producer.param].detach().clone()
            changes[producer.param] = (old, old.index_fill(producer.axis, torch.tensor([0, site.width - 1]), 7.0))
    layers, notes = atlas.build(stats, [Delta.from_changes(changes, model=model)])
    assert notes == []
    assert {f"{row.part}.{row.layer}": int((row.neurons[0] > 0).sum()) for row in layers if 0 in row.neurons} == \
        {name: 2 for name in stats.site_names}


def test_rank_percentile():
    scores = torch.tensor([0.5, 3.0, 1.0, 2.0, 0.0])  # ranks 1, 4, 2, 3, 0 of 4
    assert atlas.rank_percentile(scores, torch.tensor([1])) == 100.0
    assert atlas.rank_percentile(scores, torch.tensor([4])) == 0.0
    assert atlas.rank_percentile(scores, torch.tensor([1, 3, 2])) == 75.0
    assert atlas.rank_percentile(scores, torch.tensor([], dtype=torch.int64)) is None


def test_a_real_manu_delta_touches_the_neurons_its_own_report_selected(made, tmp_path, tmp_path_factory):
    """MANU (the plugin, run here) records how many neurons it zeroed per site; the atlas finds as many."""
    from mmedit.eval import html
    from mmedit.plugins import apply_plugin

    model, processor = load(zoo.tiny("llava", root=tmp_path_factory.getbasetemp() / "zoo"), device="cpu")
    forget, retain = read_rows(made / "bench" / "forget10.jsonl")[:6], read_rows(made / "bench" / "retain90.jsonl")[:12]
    delta = apply_plugin("manu", model, processor, forget, retain, {})
    delta.save(tmp_path / "manu-real.safetensors")
    selected = {layer["site"]: layer["selected"] for part in delta.provenance["report"]["selected"].values()
                for layer in part["layers"] if layer["selected"]}
    assert sum(selected.values()) > 0
    page = Page(html.build(made / "trace.safetensors", [tmp_path / "manu-real.safetensors"]))
    assert neurons_shown(page, 0) == selected


def test_per_neuron_counts_of_each_change_kind():
    change = Delta.from_changes({"w": (torch.zeros(4, 6), torch.zeros(4, 6).index_fill(1, torch.tensor([1, 4]), 1.0))}
                                ).changes["w"]
    assert atlas.per_neuron(change, 1, 6).tolist() == [0, 4, 0, 0, 4, 0]  # rows along the neuron axis
    assert atlas.per_neuron(change, 0, 4).tolist() == [2, 2, 2, 2]  # the same edit, seen along the other axis
    assert atlas.per_neuron(change, 0, 5) is None  # a width that does not fit
    flat = torch.zeros(4, 6)
    flat[2, 3], flat[0, 0] = 1.0, 2.0
    change = Delta.from_changes({"w": (torch.zeros(4, 6), flat)}).changes["w"]
    assert change.kind == "elements"
    assert atlas.per_neuron(change, 0, 4).tolist() == [1, 0, 1, 0]


def test_nothing_is_fetched_and_artifact_text_is_escaped(report):
    text = report.read_text(encoding="utf-8")
    page = Page(text)
    for tag, attrs in page.tags:
        for key in ("src", "href", "xlink:href", "action", "poster", "data"):
            value = (attrs.get(key) or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//", "ftp:")), (tag, key, value)
    assert not [tag for tag, _ in page.tags if tag in ("script", "img", "link", "iframe", "object", "embed")]
    assert "url(" not in text and "@import" not in text
    assert EVIL in page.all_text  # shown as text, in the delta's and the trace's provenance
    assert page.all_text.count(EVIL) >= 2


def test_any_subset_of_inputs(made, tmp_path):
    for arguments in (["--delta", made / "manu.safetensors"], ["--trace", made / "trace.safetensors"],
                      ["--eval", made / "eval.json"], ["--attack", made / "attack.json"]):
        out = tmp_path / "one.html"
        result = run(["report", *arguments, "--out", out, "--force"])
        assert result.exit_code == 0, result.output
        page = Page(out.read_text(encoding="utf-8"))
        assert set(SECTIONS) <= {attrs["id"] for attrs in page.with_attr("id")}
        assert Path(arguments[1]).name in page.all_text


def test_form_text_shows_the_text_twins_importance_and_an_untraced_form_is_refused(made, tmp_path, tmp_path_factory):
    out = tmp_path / "text.html"
    result = run(["report", "--trace", made / "trace.safetensors", "--form", "text", "--out", out])
    assert result.exit_code == 0, result.output
    page = Page(out.read_text(encoding="utf-8"))
    strips = [attrs for tag, attrs in page.tags if tag == "svg" and attrs.get("class") == "strip"]
    assert len(strips) == 2  # the LLM's layers: text-only inputs never reach the vision tower or projector
    assert "over all positions of the text inputs" in page.all_text
    model, processor = load(zoo.tiny("llava", root=tmp_path_factory.getbasetemp() / "zoo"), device="cpu")
    rows = read_rows(made / "bench" / "forget10.jsonl")[:2]
    trace(model, make_batches(rows, processor, form="multimodal"), progress=False).save(tmp_path / "mm.safetensors")
    result = run(["report", "--trace", tmp_path / "mm.safetensors", "--form", "text", "--out", tmp_path / "x.html"])
    assert result.exit_code == 1 and "has no text statistics (traced forms: multimodal)" in result.output
    assert not (tmp_path / "x.html").exists()


@pytest.mark.parametrize("option, source, message", [
    ("--trace", "manu.safetensors", "not an mmedit trace file"),
    ("--delta", "eval.json", "not a readable safetensors file"),
    ("--eval", "attack.json", "not an eval report (mmedit eval); it is an attack report"),
    ("--attack", "eval.json", "not an attack report (mmedit attack); it is an eval report"),
    ("--eval", "trace.safetensors", "not an eval report"),
    ("--eval", "missing.json", "eval file not found"),
    ("--eval", "broken.json", "is not valid JSON"),
    ("--eval", "bare.json", "malformed eval report"),
    ("--attack", "bad-attack.json", "malformed attack report"),
])
def test_a_bad_input_is_one_line_and_nothing_is_written(made, tmp_path, option, source, message):
    (made / "broken.json").write_text('{"format": "mmedit.eval-report", ')
    (made / "bare.json").write_text('{"format": "mmedit.eval-report", "results": {"edited": {}}}')
    attack = json.loads((made / "attack.json").read_text())
    attack["attacks"]["quantize"]["variants"]["int8"]["attacked"] = None
    (made / "bad-attack.json").write_text(json.dumps(attack))
    out = tmp_path / "r.html"
    result = run(["report", "--delta", made / "manu.safetensors", option, made / source, "--out", out])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and message in result.output, \
        result.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_no_input_an_existing_output_and_a_bad_form_are_refused(made, tmp_path):
    out = tmp_path / "r.html"
    result = run(["report", "--out", out])
    assert result.exit_code == 1 and "nothing to report" in result.output and not out.exists()
    out.write_text("mine")
    result = run(["report", "--delta", made / "manu.safetensors", "--out", out])
    assert result.exit_code == 1 and "already exists" in result.output and out.read_text() == "mine"
    result = run(["report", "--delta", made / "manu.safetensors", "--out", out, "--force", "--form", "video"])
    assert result.exit_code == 1 and "unknown form" in result.output and out.read_text() == "mine"
    result = run(["report", "--delta", made / "manu.safetensors", "--out", out, "--force"])
    assert result.exit_code == 0 and "manu.safetensors" in out.read_text()


def test_an_impossible_output_is_refused_before_any_input_is_read(made, tmp_path, monkeypatch):
    import mmedit.eval.html

    def read(*args, **kwargs):
        raise AssertionError("the inputs were read before the output was checked")

    monkeypatch.setattr(mmedit.eval.html, "read_inputs", read)
    (tmp_path / "a-file").write_text("not a folder")
    result = run(["report", "--delta", made / "manu.safetensors", "--out", tmp_path / "a-file" / "r.html"])
    assert result.exit_code == 1 and result.output.startswith("error: cannot write ") and \
        "not a writable folder" in result.output and result.output.count("\n") == 1, result.output


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium)")
def test_chromium_renders_it(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run(command + [f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, tables, the magma strips: not one colour
    dom = subprocess.run(command + ["--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    rendered = Page(dom)
    assert set(SECTIONS) <= {attrs["id"] for attrs in rendered.with_attr("id")}
    assert EVIL in rendered.all_text and not [tag for tag, _ in rendered.tags if tag in ("script", "img")]
