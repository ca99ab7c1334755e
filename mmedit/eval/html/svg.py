"""Inline SVG charts for the HTML report, written as text (no JavaScript, no external resources): a neuron
strip (importance and what each delta touches), grouped bars and a forget-vs-retain scatter. Every label
goes through html.escape."""
from __future__ import annotations

from html import escape

import torch

# magma, sampled: importance 0 (dark) .. 1 (bright)
_MAGMA = [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21), (250, 193, 39),
          (252, 253, 191)]
BASE_COLOUR = "#9a9a9a"
PALETTE = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#17becf", "#e377c2", "#8c564b", "#bcbd22"]
MAX_BINS = 400  # wider sites are shown binned (each bin: the max over its neurons)


def magma(value: float) -> str:
    value = min(1.0, max(0.0, value)) * (len(_MAGMA) - 1)
    low = int(value)
    high, t = min(low + 1, len(_MAGMA) - 1), value - low
    r, g, b = (round(a + (c - a) * t) for a, c in zip(_MAGMA[low], _MAGMA[high]))
    return f"#{r:02x}{g:02x}{b:02x}"


def binned(values: torch.Tensor, bins: int) -> list[float]:
    """Max of each of `bins` contiguous groups of values (bins >= len: the values themselves)."""
    values = values.double()
    if values.numel() <= bins:
        return values.tolist()
    edges = torch.linspace(0, values.numel(), bins + 1).round().long().tolist()
    return [float(values[a:b].max()) for a, b in zip(edges[:-1], edges[1:])]


def neuron_strip(scores: torch.Tensor | None, width: int, touched: list[tuple[str, str, torch.Tensor]],
                 pixels: int = 760) -> str:
    """One row of cells for the site's importance (scaled to the layer's max), then one row per delta:
    a cell is coloured where the delta touches that neuron (darker: more of its elements)."""
    bins = min(width, MAX_BINS)
    cell, row, label = pixels / bins, 14, 96
    rows = (1 if scores is not None else 0) + len(touched)
    parts = [f'<svg class="strip" width="{pixels + label}" '
             f'height="{rows * (row + 3) + 14}" role="img">']
    y = 0
    if scores is not None:
        top = float(scores.max()) or 1.0
        parts.append(f'<text x="0" y="{y + 11}" class="lab">importance</text>')
        for i, value in enumerate(binned(scores / top, bins)):
            parts.append(f'<rect x="{label + i * cell:.2f}" y="{y}" width="{cell + 0.3:.2f}" height="{row}" '
                         f'fill="{magma(value)}"/>')
        y += row + 3
    for name, colour, counts in touched:
        parts.append(f'<text x="0" y="{y + 11}" class="lab">{escape(name[:16])}</text>')
        parts.append(f'<rect x="{label}" y="{y}" width="{pixels}" height="{row}" fill="#f3f3f3"/>')
        most = int(counts.max()) or 1
        for i, value in enumerate(binned(counts.double() / most, bins)):
            if value > 0:
                parts.append(f'<rect x="{label + i * cell:.2f}" y="{y}" width="{max(cell, 1.5):.2f}" height="{row}" '
                             f'fill="{colour}" fill-opacity="{0.35 + 0.65 * value:.2f}"/>')
        y += row + 3
    parts.append(f'<text x="{label}" y="{y + 11}" class="axis">neuron 0</text>'
                 f'<text x="{label + pixels}" y="{y + 11}" class="axis" text-anchor="end">{width - 1}</text></svg>')
    return "".join(parts)


def colours(series: list[str]) -> list[str]:
    """A series named "base" (the unedited model) is grey; the others take the palette in order."""
    others = iter(PALETTE * (1 + len(series) // len(PALETTE)))
    return [BASE_COLOUR if name == "base" else next(others) for name in series]


def bars(groups: list[tuple[str, list[tuple[str, float | None]]]], series: list[str], *, top: float = 100.0,
         unit: str = "%", height: int = 180, fills: list[str] | None = None) -> str:
    """Grouped vertical bars: groups [(label, [(series name, value or None)])], values in [0, top];
    None is written "n/a" (undefined, not 0). A label's last word goes on a second line. `fills`: one
    colour per series (default: colours(series))."""
    n = max(1, len(series))
    bar, gap, left = 14, 26, 34
    fills = fills or colours(series)
    width = left + len(groups) * (n * bar + gap) + 10
    scale = (height - 40) / top
    out = [f'<svg class="bars" width="{width}" height="{height + 40}" role="img">']
    for tick in (0, top / 2, top):
        y = height - 20 - tick * scale
        out.append(f'<line x1="{left - 4}" x2="{width}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" class="axis" text-anchor="end">{tick:g}</text>')
    for g, (label, values) in enumerate(groups):
        x0 = left + g * (n * bar + gap) + gap / 2
        for s, (name, value) in enumerate(values):
            x, colour = x0 + series.index(name) * bar, fills[series.index(name)]
            if value is None:
                out.append(f'<text x="{x + bar / 2:.1f}" y="{height - 24}" class="axis" text-anchor="middle">n/a</text>')
                continue
            h = max(0.0, min(top, value)) * scale
            out.append(f'<rect x="{x:.1f}" y="{height - 20 - h:.1f}" width="{bar - 2}" height="{h:.1f}" fill="{colour}">'
                       f'<title>{escape(label)} / {escape(name)}: {value:.3g}{escape(unit)}</title></rect>')
        first, _, last = label.rpartition(" ")
        out.append(f'<text x="{x0 + n * bar / 2:.1f}" y="{height - 6}" class="axis" text-anchor="middle">'
                   f'{escape(first or last)}</text>' + (f'<text x="{x0 + n * bar / 2:.1f}" y="{height + 6}" '
                   f'class="axis" text-anchor="middle">{escape(last)}</text>' if first else ""))
    out.append("</svg>")
    return "".join(out)


def legend(series: list[str], fills: list[str] | None = None) -> str:
    return '<div class="legend">' + "".join(
        f'<span><i style="background:{colour}"></i>{escape(name)}</span>'
        for name, colour in zip(series, fills or colours(series))) + "</div>"


def scatter(points: list[tuple[str, float, float, str | None]], x_label: str, y_label: str, size: int = 260) -> str:
    """Points (name, x %, y %, colour) on [0, 100]^2; colour None is the base model: a hollow black square,
    drawn on top so that a method sitting on it stays visible."""
    pad = 36
    inner = size - 2 * pad
    out = [f'<svg class="scatter" width="{size}" height="{size}" role="img">',
           f'<rect x="{pad}" y="{pad / 2}" width="{inner}" height="{inner}" class="frame"/>']
    for tick in (0, 50, 100):
        x, y = pad + tick / 100 * inner, pad / 2 + inner - tick / 100 * inner
        out.append(f'<text x="{x:.0f}" y="{pad / 2 + inner + 12}" class="axis" text-anchor="middle">{tick}</text>'
                   f'<text x="{pad - 4}" y="{y + 4:.0f}" class="axis" text-anchor="end">{tick}</text>')
    out.append(f'<text x="{pad + inner / 2}" y="{size - 4}" class="axis" text-anchor="middle">{escape(x_label)}</text>'
               f'<text transform="translate(10,{pad / 2 + inner / 2}) rotate(-90)" class="axis" '
               f'text-anchor="middle">{escape(y_label)}</text>')
    for name, x, y, colour in sorted(points, key=lambda point: point[3] is None):  # the base last: on top
        cx, cy = pad + min(100, max(0, x)) / 100 * inner, pad / 2 + inner - min(100, max(0, y)) / 100 * inner
        tip = f'<title>{escape(name)}: {x:.1f}, {y:.1f}</title>'
        out.append(f'<rect x="{cx - 6:.1f}" y="{cy - 6:.1f}" width="12" height="12" fill="none" stroke="#000" '
                   f'stroke-width="2">{tip}</rect>' if colour is None else
                   f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{colour}" fill-opacity="0.85">{tip}</circle>')
    out.append("</svg>")
    return "".join(out)
