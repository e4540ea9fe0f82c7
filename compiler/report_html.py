"""The HTML report of an artifact: bits per layer along depth, and error against bits.

Self-contained (inline SVG, no scripts, no plotting library): one file a user can open or attach.
"""

from __future__ import annotations

import html
import math

__all__ = ["html_report"]

_W, _H, _PAD = 760, 260, 48
_COLORS = {2: "#b2182b", 3: "#ef8a62", 4: "#67a9cf", 5: "#2166ac", 6: "#5aae61", 8: "#1b7837"}


def _axis(x0, y0, x1, y1, xlabel, ylabel, yticks, ymap, xticks=(), xmap=None) -> list[str]:
    out = [f'<line x1="{x0}" y1="{y1}" x2="{x1}" y2="{y1}" stroke="#333"/>',
           f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#333"/>',
           f'<text x="{(x0 + x1) / 2}" y="{y1 + 34}" text-anchor="middle" font-size="12">{html.escape(xlabel)}</text>',
           f'<text x="14" y="{(y0 + y1) / 2}" font-size="12" transform="rotate(-90 14 {(y0 + y1) / 2})" '
           f'text-anchor="middle">{html.escape(ylabel)}</text>']
    for v, label in yticks:
        y = ymap(v)
        out.append(f'<line x1="{x0 - 4}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{label}</text>')
    for v, label in xticks:
        x = xmap(v)
        out.append(f'<text x="{x:.1f}" y="{y1 + 16}" font-size="10" text-anchor="middle">{label}</text>')
    return out


def _bits_chart(tensors: list[dict], target: float) -> str:
    n = max(len(tensors), 1)
    top = max([t["storage_bits"]["total"] / (t["shape"][0] * t["shape"][1]) for t in tensors] + [target, 1.0])
    top = math.ceil(top)
    x0, y0, x1, y1 = _PAD, 12, _W - 12, _H - _PAD
    ymap = lambda v: y1 - (y1 - y0) * v / top  # noqa: E731
    parts = _axis(x0, y0, x1, y1, "quantized tensor (graph order = depth)", "bits per weight",
                  [(v, str(v)) for v in range(0, top + 1, max(1, top // 8))], ymap)
    bw = (x1 - x0) / n
    for i, t in enumerate(tensors):
        bpw = t["storage_bits"]["total"] / (t["shape"][0] * t["shape"][1])
        x = x0 + i * bw
        color = _COLORS.get(t["bits"], "#777")
        parts.append(f'<rect x="{x + bw * 0.1:.1f}" y="{ymap(bpw):.1f}" width="{bw * 0.8:.1f}" '
                     f'height="{y1 - ymap(bpw):.1f}" fill="{color}"><title>{html.escape(t["name"])}: '
                     f'{t["format"]}, {bpw:.3f} bpw</title></rect>')
    parts.append(f'<line x1="{x0}" y1="{ymap(target):.1f}" x2="{x1}" y2="{ymap(target):.1f}" '
                 f'stroke="#000" stroke-dasharray="5,4"><title>target {target}</title></line>')
    return f'<svg width="{_W}" height="{_H}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'


def _error_chart(tensors: list[dict]) -> str:
    points = []  # (bpw, error, chosen, label)
    for t in tensors:
        n = t["shape"][0] * t["shape"][1]
        for c in t.get("candidates", []):
            points.append((c["bits"] / n, c["error"], c["format"] == t["format"], f'{t["name"]} {c["format"]}'))
        if not t.get("candidates"):
            points.append((t["storage_bits"]["total"] / n, t["rel_error"], True, f'{t["name"]} {t["format"]}'))
    points = [p for p in points if p[1] > 0]
    if not points:
        return "<p>No quantized tensors.</p>"
    x0, y0, x1, y1 = _PAD, 12, _W - 12, _H - _PAD
    lo = math.floor(math.log10(min(p[1] for p in points)))
    hi = math.ceil(math.log10(max(p[1] for p in points)))
    hi = max(hi, lo + 1)
    xmin, xmax = math.floor(min(p[0] for p in points)), math.ceil(max(p[0] for p in points))
    xmax = max(xmax, xmin + 1)
    xmap = lambda v: x0 + (x1 - x0) * (v - xmin) / (xmax - xmin)  # noqa: E731
    ymap = lambda v: y1 - (y1 - y0) * (math.log10(v) - lo) / (hi - lo)  # noqa: E731
    parts = _axis(x0, y0, x1, y1, "bits per weight", "relative error (log)",
                  [(10.0 ** e, f"1e{e}") for e in range(lo, hi + 1)], ymap,
                  [(v, str(v)) for v in range(xmin, xmax + 1)], xmap)
    for bpw, err, chosen, label in sorted(points, key=lambda p: p[2]):
        fill = "#d6604d" if chosen else "#9ecae1"
        r = 4 if chosen else 2.5
        parts.append(f'<circle cx="{xmap(bpw):.1f}" cy="{ymap(err):.1f}" r="{r}" fill="{fill}" opacity="0.8">'
                     f'<title>{html.escape(label)}: {bpw:.3f} bpw, error {err:.3e}</title></circle>')
    return f'<svg width="{_W}" height="{_H}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'


def html_report(manifest: dict, title: str = "qcompile report") -> str:
    """The whole report page for ``manifest`` (an artifact's manifest.json)."""
    b = manifest["bpw"]
    tensors = manifest["tensors"]
    rows = "".join(
        f"<tr><td>{i}</td><td>{html.escape(t['name'])}</td><td>{t['op']}</td><td>{t['shape']}</td>"
        f"<td>{t['format']}</td><td>{t['storage_bits']['total'] / (t['shape'][0] * t['shape'][1]):.3f}</td>"
        f"<td>{t['rel_error']:.3e}</td></tr>"
        for i, t in enumerate(tensors)
    )
    summary = (f"{b['achieved']:.4f} bits per weight achieved for a target of {b['target']} over "
               f"{b['quantized_weights']:,} weights in {len(tensors)} tensors; "
               f"error measure: {html.escape(manifest.get('error_measure', 'relative weight error'))}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:820px}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}} td:nth-child(2){{text-align:left}}</style></head>
<body><h1>{html.escape(title)}</h1><p>{summary}</p>
<h2>Bits per layer along depth</h2>{_bits_chart(tensors, float(b['target']))}
<h2>Error against bits</h2><p>Every measured candidate (blue) and the allocator's choice (red) per tensor.</p>
{_error_chart(tensors)}
<h2>Per tensor</h2><table><tr><th>#</th><th>tensor</th><th>op</th><th>[N, K]</th><th>format</th>
<th>bpw</th><th>error</th></tr>{rows}</table></body></html>
"""
