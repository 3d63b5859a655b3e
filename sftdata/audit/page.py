"""The audit report as one self-contained HTML page (``--html``): no network, no script, works
opened from a CI artifact. The summary, histograms drawn as inline SVG, each check's records, and
a record viewer (the rendered text token by token: trained tokens highlighted, stop tokens
marked, token boundaries visible), linked from every listed record that it shows."""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from sftdata.audit import AuditReport
from sftdata.audit.checks import CHECKS

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
td, th { border-bottom: 1px solid #ddd; padding: .25em .7em; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.fail { color: #b00020; font-weight: 600; } .warn { color: #a65f00; } .ok { color: #1b7a2f; }
figure { display: inline-block; margin: 0 1.5em 1em 0; } figcaption { font-size: 12px; color: #555; }
pre.tokens { white-space: pre-wrap; word-break: break-all; background: #fafafa; padding: .6em;
  border: 1px solid #eee; }
span.tok { border-left: 1px solid #c9c9c9; }
span.tok.trained { background: #d7f0d2; }
span.tok.stop { outline: 2px solid #b00020; outline-offset: -2px; }
section.record { margin-bottom: 2em; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _bars(values: list[float], labels: list[str], caption: str) -> str:
    """A bar chart as inline SVG."""
    w, h, top = 360, 140, max(values, default=0) or 1
    bw = w / max(len(values), 1)
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{h - h * v / top:.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{h * v / top:.1f}" fill="#4a7fb5"><title>{_e(lab)}: {v:g}</title></rect>'
        for i, (v, lab) in enumerate(zip(values, labels, strict=True))
    )
    svg = f'<svg width="{w}" height="{h}" role="img" aria-label="{_e(caption)}">{bars}</svg>'
    return f"<figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>"


def _histogram(data: list[float], bins: int, caption: str) -> str:
    if not data:
        return ""
    counts, edges = np.histogram(np.asarray(data, dtype=float), bins=bins)
    labels = [f"{edges[i]:.3g}–{edges[i + 1]:.3g}" for i in range(len(counts))]
    return _bars(
        [float(c) for c in counts], labels, f"{caption} ({edges[0]:.3g} to {edges[-1]:.3g})"
    )


def _view(k: int, view: dict[str, Any]) -> str:
    parts = [f'<section class="record" id="rec-{k}"><h3>{_e(view["id"])} '
             f'<small>({_e(view["where"])}; {_e(view["file"])}:{view["line"]})</small></h3>']  # fmt: skip
    if view.get("refusal"):
        parts.append(f'<p class="fail">{_e(view["refusal"])}</p>')
    for n, s in enumerate(view["samples"]):
        trained = sum(s["trained"])
        parts.append(f"<p>sample {n}: {len(s['pieces']):,} tokens, "
                     f'<span class="trained-count">{trained:,}</span> trained</p><pre class="tokens">')  # fmt: skip
        for piece, t, stop in zip(s["pieces"], s["trained"], s["stops"], strict=True):
            cls = "tok" + (" trained" if t else "") + (" stop" if stop else "")
            parts.append(f'<span class="{cls}">{_e(piece)}</span>')
        parts.append("</pre>")
    parts.append("</section>")
    return "".join(parts)


def page(report: AuditReport) -> str:
    """The whole page."""
    anchor = {(v["file"], v["line"]): k for k, v in enumerate(report.views)}
    out = ["<!doctype html><html lang=en><head><meta charset=utf-8>",
           "<title>sftdata audit</title>", f"<style>{STYLE}</style></head><body>",
           "<h1>sftdata audit</h1>",
           f"<p>{report.records:,} records; tokenizer {_e(report.tokenizer)}; template "
           f"{_e(report.template)}; seq_len {_e(report.seq_len or '-')}; "
           f"{'<b class=fail>failed</b>' if report.failed else '<b class=ok>passed</b>'}</p>",
           "<h2>Checks</h2><table><tr><th>check</th><th>count</th><th>share</th><th>verdict</th>"
           "<th>what</th></tr>"]  # fmt: skip
    for c in report.checks.values():
        link = f'<a href="#check-{c.name}">{c.name}</a>' if c.findings else c.name
        out.append(f'<tr><td>{link}</td><td class="n">{c.count:,}</td>'
                   f'<td class="n">{100 * c.share:.2f}%</td><td class="{c.verdict}">{c.verdict}</td>'
                   f"<td>{_e(CHECKS[c.name])}{'; ' + _e(c.note) if c.note else ''}</td></tr>")  # fmt: skip
    out.append("</table><h2>Histograms</h2>")
    hist = report.histograms
    out.append(_histogram(hist.get("lengths", []), 30, "tokens per record"))
    out.append(_histogram(hist.get("trained_share", []), 20, "trained share of each record"))
    sources = hist.get("sources", {})
    out.append("<table><tr><th>source</th><th>records</th></tr>")
    out += [f'<tr><td>{_e(k)}</td><td class="n">{v:,}</td></tr>' for k, v in sources.items()]
    out.append("</table>")
    for c in report.checks.values():
        if not c.findings:
            continue
        out.append(f'<h2 id="check-{c.name}">{c.name}: {c.count:,}</h2><table>'
                   "<tr><th>record</th><th>source</th><th>what</th></tr>")  # fmt: skip
        for f in c.findings:
            k = anchor.get((f.file, f.line))
            rid = f'<a href="#rec-{k}">{_e(f.id)}</a>' if k is not None else _e(f.id)
            out.append(f"<tr><td>{rid}</td><td>{_e(f.where)}</td><td>{_e(f.detail)}</td></tr>")
        out.append("</table>")
    out.append("<h2>Records</h2><p>Trained tokens are green, stop tokens outlined in red; a line "
               "to the left of each token marks its boundary.</p>")  # fmt: skip
    out += [_view(k, v) for k, v in enumerate(report.views)]
    out.append("</body></html>")
    return "\n".join(out)


__all__ = ["page"]
