"""A study report: what a search found, as CSV tables, Markdown and one self-contained HTML page.

    from autoprune.report import write_report
    write_report("sqlite:///studies/autoprune.db", "quickstart")   # -> studies/quickstart/report.html

The report reads a snapshot of the study (copied into memory first), so a study that a search is
still driving is neither locked nor slowed, and is never written to. It writes, in `out_dir`:

- `trials.csv`: every trial (outcome, config, metrics); `pareto.csv`: the Pareto front only.
- `report.md`: settings, the front, the warm-start configs and what the search gained over them,
  outcome counts and failure reasons.
- `report.html`: the same plus plots (accuracy vs throughput and vs GFLOPs, hypervolume over the
  trials, parameter importance) and token-reduction maps of the front's models on validation
  images. Plots are embedded (SVG and PNG data URIs) and the styles inline: it renders offline.

One module per part: `rows` (the study snapshot, one row per trial), `context` (what the report
says, as tables), `plots`, `maps` (token-reduction maps: loads models), `markdown`, `page` (HTML).
"""

from __future__ import annotations

from pathlib import Path

from .context import build_context
from .markdown import render_markdown
from .page import render_html
from .rows import rows_table, snapshot_study

__all__ = ["write_report"]


def write_report(storage_url: str, study_name: str, out_dir: str | Path | None = None, maps: int = 3) -> Path:
    """Write trials.csv, pareto.csv, report.md and report.html for the study; return report.html's path.

    Reads a snapshot of the study (so a running search is not disturbed). Raises `StudyNotFound`
    for an unknown study and `StorageError` for a storage that cannot be opened."""
    study = snapshot_study(storage_url, study_name)
    out = Path(out_dir) if out_dir is not None else Path("studies") / study_name
    out.mkdir(parents=True, exist_ok=True)
    ctx = build_context(study, storage_url)
    table = rows_table(ctx.rows)
    table.to_csv(out / "trials.csv", index=False)
    front_numbers = [r.number for r in ctx.front]
    table.set_index("number").loc[front_numbers].reset_index().to_csv(out / "pareto.csv", index=False)
    (out / "report.md").write_text(render_markdown(ctx), encoding="utf-8")
    page, _ = render_html(ctx, study, maps)
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
