"""The hidden-state probe (UnLOK-VQA's attack): does the edited model still hold what it no longer says?

A linear probe is trained on the BASE model's hidden states, at the last prompt token of every LLM layer,
to predict a question's answer (a person's attribute: occupation, employer, ...), on people who are
neither the forget people nor the retain control. It is then read on the forget people's hidden states in
the base and in the edited model, and on held-out retain people as control. If it still reads the forget
people's attributes from the edited model, the edit hid them from the output rather than removing them.

    groups = {"train": train_rows, "forget": forget_rows, "retain": control_rows}
    states = {"base": collect(base, processor, groups), "edited": collect(edited, processor, groups_but_train)}
    result = score(states, groups, weight_decay=1e-3, steps=50)   # per form: layers, chance, best layer, kept

- a label is the normalised correct answer (the chosen option of a multiple-choice row, else the answer);
  the probe learns the labels two or more training people share (attribute values); a scored row whose
  label is not among them cannot be predicted by any probe and is left out, and counted;
- one prompt per (person, question wording, label, image): the multiple-choice and short-answer rows ask
  the same words, which would count one hidden state twice;
- chance = predicting, for each scored row, the most frequent training label among the training rows
  asking the same image-form question (the attribute), else the most frequent overall: what a probe that
  reads the question but not the person gets (layer 0, the embedding of the last prompt token, is the same
  for every prompt of a chat template that ends the same way, and gets the overall majority: less);
- the probe: multinomial logistic regression on standardised features (training mean and scale), from
  zero weights, full-batch L-BFGS, L2 weight decay: deterministic, no sampling.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

from mmedit.data.batches import FORMS, make_batches
from mmedit.loading import input_device
from mmedit.data.rows import Row
from mmedit.errors import MmeditError
from mmedit.eval import attack_metrics
from mmedit.eval.harness import REPORT_FORMS
from mmedit.eval.metrics import normalise
from mmedit.progress import track

GROUPS = ("train", "forget", "retain")  # training people, forget people, held-out retain people (control)
SCORED = ("forget", "retain")


def label(row: Row) -> str:
    """What the probe predicts for a row: its correct answer, normalised (the option for multiple choice)."""
    return normalise(row.options[row.correct] if row.options is not None and row.correct is not None else row.answer)


def prompts(rows: Sequence[Row]) -> list[Row]:
    """One row per distinct prompt and label: (person, image-form question, text question, label, image)."""
    seen, out = set(), []
    for row in rows:
        key = (row.entity, row.question, row.text_question, label(row), row.image)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def training_rows(retain: Sequence[Row], control: Sequence[Row]) -> list[Row]:
    """The retain rows of people who are not in the control sample: what the probe is fitted on."""
    held = {row.entity for row in control}
    return [row for row in retain if row.entity not in held]


def attribute_labels(train: Sequence[Row]) -> set[str]:
    """The labels at least two training people have: attributes people share. A label only one person has
    is a fact about that person (MLLMU-Bench's free-text answers), which no other person's hidden state can
    teach a probe; its rows are left out of training."""
    holders: dict[str, set[str]] = defaultdict(set)
    for row in train:
        holders[label(row)].add(row.entity)
    return {name for name, people in holders.items() if len(people) >= 2}


def check(forget: Sequence[Row], train: Sequence[Row]) -> None:
    """Refuse, in one line, data a probe trained on other people cannot be scored on."""
    if not train:
        raise MmeditError("probe needs retain people besides the scored retain sample to train on (lower "
                          "--retain-people, or give a larger retain set)")
    classes = attribute_labels(train)
    if len(classes) < 2:
        raise MmeditError(f"probe: {len(classes)} answer(s) of the training (retain) rows are shared by two or more "
                          "people; a probe needs at least two such labels (categorical attributes)")
    if not any(label(row) in classes for row in forget):
        raise MmeditError("probe: no forget row's answer is an answer of any training (retain) person, so a probe "
                          "trained on other people has no label to read; it needs categorical attributes people "
                          "share (the synthetic benchmark's, or multiple-choice options)")


def collect(model, processor, groups: dict[str, Sequence[Row]], batch_size: int = 64, progress: bool = True,
            description: str = "probe: hidden states") -> dict[str, dict[str, torch.Tensor]]:
    """{report form: {group: float32 CPU tensor [layers + 1, rows, hidden]}}: every hidden state the model
    returns (the embeddings, then each LLM layer's output) at the last prompt token of each of
    prompts(rows), in order. The image form takes the rows with a picture."""
    jobs = [(form, group, [row for row in prompts(rows) if form == "text" or row.image is not None])
            for form in FORMS for group, rows in groups.items()]
    device = input_device(model)
    batches = ((form, group, batch) for form, group, rows in jobs
               for batch in make_batches(rows, processor, form=form, batch_size=batch_size, with_answer=False,
                                         device=device))
    total = sum(-(-len(rows) // batch_size) for _, _, rows in jobs)
    found: dict = defaultdict(lambda: defaultdict(list))
    with torch.no_grad():
        for form, group, batch in track(batches, description, total=total, enabled=progress):
            hidden = model(**batch.inputs, output_hidden_states=True).hidden_states
            last = batch.inputs["attention_mask"].sum(dim=1) - 1  # right padding: the last prompt token
            rows = torch.arange(len(last), device=last.device)
            found[REPORT_FORMS[form]][group].append(torch.stack([layer[rows, last].float().cpu() for layer in hidden]))
    return {form: {group: torch.cat(parts, dim=1) for group, parts in by_group.items()}
            for form, by_group in found.items()}


@dataclass(frozen=True)
class Probe:
    mean: torch.Tensor  # [hidden]: the training features' mean and scale
    scale: torch.Tensor
    weight: torch.Tensor  # [classes, hidden]
    bias: torch.Tensor  # [classes]

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """The most likely class index of each row of features [rows, hidden]."""
        standard = ((features.double() - self.mean) / self.scale)
        return (standard @ self.weight.T + self.bias).argmax(dim=1)


def fit(features: torch.Tensor, targets: torch.Tensor, classes: int, weight_decay: float = 1e-3,
        steps: int = 50) -> Probe:
    """Multinomial logistic regression: mean cross-entropy + weight_decay * ||W||^2 on standardised
    features, from zero, by full-batch L-BFGS (strong Wolfe line search) for at most `steps` iterations."""
    x = features.double()
    mean, scale = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
    x = (x - mean) / scale
    weight = torch.zeros(classes, x.shape[1], dtype=torch.double, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.double, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, targets) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return Probe(mean, scale, weight.detach(), bias.detach())


def chance(train: Sequence[Row], scored: Sequence[Row]) -> float | None:
    """Accuracy of guessing, per scored row, the most frequent training label among training rows with the
    same image-form question (else the most frequent training label): the probe's floor."""
    if not scored:
        return None
    by_question: dict[str, Counter] = defaultdict(Counter)
    for row in train:
        by_question[row.question][label(row)] += 1
    overall = Counter(label(row) for row in train)

    def guess(row: Row) -> str:
        counts = by_question.get(row.question) or overall
        return min(counts, key=lambda name: (-counts[name], name))  # ties: the alphabetically first

    return sum(guess(row) == label(row) for row in scored) / len(scored)


def score(states: dict[str, dict], groups: dict[str, Sequence[Row]], weight_decay: float = 1e-3, steps: int = 50,
          min_gap: float = 0.05, progress: bool = True) -> dict:
    """Per form: a probe per layer fitted on states["base"][form]["train"], its accuracy on the forget and
    control people in the base and the edited model, chance, and the layer chosen by the control people's
    base accuracy (not by the scored forget people). "kept" = (edited - chance) / (base - chance), per layer
    and at that layer: 1 = the probe reads the forget people as well as before, 0 = no better than chance."""
    rows = {group: prompts(found) for group, found in groups.items()}
    out, data = {}, {}
    for form in states["base"]:
        usable = {group: [row for row in rows[group] if form == REPORT_FORMS["text"] or row.image is not None]
                  for group in GROUPS}
        index = {name: i for i, name in enumerate(sorted(attribute_labels(usable["train"])))}
        known = {group: torch.tensor([label(row) in index for row in usable[group]], dtype=torch.bool)
                 for group in GROUPS}
        seen = {group: [row for row in usable[group] if label(row) in index] for group in GROUPS}
        data[form] = {"known": known, "truth": {group: torch.tensor([index[label(row)] for row in seen[group]],
                                                                    dtype=torch.long) for group in GROUPS},
                      "classes": len(index)}
        out[form] = {"rows": {group: len(usable[group]) for group in GROUPS}, "classes": len(index),
                     "train_rows_fitted": len(seen["train"]),
                     "unseen_label_rows": {group: len(usable[group]) - len(seen[group]) for group in SCORED},
                     "chance": {group: chance(seen["train"], seen[group]) for group in SCORED}, "layers": []}
    jobs = [(form, layer) for form, by_group in states["base"].items() for layer in range(by_group["train"].shape[0])]
    for form, layer in track(jobs, "probe: fitting", enabled=progress):
        known, truth = data[form]["known"], data[form]["truth"]
        features = states["base"][form]["train"][layer][known["train"]]
        probe = fit(features, truth["train"], data[form]["classes"], weight_decay, steps)
        entry = {"layer": layer, "name": "embeddings" if layer == 0 else f"layer {layer}",
                 "train": _accuracy(probe.predict(features), truth["train"])}
        for model in ("base", "edited"):
            entry[model] = {group: _accuracy(probe.predict(states[model][form][group][layer][known[group]]),
                                             truth[group]) for group in SCORED}
        entry["kept"] = {group: attack_metrics.kept(entry["base"][group], entry["edited"][group],
                                                    out[form]["chance"][group], min_gap) for group in SCORED}
        out[form]["layers"].append(entry)
    for values in out.values():
        layers = values["layers"]
        best = max(layers, key=lambda entry: (_value(entry["base"]["retain"]), -entry["layer"]))
        strongest = max(layers, key=lambda entry: (_value(entry["edited"]["forget"]), -entry["layer"]))
        values.update(best_layer=best["layer"], attacker_best_layer=strongest["layer"], kept=best["kept"])
    return out


def _accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float | None:
    return float((predicted == truth).double().mean()) if len(truth) else None


def _value(accuracy: float | None) -> float:
    return -1.0 if accuracy is None else accuracy
