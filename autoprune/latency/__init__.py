"""Speed you can plan on: a latency table per model, device and batch size (`calibrate`), and
throughput predicted from it in closed form (`predict_throughput`)."""

from .measure import DEFAULT_KINDS, calibrate, default_grid
from .predict import predict_seconds, predict_throughput
from .table import DEFAULT_CACHE, LatencyError, LatencyTable, reduce_kind

__all__ = ["DEFAULT_CACHE", "DEFAULT_KINDS", "LatencyError", "LatencyTable", "calibrate", "default_grid",
           "predict_seconds", "predict_throughput", "reduce_kind"]
