"""`calibrate`: time a model's parts at the token counts configs can produce.

Every part is timed once per round, parts in a fresh seeded order, after an untimed warm-up round;
the median round is kept, so a machine that slows down for a while slows every part alike.
Weights and images are random: fixed-schedule work does not depend on them.

Parts timed one at a time miss what a whole forward adds (on a CPU, sub-millisecond parts run
slower among other code, and a reducer's first run in a forward slower than its next). So the
rounds also time whole forwards, the dense model and one probe per reducer, and where fixed costs
dominate a block the table keeps what a forward costs beyond its parts: the dense model's excess,
and a line through the probes' further excess: a cost per reduced forward plus one per reducing
block.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable

import torch
from filelock import FileLock
from torch import nn

from ..config import PruneConfig
from ..patch import TokenReducer, apply, attention_half, embed, head, run_block
from ..reducers import NEEDS_PROBS, Tokens
from .excess import overhead_bound, with_forward_excess
from .table import (BIAS_VARIANTS, DEFAULT_CACHE, PPT_BRANCHES, LatencyTable, reduce_kind, table_identity,
                    table_path)

# One config per reducer kind the default search space produces; their amounts are varied.
DEFAULT_KINDS = (
    PruneConfig(reducer="evit", layers=(0,), keep_rate=0.5),
    PruneConfig(reducer="evit", layers=(0,), keep_rate=0.5, fuse=False),
    PruneConfig(reducer="tome", layers=(0,), r=1),
    PruneConfig(reducer="ppt", layers=(0,), r=1),
    PruneConfig(reducer="tps", layers=(0,), keep_rate=0.5),
    PruneConfig(reducer="bat", layers=(0,), keep_rate=0.5, clusters=4, knn=5, pairs=4),
    PruneConfig(reducer="sait", layers=(0,), keep_rate=0.5),
    PruneConfig(reducer="sait", layers=(0,), mass_threshold=0.5),
)
MERGE_RATIOS = (0.55, 0.75, 0.95)  # tokens out / tokens in: tome and ppt remove at most half
KEEP_RATIOS = (0.3, 0.6, 0.9)
_UNMIXED_TAU = {"pool": 1e30, "prune": 0.0, "mixed": 1e-20}  # images with identical tokens pool at 1e-20
# rounds when not given: as many as fit in about this long, within these bounds (a sub-millisecond
# part's median needs tens of rounds on a shared CPU; a DeiT-S table at batch 32 takes a minute a round)
ROUNDS_TARGET_SECONDS = 30.0
ROUNDS_RANGE = (5, 60)
# CUDA: parts faster than this are repeated within one sample, so a synchronisation does not
# dwarf kernels that a real forward queues back to back. CPU: every part runs once per sample,
# between other parts, so its caches are as cold as in a real forward (repeating it warms them).
CUDA_MIN_SAMPLE_SECONDS = 2e-3
DECISION_SAMPLES = 3  # runs of the block stack deciding whether whole forwards are timed


def default_grid(patches: int) -> list[int]:
    """Token counts to time: denser where small counts make time least linear."""
    fractions = (0, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1)
    return sorted({max(1, round(patches * f)) for f in fractions})


def calibrate(
    model: nn.Module,
    batch_size: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    grid: Iterable[int] | None = None,
    rounds: int | None = None,
    kinds: Iterable[PruneConfig] = DEFAULT_KINDS,
    cache_dir=DEFAULT_CACHE,
    refresh: bool = False,
    progress: Callable[[str], None] | None = None,
) -> LatencyTable:
    """The latency table of `model` (a timm ViT, any weights) at `batch_size` on `device`.

    dtype: float32 (default on CPU) runs as is; bfloat16 or float16 (default bfloat16 on CUDA)
    run under autocast, as `autoprune bench` does. A table already cached for the same model,
    device, batch size, dtype and versions is returned without timing unless `refresh`; `kinds`
    are configs whose reducers to time (their amounts are varied; their layers are ignored);
    `grid` the token counts to time (all patches are always among them); `rounds` timed rounds
    (default: as many as fit in about ROUNDS_TARGET_SECONDS, within ROUNDS_RANGE)."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    kinds = {reduce_kind(cfg): cfg for cfg in kinds}
    dense = apply(copy.deepcopy(model), None).eval().to(device)
    identity = table_identity(dense, batch_size, device, dtype)
    path = table_path(dense, identity, cache_dir) if cache_dir is not None else None
    if path is None:
        return _measure(dense, identity, batch_size, device, dtype, grid, rounds, kinds, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        if path.exists() and not refresh:
            with contextlib.suppress(Exception):  # a damaged or older table is measured again
                table = LatencyTable.load(path)
                if set(kinds) <= {kind.split("/")[0] for kind in table.reduce}:
                    if progress:
                        progress(f"latency table cached: {path}")
                    return table
        table = _measure(dense, identity, batch_size, device, dtype, grid, rounds, kinds, progress)
        table.save(path)
        if progress:
            progress(f"latency table written: {path}")
        return table


def _measure(model, identity, batch_size, device, dtype, grid, rounds, kinds, progress) -> LatencyTable:
    if batch_size < 1 or (rounds is not None and rounds < 1):
        raise ValueError(f"calibrate: batch_size {batch_size} and rounds {rounds} must be positive")
    patches, prefix = model.patch_embed.num_patches, model.num_prefix_tokens
    grid = sorted(set(grid)) if grid is not None else default_grid(patches)
    if not grid or grid[0] < 1 or grid[-1] > patches:
        raise ValueError(f"calibrate: grid {grid} is invalid; accepted: token counts from 1 to {patches}")
    grid = sorted(set(grid) | {patches})  # the dense model's count is always measured, never extrapolated
    parts = _Parts(model, batch_size, device, kinds)
    timer = _Timer(device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    started = time.perf_counter()
    groups: list[int | str] = [*grid, "forwards"]
    round_index = -1
    with torch.inference_mode(), autocast:
        while rounds is None or round_index < rounds:  # round -1 warms up and sizes the repeats
            # a fresh seeded order every round: a sub-millisecond part runs slower right after
            # unrelated code (the CPU's caches of code and branches are cold), so each part must
            # follow different parts from round to round, or its median carries one neighbour's cost
            timer.time(("embed",), parts.embed, record=round_index >= 0)
            for n in random.Random(round_index).sample(groups, len(groups)):
                items = parts.forwards() if n == "forwards" else parts.items(n, seed=n)
                for key, run in random.Random(f"{round_index}/{n}").sample(items, len(items)):
                    timer.time(key, run, record=round_index >= 0)
            elapsed = time.perf_counter() - started
            if round_index < 0:
                if rounds is None:
                    low, high = ROUNDS_RANGE
                    rounds = min(max(math.ceil(ROUNDS_TARGET_SECONDS / elapsed), low), high)
                # whole forwards only where the table will keep their excess (a DeiT-S table at
                # batch 32 would spend a third of its time on forwards it then ignores)
                if not overhead_bound(*_block_stack_seconds(parts, grid[0], grid[-1])):
                    groups.remove("forwards")
            round_index += 1
            if progress:
                label = "warm-up" if round_index == 0 else f"round {round_index}/{rounds}"
                progress(f"  {label} done, {elapsed:.0f} s, about {elapsed / (round_index + 1) * (rounds - round_index):.0f} s left")
    seconds = timer.medians()
    meta = {**identity, "grid_rounds": rounds, "calibration_seconds": round(time.perf_counter() - started, 1),
            "kinds": {kind: cfg.to_dict() for kind, cfg in kinds.items()}}
    def build(times: dict[tuple, float]) -> LatencyTable:
        return _table(times, meta, batch_size, patches, prefix, len(model.blocks), grid, kinds, parts.outputs)

    table = build(seconds)
    if "forwards" not in groups:
        return table
    return with_forward_excess(table, build, timer.samples, parts.probes, parts.images)


def _block_stack_seconds(parts: _Parts, fewest: int, every: int) -> tuple[float, float]:
    """The block stack's seconds at `fewest` and at `every` token, medians of DECISION_SAMPLES
    interleaved runs after the warm-up: the warm-up's own sample is the first at each shape, and
    one slow sample could flip the decision for a model near OVERHEAD_BOUND."""
    runs = {n: dict(parts.items(n, seed=n))[("block", "none", n)] for n in (fewest, every)}
    timer = _Timer(parts.device)
    for _ in range(DECISION_SAMPLES):
        for n, run in runs.items():
            timer.time(n, run)
    seconds = timer.medians()
    return seconds[fewest], seconds[every]


class _Timer:
    """Samples per part (on CUDA, a part too fast to time alone is repeated within a sample)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.repeat: dict[tuple, int] = {}
        self.samples: dict[tuple, list[float]] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, key: tuple, run: Callable[[], object], record: bool = True) -> None:
        repeat = self.repeat.get(key, 1)
        self._sync()
        start = time.perf_counter()
        for _ in range(repeat):
            run()
        self._sync()
        elapsed = (time.perf_counter() - start) / repeat
        if key not in self.repeat and self.device.type == "cuda":
            self.repeat[key] = max(1, math.ceil(CUDA_MIN_SAMPLE_SECONDS / max(elapsed, 1e-7)))
        if record:
            self.samples.setdefault(key, []).append(elapsed)

    def medians(self) -> dict[tuple, float]:
        return {key: statistics.median(values) for key, values in self.samples.items()}


class _Parts:
    """The parts to time at one token count, with their inputs (built untimed)."""

    def __init__(self, model: nn.Module, batch_size: int, device: torch.device,
                 kinds: dict[str, PruneConfig]) -> None:
        self.model, self.batch, self.device, self.kinds = model, batch_size, device, kinds
        self.width, self.prefix = model.embed_dim, model.num_prefix_tokens
        embed_layer = model.patch_embed
        self.images = torch.randn(batch_size, embed_layer.proj.in_channels, *embed_layer.img_size, device=device)
        self.outputs: dict[tuple, tuple[int, bool]] = {}  # reduce part -> (tokens out, nothing done)
        self.needs_probs = {_bias_variant(cfg) for cfg in kinds.values() if cfg.score in NEEDS_PROBS}
        # whole forwards, each model with its own weights as a served model has
        self.dense = copy.deepcopy(model)
        self.probes = {kind: (cfg, apply(copy.deepcopy(model), cfg)) for kind, cfg in _probes(kinds, model).items()}

    def forwards(self) -> list[tuple[tuple, Callable[[], object]]]:
        items: list[tuple[tuple, Callable[[], object]]] = [(("forward", "dense"), lambda: self.dense(self.images))]
        items.extend((("forward", kind), lambda m=probe: m(self.images)) for kind, (_, probe) in self.probes.items())
        return items

    def embed(self) -> None:
        embed(self.model, self.images)

    def _tokens(self, n: int, seed: int, identical_half: bool) -> Tokens:
        """Random tokens; with `identical_half`, the second half of the images repeats one token
        over all positions, so their scores are flat (ppt pools them) while the rest are not."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(self.batch, self.prefix + n, self.width, generator=generator)
        if identical_half and self.batch > 1:
            half = self.batch // 2
            x[half:, self.prefix:] = x[half:, self.prefix:self.prefix + 1]
        # float32 under autocast too: the residual stream stays float32 (position embedding, norms)
        return Tokens.start(x.to(self.device), self.prefix)

    def items(self, n: int, seed: int) -> list[tuple[tuple, Callable[[], object]]]:
        blocks, tokens = self.model.blocks, self._tokens(n, seed, identical_half=False)
        masked = tokens.replace(valid=torch.ones_like(tokens.size, dtype=torch.bool))
        by_variant = {"none": (tokens, False), "prop": (tokens, True), "mask": (masked, False)}
        for start, prop in by_variant.values():
            start.attn_bias(prop)  # kept by the tokens: blocks reuse a bias; a reduction makes a new one
        items: list[tuple[tuple, Callable[[], object]]] = []
        for variant in BIAS_VARIANTS:
            start, prop = by_variant[variant]
            items.append((("block", variant, n), lambda s=start, p=prop: _stack(blocks, s, p)))
        for variant in ("none", "prop"):
            start, prop = by_variant[variant]
            items.append((("attention", variant, n), lambda s=start, p=prop: _attention_stack(blocks, s, p)))
        for variant in sorted(self.needs_probs):
            start, prop = by_variant[variant]
            for probs in (False, True):
                items.append((("attention1", variant, probs, n),
                              lambda s=start, p=prop, e=probs: attention_half(blocks[0], s, s.attn_bias(p), e)))
        items.append((("head", n), lambda: head(self.model, tokens)))
        items.extend(self._reduce_items(n, seed))
        return items

    def _reduce_items(self, n: int, seed: int) -> list[tuple[tuple, Callable[[], object]]]:
        start = self._tokens(n, seed, identical_half=True)
        inputs = {}
        for variant, prop in (("none", False), ("prop", True)):
            bias = start.attn_bias(prop)
            tokens, q, k, v, probs = attention_half(self.model.blocks[0], start, bias, True)
            inputs[variant] = (tokens, q, k, v, q.shape[-1] ** -0.5, bias, probs)
        items = []
        for kind, cfg in self.kinds.items():
            tokens, q, k, v, scale, bias, probs = inputs[_bias_variant(cfg)]
            probs = probs if cfg.score in NEEDS_PROBS else None
            branches = PPT_BRANCHES if cfg.reducer == "ppt" else (None,)
            for branch in branches:
                if branch == "mixed" and self.batch < 2:
                    continue
                name = kind if branch is None else f"{kind}/{branch}"
                for ratio in (MERGE_RATIOS if cfg.reducer in ("tome", "ppt") else KEEP_RATIOS):
                    reducer = TokenReducer(_amount(cfg, n, ratio, branch), 0)
                    key = ("reduce", name, n, ratio)
                    # with the key bias its output needs, which the next block would compute
                    run = (lambda r=reducer, t=tokens, q=q, k=k, v=v, s=scale, b=bias, p=probs,
                           a=bool(cfg.prop_attn): r(t, q, k, v, s, b, p).attn_bias(a))
                    if key not in self.outputs:
                        out = reducer(tokens, q, k, v, scale, bias, probs)
                        self.outputs[key] = (out.count, out is tokens)
                    items.append((key, run))
        return items


def _stack(blocks, tokens: Tokens, prop_attn: bool) -> None:
    """Every block in turn, each on the previous one's output: a block's cost as in a forward
    (weights read from memory, activations freshly written; feeding every block the same input
    instead measured DeiT-S at batch 32 10 % slower than its forward)."""
    for block in blocks:
        tokens = run_block(block, tokens, prop_attn)


def _attention_stack(blocks, tokens: Tokens, prop_attn: bool) -> None:
    """Every block's attention half in turn, chained as `_stack` chains whole blocks."""
    for block in blocks:
        tokens = attention_half(block, tokens, tokens.attn_bias(prop_attn), False)[0]


def _probes(kinds: dict[str, PruneConfig], model: nn.Module) -> dict[str, PruneConfig]:
    """One probe forward per reducer, at the middle block or, every other reducer, at every block
    but the first (sait: the middle block), each layer taking a share of the tokens that halves
    them over all blocks but the first. Both block counts are covered for the fit; a forward of
    DeiT-S at batch 32 takes seconds, so one probe each keeps calibration within minutes."""
    depth, patches = len(model.blocks), model.patch_embed.num_patches
    probes = {}
    for index, (kind, cfg) in enumerate(kinds.items()):
        amount = _amount(cfg, patches, 0.5 ** (1 / max(depth - 1, 1)), None)
        every = index % 2 == 1 and cfg.reducer != "sait" and depth > 1
        probes[kind] = dataclasses.replace(amount, layers=tuple(range(1, depth)) if every else (depth // 2,))
    return probes


def _bias_variant(cfg: PruneConfig) -> str:
    return "prop" if cfg.prop_attn else "none"


def _amount(cfg: PruneConfig, n: int, ratio: float, branch: str | None) -> PruneConfig:
    """`cfg` at one layer, taking n tokens to about ratio * n (ppt: forced into `branch`)."""
    changes: dict = {"layers": (0,), "keep_rate": None, "r": None}
    if cfg.adaptive:
        changes.update(mass_threshold=ratio)
    elif cfg.reducer in ("tome", "ppt"):
        changes.update(r=round((1 - ratio) * n))
    else:
        changes.update(keep_rate=ratio)
    if branch is not None:
        changes.update(tau=_UNMIXED_TAU[branch], tau_mode="var")
    return dataclasses.replace(cfg, **changes)


def _table(seconds: dict[tuple, float], meta, batch_size, patches, prefix, depth, grid, kinds, outputs) -> LatencyTable:
    per_block = {key: value / depth for key, value in seconds.items() if key[0] in ("block", "attention")}
    def series(kind: str, variant: str) -> list[float]:
        return [per_block[(kind, variant, n)] for n in grid]

    probs_variants = sorted({key[1] for key in seconds if key[0] == "attention1"})
    samples: dict[str, list[list[tuple[float, float, bool]]]] = {}
    for key, value in seconds.items():
        if key[0] == "reduce":
            _, name, n, _ = key
            count, idle = outputs[key]
            samples.setdefault(name, [[] for _ in grid])[grid.index(n)].append((count / n, value, idle))
    # a reducer asked to keep everything returns at once: that is not the cost of reducing, so
    # such samples only stand in where nothing else was measured (the smallest token counts)
    reduce = {name: [sorted((ratio, value) for ratio, value, idle in row if not idle)
                     or sorted((ratio, value) for ratio, value, _ in row) for row in rows]
              for name, rows in samples.items()}
    return LatencyTable(
        meta=meta, batch_size=batch_size, patches=patches, prefix=prefix, depth=depth, grid=grid,
        embed=seconds[("embed",)], head=[seconds[("head", n)] for n in grid],
        block={variant: series("block", variant) for variant in BIAS_VARIANTS},
        attention={variant: series("attention", variant) for variant in ("none", "prop")},
        probs_extra={variant: [seconds[("attention1", variant, True, n)] - seconds[("attention1", variant, False, n)]
                               for n in grid] for variant in probs_variants},
        reduce=reduce,
    )
