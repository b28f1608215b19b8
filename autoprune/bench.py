"""Throughput of dense vs reduced models, timed interleaved in one process (reducers.md protocol).

A machine is noisy, so only ratios of interleaved runs are trusted: every round times each model
once, in a rotating order, and the median round is reported. The models run in PyTorch (eager, or
through torch.compile, optional: its compile time and graph breaks are reported) or, exported to
ONNX, in onnxruntime's CPU provider. Each reduced model gets a reference: its slicing
floor, the same token schedule reduced by keeping the first tokens (no scores, no matching, no key
bias), so a reducer's own overhead reads as its time over the floor's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import PruneConfig
from .flops import count_flops
from .onnx_export import INPUT, OnnxExportError, onnxruntime_session, write_onnx
from .patch import apply, apply_slicing, reductions

BACKENDS = ("eager", "compile", "onnxruntime")
Runner = Callable[[Tensor], object]  # a model, or anything else that runs a batch


@dataclass(frozen=True)
class BenchRow:
    name: str
    config: PruneConfig | None
    gflops: float
    images_per_s: float
    speedup: float        # measured, over the dense model
    ideal_speedup: float  # dense FLOPs / reduced FLOPs
    refused: str | None = None      # why the backend could not run it (then the timings are NaN)
    floor_of: str | None = None     # a slicing-floor row: the config whose schedule it runs
    overhead: float | None = None   # a reduced row: its time over its floor's, less 1
    compile_seconds: float | None = None  # backend compile: its first call (compiling included)
    graph_breaks: int | None = None       # backend compile: where dynamo split the forward

    @property
    def efficiency(self) -> float:
        """Measured speedup as a share of the FLOPs ratio (the project's goal: >= 0.95)."""
        return self.speedup / self.ideal_speedup


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(models: dict[str, Runner], images: torch.Tensor, rounds: int, warmup: int,
                     autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Median images/s of each model over `rounds` interleaved rounds, after `warmup` passes each."""
    device = images.device
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    names = list(models)
    rates: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode(), autocast:
        for name in names:
            for _ in range(warmup):
                models[name](images)
        _synchronize(device)
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                models[name](images)
                _synchronize(device)
                rates[name].append(len(images) / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def floor_name(name: str) -> str:
    return f"{name} [floor]"


def slicing_floor(dense: nn.Module, reduced: nn.Module, images: torch.Tensor) -> nn.Module:
    """A copy of `dense` that keeps, at each reducing layer of `reduced`, as many tokens as
    `reduced` computes on `images` (a padded batch computes its largest count)."""
    with torch.inference_mode():
        keep = {r.block: int(r.counts.max()) for r in reductions(reduced, images, chunk=len(images))}
    return apply_slicing(copy.deepcopy(dense), keep, like=reduced)


def benchmark(model: nn.Module, configs: dict[str, PruneConfig], batch_size: int = 32,
              rounds: int = 7, warmup: int = 2, device: str = "cpu", seed: int = 0, backend: str = "eager",
              floor: bool = True, log: Callable[[str], None] = lambda line: None) -> list[BenchRow]:
    """Time the dense `model` and a reduced copy per config on random images; the first row is
    dense; with `floor`, each config's slicing floor follows it. On CUDA the models run under bf16
    autocast. FLOPs of adaptive configs are averaged over the same images. With backend
    "onnxruntime" every model is exported to ONNX (checked against PyTorch) and run by
    onnxruntime's CPU provider, with "compile" through torch.compile a config at a time (beside
    the dense model and its floor; dense's row: the median over those groups); a config the backend
    refuses gets a row that says why."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend: {backend!r} is invalid; accepted: {', '.join(BACKENDS)}")
    torch.manual_seed(seed)
    target = torch.device(device)
    if backend == "onnxruntime" and target.type != "cpu":
        raise ValueError(f"--device: {device!r} with --backend onnxruntime; accepted: cpu (its CPU provider)")
    dense = apply(model, None).eval().to(target)
    embed = dense.patch_embed
    images = torch.randn(batch_size, embed.proj.in_channels, *embed.img_size, device=target)
    models = {"dense": dense}
    floors = {}
    for name, cfg in configs.items():
        models[name] = apply(copy.deepcopy(dense), cfg)
        if floor:
            floors[floor_name(name)] = name
            models[floor_name(name)] = slicing_floor(dense, models[name], images)
    flops = {name: count_flops(m, images) for name, m in models.items()}
    with tempfile.TemporaryDirectory() as folder:
        refused: dict[str, str] = {}
        compiled: dict[str, tuple[float, int]] = {}
        autocast_dtype = torch.bfloat16 if target.type == "cuda" else None
        if backend == "compile":
            rates, refused, compiled = _time_compiled(models, floors, images, rounds, warmup, autocast_dtype,
                                                      Path(folder), log)
        else:
            runners: dict[str, Runner] = dict(models)
            if backend == "onnxruntime":
                runners, refused = _onnxruntime_runners(models, images, Path(folder), log)
            log(f"timing {len(runners)} models: {warmup} warm-up and {rounds} rounds each")
            measured = time_interleaved(runners, images, rounds, warmup, autocast_dtype)
            rates = {name: (rate, measured["dense"]) for name, rate in measured.items()}
    return [
        BenchRow(name=name, config=configs.get(name), gflops=flops[name] / 1e9,
                 images_per_s=rates.get(name, (math.nan,))[0],
                 speedup=rates[name][0] / rates[name][1] if name in rates else math.nan,
                 ideal_speedup=flops["dense"] / flops[name], refused=refused.get(name), floor_of=floors.get(name),
                 overhead=(rates[floor_name(name)][0] / rates[name][0] - 1
                           if floor_name(name) in rates and name in rates else None),
                 compile_seconds=compiled.get(name, (None, None))[0], graph_breaks=compiled.get(name, (None, None))[1])
        for name in models
    ]


COMPILE_TOLERANCE = 1e-3  # compiled logits may differ from eager ones by float reordering, no more


class CompileError(RuntimeError):
    """torch.compile changed the dense model's outputs: no compiled timing can be trusted."""


def _time_compiled(models: dict[str, nn.Module], floors: dict[str, str], images: Tensor, rounds: int, warmup: int,
                   autocast_dtype: torch.dtype | None, folder: Path, log: Callable[[str], None]
                   ) -> tuple[dict[str, tuple[float, float]], dict[str, str], dict[str, tuple[float, int]]]:
    """Compiled models timed a config at a time: the dense model, the config and its floor,
    interleaved, then dynamo's caches cleared. With every config compiled into one process their
    kernels crowd each other out: 29 compiled DeiT-S models at batch 1 ran ToMe r11 at 17.6 img/s
    and BAT 0.7 at 15.9 (eager, that day: 18.7 and 19.4); compiled in a group of five, 21.0 and 21.0.
    Returns (img/s, the dense img/s of its group) per model, refusals, (compile s, graph breaks)."""
    import torch._dynamo

    groups = [["dense", name] + [floor for floor, of in floors.items() if of == name]
              for name in models if name != "dense" and name not in floors] or [["dense"]]
    rates: dict[str, tuple[float, float]] = {}
    refused: dict[str, str] = {}
    compiled: dict[str, tuple[float, int]] = {}
    dense_rates = []
    with _fresh_inductor_cache(folder):
        for index, group in enumerate(groups):
            torch._dynamo.reset()
            members = {name: models[name] for name in group}
            log(f"group {index + 1}/{len(groups)}: {', '.join(group)}")
            runners, group_refused, group_compiled = _compiled_runners(members, images, autocast_dtype, log)
            refused.update(group_refused)
            for name, figures in group_compiled.items():
                compiled.setdefault(name, figures)  # dense: its first compile (later groups reuse its kernels)
            measured = time_interleaved(runners, images, rounds, warmup, autocast_dtype)
            rates.update({name: (rate, measured["dense"]) for name, rate in measured.items() if name != "dense"})
            dense_rates.append(measured["dense"])
        torch._dynamo.reset()
    rates["dense"] = (statistics.median(dense_rates),) * 2
    return rates, refused, compiled


@contextlib.contextmanager
def _fresh_inductor_cache(folder: Path):
    """Inductor's on-disk cache in a fresh folder while compiling, so a row's compile seconds are
    what a first deployment pays, not a hit from an earlier run."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def _compiled_runners(models: dict[str, nn.Module], images: Tensor, autocast_dtype: torch.dtype | None,
                      log: Callable[[str], None]
                      ) -> tuple[dict[str, Runner], dict[str, str], dict[str, tuple[float, int]]]:
    """Each model through torch.compile (inductor, static shapes), with (seconds of its first call,
    compiling included; graph breaks dynamo's explain finds in its forward); a model whose compiled
    logits differ from its eager ones is refused, saying by how much. The dense model must compile."""
    import torch._dynamo

    autocast = (torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    breaks = {}
    # room in dynamo's cache for every model of the group: they share their forward's code, and past
    # its recompile limit dynamo would silently run the rest in eager mode; its warnings about each
    # graph break are left out (the table counts them)
    with (torch.inference_mode(), autocast, torch._dynamo.config.patch(recompile_limit=max(8, 2 * len(models))),
          _quiet("torch._dynamo", "torch._inductor", "torch.utils.cpp_extension")):
        for name, model in models.items():
            breaks[name] = torch._dynamo.explain(model)(images).graph_break_count
        torch._dynamo.reset()  # explain's traces are not the compiled models' own
        runners, refused, compiled = {}, {}, {}
        for name, model in models.items():
            log(f"  compiling {name}")
            runner = torch.compile(model, dynamic=False)
            start = time.perf_counter()
            logits = runner(images)
            _synchronize(images.device)
            compiled[name] = (time.perf_counter() - start, breaks[name])
            log(f"    {compiled[name][0]:.1f} s, {breaks[name]} graph break(s)")
            differs = float((logits.float() - model(images).float()).abs().max())
            if differs > COMPILE_TOLERANCE * max(1.0, float(logits.float().abs().max())):
                if name == "dense":
                    raise CompileError(f"torch.compile changed the dense model's logits by up to {differs:.3g}")
                refused[name] = f"torch.compile changed its logits by up to {differs:.3g}"
                log(f"    refused: {refused[name]}")
                continue
            runners[name] = runner
    return runners, refused, compiled


@contextlib.contextmanager
def _quiet(*loggers: str):
    """The named loggers raised to ERROR for the block."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _onnxruntime_runners(models: dict[str, nn.Module], images: Tensor, folder: Path,
                         log: Callable[[str], None]) -> tuple[dict[str, Runner], dict[str, str]]:
    """Each model exported to ONNX and opened in onnxruntime with torch's thread count; the
    reason for each one that cannot be exported faithfully. The dense model must export."""
    runners, refused = {}, {}
    for index, (name, model) in enumerate(models.items()):
        log(f"exporting {name} to ONNX ({index + 1}/{len(models)})")
        path = folder / f"{index}.onnx"
        try:
            write_onnx(model, path, images=images)
        except OnnxExportError as error:
            if name == "dense":
                raise
            refused[name] = str(error)
            log(f"  refused: {error}")
            continue
        session = onnxruntime_session(path, threads=torch.get_num_threads())
        runners[name] = lambda batch, session=session: session.run(None, {INPUT: batch.numpy()})
    return runners, refused


def format_table(rows: list[BenchRow]) -> str:
    """A Markdown table of benchmark rows (refused ones marked, with the reason below)."""
    compiled = any(row.compile_seconds is not None for row in rows)
    lines = ["| config | GFLOPs | img/s | speedup | ideal (FLOPs ratio) | speedup / ideal | over floor |"
             + (" compile s | graph breaks |" if compiled else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if compiled else "")]
    for row in rows:
        compile_cells = f" {row.compile_seconds:.1f} | {row.graph_breaks} |" if compiled else ""
        if row.refused:
            lines.append(f"| {row.name} | {row.gflops:.3f} | refused* | | {row.ideal_speedup:.2f}x | | |"
                         + compile_cells)
            continue
        over = "" if row.overhead is None else f"{row.overhead:+.1%}"
        lines.append(f"| {row.name} | {row.gflops:.3f} | {row.images_per_s:.1f} | {row.speedup:.2f}x "
                     f"| {row.ideal_speedup:.2f}x | {row.efficiency:.2f} | {over} |{compile_cells}")
    notes = [f"*{row.name}: {row.refused}" for row in rows if row.refused]
    return "\n".join(lines + ([""] + notes if notes else []))
