"""Token reducers as pure functions over `Tokens` (no timm, no modules): see reducers.md."""

from .bat import bat, density_peak_clusters, merge_attentive_pairs
from .evit import evit
from .ppt import ppt
from .sait import mass_counts, sait, sait_mass
from .scores import NEEDS_PROBS, cls_attention, token_scores
from .tokens import Tokens
from .tome import tome
from .tps import tps

__all__ = ["Tokens", "bat", "cls_attention", "density_peak_clusters", "evit", "mass_counts",
           "merge_attentive_pairs", "NEEDS_PROBS", "ppt", "sait", "sait_mass", "token_scores", "tome", "tps"]
