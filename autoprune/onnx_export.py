"""Export a (token-reduced) timm ViT to one ONNX file, checked in onnxruntime against PyTorch.

The graph comes from `torch.onnx.export(dynamo=True)` (torch.export underneath) with a dynamic
batch axis. Every file is run once in onnxruntime on a varied batch and compared with the PyTorch
model; one that disagrees is refused and never left on disk, so an export is either faithful or
absent. The folder form (`export_onnx`) adds `autoprune.json`: opset, input and output names, and
the preprocessing (input size, mean/std, interpolation, crop) a consumer needs without timm.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .export import MANIFEST, ONNX_FILE, ExportError, model_from_manifest, trial_manifest, write_folder

OPSET = 18            # the lowest the exporter writes: the widest runtime support (onnxruntime, TensorRT, OpenVINO)
TOLERANCE = 1e-4      # max |logit difference| between onnxruntime and PyTorch (fp32)
INPUT, OUTPUT = "images", "logits"
CHECK_IMAGES = 8


class OnnxExportError(ExportError):
    """A model that cannot be exported faithfully (or a machine without the ONNX packages)."""


@dataclass(frozen=True)
class OnnxCheck:
    """How the written file compared with PyTorch in onnxruntime."""

    images: int
    max_abs_diff: float


def export_onnx(model: nn.Module, out: str | Path, *, opset: int = OPSET, images: Tensor | None = None,
                force: bool = False, manifest: dict[str, Any] | None = None) -> Path:
    """Write `model` (a timm ViT, reduced by `autoprune.apply` or dense, e.g. from `autoprune.load`)
    to the folder `out`: `model.onnx` and `autoprune.json`. The file is checked in onnxruntime
    against PyTorch on `images` (default: a varied synthetic batch) and refused if they disagree.
    `manifest` adds fields to `autoprune.json` (the CLI adds the study's)."""
    def write(folder: Path) -> None:
        check = write_onnx(model, folder / ONNX_FILE, opset=opset, images=images)
        (folder / MANIFEST).write_text(json.dumps({**(manifest or {}), **_manifest(model, opset, check)}, indent=2))

    return write_folder(out, force, write)


def export_trial_onnx(study: optuna.Study, trial: optuna.trial.FrozenTrial, out: str | Path,
                      force: bool = False) -> Path:
    """`export_trial` in ONNX form: the trial's fine-tuned reduced model as `model.onnx`."""
    manifest, checkpoint = trial_manifest(study, trial)
    return export_onnx(model_from_manifest(manifest, checkpoint), out, force=force, manifest=manifest)


def write_onnx(model: nn.Module, path: str | Path, *, opset: int = OPSET, images: Tensor | None = None) -> OnnxCheck:
    """Export `model` to the ONNX file `path` and check it in onnxruntime against PyTorch; on any
    failure nothing is left at `path` and `OnnxExportError` says, in one line, which reducer and why."""
    _require_packages()
    if not isinstance(model, VisionTransformer):
        raise OnnxExportError(f"ONNX export: expected a timm VisionTransformer, got {type(model).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < OPSET:
        raise OnnxExportError(f"opset: {opset!r} is invalid; accepted: an integer >= {OPSET} (the exporter's lowest)")
    name = _reducer_name(model)
    model = copy.deepcopy(model).float().cpu().eval()  # the caller's model keeps its device, dtype and mode
    images = _check_images(model) if images is None else images.float().cpu()
    path = Path(path)
    try:
        _export(model, images, path, opset, name)
        return _compare(model, images, path, name)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def preprocessing(model: nn.Module) -> dict[str, Any]:
    """timm's eval transform for the model, spelled out: resize, centre crop, scale, normalise."""
    from .data import model_data_config

    data = model_data_config(model)
    return {
        "input_size": list(data["input_size"]),
        "interpolation": data["interpolation"],
        "crop_pct": data["crop_pct"],
        "crop_mode": data["crop_mode"],
        "mean": list(data["mean"]),
        "std": list(data["std"]),
        "scale": "RGB pixels / 255, then (x - mean) / std per channel",
    }


def onnxruntime_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session for `path`, with `threads` intra-op threads (None: its default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _reducer_name(model: nn.Module) -> str:
    """'dense' or the reducer a model runs, for messages."""
    config = getattr(model, "prune_config", None)
    return "dense" if config is None else f"reducer {config.reducer}"


def _check_images(model: VisionTransformer, count: int = CHECK_IMAGES) -> Tensor:
    """A deterministic batch of differently structured inputs (blank, objects, noise, half noise,
    a gradient, stripes), so adaptive reducers take different paths and keep different counts."""
    generator = torch.Generator().manual_seed(0)
    channels, (height, width) = model.patch_embed.proj.in_channels, model.patch_embed.img_size
    images = torch.zeros(count, channels, height, width)
    noise = torch.randn(count, channels, height, width, generator=generator)
    ramp = torch.linspace(-2, 2, width)
    for index in range(count):
        kind = index % 6
        if kind == 1:  # an object on a blank background, at a place depending on the index
            top, left = (index * height // 7) % (height // 2), (index * width // 5) % (width // 2)
            images[index, :, top:top + height // 3, left:left + width // 3] = 3.0
        elif kind == 2:
            images[index] = noise[index]
        elif kind == 3:
            images[index, :, :, width // 2:] = 2 * noise[index, :, :, width // 2:]
        elif kind == 4:
            images[index] = ramp.expand(channels, height, width)
        elif kind == 5:
            images[index, :, :, ::4] = 2.0
    return images


def _manifest(model: nn.Module, opset: int, check: OnnxCheck) -> dict[str, Any]:
    """What a consumer needs to run the file without timm: names, shapes, preprocessing, versions."""
    import onnxruntime

    from . import __version__

    config = getattr(model, "prune_config", None)
    data = preprocessing(model)
    return {
        "format": "onnx",
        "model": (getattr(model, "pretrained_cfg", None) or {}).get("architecture"),
        "num_classes": model.num_classes,
        "prune_config": None if config is None else config.to_dict(),
        "onnx": {
            "file": ONNX_FILE,
            "opset": opset,
            "input": {"name": INPUT, "shape": ["batch", *data["input_size"]], "dtype": "float32"},
            "output": {"name": OUTPUT, "shape": ["batch", model.num_classes], "dtype": "float32"},
            "checked": {"onnxruntime": onnxruntime.__version__, "images": check.images,
                        "max_abs_diff": check.max_abs_diff, "tolerance": TOLERANCE},
        },
        "preprocessing": data,
        "versions": {"autoprune": __version__, "torch": torch.__version__},
    }


def _require_packages() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise OnnxExportError(f"ONNX export needs onnx, onnxruntime and onnxscript ({error.name} is missing): "
                              "pip install 'autoprune[onnx]'") from None


def _export(model: nn.Module, images: Tensor, path: Path, opset: int, name: str) -> None:
    batch = torch.export.Dim("batch")
    try:
        with _quiet_exporter():
            program = torch.onnx.export(model, (images,), dynamo=True, opset_version=opset, verbose=False,
                                        input_names=[INPUT], output_names=[OUTPUT], dynamic_shapes=({0: batch},))
    except Exception as error:  # the exporter raises its own error types, with the cause chained
        raise OnnxExportError(f"{name} cannot be exported to ONNX: {_why(error)}") from None
    config = getattr(model, "prune_config", None)
    program.model.metadata_props["autoprune.prune_config"] = "null" if config is None else config.to_json()
    program.model.metadata_props["autoprune.preprocessing"] = json.dumps(preprocessing(model))
    program.save(path)


def _compare(model: nn.Module, images: Tensor, path: Path, name: str) -> OnnxCheck:
    """Max |logit difference| over the batch and over its first image alone (the dynamic batch axis)."""
    try:
        session = onnxruntime_session(path)
        difference = 0.0
        for batch in (images, images[:1]):
            with torch.no_grad():
                expected = model(batch)
            got = torch.from_numpy(session.run([OUTPUT], {INPUT: batch.numpy()})[0])
            difference = max(difference, float((got - expected).abs().max()))
    except Exception as error:  # onnxruntime raises its own error types
        raise OnnxExportError(f"{name}: onnxruntime cannot run the exported graph "
                              f"({str(error).splitlines()[0][:300]})") from None
    if not difference <= TOLERANCE:  # also refuses NaN
        raise OnnxExportError(f"{name}: the ONNX graph computes something else than PyTorch (logits differ by up to "
                              f"{difference:.1e} in onnxruntime, tolerance {TOLERANCE:.0e}); nothing written")
    return OnnxCheck(images=len(images), max_abs_diff=difference)


def _why(error: BaseException) -> str:
    """One line from the exporter's chained errors: the root cause, and the user code it points at."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    reason = lines[0] if lines else type(root).__name__
    reason = re.sub(r"<OpOverload\(op='([\w.]+)', overload='(\w+)'\)>", r"\1.\2", reason)
    where = re.search(r'raised this error:\s+File "([^"]+)", line (\d+), in \w+\s+(.+)', str(error))
    if where:
        file = where.group(1).split("autoprune/", 1)[-1]
        reason += f" (at {file}:{where.group(2)}: {where.group(3).strip()})"
    return reason[:400]


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter reports through warnings, torch's loggers and prints (a failed attempt prints its
    partial graph before the next strategy is tried); autoprune reports through its errors."""
    loggers = [logging.getLogger(name) for name in ("torch.fx.experimental.symbolic_shapes", "torch.onnx",
                                                     "torch._dynamo", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
