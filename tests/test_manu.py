"""MANU: planted neurons are found, scores equal the formulas computed on materialised activations,
pruned neurons are exactly zero on any input (soft: exactly scaled), precomputed statistics (API and
`mmedit trace` + `mmedit apply --stats`) give the same edit, and bad statistics are refused."""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from mmedit import zoo
from mmedit.arch import model_map
from mmedit.cli.main import app
from mmedit.data.batches import make_batches
from mmedit.data.rows import Row, write_jsonl
from mmedit.delta import Delta
from mmedit.errors import MmeditError
from mmedit.loading import load
from mmedit.plugins import apply_plugin, get
from mmedit.plugins.manu import candidate_sites, report, scoring
from mmedit.trace import TraceStats, trace

TAU = 0.1
EPS = 1e-8
FORGET = {"vision.0": 3, "vision.1": 20, "projector.0": 12, "llm.0": 17, "llm.1": 64}  # fire on forget images only
RETAIN = {"vision.0": 9, "vision.1": 40, "projector.0": 30, "llm.0": 90, "llm.1": 100}  # ... on retain images only


def person_rows(folder, people, colour, prefix="") -> list[Row]:
    """Two questions per person; each portrait mostly `colour` with a light patch of its own."""
    rows = []
    for i in people:
        generator = torch.Generator().manual_seed(i)
        noise = (torch.rand(32, 32, 3, generator=generator) * 60).to(torch.uint8)
        base = torch.tensor(colour, dtype=torch.uint8).expand(32, 32, 3) // 4 * 3 + noise
        image = Image.fromarray(base.numpy())
        image.paste((230, 230, 230), (2 + 2 * (i % 8), 3, 12 + 2 * (i % 8), 13))
        path = folder / f"{prefix}p{i}.png"
        image.save(path)
        for q, (question, answer) in enumerate([("What is the job of", ["pilot", "baker", "judge"][i % 3]),
                                                 ("Where was born", ["Lima", "Oslo"][i % 2])]):
            rows.append(Row(id=f"{prefix}p{i}-{q}", entity=f"Person {i}", image=path,
                            question=f"{question} this person?", text_question=f"{question} Person {i}?",
                            answer=answer, where=f"rows.jsonl:{len(rows) + 1}"))
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("manu-rows")
    return {"forget": person_rows(folder, range(0, 4), (220, 40, 30)),
            "retain": person_rows(folder, range(4, 8), (30, 60, 220)),
            "novel": person_rows(folder, range(8, 10), (40, 200, 60), prefix="n")}


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return zoo.tiny("llava", root=tmp_path_factory.getbasetemp() / "zoo")


def site_inputs(model, module: str, rows, processor) -> torch.Tensor:
    """Every row vector that reaches `module` on the rows' multimodal batches: [positions, features]."""
    seen = []
    handle = model.get_submodule(module).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for batch in make_batches(rows, processor, "multimodal", batch_size=4):
                model(**batch.inputs)
    finally:
        handle.remove()
    return torch.cat([value.reshape(-1, value.shape[-1]) for value in seen])


def plant_threshold(linear, index: int, target: torch.Tensor, other: torch.Tensor, strength: float = 10.0):
    """Row `index` of `linear` fires (about `strength`) on the target inputs furthest along their mean
    difference from the others, and never above zero on any of the others."""
    direction = target.mean(0) - other.mean(0)
    direction = direction / direction.norm()
    threshold = (other @ direction).max()
    margin = (target @ direction - threshold).clamp_min(0)
    assert (margin > 0).float().mean() > 0.2, "test images not separable enough"
    scale = strength / margin[margin > 0].mean()
    with torch.no_grad():
        linear.weight[index] = scale * direction
        linear.bias[index] = -scale * threshold


@pytest.fixture(scope="module")
def planted(llava_dir, data):
    """Tiny LLaVA where the FORGET neurons fire only on forget people's images (and what they feed in
    the LLM), the RETAIN neurons only on retain people's; everything else is the random model."""
    model, processor = load(llava_dir, device="cpu")
    mapping = model_map(model)
    forget, retain = data["forget"], data["retain"]
    for name in ("vision.0", "vision.1", "projector.0"):  # in execution order: later inputs see earlier plants
        path = mapping.site(name).producers[0].param.removesuffix(".weight")  # fc1 / linear_1
        producer = model.get_submodule(path)
        target, other = site_inputs(model, path, forget, processor), site_inputs(model, path, retain, processor)
        plant_threshold(producer, FORGET[name], target, other)
        plant_threshold(producer, RETAIN[name], other, target)
    # The projector neurons write along their own directions of the LLM's residual stream; the LLM neurons
    # read them: silu(s) * s with s = the (normalised) residual along that direction.
    directions = torch.linalg.qr(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)))[0].T
    projector = model.get_submodule(mapping.site("projector.0").module)
    with torch.no_grad():
        for neurons, direction in ((FORGET, directions[0]), (RETAIN, directions[1])):
            projector.weight[:, neurons["projector.0"]] = 5 * direction
            for name in ("llm.0", "llm.1"):
                for producer in mapping.site(name).producers:
                    model.get_parameter(producer.param)[neurons[name]] = direction
    return model, processor


def selected(delta: Delta, mapping) -> dict[str, set[int]]:
    """Neurons whose producer rows the delta zeroes, by site."""
    found = {}
    for site in mapping.sites:
        change = delta.changes.get(site.producers[0].param)
        if change is not None:
            assert change.kind == "zeroed_rows" and change.axis == site.producers[0].axis
            found[site.name] = set(change.index.tolist())
    return found


# ---- planted neurons ---------------------------------------------------------------------------------
def test_planted_forget_neurons_are_selected_and_retain_ones_are_not(planted, data):
    model, processor = planted
    mapping = model_map(model)
    delta = apply_plugin("manu", model, processor, data["forget"], data["retain"], progress=False)
    chosen = selected(delta, mapping)
    for name, neuron in FORGET.items():
        assert neuron in chosen.get(name, set()), f"planted forget neuron {name}[{neuron}] not selected: {chosen}"
    for name, neuron in RETAIN.items():
        assert neuron not in chosen.get(name, set()), f"retain-only neuron {name}[{neuron}] was selected"
    # alpha = 2 % of each part: vision 128 -> 3, projector 64 -> 1, llm 256 -> 5.
    counts = {part: sum(len(v) for k, v in chosen.items() if k.startswith(part))
              for part in ("vision", "projector", "llm")}
    assert counts == {"vision": 3, "projector": 1, "llm": 5}
    header = delta.header()
    assert header["report"]["selected"]["llm"]["neurons"] == 5
    assert [layer["selected"] for layer in header["report"]["selected"]["llm"]["layers"]] == [
        len(chosen.get("llm.0", ())), len(chosen.get("llm.1", ()))]
    # Tiny: row indices and old rows only.
    assert delta.nbytes < 0.02 * sum(p.numel() * p.element_size() for p in model.parameters())

    # Per layer, and restricted to the LLM: the planted LLM neurons still win in their layers.
    by_layer = apply_plugin("manu", model, processor, data["forget"], data["retain"],
                            {"within": "layer", "parts": "llm", "alpha": 1.0}, progress=False)
    chosen = selected(by_layer, mapping)
    assert chosen == {"llm.0": {FORGET["llm.0"]}, "llm.1": {FORGET["llm.1"]}}
    assert all(mapping.part_of(name)[0] == "llm" for name in by_layer.changes)

    # The reference preset reads vision and projector from the multimodal pass: it finds those planted
    # neurons. It reads the LLM from the text-only pass, which never carries the image route the planted
    # LLM neurons read: they stay unselected there.
    reference = selected(apply_plugin("manu", model, processor, data["forget"], data["retain"],
                                      {"preset": "reference"}, progress=False), mapping)
    for name, neuron in FORGET.items():
        assert (neuron in reference.get(name, set())) == (not name.startswith("llm")), (name, reference)


# ---- scores against a direct computation ------------------------------------------------------------
def materialise(model, mapping, rows, processor, form: str) -> dict[str, dict[str, torch.Tensor]]:
    """Every activation of every site, kept whole, with the positions of each group: {site: {group: [P, W]}}."""
    values = {site.name: {"all": [], "last": []} for site in mapping.sites}
    for batch in make_batches(rows, processor, form, batch_size=4):
        seen, handles = {}, []
        for site in mapping.sites:
            module = model.get_submodule(site.module)
            handles.append(module.register_forward_pre_hook(lambda m, a, n=site.name: seen.__setitem__(n, a[0])))
        with torch.no_grad():
            model(**batch.inputs)
        for handle in handles:
            handle.remove()
        real = batch.inputs["attention_mask"].bool()
        answer = batch.inputs["labels"] != -100
        first = torch.where(answer, torch.arange(answer.shape[1]), answer.shape[1]).min(dim=1).values
        last = torch.zeros_like(real)
        last[torch.arange(len(first)), first - 1] = True
        for name, value in seen.items():
            if name.startswith("llm"):
                values[name]["all"].append(value[real])
                values[name]["last"].append(value[last])
            else:
                values[name]["all"].append(value.reshape(-1, value.shape[-1]))
    return {name: {group: torch.cat(parts).double() for group, parts in groups.items() if parts}
            for name, groups in values.items() if groups["all"]}


def direct_scores(acts, preset, group, rates) -> dict[str, torch.Tensor]:
    """S from the materialised activations: the paper's modality comparison, or the reference code's
    sum_k w_k (F_k / (R_k + 1e-5) - 1) on one pass per site (LLM: text-only; vision, projector: multimodal)."""
    def stats(z):
        share = (z.abs() > TAU).double().mean(0) if rates else (z.abs() > TAU).double().sum(0)
        energy = z.square().mean(0) if rates else z.square().sum(0)
        return z.abs().mean(0), share, z.var(0, unbiased=False), energy

    def cmp(a, b):
        return (a - b).abs() / (a + b + EPS)

    scores = {}
    for name in acts["forget", "multimodal"]:
        used = group if name.startswith("llm") else "all"
        if preset == "reference":
            form = "text" if name.startswith("llm") else "multimodal"
            (z_f, n_f, v_f, e_f), (z_r, n_r, v_r, e_r) = (stats(acts[role, form][name][used])
                                                          for role in ("forget", "retain"))
            pairs = [(2, z_f, z_r), (0, n_f, n_r), (2, v_f.sqrt(), v_r.sqrt()), (2, e_f.sqrt(), e_r.sqrt())]
            scores[name] = sum(w * (f / (r + 1e-5) - 1) for w, f, r in pairs)
            continue
        importance = []
        for role in ("forget", "retain"):
            z_m, n_m, v_m, e_m = stats(acts[role, "multimodal"][name][used])
            if name.startswith("llm"):
                z_t, n_t, v_t, e_t = stats(acts[role, "text"][name][used])
                terms = [cmp(z_m, z_t), cmp(n_m, n_t), (v_m + v_t).sqrt(), cmp(e_m, e_t).sqrt()]
            else:  # no text side: the multimodal statistics alone
                terms = [z_m, n_m, v_m.sqrt(), e_m.sqrt()]
            importance.append(sum(terms))
        scores[name] = importance[0] / (importance[1] + EPS)
    return scores


def traced(model, processor, data, group="all") -> dict[str, TraceStats]:
    return {role: trace(model, (b for form in ("multimodal", "text")
                                for b in make_batches(data[role], processor, form, batch_size=4)),
                        groups=(group,), tau=TAU, progress=False) for role in ("forget", "retain")}


@pytest.mark.parametrize("preset, group, rates", [("paper", "all", True), ("paper", "last", False),
                                                  ("reference", "all", True)])
def test_scores_equal_the_formulas_on_materialised_activations(planted, data, preset, group, rates):
    model, processor = planted
    mapping = model_map(model)
    acts = {(role, form): materialise(model, mapping, data[role], processor, form)
            for role in ("forget", "retain") for form in ("multimodal", "text")}
    expected = direct_scores(acts, preset, group, rates)

    stats = traced(model, processor, data, group)
    got = scoring.site_scores(stats["forget"], stats["retain"], mapping.sites, image_only=mapping.image_only,
                              group=group, preset=preset, rates=rates)
    assert set(got) == set(expected)
    # The tracer adds float32 batch sums into float64 (relative error ~1e-7 on each statistic);
    # |a - b| / (a + b) turns that into an absolute error of about the same size where a ~ b.
    for name, score in expected.items():
        torch.testing.assert_close(got[name].score, score, rtol=1e-4, atol=1e-4)
    for role, form, name in [("forget", "text", "llm.1"), ("retain", "multimodal", "vision.0")]:
        moments = scoring.moments(stats[role], role, name, form, group if name.startswith("llm") else "all", rates)
        z = acts[role, form][name][group if name.startswith("llm") else "all"]
        reduce = (lambda t: t.mean(0)) if rates else (lambda t: t.sum(0))  # noqa: E731
        torch.testing.assert_close(moments.mean_abs, z.abs().mean(0), rtol=2e-6, atol=0)
        torch.testing.assert_close(moments.active, reduce((z.abs() > TAU).double()), rtol=1e-12, atol=0)
        torch.testing.assert_close(moments.var, z.var(0, unbiased=False), rtol=2e-5, atol=1e-9)
        torch.testing.assert_close(moments.energy, reduce(z.square()), rtol=2e-6, atol=0)

    # Selection: the top 2 % of each part's concatenated scores.
    chosen = scoring.select(got, 2.0).chosen
    for part in ("vision", "projector", "llm"):
        names = [s.name for s in mapping.sites_of(part)]
        flat = torch.cat([got[n].score for n in names])
        top = set(flat.topk(scoring.budget(2.0, flat.numel())).indices.tolist())
        offsets = dict(zip(names, [0, *torch.tensor([expected[n].numel() for n in names]).cumsum(0).tolist()]))
        assert {offsets[n] + i for n in names for i in chosen.get(n, torch.empty(0)).tolist()} == top


def reference_transcription(forget: TraceStats, retain: TraceStats, sites) -> dict[str, torch.Tensor]:
    """franciscoliu/MANU prune/prune_utility.py compute_combined_scores_incremental, written out on the
    traced sums: S = sum_k w_k (F_k / (R_k + 1e-5) - 1), weights abs 2, freq 0, var 2, rms 2, with
    F_abs = mean |z|, F_freq = share |z| > 0.1, F_var = std z, F_rms = sqrt(mean z^2) (the code's
    collect_feedforward_activations), each site from ONE pass: the LLM layers the text-only pass (the
    code's "unimodal" hooks), vision and projector the multimodal pass."""
    def statistics(stats, site, form):
        n = stats.count(site, form, "all")
        mean = stats.sum(site, form, "all", "sum").double() / n
        mean_sq = stats.sum_sq(site, form, "all").double() / n
        return {"abs": stats.sum(site, form, "all", "sum_abs").double() / n,
                "freq": stats.active(site, form, "all").double() / n,
                "var": (mean_sq - mean.square()).clamp_min(0).sqrt(), "rms": mean_sq.sqrt()}

    weights = {"abs": 2.0, "freq": 0.0, "var": 2.0, "rms": 2.0}
    scores = {}
    for site in sites:
        form = "text" if site.part == "llm" else "multimodal"
        f, r = statistics(forget, site.name, form), statistics(retain, site.name, form)
        scores[site.name] = sum(w * (f[k] / (r[k] + 1e-5) - 1) for k, w in weights.items())
    return scores


def test_reference_preset_is_the_public_codes_score(planted, data):
    model, processor = planted
    mapping = model_map(model)
    stats = traced(model, processor, data)
    expected = reference_transcription(stats["forget"], stats["retain"], mapping.sites)
    settings = get("manu").configure({"preset": "reference"}).scoring
    got = scoring.site_scores(stats["forget"], stats["retain"], mapping.sites, image_only=mapping.image_only,
                              **settings)
    assert set(got) == set(expected)
    for name, score in expected.items():
        torch.testing.assert_close(got[name].score, score, rtol=1e-6, atol=1e-6)
        assert got[name].forms == (("text",) if name.startswith("llm") else ("multimodal",))
    # Not the modality comparison (nor anything else): the scores differ from the paper preset's.
    paper = scoring.site_scores(stats["forget"], stats["retain"], mapping.sites, image_only=mapping.image_only)
    assert not torch.allclose(paper["llm.0"].score, expected["llm.0"], rtol=1e-2)

    # The plugin's edit selects each part's top 2 % of exactly these scores, and reports the forms read.
    delta = apply_plugin("manu", model, processor, data["forget"], data["retain"], {"preset": "reference"},
                         stats=stats, progress=False)
    chosen = selected(delta, mapping)
    for part in ("vision", "projector", "llm"):
        names = [site.name for site in mapping.sites_of(part)]
        flat = torch.cat([expected[name] for name in names])
        k = max(1, round(0.02 * flat.numel()))
        offsets = dict(zip(names, [0, *torch.tensor([expected[n].numel() for n in names]).cumsum(0).tolist()]))
        assert {offsets[n] + i for n in names for i in chosen.get(n, ())} == set(flat.topk(k).indices.tolist())
    report = delta.header()["report"]
    assert report["scoring"]["preset"] == "reference"
    assert {part: info["forms"] for part, info in report["selected"].items()} == {
        "vision": ["multimodal"], "projector": ["multimodal"], "llm": ["text"]}


# ---- the edit ----------------------------------------------------------------------------------------
def activations(model, mapping, rows, processor) -> dict[str, list[torch.Tensor]]:
    seen = {}
    handles = []
    for site in mapping.sites:
        module = model.get_submodule(site.module)
        keep = lambda value, n=site.name: seen.setdefault(n, []).append(value.detach())  # noqa: E731
        if site.io == "input":
            handles.append(module.register_forward_pre_hook(lambda m, a, k=keep: k(a[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, a, o, k=keep: k(o)))
    try:
        with torch.no_grad():
            for form in ("multimodal", "text"):
                for batch in make_batches(rows, processor, form, batch_size=4):
                    model(**batch.inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("family", [f for f in ("llava", "qwen2_5_vl", "idefics3") if f in zoo.FAMILIES])
def test_selected_neurons_are_exactly_zero_on_any_input(family, data, tmp_path_factory):
    model, processor = load(zoo.tiny(family, root=tmp_path_factory.getbasetemp() / "zoo"), device="cpu")
    mapping = model_map(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the tiny models' biases are zero; zeroing them must show
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    forget, retain = data["forget"][:4], data["retain"][:4]
    delta = apply_plugin("manu", model, processor, forget, retain, {"alpha": 10.0}, progress=False)
    chosen = {}
    for site in mapping.sites:
        changed = [producer for producer in site.producers if producer.param in delta.changes]
        if not changed:
            continue
        # Every producing slice (fc1 rows and bias; gate_proj and up_proj rows, and their biases) is zeroed.
        assert changed == list(site.producers), f"{site.name}: only {[p.param for p in changed]} zeroed"
        for producer in changed:
            change = delta.changes[producer.param]
            assert change.kind == "zeroed_rows" and change.axis == producer.axis
            chosen.setdefault(site.name, set(change.index.tolist()))
            assert chosen[site.name] == set(change.index.tolist()), "producers of one neuron disagree"
    assert {name.split(".")[0] for name in chosen} == {"vision", "projector", "llm"}
    with delta.applied(model):
        seen = activations(model, mapping, data["novel"] + forget[:2] + retain[:2], processor)
    for name, indices in chosen.items():
        assert seen[name], f"{name} never ran"
        for value in seen[name]:
            assert torch.count_nonzero(value[..., sorted(indices)]) == 0, f"{name} neurons not zero"


def test_soft_scales_each_selected_neuron_exactly(planted, data):
    model, processor = planted
    mapping = model_map(model)
    decay = 0.25
    delta = apply_plugin("manu", model, processor, data["forget"], data["retain"], {"soft": decay}, progress=False)
    # Sites read at a module's input: the module's input columns scaled, stored as rows along axis 1.
    chosen = {}
    for site in mapping.sites:
        change = delta.changes.get(f"{site.module}.weight")
        if change is not None:
            assert change.kind == "rows" and change.axis == 1
            torch.testing.assert_close(change.new, change.old * decay, rtol=0, atol=0)
            chosen[site.name] = change.index.tolist()
    assert set(delta.changes) == {f"{mapping.site(name).module}.weight" for name in chosen}
    assert chosen == {name: sorted(indices) for name, indices in
                      selected(apply_plugin("manu", model, processor, data["forget"], data["retain"], progress=False),
                               mapping).items()}
    # Same as multiplying the neurons by `decay` in the base model.
    handles = []
    for name, indices in chosen.items():
        def scale(module, args, indices=indices):
            value = args[0].clone()
            value[..., indices] *= decay
            return (value, *args[1:])
        handles.append(model.get_submodule(mapping.site(name).module).register_forward_pre_hook(scale))
    batch = next(make_batches(data["novel"], processor, "multimodal", batch_size=4))
    with torch.no_grad():
        hooked = model(**batch.inputs).logits
        for handle in handles:
            handle.remove()
        with delta.applied(model):
            edited = model(**batch.inputs).logits
    torch.testing.assert_close(edited, hooked, rtol=1e-5, atol=1e-6)


# ---- precomputed statistics --------------------------------------------------------------------------
def test_precomputed_statistics_and_cli(planted, data, llava_dir, tmp_path):
    model, processor = planted
    # Python API: statistics as `mmedit trace` makes them (all parts, both forms, every group).
    stats = {role: trace(model, (b for form in ("multimodal", "text")
                                 for b in make_batches(data[role], processor, form, batch_size=4)), progress=False)
             for role in ("forget", "retain")}
    own = apply_plugin("manu", model, processor, data["forget"], data["retain"], progress=False)
    given = apply_plugin("manu", model, processor, data["forget"], data["retain"], stats=stats, progress=False)
    assert own.changes.keys() == given.changes.keys()
    for name, change in own.changes.items():
        assert torch.equal(change.index, given.changes[name].index) and torch.equal(change.old, given.changes[name].old)
    assert given.header()["report"]["statistics"] == {"forget": "precomputed", "retain": "precomputed"}

    # Refused: a different tau, a missing text form, other rows, an unknown key.
    with pytest.raises(MmeditError, match="traced with tau=0.1 but manu has tau=0.2"):
        apply_plugin("manu", model, processor, data["forget"], data["retain"], {"tau": 0.2}, stats=stats,
                     progress=False)
    multimodal_only = trace(model, make_batches(data["retain"], processor, "multimodal"), progress=False)
    with pytest.raises(MmeditError, match="retain statistics have nothing for site llm.0, text form"):
        apply_plugin("manu", model, processor, data["forget"], data["retain"],
                     stats={"forget": stats["forget"], "retain": multimodal_only}, progress=False)
    with pytest.raises(MmeditError, match="unknown statistics key 'text'"):
        apply_plugin("manu", model, processor, data["forget"], data["retain"], stats={"text": stats["forget"]},
                     progress=False)
    counted = TraceStats(stats["forget"].tensors, stats["forget"].meta | {"data": {"rows": 3}})
    with pytest.raises(MmeditError, match="forget statistics cover 3 rows, the forget set has 8"):
        apply_plugin("manu", model, processor, data["forget"], data["retain"], stats={"forget": counted},
                     progress=False)

    # CLI: mmedit trace, then mmedit apply --stats, on the plain tiny model; same edit as tracing inside.
    runner = CliRunner()
    files = {}
    for role in ("forget", "retain"):
        write_jsonl(data[role], tmp_path / f"{role}.jsonl")
        files[role] = tmp_path / f"{role}.safetensors"
        result = runner.invoke(app, ["trace", str(llava_dir), "--data", str(tmp_path / f"{role}.jsonl"),
                                     "--out", str(files[role]), "--top", "0", "--device", "cpu"])
        assert result.exit_code == 0, result.output
    common = ["apply", "manu", str(llava_dir), "--forget", str(tmp_path / "forget.jsonl"),
              "--retain", str(tmp_path / "retain.jsonl"), "--device", "cpu", "--set", "alpha=5"]
    plot = tmp_path / "selected.png"
    stats_args = ["--stats", f"forget={files['forget']}", "--stats", f"retain={files['retain']}"]
    result = runner.invoke(app, [*common, *stats_args, "--set", f"plot={plot}", "--out", str(tmp_path / "a.st")])
    assert result.exit_code == 0, result.output
    assert "vision total" in result.output and "llm total" in result.output  # the plugin's report table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "b.safetensors")])
    assert result.exit_code == 0, result.output
    with_stats, without = Delta.load(tmp_path / "a.st"), Delta.load(tmp_path / "b.safetensors")
    assert with_stats.changes.keys() == without.changes.keys()
    assert all(torch.equal(c.index, without.changes[n].index) for n, c in with_stats.changes.items())
    assert with_stats.header()["files"]["stats/forget"]["path"] == str(files["forget"])
    result = runner.invoke(app, [*common, "--set", f"plot={plot}", "--out", str(tmp_path / "c.safetensors")])
    assert result.exit_code != 0 and "option plot must name a new file" in result.output
    result = runner.invoke(app, [*common, "--stats", "forget", "--out", str(tmp_path / "d.safetensors")])
    assert result.exit_code != 0 and "--stats expects KEY=PATH" in result.output
    result = runner.invoke(app, [*common, "--stats", f"forget={tmp_path / 'a.st'}", "--out", str(tmp_path / "e.st")])
    assert result.exit_code == 1 and "a.st is not a TraceStats file" in result.output  # a delta, not statistics
    assert not (tmp_path / "e.st").exists()


# ---- options and report ------------------------------------------------------------------------------
def test_options_and_selection_table():
    manu = get("manu")
    config = manu.configure({"alpha": "5", "preset": "reference", "weights": "freq=1", "positions": "last"})
    assert config.scoring == {"preset": "reference", "weights": {"abs": 2.0, "freq": 1.0, "var": 2.0, "rms": 2.0},
                              "group": "last", "rates": True}
    for bad, message in [({"alpha": 0}, "alpha must be a percentage"), ({"soft": 1.0}, "soft must be 0"),
                         ({"weights": "abs=-1"}, "abs must be a finite number"), ({"weights": "size=1"}, "terms abs"),
                         ({"weights": "abs=0,freq=0,var=0,rms=0"}, "at least one weight"),
                         ({"parts": "audio"}, "parts must be"), ({"positions": "image"}, "expected one of all, last")]:
        with pytest.raises(MmeditError, match=message):
            manu.configure(bad)
    assert [scoring.budget(a, 256) for a in (2, 5, 10, 0.1, 100)] == [5, 13, 26, 1, 256]
    entry = scoring.SiteScore("llm.0", "llm", 0, torch.tensor([3.0, 1.0, 3.0, 0.5]), ("multimodal", "text"))
    other = dataclasses.replace(entry, site="llm.1", layer=1, score=torch.tensor([3.0, 9.0]))
    selection = scoring.select({"llm.0": entry, "llm.1": other}, 67)  # 4 of 6: 9 and the three 3.0s
    assert {k: v.tolist() for k, v in selection.chosen.items()} == {"llm.0": [0, 2], "llm.1": [0, 1]}
    assert selection.skipped == {} and selection.ties == {}
    summary = report.summary({"llm.0": entry, "llm.1": other}, selection)
    assert summary["selected"]["llm"]["neurons"] == 4 and summary["selected"]["llm"]["threshold"] == 3.0
    assert [layer["selected"] for layer in summary["selected"]["llm"]["layers"]] == [2, 2]
    assert math.isclose(summary["selected"]["llm"]["layers"][1]["max_score"], 9.0)
    assert report.table(summary).row_count == 3 and report.table(summary).caption is None


def rendered(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_a_pool_of_equal_scores_is_skipped_never_cut_by_index():
    flat = scoring.SiteScore("vision.0", "vision", 0, torch.zeros(6), ("multimodal",))
    varied = scoring.SiteScore("llm.0", "llm", 0, torch.tensor([0.5, 2.0, 1.0, 0.1]), ("text",))
    constant_layer = scoring.SiteScore("llm.1", "llm", 1, torch.full((4,), 7.0), ("text",))
    scores = {"vision.0": flat, "llm.0": varied, "llm.1": constant_layer}
    # Per part: vision has only zeros -> skipped; the LLM pool (one constant layer among others) is ranked.
    selection = scoring.select(scores, 50)
    assert {k: v.tolist() for k, v in selection.chosen.items()} == {"llm.1": [0, 1, 2, 3]}
    assert selection.skipped == {"vision": "all 6 scores equal 0"} and selection.ties == {}
    summary = report.summary(scores, selection)
    assert summary["selected"]["vision"]["skipped"] == "all 6 scores equal 0"
    assert summary["selected"]["vision"]["neurons"] == 0 and summary["selected"]["llm"]["skipped"] is None
    text = rendered(report.table(summary))
    assert "skipped, nothing selected: vision (all 6 scores equal 0)" in text
    # Per layer: the constant LLM layer is skipped too, the varied one ranked on its own.
    by_layer = scoring.select(scores, 25, "layer")
    assert {k: v.tolist() for k, v in by_layer.chosen.items()} == {"llm.0": [1]}
    assert by_layer.skipped == {"vision.0": "all 6 scores equal 0", "llm.1": "all 4 scores equal 7"}
    layers = report.summary(scores, by_layer)["selected"]["llm"]["layers"]
    assert [layer["skipped"] for layer in layers] == [None, "all 4 scores equal 7"]
    assert "llm.1 (all 4 scores equal 7)" in rendered(report.table(report.summary(scores, by_layer)))
    # A tie across the cut is never broken by index: at 25 % (2 of 8) the four 7s tie across the cut and
    # nothing scores above them, so the LLM pool is skipped; with a 9 above them only the 9 is chosen.
    with pytest.raises(MmeditError, match="llm: 4 neurons tie at 7 across the cut of 2, none above"):
        scoring.select(scores, 25)
    above = scoring.SiteScore("llm.2", "llm", 2, torch.tensor([9.0, 0.0, 0.0, 0.0]), ("text",))
    partial = scoring.select({"llm.0": varied, "llm.1": constant_layer, "llm.2": above}, 25)
    assert {k: v.tolist() for k, v in partial.chosen.items()} == {"llm.2": [0]}
    assert partial.ties == {"llm": "4 neurons tie at 7 across the cut of 3, left out"}
    shown = rendered(report.table(report.summary({"llm.0": varied, "llm.1": constant_layer, "llm.2": above}, partial)))
    assert "not cut by index: llm: 4 neurons tie at 7 across the cut of 3, left out" in " ".join(shown.split())
    # Nothing can be selected anywhere: one error naming every pool.
    with pytest.raises(MmeditError, match="nothing to select.*vision: all 6 scores equal 0; llm: all 4 scores equal 7"):
        scoring.select({"vision.0": flat, "llm.1": constant_layer}, 25)


def constant(stats: TraceStats, part: str) -> TraceStats:
    """The same statistics with every neuron of `part`, in every layer, given the part's average value of
    each field (form/group/field): no neuron of the part stands out."""
    def mine(key):
        return key.split("/")[0].split(".")[0] == part and not key.endswith("/n")

    fields = {}
    for key, value in stats.tensors.items():
        if mine(key):
            fields.setdefault(key.split("/", 1)[1], []).append(value)
    average = {field: float(torch.cat(values).mean()) for field, values in fields.items()}
    return TraceStats({key: torch.full_like(value, average[key.split("/", 1)[1]]) if mine(key) else value
                       for key, value in stats.tensors.items()}, stats.meta)


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_parts_with_constant_statistics_are_skipped_and_reported(planted, data, preset):
    model, processor = planted
    mapping = model_map(model)
    stats = traced(model, processor, data)
    planted_stats = {role: constant(value, "vision") for role, value in stats.items()}
    delta = apply_plugin("manu", model, processor, data["forget"], data["retain"], {"preset": preset},
                         stats=planted_stats, progress=False)
    chosen = selected(delta, mapping)
    assert {name.split(".")[0] for name in chosen} == {"projector", "llm"}
    summary = delta.header()["report"]
    assert summary["selected"]["vision"]["skipped"].startswith("all 128 scores equal ")
    assert summary["selected"]["vision"]["neurons"] == 0 and summary["selected"]["llm"]["skipped"] is None
    assert "vision (all 128 scores equal" in rendered(get("manu").report_table(summary))
    # No part has a neuron that stands out: one clear error, no edit.
    nothing = {role: constant(constant(constant(value, "vision"), "projector"), "llm") for role, value in stats.items()}
    with pytest.raises(MmeditError, match="manu: nothing to select, the scores of every part are all equal"):
        apply_plugin("manu", model, processor, data["forget"], data["retain"], {"preset": preset}, stats=nothing,
                     progress=False)


def test_dead_sites_are_not_candidates():
    sites = [SimpleNamespace(name=name, part=name.split(".")[0]) for name in ("vision.0", "vision.1", "llm.0")]
    mapping = SimpleNamespace(sites=sites, expected_dead=("vision.1",))
    assert [site.name for site in candidate_sites(mapping, ("vision", "llm"))] == ["vision.0", "llm.0"]
    assert [site.name for site in candidate_sites(mapping, ("llm",))] == ["llm.0"]
