"""Search spaces: YAML files describing which reducers and parameter ranges a search may try.

A space is what a proposal may choose: the reducer, where it acts (layer count, first layer,
spacing, as fractions of depth), the shape of its schedule, the share of the budget it spends,
reducer-specific settings and training settings. The amount of reduction (keep rate, r, mass
threshold) is not chosen but solved to the budget (`proposals.py`): its range here bounds the
solved value. Layer positions and token counts are relative to the model (fractions of depth and
of the patch count), so one file fits any depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from ..config import REDUCERS, TAU_MODES, PruneConfig
from ..distill import DISTILL_KINDS

DISTILL_CHOICES = ("none",) + DISTILL_KINDS
TRAINING_ONLY = ("distill", "sait.distill", "beta", "lr")  # params that change fine-tuning, not the model
BUILT_IN = Path(__file__).resolve().parents[2] / "search_spaces"


class SpaceError(ValueError):
    """An invalid search-space file: the message names the file and the key."""


@dataclass(frozen=True)
class Candidate:
    """What one trial trains: the reduction, and how it is fine-tuned."""

    prune: PruneConfig
    distill: str = "none"      # none, logits, tis, features, features_cls
    beta: float = 0.0
    lr: float | None = None    # None: the recipe's

    def train_overrides(self) -> dict[str, Any]:
        overrides: dict[str, Any] = {"beta": self.beta}
        if self.distill != "none":
            overrides["distill"] = self.distill
        if self.lr is not None:
            overrides["lr"] = self.lr
        return overrides


# -- parameter specs ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fixed:
    value: Any

    def suggest(self, trial, name: str) -> Any:
        return self.value


@dataclass(frozen=True)
class Choice:
    values: tuple

    def suggest(self, trial, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.values))


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    integer: bool = False
    log: bool = False

    def suggest(self, trial, name: str) -> Any:
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high))
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.log)


Spec = Fixed | Choice | Range


@dataclass(frozen=True)
class _Kind:
    """What a key accepts: numbers (int or float, with a validity check) or named choices."""

    number: str | None          # "int" | "float" | None (categorical)
    check: Callable[[Any], bool]
    accepted: str
    log: bool = False


def _between(low: float, high: float, low_open: bool = False) -> Callable[[Any], bool]:
    return lambda v: (low < v if low_open else low <= v) and v <= high


_FRACTION = _Kind("float", _between(0, 1), "fractions in [0, 1]")
_KINDS: dict[str, dict[str, _Kind]] = {
    "layers": {"count": _Kind("int", lambda v: v >= 1, "integers >= 1"),
               "first": _FRACTION, "spacing": _FRACTION},
    "evit": {"fuse": _Kind(None, lambda v: isinstance(v, bool), "true or false")},
    "tome": {"r": _Kind("float", _between(0, 0.5, True), "fractions of the patches in (0, 0.5]")},
    "ppt": {"r": _Kind("float", _between(0, 0.5, True), "fractions of the patches in (0, 0.5]"),
            "tau": _Kind("float", lambda v: v > 0, "positive numbers", log=True),
            "tau_mode": _Kind(None, lambda v: v in TAU_MODES, " or ".join(TAU_MODES))},
    "tps": {"temperature": _Kind("float", lambda v: v > 0, "positive numbers", log=True)},
    "bat": {"clusters": _Kind("int", lambda v: v >= 1, "integers >= 1"),
            "knn": _Kind("int", lambda v: v >= 1, "integers >= 1"),
            "pairs": _Kind("int", lambda v: v >= 0, "integers >= 0")},
    "sait": {"mode": _Kind(None, lambda v: v in ("mass", "value"), "mass or value"),
             "mass_threshold": _Kind("float", _between(0, 1, True), "numbers in (0, 1]")},
    "distill": {"kind": _Kind(None, lambda v: v in DISTILL_CHOICES, ", ".join(DISTILL_CHOICES)),
                "beta": _Kind("float", lambda v: v >= 0, "numbers >= 0")},
    "train": {"lr": _Kind("float", lambda v: v > 0, "positive numbers", log=True)},
}
_TOP_LEVEL = {  # keys with a value of their own (the others are sections)
    "keep_rate": _Kind("float", _between(0, 1, True), "numbers in (0, 1]"),
    "budget_share": _Kind("float", _between(0, 1, True), "fractions of the budget in (0, 1]"),
    "schedule": _Kind("float", _between(-1, 1), "shapes in [-1, 1] (-1 front-loaded, 0 constant, 1 back-loaded)"),
}
_TOP_KEYS = ("reducers",) + tuple(_TOP_LEVEL) + tuple(_KINDS)
_DEFAULTS = {  # what a file may leave out
    ("layers", "count"): Fixed(1), ("layers", "first"): Fixed(0.25), ("layers", "spacing"): Fixed(0.25),
    ("evit", "fuse"): Fixed(True), ("ppt", "tau"): Fixed(7e-5), ("ppt", "tau_mode"): Fixed("var"),
    ("tps", "temperature"): Fixed(1.0), ("sait", "mode"): Fixed("mass"),
    ("distill", "kind"): Fixed("none"), ("distill", "beta"): Fixed(0.0),
    # files written before budget-exact proposals: constant schedules, budget shares as the default space's
    "schedule": Fixed(0.0), "budget_share": Range(0.6, 1.0),
}
_REQUIRED = {"keep_rate": ("evit", "tps", "bat"), ("tome", "r"): ("tome",), ("ppt", "r"): ("ppt",),
             ("bat", "clusters"): ("bat",), ("bat", "knn"): ("bat",), ("bat", "pairs"): ("bat",)}


def _parse_spec(value: Any, kind: _Kind, where: str) -> Spec:
    def check(v):
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        if kind.number is not None and not numeric:
            raise SpaceError(f"{where}: {v!r} is not a number (accepted: {kind.accepted})")
        if kind.number == "int" and not float(v).is_integer():
            raise SpaceError(f"{where}: {v!r} is not an integer (accepted: {kind.accepted})")
        if numeric and not math.isfinite(v) or not kind.check(v):
            raise SpaceError(f"{where}: {v!r} is out of range (accepted: {kind.accepted})")
        return int(v) if kind.number == "int" else v

    if isinstance(value, dict):
        if set(value) != {"choices"} or not isinstance(value["choices"], list) or not value["choices"]:
            raise SpaceError(f"{where}: a mapping must be {{choices: [...]}} with at least one value")
        return Choice(tuple(check(v) for v in value["choices"]))
    if isinstance(value, list):
        if not value:
            raise SpaceError(f"{where}: an empty list offers nothing to choose")
        if kind.number is not None:
            if len(value) != 2:
                raise SpaceError(f"{where}: a numeric range is [low, high]; for a set of values write {{choices: [...]}}")
            low, high = check(value[0]), check(value[1])
            if low > high:
                raise SpaceError(f"{where}: low {low} is above high {high}")
            if low == high:
                return Fixed(low)
            return Range(low, high, integer=kind.number == "int", log=kind.log)
        values = tuple(check(v) for v in value)
        return Choice(values) if len(values) > 1 else Fixed(values[0])
    return Fixed(check(value))


@dataclass(frozen=True)
class SearchSpace:
    source: str
    data: dict                      # the file's content, stored with the study
    reducers: Spec
    specs: dict                     # (section, key) -> Spec, plus "keep_rate"

    @classmethod
    def from_file(cls, path: str | Path) -> "SearchSpace":
        """A space from a YAML file, or by name from the project's search_spaces/ (e.g. "default")."""
        path = Path(path)
        if not path.is_file() and (BUILT_IN / path).is_file():
            path = BUILT_IN / path
        elif not path.is_file() and (BUILT_IN / f"{path}.yaml").is_file():
            path = BUILT_IN / f"{path}.yaml"
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in BUILT_IN.glob("*.yaml")))
            raise SpaceError(f"search space {str(path)!r} does not exist (give a YAML file, or one of: {names})")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise SpaceError(f"search space {path}: not valid YAML ({str(error).splitlines()[0]})") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<search space>") -> "SearchSpace":
        if not isinstance(data, dict):
            raise SpaceError(f"{source}: expected a mapping of keys ({', '.join(_TOP_KEYS)})")
        unknown = sorted(set(data) - set(_TOP_KEYS))
        if unknown:
            raise SpaceError(f"{source}: unknown key {unknown[0]!r} (accepted: {', '.join(_TOP_KEYS)})")
        reducers = _parse_spec(data.get("reducers", list(REDUCERS[1:])),
                               _Kind(None, lambda v: v in REDUCERS[1:], ", ".join(REDUCERS[1:])), f"{source}: reducers")
        specs: dict = {}
        for key, kind in _TOP_LEVEL.items():
            if key in data:
                specs[key] = _parse_spec(data[key], kind, f"{source}: {key}")
            elif key in _DEFAULTS:
                specs[key] = _DEFAULTS[key]
        for section, kinds in _KINDS.items():
            entries = data.get(section, {}) or {}
            if not isinstance(entries, dict):
                raise SpaceError(f"{source}: {section} must be a mapping (keys: {', '.join(kinds)})")
            for key in sorted(set(entries) - set(kinds)):
                raise SpaceError(f"{source}: unknown key '{section}.{key}' (accepted: {', '.join(kinds)})")
            for key, kind in kinds.items():
                if key in entries:
                    specs[(section, key)] = _parse_spec(entries[key], kind, f"{source}: {section}.{key}")
                elif (section, key) in _DEFAULTS:
                    specs[(section, key)] = _DEFAULTS[(section, key)]
        space = cls(source=source, data=data, reducers=reducers, specs=specs)
        for key, needed_by in _REQUIRED.items():
            users = [r for r in needed_by if r in space.reducer_choices]
            if users and key not in specs:
                name = key if isinstance(key, str) else ".".join(key)
                raise SpaceError(f"{source}: {name} is required when the space includes {users[0]}")
        if "sait" in space.reducer_choices:
            modes = _values(specs[("sait", "mode")])
            if "value" in modes and "keep_rate" not in specs:
                raise SpaceError(f"{source}: keep_rate is required for value-based sait (sait.mode)")
            if "mass" in modes and ("sait", "mass_threshold") not in specs:
                raise SpaceError(f"{source}: sait.mass_threshold is required for mass-based sait")
        return space

    @property
    def reducer_choices(self) -> tuple[str, ...]:
        return _values(self.reducers)

    def distill_kinds(self) -> tuple[str, ...]:
        """The distillation kinds some candidate of this space trains with (tis: sait only)."""
        declared = _values(self.specs[("distill", "kind")])
        return tuple(k for k in declared if k != "none" and (k != "tis" or "sait" in self.reducer_choices))


def _values(spec: Spec) -> tuple:
    if isinstance(spec, Fixed):
        return (spec.value,)
    if isinstance(spec, Choice):
        return spec.values
    raise TypeError(spec)
