"""autoprune: token reduction for timm Vision Transformers, and the search that configures it.

    import timm, autoprune
    cfg = autoprune.PruneConfig(reducer="evit", layers=(3, 6, 9), keep_rate=0.7)
    model = autoprune.apply(timm.create_model("deit_small_patch16_224"), cfg)
    autoprune.count_flops(model), autoprune.predict_flops(model, cfg)
"""

from .config import ConfigError, PruneConfig
from .export import load
from .flops import count_flops, predict_flops
from .onnx_export import export_onnx
from .patch import apply, remove

__all__ = ["ConfigError", "PruneConfig", "apply", "count_flops", "export_onnx", "load", "predict_flops", "remove"]
__version__ = "0.1.1"  # part of the baseline cache key: bump when a baseline would change
