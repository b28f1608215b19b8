"""Small random-weight timm ViTs covering the model features reducers must respect; the fixtures
that start real servers (fixtures_*.py); and, under CI=true, a run that fails when any test skipped."""

from __future__ import annotations

import os

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from autoprune.latency import measure
from fixtures_browser import artifacts, chromium  # noqa: F401  (fixtures)
from fixtures_postgres import postgres_url  # noqa: F401

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)

VARIANTS = {
    "plain": lambda: VisionTransformer(**TINY),
    "layerscale_qknorm": lambda: VisionTransformer(**TINY, init_values=0.1, qk_norm=True),
    "registers": lambda: VisionTransformer(**TINY, reg_tokens=2),
    "distilled": lambda: VisionTransformerDistilled(**TINY),
    "avgpool_no_class_token": lambda: VisionTransformer(**TINY, class_token=False, global_pool="avg", fc_norm=True),
}


def make_model(variant: str = "plain", seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VARIANTS[variant]().eval()
    # timm's initialisation makes attention almost uniform (class token near zero, small q/k);
    # sharpen it, as training does, so that scores and per-image token counts differ
    with torch.no_grad():
        if model.cls_token is not None:
            model.cls_token.normal_(std=0.5)
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.embed_dim] *= 4
    return model


@pytest.fixture(autouse=True)
def quick_calibration(monkeypatch):
    """Latency tables in tests check what is timed, not how closely: the fewest rounds (calibrate's
    default fills about 30 s a table, and every search test calibrates its own)."""
    monkeypatch.setattr(measure, "ROUNDS_TARGET_SECONDS", 0.0)


@pytest.fixture
def images() -> torch.Tensor:
    """Four 32x32 images that differ in structure (blank, an object, noise, half noise), so that
    adaptive reducers keep different token counts for them."""
    torch.manual_seed(1)
    batch = torch.zeros(4, 3, 32, 32)
    batch[1, :, 4:12, 4:12] = 3.0
    batch[2] = torch.randn(3, 32, 32)
    batch[3, :, :, 16:] = 2 * torch.randn(3, 32, 16)
    return batch


@pytest.fixture
def one_thread():
    """Timing tiny models: one thread avoids waiting on a busy machine's second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ppt_score_spreads(model, images: torch.Tensor) -> torch.Tensor:
    """Per image, the squared coefficient of variation of the scores PPT compares with tau (cv2
    form) at `model`'s first reducing block, as the patched forward computes them."""
    from autoprune.reducers import token_scores

    block = next(b for b in model.blocks if hasattr(b, "reducer"))
    captured = {}
    hook = block.reducer.register_forward_hook(lambda mod, args, out: captured.update(args=args))
    with torch.no_grad():
        model(images)
    hook.remove()
    tokens, q, k, v, scale, bias, probs = captured["args"]
    scores = token_scores("cls_vnorm", tokens.prefix, q, k, v, scale, bias, probs)
    return scores.var(dim=1) * scores.shape[1] ** 2


# -- CI: a skipped test fails the run ----------------------------------------------------------------
# A test skips when a part it needs is missing (Chromium, PostgreSQL, a driver). Locally that is a
# choice; in CI it would hide the part going untested, so there every skip fails the run.

_skipped: list[tuple[str, str]] = []  # (test, reason) of every skip in this run


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_runtest_logreport(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus) -> None:
    if _in_ci() and _skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _in_ci() and _skipped:
        terminalreporter.section("CI=true: a skipped test fails the run", red=True)
        for nodeid, reason in _skipped:
            terminalreporter.line(f"SKIPPED {nodeid}: {reason}", red=True)
