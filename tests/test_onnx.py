"""ONNX export: every reducer matches PyTorch in onnxruntime, refusals are one line and leave
nothing behind, the manifest says how to feed the file, and bench runs through onnxruntime."""

import json
import sys

import pytest
import torch

for package in ("onnx", "onnxruntime", "onnxscript"):
    pytest.importorskip(package, reason=f"{package} is not installed: pip install -e '.[onnx]' runs these tests")

import onnx  # noqa: E402

import autoprune  # noqa: E402
from autoprune import PruneConfig, apply, export_onnx  # noqa: E402
from autoprune.cli import main  # noqa: E402
from autoprune.onnx_export import INPUT, OPSET, OUTPUT, TOLERANCE, OnnxExportError, onnxruntime_session  # noqa: E402
from conftest import make_model, ppt_score_spreads  # noqa: E402

CONFIGS = {
    "evit": PruneConfig(reducer="evit", layers=(1, 2), keep_rate=0.6),
    "evit no fuse": PruneConfig(reducer="evit", layers=(1, 2), keep_rate=0.6, fuse=False),
    "tome": PruneConfig(reducer="tome", r=6),
    "tps": PruneConfig(reducer="tps", layers=(1, 2), keep_rate=0.6),
    "sait value": PruneConfig(reducer="sait", layers=(1,), keep_rate=0.6),
    "bat": PruneConfig(reducer="bat", layers=(1, 2), keep_rate=0.6, clusters=3, knn=3, pairs=2),
}


def onnx_logits(path, images: torch.Tensor) -> torch.Tensor:
    session = onnxruntime_session(path)
    return torch.from_numpy(session.run([OUTPUT], {INPUT: images.numpy()})[0])


def assert_matches_pytorch(model, path, images: torch.Tensor) -> None:
    """The file's logits equal PyTorch's on the batch and on each image alone (the batch axis is dynamic)."""
    with torch.no_grad():
        torch.testing.assert_close(onnx_logits(path, images), model(images), atol=TOLERANCE, rtol=0)
        for image in images:
            torch.testing.assert_close(onnx_logits(path, image[None]), model(image[None]), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("cfg", [
    pytest.param(cfg, id=name)
    for name, cfg in CONFIGS.items()
])
def test_each_reducer_exports_and_matches_pytorch(cfg, images, tmp_path):
    model = apply(make_model(), cfg)
    out = export_onnx(model, tmp_path / "m", images=images)
    assert_matches_pytorch(model, out / "model.onnx", images)


def test_mass_based_sait_exports_its_per_image_counts(images, tmp_path):
    model = apply(make_model(), PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.6))
    with torch.no_grad():
        model(images)
    counts = model.final_tokens.valid.sum(1).tolist()
    assert len(set(counts)) > 1, "the images must keep different token counts"
    out = export_onnx(model, tmp_path / "m", images=images[:2])  # traced on two images, run on others
    assert_matches_pytorch(model, out / "model.onnx", images)


def test_ppt_exports_a_batch_that_pools_some_images_and_prunes_others(images, tmp_path):
    model = apply(make_model(), PruneConfig(reducer="ppt", layers=(1,), r=10, tau=0.0, tau_mode="cv2"))
    middle = ppt_score_spreads(model, images).sort().values[1:3]
    tau = float(middle.mean())  # halfway between two images: no image sits on the threshold
    apply(model, PruneConfig(reducer="ppt", layers=(1,), r=10, tau=tau, tau_mode="cv2"))
    with torch.no_grad():
        model(images)
    pooled = (model.final_tokens.size > 1).any(dim=1)
    assert 0 < int(pooled.sum()) < len(images), "the batch must mix pooled and pruned images"
    out = export_onnx(model, tmp_path / "m", images=images)
    assert_matches_pytorch(model, out / "model.onnx", images)


def test_manifest_and_file_say_how_to_feed_the_model(images, tmp_path):
    model = apply(make_model(), CONFIGS["evit"]).train()
    out = export_onnx(model, tmp_path / "m", images=images)
    assert model.training, "the caller's model keeps its mode (the export runs a copy in eval mode)"
    assert sorted(p.name for p in out.iterdir()) == ["autoprune.json", "model.onnx"]
    manifest = json.loads((out / "autoprune.json").read_text())
    assert manifest["format"] == "onnx" and manifest["onnx"]["opset"] == OPSET
    assert manifest["prune_config"] == CONFIGS["evit"].to_dict() and manifest["num_classes"] == 10
    assert manifest["onnx"]["input"] == {"name": INPUT, "shape": ["batch", 3, 32, 32], "dtype": "float32"}
    assert manifest["onnx"]["output"] == {"name": OUTPUT, "shape": ["batch", 10], "dtype": "float32"}
    assert manifest["onnx"]["checked"]["max_abs_diff"] <= TOLERANCE
    preprocessing = manifest["preprocessing"]
    assert preprocessing["input_size"] == [3, 32, 32]
    assert preprocessing["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert preprocessing["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert preprocessing["interpolation"] == "bicubic" and preprocessing["crop_mode"] == "center"
    assert 0 < preprocessing["crop_pct"] <= 1
    graph = onnx.load(str(out / "model.onnx"))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    batch_axis = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param and not batch_axis.dim_value  # dynamic
    metadata = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(metadata["autoprune.prune_config"]) == CONFIGS["evit"].to_dict()
    assert json.loads(metadata["autoprune.preprocessing"]) == preprocessing


def test_an_export_that_computes_something_else_is_refused_and_removed(images, tmp_path, monkeypatch):
    """A reducer that traces into a different graph than it runs: the onnxruntime check catches it."""
    real_evit = autoprune.reducers.evit

    def evit_unlike_its_export(tokens, scores, keep, fuse):
        out = real_evit(tokens, scores, keep, fuse)
        return out.replace(x=out.x * 1.01) if torch.compiler.is_exporting() else out

    monkeypatch.setattr(autoprune.reducers, "evit", evit_unlike_its_export)
    model = apply(make_model(), CONFIGS["evit"])
    with pytest.raises(OnnxExportError) as refused:
        export_onnx(model, tmp_path / "m", images=images)
    message = str(refused.value)
    assert message.startswith("reducer evit: the ONNX graph computes something else than PyTorch")
    assert "\n" not in message and "nothing written" in message
    assert list(tmp_path.iterdir()) == []


def test_a_reducer_that_does_not_trace_is_refused_in_one_line(images, tmp_path, monkeypatch):
    real_tps = autoprune.reducers.tps

    def tps_with_a_data_dependent_branch(tokens, scores, keep, temperature):
        if bool(scores.max() > 0.5):
            keep = keep - 1
        return real_tps(tokens, scores, keep, temperature)

    monkeypatch.setattr(autoprune.reducers, "tps", tps_with_a_data_dependent_branch)
    with pytest.raises(OnnxExportError) as refused:
        export_onnx(apply(make_model(), CONFIGS["tps"]), tmp_path / "m", images=images)
    message = str(refused.value)
    assert message.startswith("reducer tps cannot be exported to ONNX: ")
    assert "data-dependent" in message and "test_onnx.py" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call, message", [
    (lambda path: export_onnx(make_model(), path, opset=17), "opset: 17 is invalid; accepted: an integer >= 18"),
    (lambda path: export_onnx(torch.nn.Linear(2, 2), path), "expected a timm VisionTransformer, got Linear"),
])
def test_bad_arguments_are_refused(call, message, tmp_path):
    with pytest.raises(OnnxExportError, match=message):
        call(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_missing_packages_are_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(OnnxExportError, match=r"needs onnx, onnxruntime and onnxscript .*pip install 'autoprune\[onnx\]'"):
        export_onnx(make_model(), tmp_path / "m")


def test_bench_runs_through_onnxruntime(capsys):
    code = main(["bench", "--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=8,depth=4",
                 "--config", '{"reducer": "tome", "r": 2}', "--backend", "onnxruntime",
                 "--batch-size", "2", "--rounds", "2", "--warmup", "0", "--json"])
    captured = capsys.readouterr()
    assert code == 0
    rows = json.loads(captured.out.strip().splitlines()[-1])
    assert [row["name"] for row in rows] == ["dense", "tome r=2 @all", "tome r=2 @all [floor]"]
    assert all(row["refused"] is None and row["images_per_s"] > 0 for row in rows)
    assert "onnxruntime" in captured.out and "exporting tome r=2 @all to ONNX (2/3)" in captured.err
