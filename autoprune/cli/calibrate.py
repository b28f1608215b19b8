"""`autoprune calibrate`: measure (or read from the cache) the latency tables of a model."""

from __future__ import annotations

import argparse

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def register(commands) -> None:
    """Add `calibrate` to the CLI's subcommands."""
    parser = commands.add_parser(
        "calibrate", help="time a model's parts on this device: the table throughput predictions read",
        description="Time a timm ViT's parts (blocks at a grid of token counts, with and without key bias, "
                    "each reducer's own work, embedding and head) and whole forwards on this device, "
                    "interleaved, and cache "
                    "the latency table under --out, one per batch size. predict_throughput and speed "
                    "budgets read it.")
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name (default: %(default)s)")
    parser.add_argument("--model-kwargs", help="timm create_model kwargs, e.g. img_size=64,patch_size=8")
    parser.add_argument("--num-classes", type=int, help="classifier outputs, as the searched model has "
                                                        "(default: the model's own)")
    parser.add_argument("--batch-size", dest="batch_sizes", default="1,32",
                        help="batch sizes, comma-separated (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="float32 as is, bfloat16/float16 under autocast "
                        "(default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--rounds", type=int, help="timed rounds, median kept (default: as many as fit in "
                                                   "about 30 s, 5 to 60)")
    parser.add_argument("--grid", help="token counts to time, comma-separated; all patches are always timed "
                                       "(default: 10 from 1 to all patches)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--out", default="studies/latency", help="folder of cached tables (default: %(default)s)")
    parser.add_argument("--refresh", action="store_true", help="measure again even if a table is cached")
    parser.set_defaults(run=run)


def _integers(text: str, flag: str, low: int) -> list[int]:
    from .parsing import UsageError

    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        values = []
    if not values or any(value < low for value in values):
        raise UsageError(f"{flag}: {text!r} is invalid; accepted: integers >= {low}, comma-separated (e.g. 1,32)")
    return values


def run(args: argparse.Namespace) -> None:
    import torch

    from ..latency import calibrate, predict_throughput
    from .parsing import UsageError, create_model, parse_model_kwargs

    batch_sizes = _integers(args.batch_sizes, "--batch-size", 1)
    grid = _integers(args.grid, "--grid", 1) if args.grid else None
    for flag, value in (("--rounds", args.rounds), ("--threads", args.threads), ("--num-classes", args.num_classes)):
        if value is not None and value < 1:
            raise UsageError(f"{flag}: {value} is invalid; accepted: a positive integer")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device: {args.device!r} but no CUDA device is available (use cpu)")
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = parse_model_kwargs(args.model_kwargs)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    model = create_model(args.model, kwargs)
    if grid is not None and grid[-1] > model.patch_embed.num_patches:
        raise UsageError(f"--grid: {args.grid!r} is invalid; accepted: token counts from 1 to "
                         f"{model.patch_embed.num_patches} (the model's patches)")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    for batch_size in batch_sizes:
        print(f"calibrating {' '.join(filter(None, (args.model, args.model_kwargs)))} on {args.device}, "
              f"batch {batch_size}", flush=True)
        table = calibrate(model, batch_size, args.device, dtype, grid=grid, rounds=args.rounds,
                          cache_dir=args.out, refresh=args.refresh, progress=lambda line: print(line, flush=True))
        print(f"  dense: {predict_throughput(model, None, table):.1f} img/s predicted at batch {batch_size}",
              flush=True)
