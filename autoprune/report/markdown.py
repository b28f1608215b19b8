"""report.md: the settings, front, warm starts, outcomes and failures as Markdown tables."""

from __future__ import annotations

from typing import Sequence

from .context import (Context, _failure_table, _front_table, _outcome_table, _settings_items, _status_note,
                      _warm_start_table, over_budget_line, throughput_note, warm_start_gain)


def _md_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(cell, line)) + " |" for line in body]
    return "\n".join(lines)


def render_markdown(ctx: Context) -> str:
    out = [f"# autoprune report: study `{ctx.name}`", "",
           f"Snapshot of {ctx.storage} taken {ctx.taken}: {len(ctx.rows)} trials. "
           "Plots and token-reduction maps are in report.html; every trial is in trials.csv, the front in pareto.csv.",
           ""]
    note = _status_note(ctx)
    if note:
        out += [f"> **Note:** {note}", ""]
    out += ["## Settings", ""]
    items = _settings_items(ctx)
    out += [f"- **{k}**: {v}" for k, v in items] if items else ["(the study records no autoprune settings)"]
    out += ["", "## Pareto front (validation accuracy vs throughput, within budget)", ""]
    if ctx.front:
        out += [_md_table(*_front_table(ctx)), "",
                "The front is chosen on validation accuracy" + ("; test accuracy is shown alongside." if ctx.has_test
                                                                 else ".") + " " + throughput_note(ctx)]
    else:
        out.append("No trial is on the front yet.")
    out += ["", "## Warm starts (hand-designed configs)", ""]
    headers, body = _warm_start_table(ctx)
    if body:
        out += [_md_table(headers, body), ""]
    out += [warm_start_gain(ctx), ""]
    if ctx.stages:
        out += ["## Screening and successive halving", "", *ctx.stages.sentences(), ""]
    out += ["## Outcomes", "", _md_table(*_outcome_table(ctx)) if ctx.rows else "No trials.",
            "", over_budget_line(ctx), ""]
    failures = _failure_table(ctx)
    if failures[1]:
        out += ["## Failures", "", _md_table(*failures), ""]
    return "\n".join(out).rstrip() + "\n"
