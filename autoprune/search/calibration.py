"""FLOPs of mass-based SaiT configs, on a calibration batch of images run through the trained baseline.

A mass-based config keeps a different number of tokens per image, so its cost is a mean over
images. At its one reducing layer the token importance does not depend on the threshold (the
blocks before it run dense), so the sorted scores are computed once per (layer, score) with one
forward pass; every threshold is then a token count per image, priced in closed form. Solving a
threshold for a budget thus costs no further forward pass, and the figure equals
`count_flops(model, images)` for the same config.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..config import ConfigError, PruneConfig
from ..flops import predict_flops
from ..patch import TokenReducer, apply
from ..reducers import mass_counts, token_scores


class Calibration:
    """Mean FLOPs per image of mass-based configs on `images`, with `model`'s weights."""

    def __init__(self, model: nn.Module, images: Tensor) -> None:
        self.model = copy.deepcopy(model).eval()
        self.images = images.to(next(model.parameters()).device)
        self._ranked: dict[tuple, Tensor] = {}
        self._prices: dict[tuple, Tensor] = {}

    @classmethod
    def from_dataset(cls, model: nn.Module, dataset, count: int) -> "Calibration":
        """The first `count` images of `dataset` (deterministic)."""
        loader = torch.utils.data.DataLoader(dataset, batch_size=min(count, len(dataset)))
        return cls(model, next(iter(loader))[0])

    def flops(self, cfg: PruneConfig) -> float:
        return float(self._price_table(cfg, (cfg.layers, cfg.score))[self.kept_counts(cfg)].mean())

    def kept_counts(self, cfg: PruneConfig) -> Tensor:
        """Per calibration image, the patch tokens a mass-based config keeps (no forward pass once
        its layer's scores are known)."""
        if not cfg.adaptive:
            raise ConfigError("Calibration: only mass-based sait needs calibration; use predict_flops")
        return mass_counts(self._ranked_scores(cfg, (cfg.layers, cfg.score)), cfg.mass_threshold)

    def _ranked_scores(self, cfg: PruneConfig, key: tuple) -> Tensor:
        """Per image, the importance scores at the reducing layer, sorted in descending order."""
        if key not in self._ranked:
            model = apply(self.model, cfg)
            captured: list[Tensor] = []

            def capture(module: TokenReducer, args) -> None:
                tokens, q, k, v, scale, bias, probs = args
                scores = token_scores(module.cfg.score, tokens.prefix, q, k, v, scale, bias, probs)
                captured.append(scores.sort(dim=1, descending=True).values)

            hooks = [m.register_forward_pre_hook(capture) for m in model.modules() if isinstance(m, TokenReducer)]
            try:
                with torch.no_grad():
                    for start in range(0, len(self.images), 64):
                        model(self.images[start:start + 64])
            finally:
                for hook in hooks:
                    hook.remove()
            self._ranked[key] = torch.cat(captured).cpu()
        return self._ranked[key]

    def _price_table(self, cfg: PruneConfig, key: tuple) -> Tensor:
        """FLOPs per image by the number of tokens it keeps (index = kept count)."""
        if key not in self._prices:
            n = self.model.patch_embed.num_patches
            prices = [0.0] + [float(predict_flops(self.model, PruneConfig(reducer="sait", layers=cfg.layers,
                                                                          r=n - kept, score=cfg.score)))
                              for kept in range(1, n + 1)]
            self._prices[key] = torch.tensor(prices, dtype=torch.float64)
        return self._prices[key]
