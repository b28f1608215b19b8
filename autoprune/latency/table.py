"""A latency table: what each part of one model costs on one device at one batch size.

Times are seconds per batch, medians of interleaved rounds, at a grid of token counts; between
grid points they are interpolated linearly, so a prediction reads the table without running
anything. Tables are cached on disk under a key of everything that changes the timings.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .. import __version__
from ..config import REDUCER_PARAMS, PruneConfig
from ..patch import architecture

DEFAULT_CACHE = Path("studies") / "latency"
BIAS_VARIANTS = ("none", "prop", "mask")  # no key bias; log(size) (proportional attention); padding mask
PPT_BRANCHES = ("pool", "prune", "mixed")


class LatencyError(ValueError):
    """A latency table that does not fit the model or config it is asked about."""


def reduce_kind(cfg: PruneConfig) -> str:
    """Which calibrated reducer cost a config's reducing layers have: the reducer, plus what
    changes its work (evit without fusing, mass-based sait, a score other than the default)."""
    kind = cfg.reducer
    if cfg.reducer == "evit" and not cfg.fuse:
        kind += "-nofuse"
    if cfg.adaptive:
        kind += "-mass"
    if cfg.score != REDUCER_PARAMS[cfg.reducer].get("score"):
        kind += f"[{cfg.score}]"
    return kind


def _interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear y(x) through the points, constant beyond the ends."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1 = xs[i - 1], xs[i]
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - x0) / (x1 - x0)


@dataclass
class LatencyTable:
    """Seconds per batch of `batch_size` images for the parts of a ViT, at the non-prefix token
    counts of `grid`.

    block[variant][i]:     one whole block at grid[i] tokens (the mean over a pass through every
                           block, so weights come from memory as in a real forward), by key bias
    attention[variant][i]: the same for a block's attention half (up to its residual)
    probs_extra[variant][i]: attention with explicit probabilities over fused attention, one block
    reduce[kind][i]:       [(tokens out / tokens in, seconds)] for the reducer at grid[i] tokens, with
                           the key bias its output needs (blocks that follow reuse it)
    embed, head[i]:        patch embedding; final norm, pooling and classifier
    forward_excess:        what the dense model's whole forward costs beyond the sum of its parts
    reduce_excess:         (per forward, per reducing block): what a reduced forward costs beyond
                           its parts and forward_excess (see `measure`)
    """

    meta: dict[str, Any]
    batch_size: int
    patches: int
    prefix: int
    depth: int
    grid: list[int]
    embed: float
    head: list[float]
    block: dict[str, list[float]]
    attention: dict[str, list[float]]
    probs_extra: dict[str, list[float]]
    reduce: dict[str, list[list[tuple[float, float]]]]
    forward_excess: float = 0.0
    reduce_excess: tuple[float, float] = (0.0, 0.0)
    _curves: dict = field(default_factory=dict, repr=False, compare=False)

    # -- lookups ----------------------------------------------------------------------------------

    def _curve(self, name: str, variant: str, values: dict[str, list[float]] | list[float]) -> list[float]:
        """Values at every integer token count 0..patches, interpolated once and kept."""
        curve = self._curves.get((name, variant))
        if curve is None:
            series = values if isinstance(values, list) else self._series(values, variant, name)
            curve = [_interpolate(self.grid, series, n) for n in range(self.patches + 1)]
            self._curves[(name, variant)] = curve
        return curve

    def block_seconds(self, variant: str, n: int) -> float:
        return self._curve("block", variant, self.block)[n]

    def attention_seconds(self, variant: str, n: int) -> float:
        return self._curve("attention", variant, self.attention)[n]

    def mlp_seconds(self, n: int) -> float:
        """A block's MLP half: the whole block less its attention half."""
        return max(0.0, self.block_seconds("none", n) - self.attention_seconds("none", n))

    def probs_seconds(self, variant: str, n: int) -> float:
        """Explicit attention's extra cost (scores that need probabilities); never below zero."""
        return max(0.0, self._curve("explicit attention", variant, self.probs_extra)[n])

    def head_seconds(self, n: int) -> float:
        return self._curve("head", "", self.head)[n]

    def reduce_seconds(self, kind: str, n: int, n_out: int) -> float:
        """The reducer `kind` taking n tokens to n_out, interpolated over n and the ratio n_out / n."""
        rows = self._curves.get(("reduce", kind))
        if rows is None:
            if kind not in self.reduce:
                raise LatencyError(f"the latency table has no timings for reducer {kind.split('/')[0]!r} "
                                   f"(it has: {', '.join(sorted(self.reduce))}); calibrate with that config")
            rows = self._curves[("reduce", kind)] = [([r for r, _ in row], [t for _, t in row])
                                                     for row in self.reduce[kind]]
        ratio, grid = n_out / n, self.grid
        if len(grid) == 1:
            return _interpolate(*rows[0], ratio)
        i = min(max(bisect.bisect_left(grid, n), 1), len(grid) - 1)  # read the rows at grid[i - 1], grid[i]
        return _interpolate(grid[i - 1:i + 1], [_interpolate(*rows[j], ratio) for j in (i - 1, i)], n)

    def excess_seconds(self, cfg: PruneConfig | None) -> float:
        """What a whole forward of `cfg` costs beyond its parts."""
        if cfg is None or cfg.reducer == "none":
            return self.forward_excess
        once, per_block = self.reduce_excess
        return self.forward_excess + once + per_block * len(cfg.resolved_layers(self.depth))

    def _series(self, table: dict[str, list[float]], variant: str, what: str) -> list[float]:
        if variant not in table:
            raise LatencyError(f"the latency table has no {what} timings with key bias {variant!r}")
        return table[variant]

    # -- storage ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("_curves")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LatencyTable":
        data = dict(data)
        data["reduce"] = {kind: [[(float(r), float(s)) for r, s in row] for row in rows]
                          for kind, rows in data["reduce"].items()}
        data["reduce_excess"] = tuple(float(value) for value in data["reduce_excess"])
        return cls(**data)

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        Path(tmp).write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "LatencyTable":
        return cls.from_dict(json.loads(Path(path).read_text()))


# -- what a table is valid for ----------------------------------------------------------------------

def architecture_digest(model: nn.Module) -> str:
    return hashlib.sha256(architecture(model).encode()).hexdigest()[:16]


def device_identity(device: torch.device) -> dict[str, Any]:
    """The hardware and threading that timings depend on."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {"type": "cuda", "name": torch.cuda.get_device_name(index),
                "capability": list(torch.cuda.get_device_capability(index))}
    return {"type": device.type, "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# how parts are timed (3: blocks chained as in a forward, parts in a seeded random order each
# round; 4: whole forwards too, for the excess over the parts); a cached table of another method
# is measured again
METHOD = 4


def table_identity(model: nn.Module, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Everything a table's timings depend on; its hash names the cached file."""
    return {"architecture": architecture_digest(model), "device": device_identity(device),
            "batch_size": batch_size, "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "timm": timm.__version__, "autoprune": __version__, "method": METHOD}


def table_path(model: nn.Module, identity: dict[str, Any], cache_dir: Path = DEFAULT_CACHE) -> Path:
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    label = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    return Path(cache_dir) / f"{label}-b{identity['batch_size']}-{identity['device']['type']}-{key}.json"
