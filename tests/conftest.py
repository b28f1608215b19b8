"""Small random-weight timm ViTs covering the model features reducers must respect."""

from __future__ import annotations

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

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
