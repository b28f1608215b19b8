"""`PruneConfig`: what to reduce, where and how much, validated and serialisable.

A config is model-independent; `apply` checks it against a model (layer range, class token).
Reducer-specific fields are None when the reducer does not take them, and hold the reducer's
default otherwise, so a config prints and serialises exactly as it runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

REDUCERS = ("none", "evit", "tome", "ppt", "tps", "bat", "sait")
SCORES = ("cls", "cls_vnorm", "tis", "entropy", "mean")
TAU_MODES = ("var", "cv2")

# Reducer-specific parameters and their defaults (None = required, no published default).
# Default scores follow reducers.md; tome ranks nothing (it matches keys), so it takes no score.
REDUCER_PARAMS: dict[str, dict[str, Any]] = {
    "none": {},
    "evit": {"score": "cls", "fuse": True},
    "tome": {"prop_attn": True},
    "ppt": {"score": "cls_vnorm", "tau": 7e-5, "tau_mode": "var", "prop_attn": True},
    "tps": {"score": "cls", "temperature": 1.0},
    "bat": {"score": "cls", "clusters": None, "knn": None, "pairs": None},
    "sait": {"score": "tis", "mass_threshold": None},
}
_OPTIONAL = {"mass_threshold"}  # sait: value-based without it, mass-based with it


class ConfigError(ValueError):
    """A config or a config/model combination that autoprune cannot run."""


def _fail(field: str, value: Any, accepted: str) -> None:
    raise ConfigError(f"PruneConfig.{field}: {value!r} is invalid; accepted: {accepted}")


@dataclass(frozen=True)
class PruneConfig:
    """Token-reduction settings for one model (semantics in shared/spec/reducers.md).

    `layers` are 0-indexed block indices (None = every block). The amount is either `keep_rate`
    (keep ceil(rate * n) of the n non-prefix tokens) or `r` (remove r tokens), a scalar for every
    layer or one value per layer; sait with `mass_threshold` decides the amount per image instead.
    """

    reducer: str = "none"
    layers: tuple[int, ...] | None = None
    keep_rate: float | tuple[float, ...] | None = None
    r: int | tuple[int, ...] | None = None
    score: str | None = None
    fuse: bool | None = None
    tau: float | None = None
    tau_mode: str | None = None
    temperature: float | None = None
    clusters: int | None = None
    knn: int | None = None
    pairs: int | None = None
    mass_threshold: float | None = None
    prop_attn: bool | None = None

    def __post_init__(self) -> None:
        if self.reducer not in REDUCERS:
            _fail("reducer", self.reducer, ", ".join(REDUCERS))
        for name in ("layers", "keep_rate", "r"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        params = REDUCER_PARAMS[self.reducer]
        for name in _PARAM_FIELDS:
            value = getattr(self, name)
            if name not in params:
                if value is not None:
                    takes = ", ".join(params) or "no parameters"
                    raise ConfigError(
                        f"PruneConfig.{name}: reducer {self.reducer!r} does not take it "
                        f"(it takes: {takes})"
                    )
            elif value is None:
                default = params[name]
                if default is None and name not in _OPTIONAL:
                    raise ConfigError(
                        f"PruneConfig.{name}: reducer {self.reducer!r} needs it "
                        "(there is no published default)"
                    )
                object.__setattr__(self, name, default)
        if self.reducer == "none":
            for name in ("layers", "keep_rate", "r"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"PruneConfig.{name}: reducer 'none' takes no {name}")
            return
        self._check_layers()
        self._check_amount()
        self._check_params()

    # -- validation -----------------------------------------------------------------------------

    def _check_layers(self) -> None:
        if self.layers is None:
            if self.reducer == "sait":
                raise ConfigError("PruneConfig.layers: sait reduces at exactly one layer; give e.g. layers=(3,)")
            return
        if not isinstance(self.layers, tuple) or not self.layers:
            _fail("layers", self.layers, "a non-empty tuple of block indices, or None for every block")
        for layer in self.layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                _fail("layers", self.layers, "non-negative integer block indices")
        if len(set(self.layers)) != len(self.layers) or list(self.layers) != sorted(self.layers):
            _fail("layers", self.layers, "strictly increasing block indices")
        if self.reducer == "sait" and len(self.layers) != 1:
            _fail("layers", self.layers, "exactly one layer for sait, e.g. (3,)")

    def _check_amount(self) -> None:
        given = [n for n in ("keep_rate", "r", "mass_threshold") if getattr(self, n) is not None]
        if len(given) != 1:
            options = "keep_rate, r or mass_threshold" if self.reducer == "sait" else "keep_rate or r"
            raise ConfigError(
                f"PruneConfig: reducer {self.reducer!r} needs exactly one of {options}"
                + (f"; got {', '.join(given)}" if given else "")
            )
        if self.keep_rate is not None:
            for rate in self._per_layer_values("keep_rate"):
                if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
                    _fail("keep_rate", self.keep_rate, "a number in (0, 1], or one per layer")
        if self.r is not None:
            for r in self._per_layer_values("r"):
                if isinstance(r, bool) or not isinstance(r, int) or r < 0:
                    _fail("r", self.r, "a non-negative integer, or one per layer")

    def _per_layer_values(self, name: str) -> tuple:
        value = getattr(self, name)
        if not isinstance(value, tuple):
            return (value,)
        if self.layers is not None and len(value) != len(self.layers):
            _fail(name, value, f"a scalar or one value per layer ({len(self.layers)} layers)")
        if not value:
            _fail(name, value, "a scalar or a non-empty tuple")
        return value

    def _check_params(self) -> None:
        if self.score is not None and self.score not in SCORES:
            _fail("score", self.score, ", ".join(SCORES))
        for name in ("fuse", "prop_attn"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                _fail(name, value, "true or false")
        if self.tau is not None and (not _is_number(self.tau) or self.tau < 0):
            _fail("tau", self.tau, "a non-negative number")
        if self.tau_mode is not None and self.tau_mode not in TAU_MODES:
            _fail("tau_mode", self.tau_mode, ", ".join(TAU_MODES))
        if self.temperature is not None and (not _is_number(self.temperature) or self.temperature <= 0):
            _fail("temperature", self.temperature, "a positive number")
        for name, low in (("clusters", 1), ("knn", 1), ("pairs", 0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                _fail(name, value, f"an integer >= {low}")
        if self.mass_threshold is not None and (
            not _is_number(self.mass_threshold) or not 0 < self.mass_threshold <= 1
        ):
            _fail("mass_threshold", self.mass_threshold, "a number in (0, 1]")

    # -- queries --------------------------------------------------------------------------------

    @property
    def adaptive(self) -> bool:
        """True when the token count varies per image (batched runs pad and mask keys)."""
        return self.mass_threshold is not None

    def resolved_layers(self, depth: int) -> tuple[int, ...]:
        """Block indices for a model of `depth` blocks, checked to be in range."""
        if self.reducer == "none":
            return ()
        layers = tuple(range(depth)) if self.layers is None else self.layers
        bad = [layer for layer in layers if layer >= depth]
        if bad:
            raise ConfigError(
                f"PruneConfig.layers: {bad[0]} is out of range for a model with {depth} blocks "
                f"(accepted: 0..{depth - 1})"
            )
        for name in ("keep_rate", "r"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != len(layers):
                _fail(name, value, f"a scalar or one value per layer ({len(layers)} layers)")
        return layers

    def amount(self, index: int) -> tuple[float | None, int | None]:
        """(keep_rate, r) for the `index`-th reducing layer; one of them is None."""
        def pick(value):
            return value[index] if isinstance(value, tuple) else value
        return pick(self.keep_rate), pick(self.r)

    def describe(self) -> str:
        """A short human label, e.g. 'evit keep_rate=0.7 @3,6,9 fuse'."""
        if self.reducer == "none":
            return "dense"
        parts = [self.reducer]
        def show(value) -> str:
            if isinstance(value, tuple):
                return ",".join(show(v) for v in value)
            return f"{value:.3g}" if isinstance(value, float) else str(value)

        for name in ("keep_rate", "r", "mass_threshold"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={show(value)}")
        parts.append("@all" if self.layers is None else "@" + ",".join(map(str, self.layers)))
        defaults = REDUCER_PARAMS[self.reducer]
        for name in _PARAM_FIELDS:
            value = getattr(self, name)
            if name in defaults and name != "mass_threshold" and value != defaults[name]:
                parts.append(f"{name}={show(value)}")
        return " ".join(parts)

    # -- serialisation --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the set fields (tuples become lists), JSON-ready."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"PruneConfig: expected a mapping of fields, got {type(data).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"PruneConfig: unknown field {unknown[0]!r}; accepted: {', '.join(sorted(known))}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PruneConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"PruneConfig: not valid JSON ({error})") from None
        return cls.from_dict(data)


_PARAM_FIELDS = ("score", "fuse", "tau", "tau_mode", "temperature", "clusters", "knn", "pairs",
                 "mass_threshold", "prop_attn")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
