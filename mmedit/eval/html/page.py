"""The HTML page: inline CSS, inline SVG, no scripts and no network resources. Every string that comes from
an input file (names, paths, provenance) is escaped here, once, where it enters the markup."""
from __future__ import annotations

from html import escape

from mmedit.eval import metrics
from mmedit.eval.html import atlas, svg
from mmedit.eval.html.inputs import Input
from mmedit.eval.report import BASE, HEADLINE, is_retain

SECTIONS = {"inputs": "Inputs", "atlas": "Neuron atlas", "eval": "Forgetting and retention",
            "attack": "Attacks: what comes back", "provenance": "Provenance"}
SHORT_FORMS = dict(zip(metrics.FORMS, ("image", "text")))
MAX_LIST = 24  # provenance lists longer than this are cut, saying how many were left out

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:18px 28px 60px}
h1{font-size:24px;margin:8px 0 2px}h2{font-size:19px;margin:34px 0 8px;border-bottom:2px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}nav a{margin-right:14px;color:#0b5cad;text-decoration:none}
table{border-collapse:collapse;margin:4px 0 10px;background:#fff}
td,th{border:1px solid #e2e2e2;padding:2px 7px;text-align:right;vertical-align:top}
th{background:#f0f0f0;font-weight:600}td.l,th.l{text-align:left}
.layer{background:#fff;border:1px solid #e4e4e4;border-radius:6px;padding:8px 10px;margin:8px 0}
.layer h4{margin:0 0 4px;font-size:13px}.muted{color:#777}.note{background:#fff6d6;border-left:4px solid #e0b000;padding:4px 10px;margin:4px 0}
svg text{font:10px system-ui,sans-serif;fill:#333}svg .lab{font-size:10px}svg .grid{stroke:#e6e6e6}
svg .frame{fill:#fff;stroke:#ccc}.legend{margin:4px 0 10px}.legend span{margin-right:14px;font-size:12px}
.legend i{display:inline-block;width:11px;height:11px;margin-right:4px;vertical-align:-1px;border-radius:2px}
.charts{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}.card{background:#fff;border:1px solid #e4e4e4;border-radius:6px;padding:8px 12px}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}table.kv td{text-align:left}table.kv td.k{color:#555;white-space:nowrap}
code{font-size:12px;word-break:break-all}
"""


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _cells(values, tag="td", left=()) -> str:
    return "".join(f'<{tag}{" class=l" if i in left else ""}>{value}</{tag}>' for i, value in enumerate(values))


def _table(header: list[str], rows: list[list[str]], left: int = 1, attrs: str = "") -> str:
    """A table whose cells are already-escaped HTML; the first `left` columns left-aligned."""
    keep = range(left)
    body = "".join(f"<tr>{_cells(row, left=keep)}</tr>" for row in rows)
    return f"<table{attrs}><tr>{_cells(map(escape, header), 'th', keep)}</tr>{body}</table>"


def delta_label(found: Input) -> str:
    """A delta's name in the report: its file name and the plugin that made it."""
    plugin = (found.content.provenance.get("plugin") or {})
    name = plugin.get("name") if isinstance(plugin, dict) else None
    return f"{found.path.name}" + (f" ({name})" if name else "")


# ---- inputs ------------------------------------------------------------------------------------------
def inputs_section(inputs: list[Input], notes: list[str]) -> str:
    rows = [[escape(found.kind), f"<code>{escape(str(found.path))}</code>", f"{found.size:,}",
             f"<code>{found.sha256}</code>"] for found in inputs]
    notes_html = "".join(f'<div class="note">{escape(note)}</div>' for note in notes)
    return _table(["kind", "file", "bytes", "sha256"], rows, left=2) + notes_html


# ---- atlas -------------------------------------------------------------------------------------------
def atlas_section(trace: Input | None, deltas: list[Input], form: str) -> tuple[str, list[str]]:
    rows, notes = atlas.build(trace.content if trace else None, [d.content for d in deltas], form)
    if not rows:
        return '<p class="muted">No trace and no delta given: nothing to map.</p>', notes
    labels = [delta_label(d) for d in deltas]
    stats = trace.content if trace else None
    intro = []
    if stats is not None:
        score = "|mean(g·z)| (gradients traced)" if any(row.gradients for row in rows) \
            else "mean |z| (no gradients traced)"
        intro.append(f"<p>Importance per neuron: {escape(score)} over all positions of the {escape(form)} inputs, "
                     "scaled to each layer's most important neuron (bright = important).")
    else:
        intro.append("<p>No trace given: layers show what each delta touches, without importance.")
    if deltas:
        intro.append(" Below the importance, one row per delta: a neuron is marked where the delta touches "
                     "its producer rows (or its consumer column); darker = more of its elements. Wide layers "
                     f"are binned to {svg.MAX_BINS} cells (max per cell).</p>"
                     + svg.legend(labels, [svg.PALETTE[i % len(svg.PALETTE)] for i in range(len(labels))]))
    else:
        intro.append("</p>")
    html = ["".join(intro), _parts_table(deltas, labels)]
    part = None
    for row in rows:
        if row.part != part:
            part = row.part
            html.append(f'<h3 id="part-{escape(part)}">{escape(part)}</h3>')
        html.append(_layer_block(row, labels, [d.path.stem for d in deltas], any(r.gradients for r in rows)))
    return "".join(html), notes


def _parts_table(deltas: list[Input], labels: list[str]) -> str:
    if not deltas:
        return ""
    rows = []
    for index, (found, label) in enumerate(zip(deltas, labels)):
        counts = found.content.counts()
        for part, tally in (counts.get("parts") or {}).items():
            rows.append([escape(label), escape(part),
                         f'<span data-delta="{index}" data-part="{escape(part)}" data-tensors="{tally["tensors"]}">'
                         f'{tally["tensors"]:,}</span>',
                         f'<span data-delta="{index}" data-part="{escape(part)}" data-elements="{tally["elements"]}">'
                         f'{tally["elements"]:,}</span>'])
        rows.append([escape(label), "<b>all</b>", f"{counts['tensors']:,}", f"<b>{counts['elements']:,}</b>"])
    return "<h3>What each delta touches, per part</h3>" + _table(["delta", "part", "tensors", "elements touched"],
                                                                 rows, left=2, attrs=' class="parts"')


def _layer_block(row: atlas.Layer, labels: list[str], short: list[str], gradients: bool) -> str:
    """One layer: its importance strip with a row per delta, and a table of what each delta touches;
    `gradients`: whether the trace has gradients anywhere (then a site without them is said)."""
    key = f"{row.part}.{row.layer}"
    width = row.site["width"] if row.site else None
    where = f"layer {row.layer}" if row.layer != atlas.NO_LAYER else "outside its layers (embeddings, norms, heads)"
    head = (f'<div class="layer" data-layer="{escape(key)}"><h4>{escape(row.part)} {escape(where)}'
            + (f' <span class="muted">— {width} neurons at <code>{escape(row.site["module"])}</code></span>'
               if row.site else ' <span class="muted">— not traced</span>')
            + (' <span class="muted">(importance: mean |z|, no gradients reached it)</span>'
               if row.site and gradients and not row.gradients else "") + "</h4>")
    touched = [(short[i], svg.PALETTE[i % len(svg.PALETTE)], counts) for i, counts in sorted(row.neurons.items())]
    strip = svg.neuron_strip(row.importance, width, touched) if row.site and (
        row.importance is not None or touched) else ""
    table_rows = []
    for index in sorted(row.elements):
        counts = row.neurons.get(index)
        hit = counts.nonzero().flatten() if counts is not None else None
        percentile = (atlas.rank_percentile(row.importance, hit) if hit is not None and row.importance is not None
                      else None)
        table_rows.append([
            escape(labels[index]), str(row.tensors[index]),
            f'<span data-delta="{index}" data-layer="{escape(key)}" data-elements="{row.elements[index]}">'
            f'{row.elements[index]:,}</span>',
            "–" if hit is None else f'<span data-delta="{index}" data-layer="{escape(key)}" '
                                    f'data-neurons="{hit.numel()}">{hit.numel()}</span>' + (f" of {width}" if width else ""),
            "–" if percentile is None else f"{percentile:.0f}"])
    table = _table(["delta", "tensors", "elements touched", "neurons touched", "median importance percentile"],
                   table_rows) if table_rows else '<span class="muted">no delta touches this layer</span>'
    return head + strip + table + "</div>"


# ---- eval --------------------------------------------------------------------------------------------
def method_label(found: Input, name: str) -> str:
    """An eval report's model: "base", or the methods of the deltas it applied (for `mmedit eval`'s
    "edited"), with the report's file name."""
    if name == "edited":
        name = "+".join(map(str, _delta_names(found))) or name
    return f"{name} [{found.path.name}]"


def _delta_names(found: Input) -> list:
    """The plugin (else the file) of each delta an eval or attack report records."""
    return [((d.get("provenance") or {}).get("plugin") or {}).get("name") or d.get("path", "?")
            for d in found.content.get("deltas") or [] if isinstance(d, dict)]


def eval_section(reports: list[Input]) -> str:
    if not reports:
        return '<p class="muted">No eval report given.</p>'
    html = [f"<p>Metric on the axes: {HEADLINE} (multiple choice answered right, %). Forgetting rate = 1 − "
            "edited/base on forget and test people; retention = edited/base on retain people. Good unlearning "
            "sits top left in the scatter: forgotten, yet the retain set kept.</p>"]
    methods = [(found, name) for found in reports for name in found.content["results"] if name != BASE]
    colours = [svg.PALETTE[i % len(svg.PALETTE)] for i in range(len(methods))]  # a card's colour is its point's
    points: dict[str, list[tuple[str, float, float, str | None]]] = {}
    for index, (found, name) in enumerate([(reports[0], BASE), *methods]):
        table = found.content["results"][name]
        for form in metrics.FORMS:
            x = table.get("forget", {}).get(form, {}).get(HEADLINE)
            y = table.get("retain", {}).get(form, {}).get(HEADLINE)
            if x is not None and y is not None:
                colour = None if index == 0 else colours[index - 1]
                points.setdefault(form, []).append((method_label(found, name), 100 * x, 100 * y, colour))
    if points:
        html.append('<div class="charts">' + "".join(
            f'<div class="card"><b>{escape(form)}</b><br>' + svg.scatter(p, f"forget {HEADLINE} %",
                                                                          f"retain {HEADLINE} %") + "</div>"
            for form, p in points.items()) + "</div>")
        html.append('<div class="legend"><span><i style="background:#fff;border:2px solid #000;width:8px;height:8px">'
                    '</i>' + escape(method_label(reports[0], BASE)) + "</span>" + "".join(
                        f'<span><i style="background:{colours[i]}"></i>{escape(method_label(found, name))}</span>'
                        for i, (found, name) in enumerate(methods)) + "</div>")
    for index, (found, name) in enumerate(methods):
        results, comparison = found.content["results"], found.content.get("comparison") or {}
        html.append(_method_card(found, name, results[BASE], results[name], comparison.get(name) or {},
                                 colours[index]))
    return "".join(html)


def _method_card(found: Input, name: str, base: dict, edited: dict, comparison: dict, colour: str) -> str:
    label = method_label(found, name)
    groups = []
    for split, forms in base.items():
        for form in forms:
            groups.append((f"{split} {SHORT_FORMS.get(form, form)}", [
                ("base", _scaled(forms[form].get(HEADLINE))),
                (label, _scaled(edited.get(split, {}).get(form, {}).get(HEADLINE)))]))
    fills = [svg.BASE_COLOUR, colour]
    chart = svg.bars(groups, ["base", label], fills=fills) + svg.legend(["base", label], fills)
    splits = list(comparison)
    rows = []
    for form in dict.fromkeys(f for forms in comparison.values() for f in forms):
        for metric in dict.fromkeys(m for forms in comparison.values() for m in forms.get(form, {})):
            cells = [escape(SHORT_FORMS.get(form, form)), escape(metric)]
            for split in splits:
                values = comparison[split].get(form, {}).get(metric)
                values = values if isinstance(values, dict) else {}
                rate = values.get("retention" if is_retain(split) else "forgetting_rate")
                place = f'data-split="{escape(split)}" data-form="{escape(form)}" data-metric="{escape(metric)}"'
                cells += [_pct(values.get("base")), _pct(values.get("edited")),
                          f'<b {place} data-rate="{"" if rate is None else rate}">{_pct(rate)}</b>']
            rows.append(cells)
    header = ["form", "metric"] + [f"{split} {column}" for split in splits
                                   for column in ("base", "edited", "retention" if is_retain(split) else "forgot")]
    table = _table(header, rows, left=2) + ('<div class="muted">in %; forgot = forgetting rate 1 − edited/base, '
                                            "retention = edited/base</div>")
    return (f'<div class="card method" data-method="{escape(label)}"><h3>{escape(label)}</h3>'
            f'<div class="charts"><div>{chart}</div><div>{table}</div></div></div>')


def _scaled(value) -> float | None:
    return None if value is None else 100 * value


# ---- attack ------------------------------------------------------------------------------------------
def attack_section(reports: list[Input]) -> str:
    if not reports:
        return '<p class="muted">No attack report given.</p>'
    html = [f"<p>Forget people, {HEADLINE} in %: the base model, the edited model, and the edited model after "
            "each attack. Recovery = (attacked edited − edited) / (base − edited): 0 nothing came back, 1 all of "
            "it; undefined (–) where the edit itself moved the metric by too little.</p>"]
    for found in reports:
        attacks = found.content["attacks"]
        deltas = _delta_names(found)
        title = f"{'+'.join(map(str, deltas)) or 'edit'} [{found.path.name}]"
        html.append(f'<div class="card attack" data-report="{escape(found.path.name)}"><h3>{escape(title)}</h3>')
        groups, rows = [], []
        for attack in ("relearn", "quantize"):
            entry = attacks.get(attack)
            if not entry:
                continue
            reference = entry["reference"]
            for variant, values in entry["variants"].items():
                for form in reference["base"].get("forget", {}):
                    base = reference["base"]["forget"][form].get(HEADLINE)
                    edited = reference["edited"].get("forget", {}).get(form, {}).get(HEADLINE)
                    after = values["attacked"]["edited"].get("forget", {}).get(form, {}).get(HEADLINE)
                    recovery = (values.get("recovery") or {}).get(form, {}).get(HEADLINE)
                    groups.append((f"{variant} {SHORT_FORMS.get(form, form)}",
                                   [("base", _scaled(base)), ("edited", _scaled(edited)), ("attacked", _scaled(after))]))
                    rows.append([escape(attack), escape(variant), escape(SHORT_FORMS.get(form, form)), _pct(base),
                                 _pct(edited), _pct(after),
                                 f'<span data-variant="{escape(variant)}" data-form="{escape(form)}" data-recovery='
                                 f'"{"" if recovery is None else recovery}">'
                                 + ("–" if recovery is None else f"{recovery:.2f}") + "</span>"])
        if groups:
            series = ["base", "edited", "attacked"]
            html.append('<div class="charts"><div>' + svg.bars(groups, series) + svg.legend(series) + "</div><div>"
                        + _table(["attack", "variant", "form", "base %", "edited %", "attacked %", "recovery"],
                                 rows, left=3) + "</div></div>")
        html.append(_mia(attacks.get("mia")) + _leakage(attacks.get("leakage")) + "</div>")
    return "".join(html)


def _mia(found) -> str:
    if not found:
        return ""
    rows = []
    for model, values in found.get("models", {}).items():
        for form, by_member in (values.get("auc") or {}).items():
            for member, scores in (by_member or {}).items():
                scores = scores if isinstance(scores, dict) else {}
                rows.append([escape(model), escape(SHORT_FORMS.get(form, form)), escape(member)] + [
                    "–" if not isinstance(scores.get(key), (int, float)) else f"{scores[key]:.2f}"
                    for key in ("loss", "min_k")])
    return ("<h4>Membership inference (AUC against never-seen people; 0.5 = indistinguishable)</h4>"
            + _table(["model", "form", "members", "loss AUC", "Min-K% AUC"], rows, left=3))


def _leakage(found) -> str:
    if not found:
        return ""
    rows = [[escape(metric), escape(direction.replace("->", " → ")), str(values["forgotten"]), str(values["leaked"]),
             _pct(values["rate"]) if isinstance(values["rate"], (int, float)) else "–"]
            for metric, directions in found.get("directions", {}).items() for direction, values in directions.items()]
    return ("<h4>Leakage across forms (forgotten in one form, still answered in the other)</h4>"
            + _table(["metric", "forgotten in → asked in", "forgotten", "leaked", "rate %"], rows, left=2))


# ---- provenance --------------------------------------------------------------------------------------
def tree(value, depth: int = 0) -> str:
    """Nested provenance as escaped HTML: mappings as key/value tables, long lists cut."""
    if isinstance(value, dict):
        if not value:
            return '<span class="muted">{}</span>'
        if depth >= 6:
            return f'<span class="muted">({len(value)} more fields)</span>'
        return '<table class="kv">' + "".join(
            f'<tr><td class="k">{escape(str(key))}</td><td>{tree(item, depth + 1)}</td></tr>'
            for key, item in value.items()) + "</table>"
    if isinstance(value, (list, tuple)):
        shown = value[:MAX_LIST]
        more = f' <span class="muted">… {len(value) - MAX_LIST} more</span>' if len(value) > MAX_LIST else ""
        if all(not isinstance(item, (dict, list, tuple)) for item in shown):
            return escape(", ".join(map(str, shown))) + more
        return "<ol>" + "".join(f"<li>{tree(item, depth + 1)}</li>" for item in shown) + "</ol>" + more
    return "<i>none</i>" if value is None else escape(str(value))


def recorded_provenance(found: Input) -> dict:
    """What the artifact itself says made it (results and statistics left out: they are the report)."""
    content = found.content
    if found.kind == "delta":
        return {"checksum": content.checksum, "counts": {k: v for k, v in content.counts().items() if k != "layers"},
                **content.provenance}
    if found.kind == "trace":
        meta = dict(content.meta)
        meta["sites"] = [f"{s['name']} ({s['width']})" for s in meta.get("sites", [])]
        return meta
    skip = {"results", "comparison"} if found.kind == "eval" else {"attacks", "evaluation", "sets"}
    return {key: value for key, value in content.items() if key not in skip}


def provenance_section(inputs: list[Input], own: dict) -> str:
    html = ["<p>Every input with its file sha256 and the provenance it records itself; then this report's own.</p>"]
    for index, found in enumerate(inputs):
        html.append(f'<details class="prov" data-input="{index}"{" open" if index == 0 else ""}><summary>'
                    f'{escape(found.kind)}: <code>{escape(str(found.path))}</code></summary>'
                    f'<table class="kv"><tr><td class="k">sha256</td><td><code>{found.sha256}</code></td></tr>'
                    f'<tr><td class="k">bytes</td><td>{found.size:,}</td></tr></table>'
                    f"{tree(recorded_provenance(found))}</details>")
    html.append(f'<details class="prov" open><summary>this report</summary>{tree(own)}</details>')
    return "".join(html)


def page(title: str, bodies: dict[str, str]) -> str:
    nav = "".join(f'<a href="#{key}">{escape(SECTIONS[key])}</a>' for key in bodies)
    sections = "".join(f'<section id="{key}"><h2>{escape(SECTIONS[key])}</h2>{body}</section>'
                       for key, body in bodies.items())
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{escape(title)}</title><style>{CSS}</style>'
            f'</head><body><main><h1>{escape(title)}</h1><nav>{nav}</nav>{sections}</main></body></html>\n')
