"""Accuracy of each reducer on the CPU quickstart preset, at similar FLOPs (about 2/3 of dense):
with no fine-tuning, after the preset's short fine-tune, and with distillation (beta > 0).

    .venv/bin/python benchmarks/quickstart_accuracy.py [--out benchmarks/quickstart_accuracy.md]
                                                       [--only "bat 0.7 c3 p2" "sait M0.7"]

Trains (or reads from studies/baselines) the quickstart dense baseline first. With --only, just
those rows are measured and replaced in --out; the other rows stay as they are.
"""

import argparse
import dataclasses
import time

import torch

from autoprune import PruneConfig, apply, count_flops
from autoprune.data import load_datasets, model_data_config
from autoprune.presets import get_preset
from autoprune.train import evaluate
from autoprune.trial import dense_baseline, run_trial

LAYERS = (1, 3, 4)  # EViT's 4/7/10 of 12 blocks, scaled to the preset's 6
CONFIGS = {
    "evit 0.7": PruneConfig(reducer="evit", layers=LAYERS, keep_rate=0.7),
    "tome r7": PruneConfig(reducer="tome", r=7),
    "ppt r14": PruneConfig(reducer="ppt", layers=LAYERS, r=14),
    "tps 0.7": PruneConfig(reducer="tps", layers=LAYERS, keep_rate=0.7),
    "bat 0.7 c3 p2": PruneConfig(reducer="bat", layers=LAYERS, keep_rate=0.7, clusters=3, knn=5, pairs=2),
    "sait M0.7": PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.7),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/quickstart_accuracy.md")
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), help="measure these rows only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    preset = get_preset("quickstart")
    probe = preset.model.create(preset.synthetic.num_classes)
    datasets = load_datasets(preset.data, model_data_config(probe), synthetic=preset.synthetic)
    started = time.perf_counter()
    baseline = dense_baseline(preset.model, datasets, preset.data, preset.baseline, preset.synthetic)
    print(f"baseline ready in {time.perf_counter() - started:.0f} s: val top-1 {baseline.metrics['val']['top1']:.2f}")
    dense_flops = baseline.metrics["flops"]
    rows = [f"| dense | {dense_flops / 1e6:.1f} | {baseline.metrics['val']['top1']:.2f} | | | | |"]
    for name, cfg in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        model = apply(baseline.fresh_copy(), cfg)
        no_ft = evaluate(model, datasets.val, preset.trial.batch_size, preset.trial.workers)["top1"]
        flops = count_flops(model, next(iter(torch.utils.data.DataLoader(datasets.val, batch_size=256)))[0])
        plain = run_trial(baseline, datasets, cfg, preset.trial)
        distill_kind = "tis" if cfg.reducer == "sait" else "logits"
        distilled = run_trial(baseline, datasets, cfg,
                              dataclasses.replace(preset.trial, beta=args.beta, distill=distill_kind))
        rows.append(f"| {name} | {flops / 1e6:.1f} | {no_ft:.2f} | {plain.accuracy:.2f} | "
                    f"{distilled.accuracy:.2f} ({distill_kind}) | {plain.speedup:.2f}x | {plain.seconds:.0f} s |")
        print(rows[-1], flush=True)
    header = [
        "# Quickstart preset: accuracy of each reducer at similar FLOPs",
        "",
        f"Model {preset.model.name} {preset.model.kwargs}, synthetic data {dataclasses.asdict(preset.synthetic)}.",
        f"Dense baseline: {preset.baseline.epochs} epochs from scratch; trials: {preset.trial.epochs} epoch(s), "
        f"lr {preset.trial.lr}; distillation weight beta = {args.beta} from the dense baseline.",
        "Val top-1 in %. Speedup: measured img/s over the dense model, interleaved in the trial's process (CPU, 2 threads).",
        "",
        "    .venv/bin/python benchmarks/quickstart_accuracy.py",
        "",
        "| config | MFLOPs | no fine-tune | fine-tuned | fine-tuned + distillation | speedup | trial time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    if args.only:
        _replace_rows(args.out, rows[1:])
    else:
        with open(args.out, "w") as handle:
            handle.write("\n".join(header + rows) + "\n")
    print(f"wrote {args.out}")


def _replace_rows(path: str, rows: list[str]) -> None:
    """Put the measured rows in place of the rows of the same config in an existing table."""
    lines = open(path).read().splitlines()
    by_name = {row.split("|")[1].strip(): row for row in rows}
    lines = [by_name.get(line.split("|")[1].strip(), line) if line.startswith("| ") else line for line in lines]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
