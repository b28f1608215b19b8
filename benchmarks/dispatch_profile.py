"""Where a reducer's batch-1 overhead goes: time inside ATen operations vs. around them.

    PYTHONPATH=. .venv/bin/python benchmarks/dispatch_profile.py --config '{"reducer": "tome", "r": 11}' \
        --config '{"reducer": "bat", "layers": [3, 6, 9], "keep_rate": 0.7, "clusters": 8, "knn": 5, "pairs": 8}'

For each config on DeiT-S: the wall time of a forward, reduced and its slicing floor (median of
interleaved rounds, no profiler), and torch.profiler's self time of every ATen operation (a
separate pass; only operations the floor does not call as often are counted). The wall-time
difference less the ATen difference is what the added operations cost outside their kernels:
Python, argument parsing, dispatch, allocating the outputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import timm
import torch
from torch.profiler import ProfilerActivity, profile

from autoprune import PruneConfig, apply
from autoprune.bench import slicing_floor


def wall_ms(models: dict[str, torch.nn.Module], images: torch.Tensor, rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(images)
            samples[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


def aten_ms(model: torch.nn.Module, images: torch.Tensor, forwards: int) -> dict[str, tuple[float, int]]:
    """(self milliseconds, calls) per forward by ATen operation."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(forwards):
            model(images)
    return {e.key: (e.self_cpu_time_total / 1e3 / forwards, e.count // forwards)
            for e in prof.key_averages() if e.key.startswith("aten::")}


def added_aten(reduced: dict[str, tuple[float, int]], floor: dict[str, tuple[float, int]]) -> tuple[float, int]:
    """Self milliseconds and calls the reducer adds: operations the floor calls as often (the
    blocks' matmuls, attention, GELU, norms on the same schedule) are left out, since their
    difference between two profiled passes is noise, not reducer work."""
    ms = calls = 0
    for key, (time_ms, count) in reduced.items():
        floor_ms, floor_count = floor.get(key, (0.0, 0))
        if count != floor_count:
            ms += time_ms - floor_ms
            calls += count - floor_count
    return ms, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="a PruneConfig as JSON")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = apply(timm.create_model("deit_small_patch16_224").eval(), None)
    images = torch.randn(args.batch_size, 3, 224, 224)
    print(f"DeiT-S, batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}; wall: median of "
          f"{args.rounds} interleaved rounds; ATen: torch.profiler self time over {args.rounds} forwards\n")
    print("| config | wall ms: reduced / floor | added wall ms | added ATen ms | added outside ATen ms "
          "| added ATen operations |")
    print("|---|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for text in args.config:
            cfg = PruneConfig.from_dict(json.loads(text))
            reduced = apply(copy.deepcopy(dense), cfg)
            floor = slicing_floor(dense, reduced, images)
            for model in (reduced, floor):
                for _ in range(5):
                    model(images)
            wall = wall_ms({"reduced": reduced, "floor": floor}, images, args.rounds)
            aten_added, calls = added_aten(aten_ms(reduced, images, args.rounds), aten_ms(floor, images, args.rounds))
            added_wall = wall["reduced"] - wall["floor"]
            print(f"| {text} | {wall['reduced']:.1f} / {wall['floor']:.1f} | {added_wall:+.2f} | {aten_added:+.2f} | "
                  f"{added_wall - aten_added:+.2f} | {calls:+d} |")


if __name__ == "__main__":
    main()
