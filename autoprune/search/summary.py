"""What a search prints at its end: the Pareto front, and what each stage did (screened, promoted,
fine-tuned by rung, over budget, whether the screen could be trusted). Read from the studies, so
a resumed search reports the whole study, not just its own part."""

from __future__ import annotations

from collections import Counter
from typing import Any

import optuna

from ..config import PruneConfig
from ..study_attrs import OUTCOME, PROMOTED_ATTR, RUNG, SCREEN_SUFFIX, WARM_START
from .retime import FrontTiming
from .screen import THROUGHPUT_NOTE, screen_tau


def format_front(front: list[optuna.trial.FrozenTrial], dense: dict[str, Any], timing: FrontTiming | None = None) -> str:
    """The front as printed: img/s and speedup are the objective (predicted from the latency
    table); measured is the speedup from the front's re-timing against dense, else each trial's
    own timing in img/s (studies from before prediction: both the timing)."""
    predicted_dense = dense.get("predicted_throughput", dense["throughput"])
    measured_dense = "1.00x" if timing else f"{dense['throughput']:.0f}"
    lines = ["Pareto front (accuracy vs throughput, within budget):",
             f"{'trial':>5}  {'config':<44} {'top-1':>7} {'GFLOPs':>7} {'img/s':>8} {'speedup':>7} {'measured':>9}",
             f"{'dense':>5}  {'':<44} {dense['val']['top1']:>6.2f}% {dense['flops'] / 1e9:>7.3f} "
             f"{predicted_dense:>8.0f} {'1.00x':>7} {measured_dense:>9}"]
    for trial in front:
        attrs = trial.user_attrs
        label = PruneConfig.from_dict(attrs["prune_config"]).describe()
        if attrs.get(WARM_START):
            label += f" [{attrs[WARM_START]}]"
        speedup = timing.speedup(trial.number) if timing else None
        measured = f"{attrs['throughput']:.0f}" if speedup is None else f"{speedup:.2f}x"
        lines.append(f"{trial.number:>5}  {label[:44]:<44} {trial.values[0]:>6.2f}% {attrs['flops'] / 1e9:>7.3f} "
                     f"{trial.values[1]:>8.0f} {trial.values[1] / predicted_dense:>6.2f}x {measured:>9}")
    if not front:
        lines.append("  (no finished trial within budget yet)")
    elif "predicted_throughput" in dense:
        lines.append(f"  img/s and speedup predicted at batch {dense.get('serve_batch')} from the latency table; measured: "
                     + (f"speedup over dense, median of {timing.rounds} interleaved rounds at batch {timing.batch_size}"
                        if timing else "each trial's own timing (img/s)"))
        note = timing.machine_note(predicted_dense) if timing else None
        if note:
            lines.append(f"  note: {note}")
    return "\n".join(lines)


def companion_screen(study: optuna.Study) -> optuna.Study | None:
    """The study's screens, if it was ever screened."""
    try:
        return optuna.load_study(study_name=study.study_name + SCREEN_SUFFIX, storage=study._storage)
    except KeyError:
        return None


def format_stages(study: optuna.Study, epochs: float, screen_images: int) -> str:
    """screened N, promoted P; fine-tuned M at full fidelity and by rung; over budget K; tau."""
    outcomes = Counter(t.user_attrs.get(OUTCOME) for t in study.get_trials(deepcopy=False))
    screen = companion_screen(study)
    screened = Counter(t.user_attrs.get(OUTCOME) for t in screen.get_trials(deepcopy=False)) if screen else Counter()
    lines = []
    if screen is not None:
        promoted = len(study.user_attrs.get(PROMOTED_ATTR) or ())
        lines += [f"screened:     {screened['complete'] + screened['failed']} configs off the shelf on "
                  f"{screen_images} val images ({screened['failed']} failed); {promoted} promoted to fine-tuning",
                  f"              ({THROUGHPUT_NOTE})"]
    rungs = Counter(t.user_attrs.get(RUNG) for t in study.get_trials(deepcopy=False)
                    if t.user_attrs.get(OUTCOME) == "stopped")
    stopped = "; ".join(f"{count} stopped at epoch {rung}" for rung, count in sorted(rungs.items(), key=str))
    lines.append(f"fine-tuned:   {outcomes['complete']} at full fidelity ({epochs:g} epochs)"
                 + (f", {outcomes['failed']} failed" if outcomes["failed"] else "")
                 + (f"; successive halving: {stopped}" if stopped else ""))
    infeasible = outcomes["infeasible"] + screened["infeasible"]
    # an interrupted trial's re-run is the same proposal: counted once
    proposals = sum(outcomes[o] + screened[o] for o in ("complete", "failed", "stopped", "infeasible"))
    lines.append(f"over budget:  {infeasible} of {proposals} proposals (never trained or screened)")
    if screen is not None:
        lines.append(f"screen proxy: {screen_tau(study).verdict()}")
    return "\n".join(lines)
