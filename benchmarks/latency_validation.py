"""Predicted vs measured speedup: every reducer at two budgets, DeiT-S and the quickstart model.

    PYTHONPATH=. .venv/bin/python benchmarks/latency_validation.py --threads 2 \
        --out benchmarks/latency_validation_cpu.md

For each model and batch size: the latency table (`autoprune.calibrate`, cached under --cache),
then the dense model and every config timed interleaved in one process (`bench.time_interleaved`,
median round) and predicted from the table (`autoprune.predict_throughput`; mass-based sait over
the timed images). The models are timed before the table is made and again after; the measured
speedup is the geometric mean of the two, and how far they disagree is how much the machine moved
meanwhile. The error is predicted speedup / measured speedup - 1. Goal: median |error| at most
5 %, worst at most 10 %. Run it on a quiet machine: the table and the timing must see the same load. Quick check of the script itself: --models quickstart --batch-sizes 2 --rounds 1
--calibration-rounds 1 --grid 1,32,64 --cache /tmp/latency.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

from autoprune import PruneConfig, apply, calibrate, count_flops, predict_throughput
from autoprune.bench import time_interleaved
from autoprune.cli import load_configs
from autoprune.presets import get_preset

HERE = Path(__file__).parent
MODELS = {  # name -> (builder, config files: one per budget)
    "deit_small": (lambda: timm.create_model("deit_small_patch16_224"), ["deit_small_configs.yaml"]),
    "quickstart": (lambda: get_preset("quickstart").model.create(10),
                   ["quickstart_configs.yaml", "quickstart_configs_half.yaml"]),
}


def validate(name: str, batch_size: int, args: argparse.Namespace) -> tuple[str, list[float]]:
    build, files = MODELS[name]
    model = build().eval()
    configs: dict[str, PruneConfig] = {}
    for file in files:
        configs.update(load_configs([str(HERE / file)]))
    grid = [int(n) for n in args.grid.split(",")] if args.grid else None
    torch.manual_seed(0)
    embed = model.patch_embed
    images = torch.randn(batch_size, embed.proj.in_channels, *embed.img_size, device=args.device)
    dense = apply(model, None).to(args.device)
    models = {"dense": dense, **{label: apply(build().eval().to(args.device), cfg) for label, cfg in configs.items()}}
    rounds = args.rounds or _rounds_for(models, images)

    def measure(when: str) -> dict[str, float]:
        started = time.perf_counter()
        rates = time_interleaved(models, images, rounds=rounds, warmup=args.warmup)
        print(f"  {name} batch {batch_size}, {when}: {len(models)} models timed in {time.perf_counter() - started:.0f} s")
        return rates

    # timed before and after the table is made: how far the two disagree is how much the machine
    # itself moved, the floor under any prediction's error
    before = measure("before calibrating")
    table = calibrate(model, batch_size, args.device, grid=grid, rounds=args.calibration_rounds,
                      cache_dir=args.cache, progress=print)
    after = measure("after calibrating")
    measured = {label: math.sqrt(before[label] * after[label]) for label in models}
    table_rounds = table.meta["grid_rounds"]
    predicted = {label: predict_throughput(m, configs.get(label), table, images=images)
                 for label, m in models.items()}
    dense_flops = count_flops(dense)
    lines = [f"### {name}, batch {batch_size}", "",
             f"dense: measured {measured['dense']:.1f} img/s, predicted {predicted['dense']:.1f} img/s "
             f"({predicted['dense'] / measured['dense'] - 1:+.1%}); table {table.meta['calibration_seconds']} s "
             f"to calibrate ({table_rounds} rounds); measured twice over {rounds} interleaved rounds (median), "
             f"before the table was made ({before['dense']:.1f} img/s dense) and after ({after['dense']:.1f})", "",
             "| config | GFLOPs | measured img/s | predicted img/s | measured speedup | predicted speedup | error "
             "| measured after / before |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    errors, drifts = [], []
    for label in configs:
        flops = count_flops(models[label], images)
        measured_speedup = measured[label] / measured["dense"]
        predicted_speedup = predicted[label] / predicted["dense"]
        error = predicted_speedup / measured_speedup - 1
        drift = (after[label] / after["dense"]) / (before[label] / before["dense"]) - 1
        errors.append(error)
        drifts.append(drift)
        lines.append(f"| {label} | {flops / 1e9:.3f} | {measured[label]:.1f} | {predicted[label]:.1f} | "
                     f"{measured_speedup:.2f}x | {predicted_speedup:.2f}x | {error:+.1%} | {drift:+.1%} |")
    lines.append(f"\ndense {dense_flops / 1e9:.3f} GFLOPs; median |error| {statistics.median(map(abs, errors)):.1%}, "
                 f"worst {max(map(abs, errors)):.1%}; the measured speedups themselves moved by "
                 f"{statistics.median(map(abs, drifts)):.1%} (median), {max(map(abs, drifts)):.1%} (worst) "
                 "between the two timings\n")
    return "\n".join(lines), errors


def _rounds_for(models: dict, images: torch.Tensor) -> int:
    """Interleaved rounds filling about a minute (15 to 300): a 4 ms forward's median moves by
    10 % between runs of 15 rounds on a shared CPU, and by 3 % over 200."""
    with torch.inference_mode():
        for model in models.values():  # warm, untimed
            model(images)
        started = time.perf_counter()
        for model in models.values():
            model(images)
    return min(max(math.ceil(60 / (time.perf_counter() - started)), 15), 300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="deit_small,quickstart")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds, median kept "
                                                   "(default: as many as fill about a minute, 15 to 300)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calibration-rounds", type=int, help="(default: calibrate's)")
    parser.add_argument("--grid", help="token counts to calibrate (default: calibrate's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default="studies/latency")
    parser.add_argument("--out", default="benchmarks/latency_validation_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections, errors = [], []
    for name in args.models.split(","):
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            section, found = validate(name, batch_size, args)
            print(section)
            sections.append(section)
            errors.extend(found)
    median, worst = statistics.median(map(abs, errors)), max(map(abs, errors))
    verdict = "met" if median <= 0.05 and worst <= 0.10 else "NOT met"
    header = [
        "# Latency prediction vs measurement", "",
        "Command:", "", "    PYTHONPATH=. python " + " ".join(sys.argv), "",
        f"Machine: {platform.machine()} {platform.processor() or ''}, {args.threads} threads, device {args.device}, "
        f"torch {torch.__version__}, timm {timm.__version__}; fp32, fused attention, no torch.compile; "
        "rounds of each table and timing in its section.", "",
        f"Over all {len(errors)} configs: median |error| {median:.1%}, worst {worst:.1%} "
        f"(goal: median <= 5 %, worst <= 10 %: {verdict}).", "",
        "error = predicted speedup / measured speedup - 1 (speedups over the dense model, same table / same run; "
        "measured: the geometric mean of a timing before the table was made and one after).", "",
    ]
    Path(args.out).write_text("\n".join(header + sections))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
