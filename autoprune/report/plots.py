"""The report's plots (matplotlib, imported only when drawing): accuracy against throughput and
against FLOPs, the hypervolume of the front over the trials, and parameter importance. Each plot
is returned as a data URI, so the page embeds it."""

from __future__ import annotations

import base64
import io
import math
from typing import Iterable, Sequence

import optuna

from ..search.budget import format_flops
from .context import Context
from .rows import Row, _number, _quiet_optuna

REDUCER_COLORS = {  # Okabe-Ito: tells the reducers apart, also for colour-blind readers
    "evit": "#0072B2", "tome": "#E69F00", "ppt": "#009E73", "tps": "#CC79A7",
    "bat": "#56B4E9", "sait": "#D55E00", "none": "#555555",
}


def _style():
    import matplotlib

    return matplotlib.rc_context({
        "font.size": 11, "axes.titlesize": 13, "axes.titleweight": "bold", "axes.labelsize": 11.5,
        "legend.fontsize": 9.5, "axes.spines.top": False, "axes.spines.right": False,
        "axes.grid": True, "grid.color": "#dfe3e8", "grid.linewidth": 0.8, "axes.axisbelow": True,
        "axes.edgecolor": "#8a94a3", "xtick.color": "#3d4451", "ytick.color": "#3d4451",
        "svg.fonttype": "path", "svg.hashsalt": "autoprune",
    })


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _svg_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _png_uri(fig, dpi: int = 110) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _color(reducer: str) -> str:
    return REDUCER_COLORS.get(reducer, "#777777")


def tradeoff_plot(ctx: Context, x: str) -> str:
    """Accuracy against throughput (x="throughput") or GFLOPs (x="gflops"), as an SVG data URI."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    by_flops = x == "gflops"
    flops_seen = [r.flops or r.predicted_flops or 0 for r in ctx.rows] + [ctx.budget_flops or 0]
    unit, unit_name = (1e9, "GFLOPs") if max(flops_seen) >= 1e8 else (1e6, "MFLOPs")
    with _style():
        fig = _figure(10.5, 5.6)
        ax = fig.add_subplot()

        def xof(r: Row) -> float | None:
            if by_flops:
                return None if r.flops is None else r.flops / unit
            return r.throughput

        complete = [r for r in ctx.complete if xof(r) is not None]
        handles: list = []
        for reducer in sorted({r.reducer for r in complete}, key=lambda n: list(REDUCER_COLORS).index(n)
                              if n in REDUCER_COLORS else 99):
            group = [r for r in complete if r.reducer == reducer]
            inside = [r for r in group if r.feasible]
            over = [r for r in group if not r.feasible]
            ax.scatter([xof(r) for r in inside], [r.accuracy for r in inside], s=46, color=_color(reducer),
                       edgecolor="white", linewidth=0.7, alpha=0.9, zorder=3)
            if over:
                ax.scatter([xof(r) for r in over], [r.accuracy for r in over], s=46, facecolor="none",
                           edgecolor=_color(reducer), linewidth=1.4, zorder=3)
            handles.append(Line2D([], [], marker="o", linestyle="", markersize=8, color=_color(reducer),
                                  markeredgecolor="white", label=f"{reducer} ({len(group)})"))
        if any(not r.feasible for r in complete):
            handles.append(Line2D([], [], marker="o", linestyle="", markersize=8, markerfacecolor="none",
                                  markeredgecolor="#555", label="measured over budget (hollow)"))
        front = [r for r in ctx.front if xof(r) is not None]
        if front:
            ax.scatter([xof(r) for r in front], [r.accuracy for r in front], s=120, facecolor="none",
                       edgecolor="#111", linewidth=1.3, zorder=4)
        if not by_flops and front:
            ordered = sorted(front, key=lambda r: r.throughput)
            ax.step([r.throughput for r in ordered], [r.accuracy for r in ordered], where="post", color="#111",
                    linewidth=1.6, zorder=2)
            handles.append(Line2D([], [], color="#111", linewidth=1.6, marker="o", markerfacecolor="none",
                                  markersize=10, label=f"Pareto front ({len(front)})"))
        elif by_flops:
            inside = sorted((r for r in complete if r.feasible), key=lambda r: r.flops / unit)
            steps_x, steps_y, best = [], [], -math.inf
            for r in inside:
                if r.accuracy > best:
                    best = r.accuracy
                    steps_x.append(r.flops / unit)
                    steps_y.append(best)
            if steps_x:
                right = ctx.budget_flops / unit if ctx.budget_flops else steps_x[-1]
                ax.step(steps_x + [max(right, steps_x[-1])], steps_y + [steps_y[-1]], where="post", color="#111",
                        linewidth=1.6, zorder=2)
                handles.append(Line2D([], [], color="#111", linewidth=1.6,
                                      label=f"best accuracy within x {unit_name}"))
            if front:
                handles.append(Line2D([], [], color="none", marker="o", markerfacecolor="none",
                                      markeredgecolor="#111", markersize=10,
                                      label=f"on the accuracy/throughput front ({len(front)})"))
        tested = [r for r in front if r.test_accuracy is not None]
        if tested:
            for r in tested:
                ax.plot([xof(r), xof(r)], [r.accuracy, r.test_accuracy], color="#9aa3af", linewidth=1,
                        linestyle=":", zorder=2)
            ax.scatter([xof(r) for r in tested], [r.test_accuracy for r in tested], marker="_", s=110,
                       color="#4b5563", linewidth=2, zorder=3)
            handles.append(Line2D([], [], marker="_", linestyle="", markersize=11, markeredgewidth=2,
                                  color="#4b5563", label="test top-1 of front trials"))
        for r in complete:
            if r.warm_start:
                ax.scatter([xof(r)], [r.accuracy], marker="*", s=300, color=_color(r.reducer), edgecolor="#111",
                           linewidth=0.9, zorder=5)
                ax.annotate(r.warm_start, (xof(r), r.accuracy), xytext=(7, 6), textcoords="offset points",
                            fontsize=9, color="#222", zorder=6,
                            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none",
                                  "alpha": 0.75})
        if any(r.warm_start for r in complete):
            handles.append(Line2D([], [], marker="*", linestyle="", markersize=14, color="#bbb",
                                  markeredgecolor="#111", label="warm start (hand-designed)"))
        dense_acc = _number(((ctx.dense or {}).get("val") or {}).get("top1"))
        dense_x = _number((ctx.dense or {}).get("flops")) if by_flops else ctx.dense_throughput
        if dense_acc is not None and dense_x is not None:
            dense_x = dense_x / unit if by_flops else dense_x
            ax.scatter([dense_x], [dense_acc], marker="D", s=70, color="#111", zorder=5)
            # dense is the costliest point (rightmost by FLOPs) and the slowest (leftmost by
            # throughput): label it on the side facing the other trials, never under the legend
            ax.annotate("dense", (dense_x, dense_acc), xytext=(-8 if by_flops else 7, -12), textcoords="offset points",
                        ha="right" if by_flops else "left", fontsize=9.5, fontweight="bold")
            handles.append(Line2D([], [], marker="D", linestyle="", markersize=8, color="#111",
                                  label="dense baseline"))
        if by_flops and ctx.budget_flops:
            ax.axvline(ctx.budget_flops / unit, color="#c0392b", linestyle="--", linewidth=1.5, zorder=1)
            handles.append(Line2D([], [], color="#c0392b", linestyle="--", linewidth=1.5,
                                  label=f"budget {format_flops(ctx.budget_flops)}"))

        # trials without a measured accuracy/throughput
        accuracies = [r.accuracy for r in complete] + [r.test_accuracy for r in tested]
        accuracies += [dense_acc] if dense_acc is not None else []
        stopped = [r for r in ctx.rows if r.outcome == "stopped"]
        infeasible = [r for r in ctx.rows if r.outcome == "infeasible"]
        failed = [r for r in ctx.rows if r.outcome in ("failed", "interrupted")]
        if by_flops:
            placed = [r for r in stopped if r.stopped_accuracy is not None and r.plot_flops is not None]
            if placed:
                ax.scatter([r.plot_flops / unit for r in placed], [r.stopped_accuracy for r in placed], s=34,
                           facecolor="none", edgecolor="#8a8a8a", linewidth=1.2, zorder=2)
                accuracies += [r.stopped_accuracy for r in placed]
            rugs = [(infeasible, "x", "#8a8a8a", 0.035), (failed, "v", "#333333", 0.075),
                    ([r for r in stopped if r not in placed], "o", "#8a8a8a", 0.115)]
            axis = ax.get_xaxis_transform()
            for group, marker, color, height in rugs:
                located = [r.plot_flops / unit for r in group if r.plot_flops is not None]
                if located:
                    style = ({"facecolor": "none", "edgecolor": color} if marker == "o" else {"color": color})
                    ax.scatter(located, [height] * len(located), transform=axis, marker=marker, s=30,
                               linewidth=1.1, zorder=2, clip_on=False, **style)
        where = f"at predicted {unit_name} along the bottom" if by_flops else "not on this plot: no throughput"
        if stopped:
            handles.append(Line2D([], [], marker="o", linestyle="", markersize=7, markerfacecolor="none",
                                  markeredgecolor="#8a8a8a",
                                  label=f"stopped early ({len(stopped)}; " +
                                        ("last accuracy" if by_flops else "no throughput") + ")"))
        if infeasible:
            handles.append(Line2D([], [], marker="x", linestyle="", markersize=7, color="#8a8a8a",
                                  label=f"infeasible, never trained ({len(infeasible)}; {where})"))
        if failed:
            handles.append(Line2D([], [], marker="v", linestyle="", markersize=7, color="#333333",
                                  label=f"failed, no accuracy ({len(failed)}; {where})"))

        xs = [xof(r) for r in complete] + ([dense_x] if dense_acc is not None and dense_x is not None else [])
        if by_flops:
            xs += [r.plot_flops / unit for r in ctx.rows if r.outcome != "complete" and r.plot_flops is not None]
            xs += [ctx.budget_flops / unit] if ctx.budget_flops else []
        if xs:
            left, right = min(xs), max(xs)
            pad = max(right - left, abs(right) * 0.05, 1e-12) * 0.06
            ax.set_xlim(left - pad, right + pad * 1.5)
        if accuracies:
            low, high = min(accuracies), max(accuracies)
            span = max(high - low, 1.0)
            ax.set_ylim(low - span * (0.22 if by_flops else 0.08), high + span * 0.1)
        ax.set_ylabel("validation top-1 accuracy (%)")
        if by_flops:
            ax.set_xlabel(f"{unit_name} per image (measured; predicted for untrained proposals)")
            ax.xaxis.set_major_locator(MaxNLocator(nbins=8))
            ax.set_title("Accuracy vs compute")
        else:
            ax.set_xlabel("throughput (images/s, higher is faster)")
            ax.set_title("Accuracy vs throughput")
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                  borderaxespad=0.0)
        return _svg_uri(fig)


def hypervolume_2d(points: Iterable[tuple[float, float]]) -> float:
    """Area dominated by `points` (both coordinates maximised) above the reference point (0, 0)."""
    volume, covered = 0.0, 0.0
    for first, second in sorted((p for p in points if p[0] > 0 and p[1] > 0), key=lambda p: -p[0]):
        if second > covered:
            volume += first * (second - covered)
            covered = second
    return volume


def hypervolume_history(rows: Sequence[Row]) -> list[tuple[int, float]]:
    """(trial number, hypervolume of the feasible complete trials up to it), per trial."""
    history, points = [], []
    for r in sorted(rows, key=lambda r: r.number):
        if r.outcome == "complete" and r.feasible and r.accuracy is not None and r.throughput is not None:
            points.append((r.accuracy, r.throughput))
        history.append((r.number, hypervolume_2d(points)))
    return history


def hypervolume_plot(ctx: Context) -> str:
    history = hypervolume_history(ctx.rows)
    dense_acc = _number(((ctx.dense or {}).get("val") or {}).get("top1"))
    dense_thr = ctx.dense_throughput
    scale = dense_acc * dense_thr if dense_acc and dense_thr else 1.0
    with _style():
        fig = _figure(10.5, 3.8)
        ax = fig.add_subplot()
        xs = [n for n, _ in history]
        ys = [v / scale for _, v in history]
        ax.step(xs, ys, where="post", color="#0072B2", linewidth=2)
        previous = 0.0
        by_number = {r.number: r for r in ctx.rows}
        for n, y in zip(xs, ys):
            if y > previous + 1e-12:
                ax.scatter([n], [y], s=40, color=_color(by_number[n].reducer), edgecolor="white", zorder=3)
            previous = y
        warm = [r.number for r in ctx.rows if r.warm_start]
        if warm:
            ax.axvspan(min(warm) - 0.5, max(warm) + 0.5, color="#f1c40f", alpha=0.15, linewidth=0)
            ax.text(min(warm) - 0.4, 0.97, "warm starts", transform=ax.get_xaxis_transform(), va="top",
                    fontsize=9, color="#7a5d00")
        if scale != 1.0:
            ax.axhline(1.0, color="#111", linestyle=":", linewidth=1)
            ax.text(xs[-1] if xs else 0, 1.0, " dense model", va="bottom", ha="right", fontsize=9)
            ax.set_ylabel("hypervolume / dense model's")
        else:
            ax.set_ylabel("hypervolume (% × img/s)")
        ax.set_xlabel("trial number")
        ax.set_title("Search progress: hypervolume of the front (reference: 0 %, 0 img/s)")
        ax.set_ylim(bottom=0)
        return _svg_uri(fig)


def param_importances(study: optuna.Study) -> dict[str, float] | None:
    """fANOVA importance of the parameters for accuracy; None when the study cannot support it."""
    try:
        with _quiet_optuna():
            result = optuna.importance.get_param_importances(
                study, target=lambda t: t.values[0])
    except Exception:  # too few trials, a single value per parameter, or conditional params only
        return None
    return dict(result) or None


def importance_plot(importances: dict[str, float]) -> str:
    ranked = sorted(importances.items(), key=lambda kv: kv[1])
    items = [kv for kv in ranked if kv[1] >= 0.005][-14:] or ranked[-3:]
    hidden = len(ranked) - len(items)
    with _style():
        fig = _figure(10.5, 0.42 * len(items) + 1.4)
        ax = fig.add_subplot()
        ax.barh([k for k, _ in items], [v for _, v in items], color="#0072B2", height=0.6)
        for i, (_, v) in enumerate(items):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=9.5)
        ax.set_xlabel("importance for validation accuracy (fANOVA, sums to 1)"
                      + (f"; {hidden} more parameters below 0.005 not shown" if hidden else ""))
        ax.set_title("Which parameters mattered for accuracy")
        ax.grid(axis="y", visible=False)
        ax.set_xlim(0, max(v for _, v in items) * 1.15 or 1)
        return _svg_uri(fig)
