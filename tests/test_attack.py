"""`mmedit attack` (mmedit.eval.attacks): the formulas on hand-computed values, then the attacks on the
shipped embedded model with a real edit (GA with its embedded preset): relearning the forget people's other
facts brings forgotten answers back (more than relearning retain rows), int4 moves the weights more than
int8, the hidden-state probe reads the trained people's attributes from the base model and loses the image
form's (what GA forgot) but not the text form's, and falls to chance under an edit that scrambles the LLM,
the membership attack tells trained people from never-seen ones, the model comes back bit for bit, and the
CLI (in process and as a subprocess) writes its report or refuses bad input in one line."""
import json
import math
import subprocess
import sys
from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

from mmedit.bench import profiles
from mmedit.bench.model import embedded
from mmedit.cli.main import app
from mmedit.data.batches import IGNORE
from mmedit.errors import MmeditError
from mmedit.eval import attack_metrics as am
from mmedit.eval import attacks, probe
from mmedit.eval.attack_settings import Settings, parse_attacks
from mmedit.eval.harness import Record
from mmedit.loading import load

runner = CliRunner()
SMALL = torch.tensor([[0.7, -1.4, 0.1, 0.35, 2.0, -0.5, 0.25, 1.0]])


# ---- formulas ----------------------------------------------------------------------------------------

def test_recovery_is_the_share_of_the_removed_gap_that_comes_back():
    assert am.recovery(1.0, 0.4, 0.7) == pytest.approx(0.5)
    assert am.recovery(1.0, 0.4, 1.0) == pytest.approx(1.0)
    assert am.recovery(1.0, 0.4, 0.4) == 0.0
    assert am.recovery(1.0, 0.4, 0.1) == pytest.approx(-0.5)  # forgotten further
    assert am.recovery(0.8, 0.8, 0.9) is None  # the edit changed nothing
    assert am.recovery(0.99, 0.98, 0.5, min_gap=0.05) is None and am.recovery(1.0, 0.9, 0.95, min_gap=0.05) == \
        pytest.approx(0.5)


def test_rtn_matches_hand_computed_group_wise_values():
    # group 1: s = 1.4 / 7.5, w/s = 3.75, -7.5, 0.54, 1.875 -> 4, -8 (half to even), 1, 2
    # group 2: s = 2 / 7.5, w/s = 7.5 -> 8 clamped to 7, -1.875 -> -2, 0.94 -> 1, 3.75 -> 4
    s1, s2 = 1.4 / 7.5, 2.0 / 7.5
    expected = torch.tensor([[4 * s1, -8 * s1, 1 * s1, 2 * s1, 7 * s2, -2 * s2, 1 * s2, 4 * s2]])
    assert torch.allclose(am.rtn(SMALL, 4, 4), expected, atol=1e-6)
    t1, t2 = 1.4 / 127.5, 2.0 / 127.5  # int8: 64, -128, 9, 32 | 127 (clamped), -32, 16, 64
    expected8 = torch.tensor([[64 * t1, -128 * t1, 9 * t1, 32 * t1, 127 * t2, -32 * t2, 16 * t2, 64 * t2]])
    assert torch.allclose(am.rtn(SMALL, 8, 4), expected8, atol=1e-6)
    assert torch.equal(am.rtn(torch.zeros(2, 4), 4, 2), torch.zeros(2, 4))  # an all-zero group stays zero
    with pytest.raises(MmeditError, match="does not divide"):
        am.rtn(SMALL, 4, 3)


def test_rtn_error_is_within_half_a_step_and_int4_is_coarser_than_int8():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for bits in (8, 4):
        step = weight.reshape(16, 2, 32).abs().amax(-1, keepdim=True) / ((2 ** bits - 1) / 2)
        error = (weight - am.rtn(weight, bits, 32)).abs().reshape(16, 2, 32)
        assert (error <= step / 2 + 1e-6).all()
        assert len(torch.unique(am.rtn(weight, bits, 32).reshape(16, 2, 32)[0, 0])) <= 2 ** bits
    assert (weight - am.rtn(weight, 4, 32)).norm() > 4 * (weight - am.rtn(weight, 8, 32)).norm()


def test_rtn_is_torchaos_symmetric_group_wise_mapping():
    """The cross-check behind "this is torchao's IntxWeightOnlyConfig mapping" (torchao is not a dependency)."""
    quantization = pytest.importorskip("torchao.quantization")
    from torchao.quantization.granularity import PerGroup

    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    for bits in (8, 4):
        layer = torch.nn.Linear(64, 8, bias=False)
        layer.weight.data = weight.clone()
        quantization.quantize_(layer, quantization.IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(32)))
        theirs, ours = layer.weight.dequantize(), am.rtn(weight, bits, 32)
        step = weight.reshape(8, 2, 32).abs().amax(-1, keepdim=True) / ((2 ** bits - 1) / 2)
        ratio = (weight.reshape(8, 2, 32) / step).reshape(8, 64)
        tie = ((ratio.abs() % 1) - 0.5).abs() < 1e-4  # x.5 exactly: float rounding of w / s may fall either way
        assert torch.allclose(theirs[~tie], ours[~tie], atol=1e-6)
        assert ((theirs - ours).abs()[tie] <= step.expand(8, 2, 32).reshape(8, 64)[tie] + 1e-6).all()


def test_min_k_is_the_mean_of_the_lowest_k_percent():
    values = [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert am.min_k_mean(values, 0.2) == -5.0
    assert am.min_k_mean(values, 0.4) == -4.5
    assert am.min_k_mean(values, 0.5) == -4.0  # ceil(2.5) = 3 tokens
    assert am.min_k_mean(values, 1.0) == -3.0
    with pytest.raises(MmeditError):
        am.min_k_mean(values, 0.0)


def test_auc_counts_pairs_with_ties_as_half():
    assert am.auc([3, 4], [1, 2]) == 1.0
    assert am.auc([1, 2], [3, 4]) == 0.0
    assert am.auc([1, 3], [2]) == 0.5
    assert am.auc([2, 2], [1, 2]) == 0.75
    assert am.auc([], [1]) is None


def test_answer_logprobs_are_the_labelled_tokens_log_probabilities():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[IGNORE, IGNORE, 0, 1]])  # token 2 predicted at position 1, token 3 at position 2
    expected = [math.log(math.e ** 2 / (math.e ** 2 + 2)), math.log(math.e / (math.e + 2))]
    assert attacks.answer_logprobs(logits, labels)[0] == pytest.approx(expected)


@pytest.fixture(scope="module")
def shipped():
    paths = embedded(progress=False)
    return paths, profiles.load(paths.data)


def test_split_facts_halves_each_persons_facts_and_keeps_a_facts_questions_together(shipped):
    _, info = shipped
    rows = info.rows("forget10")
    fit, scored = am.split_facts(rows, seed=0)
    assert sorted(r.id for r in fit + scored) == sorted(r.id for r in rows)
    fit_facts, scored_facts = {am.fact_key(r) for r in fit}, {am.fact_key(r) for r in scored}
    assert not fit_facts & scored_facts
    assert Counter(entity for entity, _ in fit_facts) == Counter(entity for entity, _ in scored_facts) == \
        Counter({person.name: 5 for person in info.people_in("forget10")})
    assert fit == am.split_facts(rows, seed=0)[0] and fit != am.split_facts(rows, seed=1)[0]
    one_fact = [r for r in rows if r.answer == rows[0].answer and r.entity == rows[0].entity]
    with pytest.raises(MmeditError, match="two facts"):
        am.split_facts(one_fact, seed=0)


def _records(values):
    """Records of one question (split forget, row q1..) per (row, form, right) triple."""
    return [Record("forget", form, "choice_acc", row, entity, float(right), "")
            for row, entity, form, right in values]


def test_leakage_counts_questions_forgotten_in_one_form_and_answered_in_the_other():
    image, text = "Image_Textual", "Pure_Text"
    base = _records([(q, "A", form, True) for q in ("q1", "q2", "q3") for form in (image, text)]
                    + [("q4", "A", image, True), ("q4", "A", text, False)])
    edited = _records([("q1", "A", image, False), ("q1", "A", text, True),  # forgotten in image, leaks via text
                       ("q2", "A", image, False), ("q2", "A", text, False),  # forgotten in both
                       ("q3", "A", image, True), ("q3", "A", text, False),  # forgotten in text, known in image
                       ("q4", "A", image, False), ("q4", "A", text, False)])  # the base missed q4's text form
    found = am.leakage(base, edited)["choice_acc"]
    assert (found[f"{image}->{text}"]["forgotten"], found[f"{image}->{text}"]["leaked"]) == (2, 1)
    assert found[f"{image}->{text}"]["rate"] == 0.5 and found[f"{image}->{text}"]["people"] == \
        {"A": {"forgotten": 2, "leaked": 1}}
    assert (found[f"{text}->{image}"]["forgotten"], found[f"{text}->{image}"]["leaked"]) == (2, 1)


def test_kept_is_the_share_of_the_probes_accuracy_above_chance_that_survives():
    assert am.kept(0.9, 0.5, 0.1) == pytest.approx(0.5)
    assert am.kept(0.9, 0.9, 0.1) == pytest.approx(1.0) and am.kept(0.9, 0.1, 0.1) == 0.0
    assert am.kept(0.9, 0.05, 0.1) == pytest.approx(-0.0625)  # below chance
    assert am.kept(0.12, 0.5, 0.1, min_gap=0.05) is None and am.kept(0.9, None, 0.1) is None


def _row(entity, question, answer, **extra):
    from mmedit.data.rows import Row

    return Row(id=f"{entity}-{question}-{answer}", entity=entity, image=None, question=question,
               text_question=f"{question} ({entity})", answer=answer, **extra)


def test_probe_labels_prompts_and_chance():
    choice = _row("A", "Job?", "x", options=("Pilot!", "Baker"), correct=0)
    assert probe.label(choice) == "pilot" and probe.label(_row("A", "Job?", "The Baker.")) == "the baker"
    # a multiple-choice row and the short-answer row asking the same words are one prompt
    assert probe.prompts([choice, _row("A", "Job?", "Pilot"), _row("A", "Pet?", "cat")]) == \
        [choice, _row("A", "Pet?", "cat")]
    train = [_row(n, "Job?", job) for n, job in (("A", "pilot"), ("B", "pilot"), ("C", "baker"))] + \
            [_row(n, "Pet?", pet) for n, pet in (("A", "cat"), ("B", "dog"), ("C", "dog"), ("D", "dog"))]
    # per question: "Job?" -> pilot, "Pet?" -> dog (overall the most frequent label is dog)
    scored = [_row("E", "Job?", "pilot"), _row("E", "Pet?", "cat"), _row("F", "Job?", "baker"),
              _row("F", "Pet?", "dog"), _row("F", "Age?", "dog")]
    assert probe.chance(train, scored) == pytest.approx(3 / 5)  # pilot, dog, and dog for the unseen question
    assert probe.chance(train, []) is None
    # what a probe can learn: labels two or more training people share (baker and cat: one person each)
    assert probe.attribute_labels(train + [_row("C", "Job?", "Baker!")]) == {"pilot", "dog"}


def test_probe_fit_separates_what_is_linearly_separable_and_generalises():
    generator = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(3, 8, generator=generator)
    targets = torch.arange(3).repeat(40)
    features = centres[targets] + torch.randn(120, 8, generator=generator)
    fitted = probe.fit(features[:90], targets[:90], 3)
    assert (fitted.predict(features[90:]) == targets[90:]).all()
    assert torch.equal(fitted.weight, probe.fit(features[:90], targets[:90], 3).weight)  # deterministic
    shuffled = probe.fit(features[:90], targets[:90][torch.randperm(90, generator=generator)], 3)
    assert (shuffled.predict(features[90:]) == targets[90:]).double().mean() < 0.7  # nothing real to learn


def test_settings_and_attack_names_are_checked():
    assert parse_attacks("mia, relearn, probe") == ("relearn", "probe", "mia")
    for text, message in (("relearn,jailbreak", "unknown attack 'jailbreak'"), (",", "no attack named")):
        with pytest.raises(MmeditError, match=message):
            parse_attacks(text)
    for options, message in (({"bits": (9,)}, "between 2 and 8"), ({"min_k": 1.5}, "Min-K"),
                             ({"lora_parts": ("llm", "eyes")}, "unknown LoRA part 'eyes'"), ({"steps": 0}, "steps")):
        with pytest.raises(MmeditError, match=message):
            Settings(**options)


# ---- on the embedded model with a real edit -------------------------------------------------------------

@pytest.fixture(scope="module")
def edited(shipped, tmp_path_factory):
    """The shipped embedded model, its benchmark, GA's embedded-preset delta (saved) and never-seen people."""
    from mmedit.plugins import apply_plugin, get

    paths, info = shipped
    model, processor = load(paths.model, device="cpu")
    sets = {"forget": info.rows("forget10"), "retain": info.rows("retain90")}
    delta = apply_plugin("ga", model, processor, sets["forget"], sets["retain"], dict(get("ga").presets["embedded"]),
                         progress=False)
    folder = tmp_path_factory.mktemp("attack")
    delta.save(folder / "ga.safetensors")
    strangers = profiles.generate(folder / "strangers", n_people=10, seed=1)
    return model, processor, sets, delta, folder, strangers


@pytest.fixture(scope="module")
def result(edited):
    model, processor, sets, delta, _, strangers = edited
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    found = attacks.run(model, processor, sets, [delta], ("relearn", "quantize", "probe", "mia", "leakage"), Settings(),
                        control=strangers.rows("retain90"), progress=False)
    return found, before


def test_the_model_is_bit_identical_after_every_attack(edited, result):
    model = edited[0]
    _, before = result
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name].view(torch.int32), before[name].view(torch.int32)) for name in before)


def test_relearn_trains_on_one_half_of_the_facts_and_scores_only_the_other(edited, monkeypatch):
    """What the attacker fits on is never scored: no fact (person, answer) of the training rows is among
    the scored rows, the two halves cover the forget set, and benign relearning uses other people."""
    from mmedit.eval.attack_metrics import fact_key

    model, processor, sets, delta, _, _ = edited
    trained, scored = [], []

    def fake_relearn(model, processor, rows, settings, progress=True, description="", log_as=""):
        trained.append(list(rows))
        return [0.0]

    def spy(self, model, rows_forget, description):
        scored.append(list(rows_forget))
        return self.reference(rows_forget)["edited"]

    monkeypatch.setattr(attacks, "relearn", fake_relearn)
    monkeypatch.setattr(attacks._Context, "evaluate", spy)
    attacks.run(model, processor, sets, [delta], ("relearn",), Settings(), progress=False)
    forget_part, retain_only = trained[0], trained[2]  # (base, edited) per variant
    assert trained[1] == forget_part and trained[3] == retain_only
    fitted = {fact_key(row) for row in forget_part}
    assert scored and all(not fitted & {fact_key(row) for row in rows} for rows in scored)
    assert all(rows == scored[0] for rows in scored)
    assert {row.id for row in forget_part} | {row.id for row in scored[0]} == {row.id for row in sets["forget"]}
    forget_people = {row.entity for row in sets["forget"]}
    assert not {row.entity for row in retain_only} & forget_people and len(retain_only) == len(forget_part)


def test_quantize_leaves_the_output_head_alone(edited):
    import copy

    model = copy.deepcopy(edited[0])
    head = model.get_output_embeddings().weight.detach().clone()
    others = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("q_proj.weight")}
    done = attacks.quantize(model, 4, 32)
    assert torch.equal(model.get_output_embeddings().weight, head) and done["layers"] > 0
    assert all(not torch.equal(dict(model.named_parameters())[name], value) for name, value in others.items())


def test_relearning_the_other_facts_brings_forgotten_answers_back(result):
    found, _ = result
    relearn = found["attacks"]["relearn"]
    reference = relearn["reference"]
    assert reference["edited"]["forget"]["Image_Textual"]["choice_acc"] < reference["base"]["forget"]["Image_Textual"]["choice_acc"]
    forget_part = relearn["variants"]["forget-part"]["recovery"]["Image_Textual"]
    retain_only = relearn["variants"]["retain-only"]["recovery"]["Image_Textual"]
    assert forget_part["choice_acc"] > 0.3 and forget_part["answer_prob"] > 0
    # relearning the forgotten people's own (other) facts brings back more than unrelated retain rows
    assert forget_part["choice_acc"] > retain_only["choice_acc"]
    assert relearn["fit_rows"] == relearn["scored_rows"] == 75
    losses = relearn["variants"]["forget-part"]["train_loss"]["edited"]
    assert losses["last"] < losses["first"]
    # the text form was not forgotten by GA at this preset: nothing to recover there
    assert relearn["variants"]["forget-part"]["recovery"]["Pure_Text"]["choice_acc"] is None


def test_int4_moves_the_weights_more_than_int8(result):
    found, _ = result
    variants = found["attacks"]["quantize"]["variants"]
    int8, int4 = variants["int8"]["weights"]["edited"], variants["int4"]["weights"]["edited"]
    assert 0 < int8["relative_change"] < int4["relative_change"] and int8["layers"] == int4["layers"] > 0
    assert variants["int8"]["attacked"]["base"]["retain"]["Image_Textual"]["choice_acc"] > 0.9  # still the model


def test_probe_hidden_states_are_the_last_prompt_token_of_each_row_whatever_the_padding(edited):
    model, processor, sets, _, _, _ = edited
    rows = probe.prompts(sets["forget"])[:6]
    lengths = {len(processor.tokenizer(row.text_question)["input_ids"]) for row in rows}
    assert len(lengths) > 1  # the batch is padded
    states = probe.collect(model, processor, {"forget": rows}, batch_size=6, progress=False)
    assert states["Image_Textual"]["forget"].shape[:2] == states["Pure_Text"]["forget"].shape[:2] == (3, 6)
    for index, row in enumerate(rows):
        alone = probe.collect(model, processor, {"forget": [row]}, batch_size=1, progress=False)
        for form in ("Image_Textual", "Pure_Text"):
            assert torch.allclose(states[form]["forget"][:, index], alone[form]["forget"][:, 0], atol=1e-4)


def test_probe_reads_the_trained_attributes_from_the_base_and_loses_what_ga_forgot(result):
    found, _ = result
    attack = found["attacks"]["probe"]
    people = {group: set(names) for group, names in attack["people"].items()}
    assert not people["train"] & people["forget"] and not people["train"] & people["retain"]
    assert len(people["train"]) == 40 and len(people["retain"]) == 5 and len(people["forget"]) == 5
    for form, values in attack["forms"].items():
        best = values["layers"][values["best_layer"]]
        assert values["best_layer"] == max(range(len(values["layers"])),
                                           key=lambda layer: values["layers"][layer]["base"]["retain"])
        # measured: base forget 98 % (image) / 100 % (text), control 100 %, chance 10 % / 8 %
        assert best["base"]["forget"] > 0.9 and best["base"]["retain"] > 0.9 and best["train"] == 1.0
        assert values["chance"]["forget"] < 0.2 and values["chance"]["retain"] < 0.2
        assert values["layers"][0]["base"]["forget"] <= values["chance"]["forget"] + 0.05  # embeddings: chance
        assert values["rows"] == {"train": 800, "forget": 100, "retain": 100}
        assert best["edited"]["retain"] > 0.9  # the control people are still read
        assert values["kept"] == best["kept"] and values["layers"][0]["kept"]["forget"] is None  # 0: at chance
    # GA forgot the image form only (forget VQA 66 %, QA 100 %): measured kept 0.44 (image) and 1.00 (text)
    assert attack["forms"]["Image_Textual"]["kept"]["forget"] < 0.7
    assert attack["forms"]["Pure_Text"]["kept"]["forget"] > 0.9


def _scrambled(model):
    """A delta whose edited model has every LLM weight's entries shuffled: nothing of the people is left."""
    import copy

    from mmedit.arch import model_map
    from mmedit.delta import Delta

    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    names = set(model_map(other).parameters("llm"))
    with torch.no_grad():
        for name, parameter in other.named_parameters():
            if name in names and parameter.dim() == 2 and parameter is not other.get_output_embeddings().weight:
                flat = parameter.flatten()
                parameter.copy_(flat[torch.randperm(flat.numel(), generator=generator)].reshape(parameter.shape))
    return Delta.from_models(model, other)


def test_probe_falls_to_chance_when_the_edit_scrambles_the_llm(edited):
    model, processor, sets, _, _, _ = edited
    found = attacks.run(model, processor, sets, [_scrambled(model)], ("probe",), Settings(), progress=False)
    for form, values in found["attacks"]["probe"]["forms"].items():
        best = values["layers"][values["best_layer"]]
        assert best["base"]["forget"] > 0.9  # fitted on the base model: still reads it
        for group in ("forget", "retain"):
            assert best["edited"][group] <= values["chance"][group] + 0.1, (form, group, best)
        assert values["kept"]["forget"] < 0.15


def test_membership_tells_trained_people_from_never_seen_ones(result):
    found, _ = result
    mia = found["attacks"]["mia"]
    base = mia["models"]["base"]["auc"]["Image_Textual"]
    assert base["forget"]["loss"] > 0.9 and base["retain"]["min_k"] > 0.9
    edited = mia["models"]["edited"]["auc"]["Image_Textual"]
    assert edited["forget"]["min_k"] <= base["forget"]["min_k"]
    # never-seen people's names are unknown tokens to the embedded tokenizer: their text rows are left out
    assert mia["models"]["base"]["rows_with_unknown_tokens"]["Pure_Text"]["control"] > 0
    assert mia["models"]["base"]["auc"]["Pure_Text"]["forget"]["loss"] is None


def test_leakage_finds_the_image_forgotten_answers_the_text_form_still_gives(result):
    found, _ = result
    directions = found["attacks"]["leakage"]["directions"]["choice_acc"]
    image_to_text = directions["Image_Textual->Pure_Text"]
    assert image_to_text["forgotten"] > 0 and image_to_text["leaked"] == image_to_text["forgotten"]


# ---- the command -------------------------------------------------------------------------------------

def _arguments(shipped, edited, out, *extra):
    paths, _ = shipped
    folder = edited[4]
    return ["attack", str(paths.model), "--delta", str(folder / "ga.safetensors"), "--data", str(paths.data),
            "--out", str(out), *extra]


def test_cli_writes_the_report_with_provenance_tables_and_plot(shipped, edited, tmp_path):
    strangers = edited[5]
    out, plot = tmp_path / "attack.json", tmp_path / "attack.png"
    shown = runner.invoke(app, _arguments(shipped, edited, out, "--attacks", "quantize,probe,mia,leakage", "--mia-control",
                                          str(strangers.jsonl("retain90")), "--plot", str(plot), "--bits", "4"),
                          terminal_width=200)
    assert shown.exit_code == 0, shown.output
    record = json.loads(out.read_text())
    assert record["format"] == "mmedit.attack-report" and record["attacks_run"] == ["quantize", "probe", "mia", "leakage"]
    assert list(record["attacks"]) == ["quantize", "probe", "mia", "leakage"] and list(record["attacks"]["quantize"]["variants"]) == ["int4"]
    assert len(record["data"]["sets"]["forget"]["sha256"]) == 64 and record["data"]["mia_control"]["people"] == 9
    assert record["deltas"][0]["provenance"]["plugin"]["name"] == "ga" and record["settings"]["seed"] == 0
    assert record["versions"]["torch"] and plot.read_bytes()[:4] == b"\x89PNG"
    probed = record["attacks"]["probe"]
    assert set(probed["forms"]) == {"Image_Textual", "Pure_Text"} and record["settings"]["probe_steps"] == 50
    assert probed["forms"]["Pure_Text"]["layers"][2]["base"]["forget"] > 0.9 and "fitted on the base" in probed["method"]
    for title in ("what comes back", "hidden-state probe", "membership inference", "leakage across forms"):
        assert title in shown.output


@pytest.mark.parametrize("extra, message", [
    (["--attacks", "relearn,jailbreak"],
     "error: unknown attack 'jailbreak'; attacks are relearn, quantize, probe, mia, leakage"),
    (["--attacks", "mia"], "error: mia needs people the model never saw (--mia-control FILE)"),
    (["--attacks", "leakage", "--mia-control", "x.jsonl"], "error: --mia-control is for the mia attack"),
    (["--bits", "4,9"], "error: quantisation bit widths must be between 2 and 8, got [4, 9]"),
    (["--attacks", "quantize", "--group-size", "7777"],  # no layer of the embedded model has 7777 inputs
     "error: quantize: no linear layer has a multiple of 7777 inputs; pick another --group-size"),
])
def test_cli_bad_input_is_one_line_before_the_model_loads(shipped, edited, tmp_path, monkeypatch, extra, message):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("mmedit.cli.attack.load_model", never)
    out = tmp_path / "attack.json"
    shown = runner.invoke(app, _arguments(shipped, edited, out, *extra))
    assert shown.exit_code == 1 and shown.output.strip().startswith(message), shown.output
    assert len(shown.output.strip().splitlines()) == 1 and not out.exists()


def test_cli_relearn_without_peft_is_one_line_before_the_model_loads(shipped, edited, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    monkeypatch.setattr("mmedit.cli.attack.load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    out = tmp_path / "attack.json"
    shown = runner.invoke(app, _arguments(shipped, edited, out, "--attacks", "relearn"))
    assert shown.exit_code == 1 and shown.output.strip().startswith("error: relearn with LoRA needs peft: pip install peft")
    assert not out.exists()


def test_cli_refuses_a_data_folder_without_what_relearn_needs(shipped, edited, tmp_path):
    paths, info = shipped
    data = tmp_path / "data"
    data.mkdir()
    rows = info.rows("forget10")
    from mmedit.data.rows import write_jsonl

    write_jsonl([row for row in rows if row.answer == rows[0].answer], data / "forget10.jsonl")  # one fact
    write_jsonl(info.rows("retain90")[:30], data / "retain90.jsonl")
    out = tmp_path / "attack.json"
    arguments = _arguments(shipped, edited, out, "--attacks", "relearn")
    arguments[arguments.index("--data") + 1] = str(data)
    shown = runner.invoke(app, arguments)
    assert shown.exit_code == 1 and "error: relearn needs at least two facts" in shown.output and not out.exists()
    (data / "forget10.jsonl").unlink()
    shown = runner.invoke(app, arguments)
    assert shown.exit_code == 1 and "no forget set" in shown.output and not out.exists()


def test_cli_refuses_a_probe_on_data_without_shared_attribute_labels(shipped, edited, tmp_path, monkeypatch):
    """Answers no training person shares (free-text answers, as MLLMU-Bench's generation rows): one line."""
    import dataclasses

    from mmedit.data.rows import write_jsonl

    paths, info = shipped
    monkeypatch.setattr("mmedit.cli.attack.load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl([dataclasses.replace(row, answer=f"{row.answer} as {row.entity} said", options=None, correct=None)
                 for row in info.rows("forget10")], data / "forget10.jsonl")
    write_jsonl(info.rows("retain90"), data / "retain90.jsonl")
    out = tmp_path / "attack.json"
    arguments = _arguments(shipped, edited, out, "--attacks", "probe")
    arguments[arguments.index("--data") + 1] = str(data)
    shown = runner.invoke(app, arguments)
    lines = shown.output.strip().splitlines()
    assert shown.exit_code == 1 and len(lines) == 1 and not out.exists()
    assert lines[0].startswith("error: probe: no forget row's answer is an answer of any training (retain) person")
    shown = runner.invoke(app, [*arguments, "--retain-people", "45"])  # every retain person is the control
    assert shown.exit_code == 1 and shown.output.strip().startswith("error: probe needs retain people besides")


def test_cli_refuses_a_delta_for_another_base_model(shipped, edited, tmp_path):
    from mmedit import zoo

    other = zoo.tiny("llava", root=tmp_path / "zoo")
    out = tmp_path / "attack.json"
    arguments = _arguments(shipped, edited, out, "--attacks", "leakage")
    arguments[1] = str(other)
    shown = runner.invoke(app, arguments)
    lines = shown.output.strip().splitlines()
    assert shown.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "ga.safetensors" in lines[0]
    assert not out.exists()


def test_cli_runs_as_a_subprocess(shipped, edited, tmp_path):
    out = tmp_path / "attack.json"
    done = subprocess.run([sys.executable, "-m", "mmedit.cli.main", *_arguments(shipped, edited, out, "--attacks", "leakage")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "leakage across forms" in done.stdout and json.loads(out.read_text())["attacks"]["leakage"]["directions"]
