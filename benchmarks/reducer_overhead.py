"""Each reducer's overhead over its slicing floor, and where its work goes.

    PYTHONPATH=. .venv/bin/python benchmarks/reducer_overhead.py --threads 2 --out benchmarks/reducer_overhead_cpu.md

Timing (skip with --no-timing): `autoprune.bench.benchmark` at each batch size, every config
beside its slicing floor (the same token schedule by plain slicing), interleaved; overhead = time
over the floor's, less 1. Goal on DeiT-S: at most 10 % at batch 1 and 5 % at batch 32. Timings
need a quiet machine.

Profile (load-independent): one forward per config at batch 1, counting the ATen operations
dispatched (each costs dispatcher and allocation time, the bulk of a small reducer's cost on a
CPU, and a kernel launch on a GPU), by where they come from (score computation, the ToMe metric,
the reducer itself by kind of operation, the key bias), and the Python calls into
`autoprune/reducers/` (the bookkeeping around `Tokens`).
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import functools
import pstats
import sys
from collections import Counter
from pathlib import Path

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import autoprune.patch as patch
import autoprune.reducers as reducers
from autoprune import apply
from autoprune.bench import benchmark, slicing_floor
from autoprune.cli import load_configs
from autoprune.presets import get_preset
from autoprune.reducers.tokens import Tokens

HERE = Path(__file__).parent
MODELS = {
    "deit_small": (lambda: timm.create_model("deit_small_patch16_224"), ["deit_small_configs.yaml"]),
    "quickstart": (lambda: get_preset("quickstart").model.create(10),
                   ["quickstart_configs.yaml", "quickstart_configs_half.yaml"]),
}
KINDS = {  # ATen operation -> kind of work, for operations dispatched inside a reducer
    "sort": {"sort", "argsort", "topk", "cumsum"},
    "index": {"gather", "scatter", "scatter_add", "scatter_add_", "index", "index_put", "index_put_", "cat",
              "masked_fill", "masked_fill_", "index_select", "masked_select", "nonzero"},
    "alloc": {"zeros", "zeros_like", "new_zeros", "empty", "new_empty", "ones", "new_ones", "ones_like", "full",
              "arange", "fill_", "copy_", "_to_copy", "clone", "empty_like", "lift_fresh"},
    "view": {"view", "_unsafe_view", "reshape", "expand", "slice", "select", "unsqueeze", "squeeze", "t", "transpose",
             "permute", "alias", "as_strided", "unbind", "split", "detach", "_reshape_alias", "contiguous"},
}


class OpCounter(TorchDispatchMode):
    """Counts ATen operations by (scope, name); scopes are pushed by the wrappers below."""

    def __init__(self) -> None:
        super().__init__()
        self.scope = ["model"]
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[(self.scope[-1], func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def scoped(counter: OpCounter):
    """Attribute operations to scores, the ToMe metric, the reducer, the key bias, explicit attention."""
    def wrap(owner, name, scope_of):
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            counter.scope.append(scope_of(args, kwargs))
            try:
                return original(*args, **kwargs)
            finally:
                counter.scope.pop()
        setattr(owner, name, wrapper)
        return owner, name, original

    saved = [
        wrap(reducers, "token_scores", lambda a, k: "scores"),
        wrap(patch, "_key_metric", lambda a, k: "metric"),
        wrap(patch.TokenReducer, "forward", lambda a, k: "reducer"),
        wrap(Tokens, "attn_bias", lambda a, k: "key bias"),
        wrap(patch, "attention_parts", lambda a, k: "explicit attention" if a[3] else counter.scope[-1]),
    ]
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def op_profile(model: torch.nn.Module, images: torch.Tensor) -> tuple[Counter, int]:
    """(ATen operations by scope and name, Python calls into autoprune/reducers/) for one forward."""
    counter = OpCounter()
    profiler = cProfile.Profile()
    with torch.inference_mode(), scoped(counter):
        model(images)  # warm: lazy initialisation is not part of the steady state
        with counter:
            profiler.enable()
            model(images)
            profiler.disable()
    stats = pstats.Stats(profiler).stats
    calls = sum(primitive for (path, _, _), (primitive, *_) in stats.items() if "autoprune/reducers/" in path)
    return counter.counts, calls


def kind_of(name: str) -> str:
    return next((kind for kind, names in KINDS.items() if name in names), "compute")


def profile_table(name: str, batch_size: int) -> str:
    build, files = MODELS[name]
    configs = {}
    for file in files:
        configs.update(load_configs([str(HERE / file)]))
    dense = build().eval()
    embed = dense.patch_embed
    torch.manual_seed(0)
    images = torch.randn(batch_size, embed.proj.in_channels, *embed.img_size)
    dense_ops = sum(op_profile(dense, images)[0].values())
    lines = [f"### {name}: ATen operations per forward, batch {batch_size} (dense: {dense_ops})", "",
             "| config | ops | floor | added | scores | metric | reducer: sort | index/gather/cat | alloc | view | "
             "compute | key bias | explicit attention | Python calls in reducers/ |",
             "|---|" + "---:|" * 13]
    for label, cfg in configs.items():
        reduced = apply(build().eval(), cfg)
        counts, calls = op_profile(reduced, images)
        floor_ops = sum(op_profile(slicing_floor(dense, reduced, images), images)[0].values())
        by_scope = Counter()
        for (scope, op), count in counts.items():
            by_scope[f"reducer:{kind_of(op)}" if scope == "reducer" else scope] += count
        total = sum(counts.values())
        cells = [by_scope[key] for key in ("scores", "metric", "reducer:sort", "reducer:index", "reducer:alloc",
                                           "reducer:view", "reducer:compute", "key bias", "explicit attention")]
        lines.append(f"| {label} | {total} | {floor_ops} | {total - floor_ops:+d} | "
                     + " | ".join(map(str, cells)) + f" | {calls} |")
    return "\n".join(lines) + "\n"


def timing_table(name: str, batch_size: int, rounds: int, goal: float) -> str:
    build, files = MODELS[name]
    configs = {}
    for file in files:
        configs.update(load_configs([str(HERE / file)]))
    rows = benchmark(build(), configs, batch_size=batch_size, rounds=rounds, warmup=2)
    lines = [f"### {name}: overhead over the slicing floor, batch {batch_size} (goal: at most {goal:.0%})", "",
             "| config | img/s | floor img/s | overhead | goal |", "|---|---:|---:|---:|---|"]
    by_name = {row.name: row for row in rows}
    for row in rows:
        if row.overhead is None:
            continue
        floor = by_name[f"{row.name} [floor]"]
        lines.append(f"| {row.name} | {row.images_per_s:.1f} | {floor.images_per_s:.1f} | {row.overhead:+.1%} | "
                     f"{'met' if row.overhead <= goal else 'missed'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="deit_small")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-timing", action="store_true", help="only the operation counts")
    parser.add_argument("--out", default="benchmarks/reducer_overhead_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    title = "Operations each reducer dispatches" if args.no_timing else "Reducer overhead over the slicing floor"
    sections = [f"# {title}", "", "Command:", "",
                "    PYTHONPATH=. python " + " ".join(sys.argv), "",
                f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads, fp32, "
                "fused attention.", ""]
    for name in args.models.split(","):
        sections.append(profile_table(name, 1))
        if not args.no_timing:
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                sections.append(timing_table(name, batch_size, args.rounds, 0.10 if batch_size == 1 else 0.05))
        print("\n".join(sections[-1:]))
    Path(args.out).write_text("\n".join(sections))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
