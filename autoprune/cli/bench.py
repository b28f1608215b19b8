"""`autoprune bench`: time dense and reduced models, interleaved in one process."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from ..config import ConfigError, PruneConfig
from .parsing import UsageError, create_model, load_configs, parse_model_kwargs

DEFAULT_BENCH_CONFIGS = {  # the papers' DeiT-S settings, one per reducer
    "evit 0.7": PruneConfig(reducer="evit", layers=(3, 6, 9), keep_rate=0.7),
    "tome r13": PruneConfig(reducer="tome", r=13),
    "ppt r50": PruneConfig(reducer="ppt", layers=(3, 6, 9), r=50),
    "tps 0.7": PruneConfig(reducer="tps", layers=(3, 6, 9), keep_rate=0.7),
    "bat 0.7": PruneConfig(reducer="bat", layers=(3, 6, 9), keep_rate=0.7, clusters=8, knn=5, pairs=8),
    "sait M0.7": PruneConfig(reducer="sait", layers=(3,), mass_threshold=0.7),
}


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from ..bench import CompileError, benchmark, format_table
    from ..onnx_export import OPSET, OnnxExportError

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device: {args.device!r} but no CUDA device is available (use cpu)")
    if args.backend == "onnxruntime" and args.device != "cpu":
        raise UsageError(f"--device: {args.device!r} with --backend onnxruntime; accepted: cpu (its CPU provider)")
    if args.backend == "compile" and args.device == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        raise UsageError("--backend compile: torch.compile needs a C++ compiler on CPU and none was found "
                         "(install g++, or use --backend eager)")
    configs = load_configs(args.config) if args.config else DEFAULT_BENCH_CONFIGS
    model = create_model(args.model, parse_model_kwargs(args.model_kwargs))
    try:
        rows = benchmark(model, configs, batch_size=args.batch_size, rounds=args.rounds,
                         warmup=args.warmup, device=args.device, backend=args.backend, floor=not args.no_floor,
                         log=lambda line: print(line, file=sys.stderr))
    except (ConfigError, OnnxExportError, CompileError) as error:
        raise UsageError(str(error)) from None
    if args.backend == "onnxruntime":
        import onnxruntime

        runtime = (f"onnxruntime {onnxruntime.__version__} CPU provider (fp32, {torch.get_num_threads()} threads, "
                   f"opset {OPSET}, all graph optimisations)")
    else:
        compiled = "torch.compile (inductor, static shapes)" if args.backend == "compile" else "no torch.compile"
        runtime = (f"device {args.device} ({'bf16 autocast' if args.device.startswith('cuda') else 'fp32'}, "
                   f"{torch.get_num_threads()} threads) | fused attention | {compiled}")
    header = (f"model {' '.join(filter(None, (args.model, args.model_kwargs)))} | {runtime} | batch {args.batch_size} | "
              f"median of {args.rounds} interleaved rounds"
              + (" (a config at a time with the dense model and its floor, each group compiled afresh)"
                 if args.backend == "compile" else ""))
    table = format_table(rows)
    print(header, table, sep="\n\n")
    if args.out:
        Path(args.out).write_text(header + "\n\n" + table + "\n")
    if args.json:
        print(json.dumps([{**row.__dict__, "config": row.config.to_dict() if row.config else None}
                          for row in rows]))


def _check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Counts argparse reads as any int: refused like its own errors (exit 2), before anything runs."""
    for name in ("batch_size", "rounds", "warmup", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "warmup" else 1):
            accepted = "an integer >= 0" if name == "warmup" else "a positive integer"
            parser.exit(2, f"autoprune: --{name.replace('_', '-')}: {value} is invalid; accepted: {accepted}\n")


def register(commands) -> None:
    bench = commands.add_parser(
        "bench", help="time dense vs token-reduced models, interleaved in one process",
        description="Time a timm ViT dense and reduced by each config (random weights and images), "
                    "interleaved, and print img/s, speedup and the ideal speedup (FLOPs ratio).")
    bench.add_argument("--model", default="deit_small_patch16_224", help="timm model name (default: %(default)s)")
    bench.add_argument("--model-kwargs", help="timm create_model kwargs, e.g. img_size=64,patch_size=8")
    bench.add_argument("--config", action="append",
                       help="inline JSON config, or a YAML/JSON file with one config or name -> config; "
                            "repeatable (default: the papers' DeiT-S setting of each reducer)")
    bench.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    bench.add_argument("--rounds", type=int, default=7, help="timed rounds, median reported (default: %(default)s)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed passes per model (default: %(default)s)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    bench.add_argument("--backend", default="eager", choices=("eager", "compile", "onnxruntime"),
                       help="run the models in PyTorch as they are, through torch.compile (compile time and "
                            "graph breaks reported; on CPU it needs a C++ compiler), or exported to ONNX in "
                            "onnxruntime's CPU provider (default: %(default)s)")
    bench.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    bench.add_argument("--out", help="also write the table (Markdown) to this file")
    bench.add_argument("--json", action="store_true", help="also print the rows as JSON")
    bench.add_argument("--no-floor", action="store_true",
                       help="leave out each config's slicing floor (its token schedule by plain slicing)")
    bench.set_defaults(run=cmd_bench, check=_check_counts)
