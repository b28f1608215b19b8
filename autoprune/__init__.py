"""autoprune: token reduction for timm Vision Transformers, and the search that configures it.

    import timm, autoprune
    cfg = autoprune.PruneConfig(reducer="evit", layers=(3, 6, 9), keep_rate=0.7)
    model = autoprune.apply(timm.create_model("deit_small_patch16_224"), cfg)
    autoprune.count_flops(model), autoprune.predict_flops(model, cfg)
    table = autoprune.calibrate(model, batch_size=1)      # this device's latency table (cached)
    autoprune.predict_throughput(model, cfg, table)       # images/s, in closed form
"""

__version__ = "0.1.1"  # part of the baseline and latency cache keys: bump when a baseline would change

from .config import ConfigError, PruneConfig  # noqa: E402  (modules below read __version__)
from .export import load  # noqa: E402
from .flops import count_flops, predict_flops  # noqa: E402
from .latency import calibrate, predict_throughput  # noqa: E402
from .onnx_export import export_onnx  # noqa: E402
from .patch import apply, remove  # noqa: E402

__all__ = ["ConfigError", "PruneConfig", "apply", "calibrate", "count_flops", "export_onnx", "load", "predict_flops",
           "predict_throughput", "remove"]
