"""report.html: one self-contained page (styles inline, plots and maps as data URIs) that renders
offline."""

from __future__ import annotations

import html
import json
import re
from typing import Sequence

import optuna

from ..study import OUTCOME_ORDER
from .context import (Context, _failure_table, _fmt, _front_table, _outcome_table, _settings_items, _status_note,
                      _warm_start_table, over_budget_line, throughput_note, warm_start_gain)
from .maps import token_maps
from .plots import hypervolume_plot, importance_plot, param_importances, tradeoff_plot
from .rows import _number


_NUMERIC = re.compile(r"^[–+\-]?[\d.,]+\s*(%|×|M)?$|^–$")


def _html_table(headers: Sequence[str], body: Sequence[Sequence[str]], highlight_first: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = []
    for index, line in enumerate(body):
        cells = "".join(
            f'<td class="num">{html.escape(c)}</td>' if _NUMERIC.match(str(c)) else f"<td>{html.escape(str(c))}</td>"
            for c in line)
        css = ' class="ref"' if highlight_first and index == 0 else ""
        rows.append(f"<tr{css}>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


CSS = """
:root { --ink:#1d2433; --muted:#5b6472; --line:#e3e7ed; --bg:#f4f6f9; --card:#fff; --accent:#0072B2; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", "DejaVu Sans", Arial, sans-serif; }
header { background:#17202e; color:#fff; padding:28px 40px 22px; }
header h1 { margin:0 0 6px; font-size:26px; font-weight:650; letter-spacing:-0.01em; }
header h1 code { background:rgba(255,255,255,.12); color:#fff; }
header p { margin:0; color:#c5cede; }
nav { margin-top:14px; display:flex; flex-wrap:wrap; gap:6px 16px; font-size:14px; }
nav a { color:#9fd3ff; text-decoration:none; } nav a:hover { text-decoration:underline; }
main { max-width:1240px; margin:0 auto; padding:24px 28px 48px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:20px 26px;
  margin:0 0 22px; box-shadow:0 1px 2px rgba(20,30,50,.04); }
h2 { font-size:20px; margin:0 0 12px; }
h3 { font-size:16px; margin:18px 0 6px; }
p { margin:8px 0; } .muted { color:var(--muted); font-size:14px; }
code { font: 13px/1.4 ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace;
  background:#eef1f5; padding:1px 5px; border-radius:4px; }
.note { background:#fff8e1; border:1px solid #f2d27a; border-left:5px solid #e0a800; padding:12px 16px;
  border-radius:8px; margin:0 0 22px; font-size:15.5px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit, minmax(200px, 1fr)); gap:14px; margin:0 0 22px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:14px 18px; }
.card .k { color:var(--muted); font-size:13px; text-transform:uppercase; letter-spacing:.04em; }
.card .v { font-size:24px; font-weight:650; margin-top:2px; }
.card .s { color:var(--muted); font-size:13px; }
.scroll { overflow-x:auto; }
table { border-collapse:collapse; width:100%; font-size:14px; font-variant-numeric:tabular-nums; }
th { text-align:left; background:#eef1f5; color:#2b3442; font-weight:600; padding:7px 10px;
  border-bottom:1px solid #d5dbe3; white-space:nowrap; }
td { padding:6px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
td.num { text-align:right; white-space:nowrap; }
tbody tr:nth-child(even) { background:#fafbfc; }
tr.ref td { background:#f1f3f6; color:#4a5261; font-style:italic; }
dl.settings { display:grid; grid-template-columns:max-content 1fr; gap:6px 18px; margin:0; }
dl.settings dt { color:var(--muted); } dl.settings dd { margin:0; }
figure { margin:6px 0 14px; } figure img { max-width:100%; height:auto; display:block; }
figure img.plot { width:100%; }
figcaption { color:var(--muted); font-size:13.5px; margin-top:4px; }
details { margin-top:10px; } summary { cursor:pointer; color:var(--accent); }
pre { background:#f6f8fa; border:1px solid var(--line); border-radius:6px; padding:10px 12px; overflow-x:auto;
  font-size:12.5px; }
.map { border-top:1px solid var(--line); padding-top:12px; margin-top:12px; }
.map:first-of-type { border-top:none; padding-top:0; }
.skip { color:#8a5a00; }
footer { color:var(--muted); font-size:13px; text-align:center; padding:0 0 30px; }
"""


def _cards(ctx: Context) -> str:
    cards = []
    feasible = [r for r in ctx.complete if r.feasible]
    if feasible:
        best = max(feasible, key=lambda r: (r.accuracy, r.throughput))
        cards.append(("best val top-1 within budget", f"{best.accuracy:.2f}%",
                      f"trial {best.number} · {best.reducer} · {best.throughput:.0f} img/s"))
        fastest = max(ctx.front or feasible, key=lambda r: r.throughput)
        speed = f"{fastest.speedup:.2f}× dense · " if fastest.speedup else ""
        cards.append(("fastest on the front", f"{fastest.throughput:.0f} img/s",
                      f"{speed}trial {fastest.number} · {fastest.accuracy:.2f}%"))
    dense_acc = _number(((ctx.dense or {}).get("val") or {}).get("top1"))
    if dense_acc is not None:
        cards.append(("dense baseline", f"{dense_acc:.2f}%",
                      f"{_fmt(_number(ctx.dense.get('throughput')), '.0f', ' img/s')}"))
    cards.append(("trials", str(len(ctx.rows)),
                  " · ".join(f"{ctx.count(o)} {o}" for o in OUTCOME_ORDER if ctx.count(o)) or "none yet"))
    cards.append(("Pareto front", str(len(ctx.front)), "configs within budget, none dominated"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{html.escape(k)}</div><div class="v">{html.escape(v)}</div>'
        f'<div class="s">{html.escape(s)}</div></div>' for k, v, s in cards) + "</div>"


def _figure_html(uri: str, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    css = "plot" if uri.startswith("data:image/svg") else "raster"
    return f'<figure><img class="{css}" src="{uri}" alt="{html.escape(alt)}">{cap}</figure>'


def render_html(ctx: Context, study: optuna.Study, maps: int) -> tuple[str, int]:
    """The page, and how many map entries it holds."""
    esc = html.escape
    sections: list[tuple[str, str, str]] = []  # (anchor, title, body)

    items = _settings_items(ctx)
    body = ('<dl class="settings">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl>"
            if items else "<p>The study records no autoprune settings.</p>")
    if ctx.settings:
        body += ("<details><summary>all settings (JSON)</summary><pre>" +
                 esc(json.dumps(ctx.settings, indent=2, sort_keys=True, default=str)) + "</pre></details>")
    sections.append(("settings", "Settings", body))

    if ctx.complete:
        body = (_figure_html(tradeoff_plot(ctx, "throughput"), "accuracy vs throughput",
                             "Every complete trial, coloured by reducer; the black step line is the Pareto front "
                             "(no other trial is both more accurate and faster). Stars are the hand-designed "
                             "warm-start configs.") +
                _figure_html(tradeoff_plot(ctx, "gflops"), "accuracy vs GFLOPs",
                             "The same trials against compute. The red dashed line is the budget; proposals "
                             "predicted over it were never trained (× along the bottom), failed trials (▼) have "
                             "no accuracy."))
    else:
        body = f'<p class="skip">{esc(_status_note(ctx) or "")}</p>'
    sections.append(("plots", "Accuracy trade-offs", body))

    if ctx.front:
        body = _html_table(*_front_table(ctx), highlight_first=bool(ctx.dense))
        body += ('<p class="muted">The front is chosen on validation accuracy and throughput' +
                 ("; test accuracy (never used for choosing) is shown alongside." if ctx.has_test else ".") +
                 " " + esc(throughput_note(ctx)) +
                 " Export one with <code>autoprune export --study " + esc(ctx.name) + " --trial N --out DIR</code>."
                 "</p>")
    else:
        body = "<p>No trial is on the front yet.</p>"
    sections.append(("front", "Pareto front", body))

    headers, rows = _warm_start_table(ctx)
    body = (_html_table(headers, rows) if rows else "") + f"<p>{esc(warm_start_gain(ctx))}</p>"
    sections.append(("warm", "Warm starts vs search", body))

    if ctx.stages:
        sections.append(("stages", "Screening and successive halving",
                         "".join(f"<p>{esc(line)}</p>" for line in ctx.stages.sentences())))

    if ctx.complete:
        body = _figure_html(hypervolume_plot(ctx), "hypervolume over trials",
                            "Area under the front (accuracy × throughput), relative to the dense model's "
                            "rectangle; dots mark the trials that grew it, coloured by reducer.")
    else:
        body = "<p>No complete trial yet: the front is empty.</p>"
    sections.append(("progress", "Search progress", body))

    importances = param_importances(study) if ctx.complete else None
    if importances:
        body = _figure_html(importance_plot(importances), "parameter importance",
                            "fANOVA on the complete trials, for validation accuracy. Parameters sampled only for "
                            "some reducers are left out by Optuna when they are not in every trial.")
    else:
        body = ("<p>Parameter importance: not enough trials (it needs several complete trials whose "
                "parameters vary).</p>")
    sections.append(("importance", "Parameter importance", body))

    entries = token_maps(ctx, maps)
    if entries:
        parts = ['<p class="muted">For each front config, 4 validation images and, below each, what the model\'s '
                 "last block receives: patches kept as themselves (unchanged), merged into a token that holds "
                 "several patches (one colour per such token), or pruned (dark).</p>"]
        for entry in entries:
            r = entry.row
            title = (f"Trial {r.number}: {r.label or r.reducer} — {_fmt(r.accuracy, '.2f', '%')} val top-1, "
                     f"{_fmt(r.throughput, '.0f', ' img/s')}")
            inner = (_figure_html(entry.image, f"token map of trial {r.number}", entry.note) if entry.image
                     else f'<p class="skip">{esc(entry.note)}</p>')
            parts.append(f'<div class="map" data-trial="{r.number}"><h3>{esc(title)}</h3>{inner}</div>')
        body = "".join(parts)
    else:
        body = "<p>No front config to map yet.</p>"
    sections.append(("maps", "Token-reduction maps", body))

    body = _html_table(*_outcome_table(ctx)) if ctx.rows else "<p>No trials yet.</p>"
    body += f"<p>{esc(over_budget_line(ctx))}</p>"
    failures = _failure_table(ctx)
    if failures[1]:
        body += "<h3>Failure reasons (latest)</h3>" + _html_table(*failures)
    sections.append(("outcomes", "Outcomes", body))

    note = _status_note(ctx)
    nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t, _ in sections)
    page = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>autoprune report: {esc(ctx.name)}</title><style>{CSS}</style></head><body>",
        f"<header><h1>autoprune report: <code>{esc(ctx.name)}</code></h1>",
        f"<p>Snapshot of {esc(ctx.storage)} taken {esc(ctx.taken)} · {len(ctx.rows)} trials · "
        "tables: trials.csv, pareto.csv</p>",
        f"<nav>{nav}</nav></header><main>",
        f'<div class="note"><strong>Note:</strong> {esc(note)}</div>' if note else "",
        _cards(ctx),
    ]
    for anchor, title, body in sections:
        page.append(f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>')
    page.append("</main><footer>Made by autoprune report from a read-only snapshot of the study.</footer>"
                "</body></html>")
    return "\n".join(page), len(entries)
