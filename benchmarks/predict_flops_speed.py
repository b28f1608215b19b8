"""How fast predict_flops screens candidate configs (the search filters proposals with it).

    .venv/bin/python benchmarks/predict_flops_speed.py

Builds 10,000 random fixed-schedule DeiT-S configs, then times predict_flops over all of them
(median of 5 passes); config construction is timed separately.
"""

import random
import statistics
import time

import timm

from autoprune import PruneConfig, predict_flops


def random_config(rng: random.Random) -> PruneConfig:
    layers = tuple(sorted(rng.sample(range(12), rng.randint(1, 4))))
    reducer = rng.choice(["evit", "tome", "ppt", "tps", "bat", "sait"])
    if reducer == "sait":
        return PruneConfig(reducer="sait", layers=layers[:1], keep_rate=round(rng.uniform(0.2, 1.0), 2))
    if reducer in ("tome", "ppt"):
        return PruneConfig(reducer=reducer, layers=layers, r=rng.randint(0, 60))
    extra = dict(clusters=rng.randint(1, 8), knn=5, pairs=rng.randint(0, 8)) if reducer == "bat" else {}
    rates = tuple(round(rng.uniform(0.3, 1.0), 2) for _ in layers)
    return PruneConfig(reducer=reducer, layers=layers, keep_rate=rates, **extra)


def main() -> None:
    model = timm.create_model("deit_small_patch16_224")
    rng = random.Random(0)
    start = time.perf_counter()
    configs = [random_config(rng) for _ in range(10_000)]
    build = time.perf_counter() - start
    predict_flops(model)  # reads the model's shapes once
    passes = []
    for _ in range(5):
        start = time.perf_counter()
        for cfg in configs:
            predict_flops(model, cfg)
        passes.append(time.perf_counter() - start)
    print(f"10,000 configs: building {build:.3f} s, predict_flops median {statistics.median(passes):.3f} s "
          f"(passes: {', '.join(f'{p:.3f}' for p in passes)})")


if __name__ == "__main__":
    main()
