"""Budget-exact proposals: a trial's free parameters, turned into a candidate within the budget.

A proposal chooses the reducer, where it acts (layer count, first layer, spacing), the shape of
its schedule (how the reduction spreads over the reducing layers), the share of the budget it
spends (`budget_share`, so cheaper and faster configs stay reachable) and the reducer's other
settings. The amount (keep rate, r, mass threshold) is then solved (`solve.py`) so that the
config costs at most share x budget, as close to it as token counts allow. A layout that cannot
reach its share even at the most reduction the space allows is moved earlier, block by block
(below the space's first layer if need be: the budget comes first); failing that, it takes the
option's cheapest layout, which starts at block 0, and lands as close to its share as that allows.
Options (a reducer, or a SaiT mode) whose cheapest config is over the budget are left out of the
study. So no proposal is over budget by construction.

`Proposer.propose(trial)` is the one call a sampler-driven stage makes per proposal;
`params_for` inverts it, so hand-designed configs become trials of the same space.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..config import ConfigError, PruneConfig
from ..flops import predict_flops
from ..schedule import block_token_counts
from .solve import (Cost, Family, Solution, keep_rate_family, mass_family, removal_family, schedule_weights,
                    shape_of, solve)
from .space import Candidate, Range, SearchSpace, Spec, _values

PROPOSALS = "budget-exact"  # recorded with each study's settings
SETTINGS = {"evit": ("fuse",), "ppt": ("tau", "tau_mode"), "tps": ("temperature",),
            "bat": ("clusters", "knn", "pairs")}  # reducer settings a proposal chooses (not solved)
_COST_SETTINGS = ("fuse", "clusters", "pairs")  # the ones that change a config's cost


class ProposalError(ValueError):
    """No option of the space can reach the budget on this model."""


Option = tuple[str, str | None]  # (reducer, sait mode or None)


def layer_positions(depth: int, first: float, spacing: float, count: int) -> tuple[int, ...]:
    """Reducing blocks from fractions of depth: first + i * spacing, rounded, in range, distinct."""
    return tuple(sorted({min(depth - 1, max(0, round(depth * (first + i * spacing)))) for i in range(count)}))


class Proposer:
    """Proposals from `space` for `model` whose `cost` is at most `limit` (FLOPs per image today;
    any cost that does not rise as reduction grows)."""

    def __init__(self, space: SearchSpace, model: torch.nn.Module, limit: float, cost: Cost) -> None:
        self.space, self.limit, self.cost = space, limit, cost
        self.depth, self.patches = len(model.blocks), model.patch_embed.num_patches
        self.cheapest: dict[Option, PruneConfig] = {}
        self.unreachable: dict[Option, float] = {}  # options left out, with their cheapest cost
        for option in self._options():
            config = self._cheapest_config(option)
            config_cost = cost(config)
            if config_cost <= limit:
                self.cheapest[option] = config
            else:
                self.unreachable[option] = config_cost
        if not self.cheapest:
            raise ProposalError(f"no reducer of the search space {space.source} reaches the budget on this model "
                                f"(the cheapest config costs {min(self.unreachable.values()):.4g})")
        self.reducers = tuple(dict.fromkeys(reducer for reducer, _ in self.cheapest))
        self.sait_modes = tuple(mode for reducer, mode in self.cheapest if reducer == "sait")

    def _options(self):
        for reducer in self.space.reducer_choices:
            if reducer == "sait":
                yield from (("sait", mode) for mode in _values(self.space.specs[("sait", "mode")]))
            else:
                yield reducer, None

    # -- proposing --------------------------------------------------------------------------------

    def propose(self, trial) -> Candidate:
        """The candidate for `trial`'s parameters (an Optuna trial, or anything with its suggest_*)."""
        return self.propose_with_solution(trial)[0]

    def propose_with_solution(self, trial) -> tuple[Candidate, Solution]:
        """The candidate, and how its amount was solved (target, cost, the next step's cost)."""
        spec = self.space.specs
        reducer = _choose(trial, "reducer", self.reducers)
        mode = _choose(trial, "sait.mode", self.sait_modes) if reducer == "sait" else None
        layers, count = None, self.depth
        if reducer != "tome":
            count = 1 if reducer == "sait" else spec[("layers", "count")].suggest(trial, "layers")
            first = spec[("layers", "first")].suggest(trial, "first_layer")
            spacing = spec[("layers", "spacing")].suggest(trial, "layer_spacing") if count > 1 else 0.0
            layers = layer_positions(self.depth, first, spacing, count)
        shape = spec["schedule"].suggest(trial, "schedule") if count > 1 else 0.0
        share = spec["budget_share"].suggest(trial, "budget_share")
        settings = {name: spec[(reducer, name)].suggest(trial, f"{reducer}.{name}") for name in SETTINGS.get(reducer, ())}
        # a share given as cost / limit (params_for) must not round below that cost; never above the limit
        target = min(self.limit, share * self.limit * (1 + 1e-9))
        family = self._fitted((reducer, mode), layers, shape, settings, target)
        solution = solve(family, self.cost, target)
        if solution.cost > self.limit:
            # only a cost that is not monotone in the reduction gets here (predicted time: a
            # reducer's own work, or a setting such as BAT's knn, can outweigh the tokens it
            # removes); the option's cheapest config is within the budget by construction
            cheapest = self.cheapest[(reducer, mode)]
            solution = Solution(cheapest, self.cost(cheapest), target, family.high)
        distill, beta = self._distill(trial, reducer)
        lr_spec = spec.get(("train", "lr"))
        return Candidate(prune=solution.config, distill=distill, beta=beta,
                         lr=lr_spec.suggest(trial, "lr") if lr_spec is not None else None), solution

    def _distill(self, trial, reducer: str) -> tuple[str, float]:
        """Distillation kind (tis only applies to sait) and weight beta."""
        declared = _values(self.space.specs[("distill", "kind")])
        kinds = [k for k in declared if k != "tis" or reducer == "sait"] or ["none"]
        name = "sait.distill" if reducer == "sait" else "distill"
        kind = kinds[0] if len(kinds) == 1 else trial.suggest_categorical(name, kinds)
        if kind == "none":
            return "none", 0.0
        return kind, self.space.specs[("distill", "beta")].suggest(trial, "beta")

    def _family(self, option: Option, layers: tuple[int, ...] | None, shape: float,
                settings: dict[str, Any]) -> Family:
        reducer, mode = option
        base = {"reducer": reducer, **settings, **({"layers": layers} if layers is not None else {})}
        if reducer in ("tome", "ppt"):
            low, high = _bounds(self.space.specs[(reducer, "r")])
            r_low = math.floor(low * self.patches + 0.5)
            r_high = max(r_low, 1, math.floor(high * self.patches + 0.5))
            count = self.depth if layers is None else len(layers)
            return removal_family(base, schedule_weights(count, shape), r_low, r_high)
        if mode == "mass":
            return mass_family(base, *_bounds(self.space.specs[("sait", "mass_threshold")]))
        return keep_rate_family(base, schedule_weights(len(layers), shape), *_bounds(self.space.specs["keep_rate"]))

    def _fitted(self, option: Option, layers: tuple[int, ...] | None, shape: float, settings: dict[str, Any],
                target: float) -> Family:
        """The proposal's family if it can reach `target`; else its layout moved earlier until it
        can; else the option's cheapest layout (within the budget: see __init__)."""
        family = self._family(option, layers, shape, settings)
        if self.cost(family.cheapest) <= target:
            return family
        if layers is not None:
            for step in range(1, layers[0] + 1):
                family = self._family(option, tuple(layer - step for layer in layers), shape, settings)
                if self.cost(family.cheapest) <= target:
                    return family
        cheapest = self.cheapest[option]
        settings = {**settings, **{name: getattr(cheapest, name) for name in settings if name in _COST_SETTINGS}}
        return self._family(option, cheapest.layers, 0.0, settings)

    # -- budget geometry ---------------------------------------------------------------------------

    def _cheapest_config(self, option: Option) -> PruneConfig:
        """The option's cheapest config: the most reduction, with layouts that start at block 0,
        and the settings that cost least."""
        reducer, _ = option
        spec = self.space.specs
        settings: dict[str, Any] = {}
        if reducer == "evit":
            settings["fuse"] = False if False in _choices(spec[("evit", "fuse")]) else True
        if reducer == "bat":
            settings.update(clusters=int(_bounds(spec[("bat", "clusters")])[0]), knn=int(_bounds(spec[("bat", "knn")])[0]),
                            pairs=int(_bounds(spec[("bat", "pairs")])[1]))
        if reducer == "tome":
            layouts = [None]
        else:
            counts = [1] if reducer == "sait" else _choices(spec[("layers", "count")])
            low, high = _bounds(spec[("layers", "spacing")])
            # the ends of the spacing range, and every whole number of blocks between them
            spacings = {low, high} | {blocks / self.depth for blocks in range(1, self.depth)
                                      if low <= blocks / self.depth <= high}
            layouts = {layer_positions(self.depth, 0.0, spacing, count) for count in counts for spacing in spacings}
        configs = [self._family(option, layers, 0.0, settings).cheapest for layers in layouts]
        return min(configs, key=self.cost)

    # -- the inverse ------------------------------------------------------------------------------

    def params_for(self, candidate: Candidate, share: float | None = None) -> dict[str, Any] | None:
        """Trial params that make `propose` return `candidate` (the same layers, settings and token
        counts), or None if the space cannot express it. With `share`, the params keep the
        candidate's reducer, layers, shape and settings as far as the space allows (values outside
        it move to its nearest) but ask for that share of the budget: warm starts are built so."""
        cfg = candidate.prune
        params: dict[str, Any] = {"reducer": cfg.reducer}
        if cfg.layers is not None:
            params["layers"] = len(cfg.layers)
            params["first_layer"] = cfg.layers[0] / self.depth
            if len(cfg.layers) > 1:
                params["layer_spacing"] = (cfg.layers[1] - cfg.layers[0]) / self.depth
        if cfg.reducer == "sait":
            params["sait.mode"] = "mass" if cfg.adaptive else "value"
        params["schedule"] = shape_of(_reductions(cfg, self.depth))
        params["budget_share"] = share if share is not None else self.cost(cfg) / self.limit
        for name in SETTINGS.get(cfg.reducer, ()):
            params[f"{cfg.reducer}.{name}"] = getattr(cfg, name)
        params["sait.distill" if cfg.reducer == "sait" else "distill"] = candidate.distill
        if candidate.distill != "none":
            params["beta"] = candidate.beta
        if candidate.lr is not None:
            params["lr"] = candidate.lr
        # nearest: a layout the budget moved below the space's first layer is asked for at that
        # layer and moved again; whether the proposal comes out the same is checked below
        replay = Replay(params, nearest=True)
        try:
            proposed = self.propose(replay)
        except (NotExpressible, ConfigError):
            return None
        if share is None and not self.equivalent(proposed, candidate):
            return None
        return replay.used

    def equivalent(self, a: Candidate, b: Candidate) -> bool:
        """The same reducer, layers, settings and training, and the same cost and token counts."""
        amounts = ("keep_rate", "r", "mass_threshold")
        rest = [{k: v for k, v in c.prune.to_dict().items() if k not in amounts} for c in (a, b)]
        if rest[0] != rest[1] or (a.distill, a.beta, a.lr) != (b.distill, b.beta, b.lr):
            return False
        if a.prune.adaptive or b.prune.adaptive:
            return a.prune.adaptive == b.prune.adaptive and self.cost(a.prune) == self.cost(b.prune)
        return (block_token_counts(a.prune, self.depth, self.patches)
                == block_token_counts(b.prune, self.depth, self.patches))


def cheapest_cost(space: SearchSpace, model: torch.nn.Module, price: Cost | None = None) -> float:
    """A lower bound on what the space can reach, before any weights exist: every option at its
    cheapest, priced by `price` (FLOPs per image by default; any cost that falls as reduction
    grows), a mass-based SaiT config counted as if it kept a single patch token."""
    patches = model.patch_embed.num_patches
    price = price or (lambda cfg: predict_flops(model, cfg))

    def bound(cfg: PruneConfig) -> float:
        if cfg.adaptive:
            cfg = PruneConfig(reducer="sait", layers=cfg.layers, r=patches - 1, score=cfg.score)
        return price(cfg)

    return min(bound(config) for config in Proposer(space, model, math.inf, bound).cheapest.values())


def _reductions(cfg: PruneConfig, depth: int) -> tuple[float, ...]:
    """What each reducing layer removes: 1 - keep rate, or r (one entry for a mass threshold)."""
    if cfg.adaptive:
        return (1.0,)
    count = depth if cfg.layers is None else len(cfg.layers)
    value = cfg.r if cfg.r is not None else cfg.keep_rate
    values = value if isinstance(value, tuple) else (value,) * count
    return tuple(float(v) for v in values) if cfg.r is not None else tuple(1 - v for v in values)


def _choose(trial, name: str, values: tuple):
    return values[0] if len(values) == 1 else trial.suggest_categorical(name, list(values))


def _bounds(spec: Spec) -> tuple[Any, Any]:
    """Lowest and highest value a spec allows (a set of values bounds a solved value likewise)."""
    if isinstance(spec, Range):
        return spec.low, spec.high
    values = _choices(spec)
    return min(values), max(values)


def _choices(spec: Spec) -> list:
    """Every value of a fixed value, a set, or an integer range."""
    if isinstance(spec, Range):
        return list(range(int(spec.low), int(spec.high) + 1)) if spec.integer else [spec.low, spec.high]
    return list(_values(spec))


class NotExpressible(Exception):
    """A parameter the space does not have, or a value outside its distribution."""


class Replay:
    """Answers `suggest_*` calls from fixed params, and records which were asked. Strict by default
    (a missing or out-of-range value is `NotExpressible`); with `nearest`, a value outside a range
    moves to its nearest end, one outside a set to its first value, and a missing one takes the
    middle of its range (or the first value)."""

    def __init__(self, params: dict[str, Any], nearest: bool = False) -> None:
        self.params, self.nearest = params, nearest
        self.used: dict[str, Any] = {}

    def _answer(self, name: str, accepts: Callable[[Any], bool], nearest: Callable[[Any], Any], middle: Any):
        if name not in self.params and not self.nearest:
            raise NotExpressible(name)
        value = self.params.get(name, middle)
        if not accepts(value):
            if not self.nearest:
                raise NotExpressible(name)
            value = nearest(value)
        self.used[name] = value
        return value

    def suggest_float(self, name, low, high, log=False):
        middle = math.sqrt(low * high) if log else (low + high) / 2
        return float(self._answer(name, lambda v: low - 1e-12 <= v <= high + 1e-12,
                                  lambda v: min(max(v, low), high), middle))

    def suggest_int(self, name, low, high):
        return int(self._answer(name, lambda v: low <= v <= high, lambda v: min(max(round(v), low), high),
                                (low + high) // 2))

    def suggest_categorical(self, name, choices):
        return self._answer(name, lambda v: v in choices, lambda v: choices[0], choices[0])
