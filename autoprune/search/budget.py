"""Budgets as users write them on the command line: FLOPs (`--budget 2.6GFLOPs`, `--budget 56%`) or
speed (`--budget 2x`, `--budget 1500img/s`).

A FLOPs budget is either absolute (FLOPs per image, the convention papers report) or relative to the
dense model; a relative budget can only be turned into FLOPs once the dense model has been measured,
which is why `Budget` keeps both forms and resolves late. A speed budget asks for a throughput on the
device and batch size of the latency table that predicts it: a multiple of the dense model's (`2x`)
or images per second. Parsing is strict: a bare small number such as `2.6` is refused rather than
read as 2.6 FLOPs, because it is almost surely a missing unit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

ACCEPTED = ("2.6GFLOPs, 2.6G, 2600MFLOPs, 2.6e9, 56% (of the dense model's FLOPs), "
            "2x (the dense model's throughput) or 1500img/s")
MIN_PLAIN_FLOPS = 1e6  # below this a number without a K/M/G prefix is taken as a missing unit

_PREFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?"
_ABSOLUTE = re.compile(rf"^({_NUMBER})\s*([kmg]?)\s*(flops?)?$", re.IGNORECASE)
_RELATIVE = re.compile(rf"^({_NUMBER})\s*%$", re.IGNORECASE)
_SPEEDUP = re.compile(rf"^({_NUMBER})\s*x$", re.IGNORECASE)
_RATE = re.compile(rf"^({_NUMBER})\s*(?:img|images)/s$", re.IGNORECASE)


class BudgetError(ValueError):
    """A `--budget` value that is not a budget; the message shows it and the accepted forms."""


def _refuse(text: object, why: str) -> BudgetError:
    return BudgetError(f"--budget: {text!r} {why}; accepted: {ACCEPTED}")


@dataclass(frozen=True)
class Budget:
    """One of: absolute FLOPs (`flops`), a fraction of the dense model's FLOPs (`fraction`), a
    multiple of the dense model's throughput (`speedup`) or a throughput (`images_per_s`)."""

    text: str                         # as the user wrote it
    flops: float | None = None        # absolute FLOPs per image
    fraction: float | None = None     # of the dense model's FLOPs (0.56 for "56%")
    speedup: float | None = None      # at least this many times the dense model's throughput
    images_per_s: float | None = None  # at least this throughput

    def __post_init__(self) -> None:
        # exactly one form, positive and finite: every consumer can then trust the numbers
        forms = (self.flops, self.fraction, self.speedup, self.images_per_s)
        if sum(value is not None for value in forms) != 1:
            raise _refuse(self.text, "must be exactly one of absolute FLOPs, a fraction of the dense model, "
                                     "a speedup or a throughput")
        if self.flops is not None and not (math.isfinite(self.flops) and self.flops > 0):
            raise _refuse(self.text, f"gives {self.flops!r} FLOPs, which is not a positive finite number")
        if self.fraction is not None and not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
            raise _refuse(self.text, f"gives fraction {self.fraction!r}, which is not in (0, 1]")
        for name in ("speedup", "images_per_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise _refuse(self.text, f"gives {name} {value!r}, which is not a positive finite number")

    @property
    def relative(self) -> bool:
        return self.fraction is not None

    @property
    def speed(self) -> bool:
        """A throughput budget: feasibility comes from the latency predictor, not from FLOPs."""
        return self.speedup is not None or self.images_per_s is not None

    def required_throughput(self, dense_throughput: float) -> float:
        """Images/s a config must reach; `dense_throughput` is the dense model's on the same table."""
        if self.images_per_s is not None:
            return self.images_per_s
        if self.speedup is None:
            raise BudgetError(f"Budget.required_throughput: {self.text!r} is a FLOPs budget; accepted: a speed budget")
        if not (isinstance(dense_throughput, (int, float)) and math.isfinite(dense_throughput) and dense_throughput > 0):
            raise BudgetError(f"Budget.required_throughput: dense_throughput {dense_throughput!r} is invalid; "
                              "accepted: the dense model's positive images/s")
        return self.speedup * float(dense_throughput)

    def throughput_shortfall(self, predicted: float, dense_throughput: float) -> float:
        """Images/s a config with `predicted` throughput lacks: <= 0 means it fits the budget (the sign
        convention of Optuna constraints, like FLOPs over a FLOPs budget)."""
        return self.required_throughput(dense_throughput) - predicted

    def resolve(self, dense_flops: float) -> float:
        """Absolute FLOPs per image; a relative budget needs the dense model's FLOPs to mean anything."""
        if self.flops is not None:
            return self.flops
        if self.speed:
            raise BudgetError(f"Budget.resolve: {self.text!r} is a speed budget, which has no FLOPs figure; "
                              "accepted: a FLOPs budget (use required_throughput for speed)")
        if not (isinstance(dense_flops, (int, float)) and math.isfinite(dense_flops) and dense_flops > 0):
            raise BudgetError(
                f"Budget.resolve: dense_flops {dense_flops!r} is invalid; accepted: the dense model's positive FLOPs per image"
            )
        assert self.fraction is not None
        return self.fraction * float(dense_flops)

    def __str__(self) -> str:
        if self.flops is not None:
            return format_flops(self.flops)
        if self.speedup is not None:
            return f"{_significant(self.speedup)}x dense throughput"
        if self.images_per_s is not None:
            return f"{_significant(self.images_per_s)} img/s"
        assert self.fraction is not None
        return f"{_significant(self.fraction * 100)}% of dense"


def parse_budget(text: str) -> Budget:
    """Read `2.6GFLOPs`, `2.6G`, `2600MFLOPs`, `850KFLOPs`, `2.6e9`, `2600000000`, `56%`, `2x` or
    `1500img/s`."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise _refuse(text, "is not a FLOPs or speed budget")
    raw = text if isinstance(text, str) else repr(text)
    stripped = raw.strip()

    for pattern, name, unit in ((_SPEEDUP, "speedup", "a speedup"), (_RATE, "images_per_s", "a throughput")):
        speed = pattern.match(stripped)
        if speed:
            value = float(speed.group(1))
            if not (math.isfinite(value) and value > 0):
                raise _refuse(raw, f"is not {unit} above zero")
            return Budget(text=raw, **{name: value})

    relative = _RELATIVE.match(stripped)
    if relative:
        percent = float(relative.group(1))
        if not (math.isfinite(percent) and 0 < percent <= 100):
            raise _refuse(raw, "is not a percentage in (0, 100] (100% is the dense cost)")
        return Budget(text=raw, flops=None, fraction=percent / 100)

    absolute = _ABSOLUTE.match(stripped)
    if not absolute:
        raise _refuse(raw, "is not a FLOPs or speed budget")
    value = float(absolute.group(1))
    prefix = absolute.group(2).lower()
    flops = value * _PREFIXES[prefix]
    if not math.isfinite(flops):
        raise _refuse(raw, "is not a finite number of FLOPs")
    if flops <= 0:
        raise _refuse(raw, "is not positive")
    if not prefix and flops < MIN_PLAIN_FLOPS:
        raise _refuse(raw, "has no K/M/G unit and is below 1e6 FLOPs, so a unit is probably missing")
    return Budget(text=raw, flops=flops, fraction=None)


def _significant(value: float, digits: int = 4) -> str:
    """`digits` significant digits in fixed notation, trailing zeros dropped (2.608, 85.3, 1234)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    formatted = f"{value:.{decimals}f}"
    if "." in formatted:
        formatted = formatted.rstrip("0").rstrip(".")
    return formatted


def format_flops(flops: float) -> str:
    """Human-readable FLOPs: "2.608 GFLOPs", "85.3 MFLOPs", "850 KFLOPs" (G from 1e9, M from 1e6, K from 1e3)."""
    if not math.isfinite(flops):
        return f"{flops} FLOPs"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(flops) >= scale:
            number = _significant(flops / scale)
            # rounding can carry into the next unit (999.96e6 -> "1000 MFLOPs"): show it there instead
            if unit != "G" and abs(float(number)) >= 1000:
                return f"{_significant(flops / (scale * 1e3))} {'GMK'['GMK'.index(unit) - 1]}FLOPs"
            return f"{number} {unit}FLOPs"
    return f"{_significant(flops)} FLOPs"
