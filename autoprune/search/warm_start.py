"""Where a search space starts and ends against a FLOPs budget: the cheapest config it can
express (a budget below it is refused up front) and the papers' hand-designed configs that fit,
enqueued once so every study measures them."""

from __future__ import annotations

from typing import Callable

import optuna
import torch

from ..config import PruneConfig
from ..flops import predict_flops
from ..study_attrs import WARM_START
from .space import Candidate, SearchSpace


def cheapest_flops(space: SearchSpace, model: torch.nn.Module) -> float:
    """A lower bound on what the space can reach: each reducer at its most aggressive settings."""
    depth, patches = len(model.blocks), model.patch_embed.num_patches
    floor = predict_flops(model)
    for prune in _extremes(space, depth, patches):
        floor = min(floor, predict_flops(model, prune))
    return floor


def _extremes(space: SearchSpace, depth: int, patches: int):
    """Configs at the low end of every range (earliest layers, lowest keep rates, most r). A
    mass-based SaiT config's cost depends on the images: it is bounded by keeping one patch token."""
    for reducer in space.reducer_choices:
        trial = _ExtremeTrial(reducer)
        try:
            prune = space.sample(trial, depth, patches).prune
        except ValueError:
            continue
        if prune.adaptive:
            prune = PruneConfig(reducer="sait", layers=prune.layers, keep_rate=1 / patches)
        yield prune


class _ExtremeTrial:
    """Answers suggestions with the cheapest end of each range."""

    CHEAP_HIGH = ("layers", "tome.r", "bat.pairs")  # more of these is cheaper

    def __init__(self, reducer: str) -> None:
        self.reducer = reducer

    def suggest_float(self, name, low, high, log=False):
        if name.startswith("ppt.r_") or name in self.CHEAP_HIGH:
            return high
        return low

    def suggest_int(self, name, low, high):
        return high if name in self.CHEAP_HIGH else low

    def suggest_categorical(self, name, choices):
        if name == "reducer":
            return self.reducer
        if name == "sait.mode":
            return "value" if "value" in choices else choices[0]
        if name == "evit.fuse":
            return False if False in choices else choices[0]
        return choices[0]


def warm_start_candidates(model: torch.nn.Module, budget: float, flops_of: Callable[[Candidate], float]) -> dict[str, Candidate]:
    """The hand-designed configs of the papers, scaled to the model, that fit the budget."""
    depth, patches = len(model.blocks), model.patch_embed.num_patches
    # EViT's blocks 4/7/10 of 12 (indices 3, 6, 9) scaled to the depth
    layers = tuple(sorted({min(depth - 1, round(depth * 0.25 * k)) for k in (1, 2, 3)}))
    sait_layer = (min(depth - 1, round(depth * 0.25)),)
    found: dict[str, Candidate] = {}

    def first_fitting(name: str, options):
        for label, cfg in options:
            candidate = Candidate(cfg)
            if flops_of(candidate) <= budget:
                found[f"{name} {label}"] = candidate
                return

    rates = (0.9, 0.8, 0.7, 0.6, 0.5)
    first_fitting("evit", [(f"{rate}", PruneConfig(reducer="evit", layers=layers, keep_rate=rate)) for rate in rates])
    first_fitting("tome", [(f"r{r}", PruneConfig(reducer="tome", r=r)) for r in range(1, patches // 2 + 1)])
    ppt_r = max(1, round(50 / 196 * patches))  # the paper's r = 50 of 196 patches
    first_fitting("ppt", [(f"r{r}", PruneConfig(reducer="ppt", layers=layers, r=r, tau=7e-5 * 196 ** 2, tau_mode="cv2"))
                          for r in range(ppt_r, patches // 2 + 1)])
    first_fitting("tps", [(f"{rate}", PruneConfig(reducer="tps", layers=layers, keep_rate=rate)) for rate in rates])
    first_fitting("sait", [(f"M{mass}", PruneConfig(reducer="sait", layers=sait_layer, mass_threshold=mass))
                           for mass in (0.9, 0.8, 0.7, 0.6, 0.5)])
    return found


def enqueue_warm_starts(study: optuna.Study, space: SearchSpace, model: torch.nn.Module, budget: float,
                        flops_of: Callable[[Candidate], float]) -> list[str]:
    depth, patches = len(model.blocks), model.patch_embed.num_patches
    enqueued = []
    for name, candidate in warm_start_candidates(model, budget, flops_of).items():
        params = space.params_for(candidate, depth, patches)
        if params is not None:
            study.enqueue_trial(params, user_attrs={WARM_START: name}, skip_if_exists=True)
            enqueued.append(name)
    return enqueued
