"""Where a reduced model's time goes in a real forward, block by block, against the latency table.

    PYTHONPATH=. .venv/bin/python benchmarks/forward_profile.py --model quickstart --batch-size 1 \
        --configs "evit 0.7" "tome r7" "sait 0.5 @1" --out benchmarks/forward_profile_cpu.md

One process: the latency table is calibrated (not cached), then each model (dense first) runs
`--rounds` forwards with a timestamp after the embedding, every block and the head (median per
part), and each block is also timed alone, in a loop on the tokens it receives in that forward;
each model's whole forward is set beside its prediction from the table. Needs a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import timm
import torch

from autoprune import apply, calibrate
from autoprune.cli import load_configs
from autoprune.latency import predict_seconds
from autoprune.patch import embed, head, run_block
from autoprune.presets import get_preset
from autoprune.schedule import block_token_counts

HERE = Path(__file__).parent
MODELS = {
    "deit_small": (lambda: timm.create_model("deit_small_patch16_224"), ["deit_small_configs.yaml"]),
    "quickstart": (lambda: get_preset("quickstart").model.create(10),
                   ["quickstart_configs.yaml", "quickstart_configs_half.yaml"]),
}


def profile(name: str, batch_size: int, labels: list[str], rounds: int) -> list[str]:
    build, files = MODELS[name]
    configs = load_configs([str(HERE / f) for f in files])
    model = build().eval()
    table = calibrate(model, batch_size, "cpu", cache_dir=None)
    torch.manual_seed(0)
    images = torch.randn(batch_size, 3, *model.patch_embed.img_size)
    models = {"dense": (apply(build().eval(), None), None)}
    models.update({label: (apply(build().eval(), configs[label]), configs[label]) for label in labels})
    stamps: dict[str, list[list[float]]] = {label: [] for label in models}
    with torch.inference_mode():
        for round_index in range(rounds + 5):  # 5 untimed warm-up rounds
            for label, (m, cfg) in models.items():
                prop = cfg is not None and bool(cfg.prop_attn)
                times = [time.perf_counter()]
                tokens = embed(m, images)
                times.append(time.perf_counter())
                for block in m.blocks:
                    tokens = run_block(block, tokens, prop)
                    times.append(time.perf_counter())
                head(m, tokens)
                times.append(time.perf_counter())
                if round_index >= 5:
                    stamps[label].append([b - a for a, b in zip(times, times[1:])])
        alone: dict[str, list[float]] = {}
        for label, (m, cfg) in models.items():
            prop = cfg is not None and bool(cfg.prop_attn)
            inputs, tokens = [], embed(m, images)
            for block in m.blocks:
                inputs.append(tokens)
                tokens = run_block(block, tokens, prop)
            samples = [[] for _ in m.blocks]
            for _ in range(rounds):
                for i, block in enumerate(m.blocks):
                    start = time.perf_counter()
                    run_block(block, inputs[i], prop).attn_bias(prop)
                    samples[i].append(time.perf_counter() - start)
            alone[label] = [statistics.median(s) for s in samples]
    lines = [f"### {name}, batch {batch_size}", "",
             "ms per part, in a forward and alone in a loop; * a reducing block", ""]
    for label, (m, cfg) in models.items():
        forward = [statistics.median(column) for column in zip(*stamps[label])]
        schedule = block_token_counts(cfg, table.depth, table.patches)
        layers = set(cfg.resolved_layers(table.depth)) if cfg else set()
        predicted = predict_seconds(table, cfg)
        lines += [f"**{label}**: forward {1e3 * sum(forward):.3f} ms, predicted {1e3 * predicted:.3f} ms", "",
                  "| part | tokens | in a forward | alone | forward - alone |", "|---|---|---:|---:|---:|",
                  f"| embed | | {1e3 * forward[0]:.3f} | | |"]
        for i, counts in enumerate(schedule):
            mark = "*" if i in layers else ""
            lines.append(f"| block {i}{mark} | {counts.attn}→{counts.out} | {1e3 * forward[i + 1]:.3f} | "
                         f"{1e3 * alone[label][i]:.3f} | {1e3 * (forward[i + 1] - alone[label][i]):+.3f} |")
        lines += [f"| head | | {1e3 * forward[-1]:.3f} | | |", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="quickstart", choices=sorted(MODELS))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=["evit 0.7", "tome r7", "sait 0.5 @1"])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/forward_profile_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["# A forward, block by block", "", "Command:", "",
             "    PYTHONPATH=. .venv/bin/python benchmarks/forward_profile.py --model " + args.model
             + f" --batch-size {args.batch_size} --configs " + " ".join(f'"{c}"' for c in args.configs), "",
             f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads, fp32; "
             f"medians of {args.rounds} rounds.", ""]
    lines += profile(args.model, args.batch_size, args.configs, args.rounds)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
