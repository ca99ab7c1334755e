"""`mmedit attack`'s report: the JSON record, rich tables and a PNG, from attacks.run's result."""
from __future__ import annotations

from pathlib import Path

from rich import box
from rich.table import Table

from mmedit.eval import metrics
from mmedit.eval.report import HEADLINE
from mmedit.safefile import save_figure

FORMAT = "mmedit.attack-report"
TABLE_METRICS = ("choice_acc", "answer_prob", "gen_acc", "cloze_acc")  # the JSON holds every metric
SHORT_FORMS = dict(zip(metrics.FORMS, ("image", "text")))  # Image_Textual, Pure_Text


def build(result: dict, provenance: dict) -> dict:
    return {"format": FORMAT, "format_version": 1, **provenance, **result}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def recovery_table(result: dict) -> Table | None:
    """relearn and quantize: forget-set values of each model, and the recovery of the attacked edited model."""
    grid = Table(title="what comes back: relearn and quantize (forget people)", box=box.SIMPLE_HEAD, caption=(
        "values in % on the scored forget rows (relearn: the held-out half of each person's facts); "
        "recovery = (attacked edited - edited) / (base - edited): 0 nothing came back, 1 all of it, "
        "- where the edit moved the metric by no more than --min-gap (default 5 points); att.: after the attack; retain: the attacked edited model on the "
        "sampled retain people; image = Image_Textual, text = Pure_Text"))
    for column in ("attack", "variant", "form", "metric", "base", "edited", "att. base", "att. edited",
                   "recovery", "retain"):
        grid.add_column(column, justify="left" if column in ("attack", "variant", "form", "metric") else "right")
    rows = 0
    for attack in ("relearn", "quantize"):
        found = result["attacks"].get(attack)
        if not found:
            continue
        reference = found["reference"]
        for variant, values in found["variants"].items():
            for form, by_metric in reference["base"]["forget"].items():
                for metric in TABLE_METRICS:
                    if metric not in by_metric:
                        continue
                    attacked = values["attacked"]
                    cells = [reference["base"]["forget"][form][metric], reference["edited"]["forget"][form][metric],
                             attacked["base"]["forget"][form][metric], attacked["edited"]["forget"][form][metric]]
                    retain = attacked["edited"].get("retain", {}).get(form, {}).get(metric)
                    grid.add_row(attack, variant, SHORT_FORMS.get(form, form), metric, *map(_percent, cells),
                                 _ratio(values["recovery"][form][metric]), _percent(retain))
                    rows += 1
            grid.add_section()
    return grid if rows else None


def mia_table(result: dict) -> Table | None:
    found = result["attacks"].get("mia")
    if not found:
        return None
    grid = Table(title="membership inference: AUC against people the model never saw", caption=(
        "AUC = P(a member person scores more member-like than a never-seen one): 1 = told apart, 0.5 = "
        "indistinguishable (the goal for forget people), below 0.5 = less familiar than strangers; retain "
        "people are the check that the attack works (near 1); - where a form has no usable control rows"))
    for column in ("model", "form", "members", "loss AUC", "Min-K% AUC"):
        grid.add_column(column, justify="left" if column in ("model", "form", "members") else "right")
    for model, values in found["models"].items():
        for form, by_member in values["auc"].items():
            for member, scores in by_member.items():
                grid.add_row(model, form, member, _ratio(scores["loss"]), _ratio(scores["min_k"]))
        grid.add_section()
    return grid


def leakage_table(result: dict) -> Table | None:
    found = result["attacks"].get("leakage")
    if not found:
        return None
    grid = Table(title="leakage across forms (forget people, edited model)", caption=(
        "forgotten: questions the base answers in both forms and the edited model misses in the first form; "
        "leaked: of those, answered right in the other form; rate = leaked / forgotten"))
    for column in ("metric", "forgotten in -> asked in", "forgotten", "leaked", "rate"):
        grid.add_column(column, justify="left" if column in ("metric", "forgotten in -> asked in") else "right")
    for metric, directions in found["directions"].items():
        for direction, values in directions.items():
            grid.add_row(metric, direction.replace("->", " -> "), str(values["forgotten"]), str(values["leaked"]),
                         _percent(values["rate"]))
    return grid


def probe_table(result: dict) -> Table | None:
    found = result["attacks"].get("probe")
    if not found:
        return None
    grid = Table(title="hidden-state probe: accuracy of a linear probe fitted on the base model", caption=(
        "accuracy in % of a per-layer probe predicting the answer from the last prompt token's hidden state, fitted "
        "on the base model's states of other retain people; forget / retain: the forget people and the held-out "
        "retain people in each model; layer 0 = the embeddings; chance (forget / retain people): the most frequent "
        "training answer per question; * = the layer chosen by the base model's retain accuracy; kept = (edited "
        "forget - chance) / (base forget - chance) per layer: 1 = the edit hid the answers but they are still "
        "readable there, 0 = no better than chance; - where the base is within --min-gap of chance"))
    for column in ("form", "layer", "chance f / r", "base forget", "edited forget", "base retain", "edited retain",
                   "kept"):
        grid.add_column(column, justify="left" if column in ("form", "layer") else "right")
    for form, values in found["forms"].items():
        chance = " / ".join(_percent(values["chance"][group]) for group in ("forget", "retain"))
        for entry in values["layers"]:
            best = entry["layer"] == values["best_layer"]
            grid.add_row(SHORT_FORMS.get(form, form), f"{entry['layer']}{' emb' if entry['layer'] == 0 else ''}"
                         f"{' *' if best else ''}", chance, _percent(entry["base"]["forget"]),
                         _percent(entry["edited"]["forget"]), _percent(entry["base"]["retain"]),
                         _percent(entry["edited"]["retain"]), _ratio(entry["kept"]["forget"]))
        grid.add_section()
    return grid


def tables(result: dict) -> list[Table]:
    return [table for table in (recovery_table(result), probe_table(result), mia_table(result), leakage_table(result))
            if table is not None]


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _bars(axis, positions, values, width, label=None) -> None:
    """Bars, with "n/a" written where a value is undefined (None) instead of a bar that reads as 0."""
    axis.bar(positions, [0 if value is None else value for value in values], width, label=label)
    for position, value in zip(positions, values):
        if value is None:
            axis.text(position, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)


def plot(result: dict, path: str | Path, metric: str = HEADLINE, force: bool = False) -> Path:
    """One panel per kind of result: recovery of `metric` per attack variant and form; the probe's accuracy
    at its chosen layer per model and people, chance marked; MIA Min-K% AUC of
    the forget people for base and edited model; leakage rate of `metric` per direction. Written
    atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = result["attacks"]
    bars = [(f"{attack} {variant}", values["recovery"]) for attack in ("relearn", "quantize")
            for variant, values in attacks.get(attack, {}).get("variants", {}).items()]
    panels = [panel for panel, present in (("recovery", bars), ("probe", "probe" in attacks), ("mia", "mia" in attacks),
                                           ("leakage", "leakage" in attacks)) if present]
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.4 * max(1, len(panels)), 4.6), squeeze=False)
    width = 0.38
    for axis, panel in zip(axes[0], panels):
        if panel == "recovery":
            labels = [label for label, _ in bars]
            for index, form in enumerate(metrics.FORMS):
                _bars(axis, [i + (index - 0.5) * width for i in range(len(bars))],
                      [by_form.get(form, {}).get(metric) for _, by_form in bars], width, form)
            axis.axhline(1, color="black", lw=0.8, ls="--")
            axis.axhline(0, color="black", lw=0.8)
            axis.set_ylabel(f"recovery of {metric} (1 = back to the base model)")
        elif panel == "probe":
            forms = attacks["probe"]["forms"]
            pairs = [(model, group) for group in ("forget", "retain") for model in ("base", "edited")]
            labels = [f"{model} {group}" for model, group in pairs]
            for index, form in enumerate(form for form in metrics.FORMS if form in forms):
                values = forms[form]
                best = values["layers"][values["best_layer"]]
                positions = [i + (index - 0.5) * width for i in range(len(pairs))]
                _bars(axis, positions, [best[model][group] for model, group in pairs], width,
                      f"{form} (layer {values['best_layer']})")
                axis.scatter(positions, [_nan(values["chance"][group]) for _, group in pairs], marker="_", s=160,
                             color="black", zorder=3, label="chance" if index == 0 else None)
            axis.set_ylim(0, 1.3)  # room for the legend above the bars
            axis.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
            axis.set_ylabel("probe accuracy (the answer read from the hidden state)")
        elif panel == "mia":
            models = attacks["mia"]["models"]
            labels = list(models)
            for index, form in enumerate(metrics.FORMS):
                _bars(axis, [i + (index - 0.5) * width for i in range(len(labels))],
                      [model["auc"].get(form, {}).get("forget", {}).get("min_k") for model in models.values()],
                      width, form)
            axis.axhline(0.5, color="black", lw=0.8, ls="--")
            axis.set_ylim(0, 1.05)
            axis.set_ylabel("Min-K% AUC, forget vs never seen (0.5 = indistinguishable)")
        else:
            directions = attacks["leakage"]["directions"].get(metric, {})
            labels = [direction.replace("->", " -> ") for direction in directions]
            _bars(axis, range(len(labels)), [values["rate"] for values in directions.values()], 0.6)
            axis.set_ylim(0, 1.05)
            axis.set_ylabel(f"{metric}: leaked / forgotten")
        axis.set_xticks(range(len(labels)))
        axis.set_xticklabels([SHORT_FORMS.get(label, label) for label in labels], rotation=20, ha="right", fontsize=8)
        axis.set_title(panel)
        axis.grid(alpha=0.3, axis="y")
        if panel != "leakage":
            axis.legend(fontsize=8, **({"loc": "upper center", "ncol": 3} if panel == "probe" else {}))
    figure.tight_layout()
    return save_figure(figure, path, force=force, dpi=110)
