"""Warm starts: the papers' hand-designed configs, solved to this study's budget, as trials of its space.

A person given a budget would not run a paper's fixed setting; they would keep its shape and
scale its amount to the budget. So each warm start keeps a paper's reducer, layers (scaled to the
model's depth), constant schedule and settings, spends the whole budget, and has its amount
solved like any proposal. Every study measures them, whatever the budget and the depth.
"""

from __future__ import annotations

import optuna

from ..config import PruneConfig
from ..study_attrs import WARM_START
from .proposals import Proposer, Replay, layer_positions
from .space import Candidate, _values

PPT_TAU = 7e-5  # the paper's threshold on the score variance at 196 patches (cv2 form: 7e-5 * 196**2)


def hand_designed(proposer: Proposer) -> dict[str, Candidate]:
    """The papers' configs for this model (amounts as published, before they are solved)."""
    depth, patches = proposer.depth, proposer.patches
    three = layer_positions(depth, 0.25, 0.25, 3)   # EViT's blocks 4/7/10 of 12 (indices 3, 6, 9)
    sait_layer = layer_positions(depth, 0.25, 0.0, 1)  # SaiT's layer 3 of 12
    cv2 = "cv2" in _values(proposer.space.specs[("ppt", "tau_mode")])
    return {
        "evit": Candidate(PruneConfig(reducer="evit", layers=three, keep_rate=0.7)),
        "tome": Candidate(PruneConfig(reducer="tome", r=max(1, round(13 / 196 * patches)))),
        "ppt": Candidate(PruneConfig(reducer="ppt", layers=three, r=max(1, round(50 / 196 * patches)),
                                     tau=PPT_TAU * 196 ** 2 if cv2 else PPT_TAU, tau_mode="cv2" if cv2 else "var")),
        "tps": Candidate(PruneConfig(reducer="tps", layers=three, keep_rate=0.7)),
        # BAT publishes no cluster, neighbour or pair counts: a few of each, as its FLOPs suggest
        "bat": Candidate(PruneConfig(reducer="bat", layers=three, keep_rate=0.7, clusters=4, knn=5, pairs=4)),
        "sait": Candidate(PruneConfig(reducer="sait", layers=sait_layer, keep_rate=0.5)),
        "sait mass": Candidate(PruneConfig(reducer="sait", layers=sait_layer, mass_threshold=0.7)),
    }


def warm_start_params(proposer: Proposer) -> dict[str, dict]:
    """Trial params of each hand-designed config the space holds, solved to the whole budget (the
    highest share the space allows), named by the paper's reducer and the solved amount."""
    found = {}
    for candidate in hand_designed(proposer).values():
        reducer = candidate.prune.reducer
        mode = "mass" if candidate.prune.adaptive else "value"
        if reducer not in proposer.reducers or (reducer == "sait" and mode not in proposer.sait_modes):
            continue
        params = proposer.params_for(candidate, share=1.0)
        if params is not None:
            found[f"{reducer} {_amount(proposer.propose(Replay(params)).prune)}"] = params
    return found


def enqueue_warm_starts(study: optuna.Study, proposer: Proposer) -> list[str]:
    """Queue the warm starts once; the searcher runs queued trials before new proposals."""
    enqueued = []
    for name, params in warm_start_params(proposer).items():
        study.enqueue_trial(params, user_attrs={WARM_START: name}, skip_if_exists=True)
        enqueued.append(name)
    return enqueued


def _amount(cfg: PruneConfig) -> str:
    """The solved amount as the papers write it: 0.7, r13, M0.7."""
    if cfg.adaptive:
        return f"M{cfg.mass_threshold:g}"
    if cfg.r is not None:
        return "r" + (",".join(map(str, cfg.r)) if isinstance(cfg.r, tuple) else str(cfg.r))
    rates = cfg.keep_rate if isinstance(cfg.keep_rate, tuple) else (cfg.keep_rate,)
    return ",".join(f"{rate:.3g}" for rate in rates)
