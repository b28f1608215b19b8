"""Unit tests of the pure reducers (autoprune.reducers) and the token schedule (autoprune.schedule)
on tiny hand-computed cases. Semantics: shared/spec/reducers.md.

Every expected value below is written out literally (with the arithmetic in a comment); nothing
is recomputed by re-implementing a reducer. Convention: `metric` and `scores` address the
non-prefix tokens only ("body index" j = global position j + prefix).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from autoprune.config import ConfigError, PruneConfig
from autoprune.reducers import (
    Tokens,
    bat,
    density_peak_clusters,
    evit,
    merge_attentive_pairs,
    ppt,
    sait,
    sait_mass,
    token_scores,
    tome,
    tps,
)
from autoprune.schedule import bat_counts, block_token_counts, keep_count, merge_count, tokens_after

LN2, LN3, LN5 = math.log(2.0), math.log(3.0), math.log(5.0)
E = math.e


def t(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def close(actual: torch.Tensor, expected, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert_close(actual, expected, rtol=rtol, atol=atol)


def same(actual: Tokens, expected: Tokens) -> None:
    assert actual.prefix == expected.prefix
    assert_close(actual.x, expected.x, rtol=0, atol=0)
    assert_close(actual.size, expected.size, rtol=0, atol=0)
    assert (actual.source is None) == (expected.source is None)
    if actual.source is not None:
        assert_close(actual.source, expected.source, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# evit
# ------------------------------------------------------------------------------------------------

CLS = [100.0, 100.0]
DIST = [50.0, -50.0]
# body tokens j = 0..4
EVIT_BODY = [[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [3.0, -1.0], [-2.0, 4.0]]
EVIT_SIZES = [1.0, 2.0, 3.0, 1.0, 4.0]
# top-2 by score are j=3 (0.4) then j=1 (0.3); kept in POSITION order -> [1, 3]
EVIT_SCORES = [0.1, 0.3, 0.05, 0.4, 0.15]
# fused = 0.1*[1,0] + 0.05*[2,2] + 0.15*[-2,4] = [0.1+0.1-0.3, 0+0.1+0.6] = [-0.1, 0.7]
EVIT_FUSED = [-0.1, 0.7]


def _evit_tokens(prefix_rows, sizes=EVIT_SIZES):
    x = t([prefix_rows + EVIT_BODY])
    size = t([[1.0] * len(prefix_rows) + sizes])
    return Tokens(x=x, size=size, prefix=len(prefix_rows))


def test_evit_keeps_top_in_position_order_and_fuses_with_raw_scores():
    tokens = _evit_tokens([CLS])
    out = evit(tokens, t([EVIT_SCORES]), keep=2, fuse=True)
    assert out.prefix == 1
    close(out.x, [[CLS, [0.0, 1.0], [3.0, -1.0], EVIT_FUSED]])
    # kept sizes 2 (j=1) and 1 (j=3); fused size = 1 + 3 + 4 (j = 0, 2, 4)
    close(out.size, [[1.0, 2.0, 1.0, 8.0]])


def test_evit_without_fuse_drops_the_rest():
    out = evit(_evit_tokens([CLS]), t([EVIT_SCORES]), keep=2, fuse=False)
    close(out.x, [[CLS, [0.0, 1.0], [3.0, -1.0]]])
    close(out.size, [[1.0, 2.0, 1.0]])


@pytest.mark.parametrize("keep", [5, 7])
def test_evit_keep_at_least_n_is_identity(keep):
    tokens = _evit_tokens([CLS])
    for fuse in (True, False):
        same(evit(tokens, t([EVIT_SCORES]), keep=keep, fuse=fuse), tokens)


def test_evit_two_prefix_tokens_stay_in_front_untouched():
    out = evit(_evit_tokens([CLS, DIST]), t([EVIT_SCORES]), keep=2, fuse=True)
    assert out.prefix == 2
    close(out.x, [[CLS, DIST, [0.0, 1.0], [3.0, -1.0], EVIT_FUSED]])
    close(out.size, [[1.0, 1.0, 2.0, 1.0, 8.0]])


def test_evit_per_image_selection_in_a_batch():
    x = t([[CLS] + EVIT_BODY, [[-7.0, 7.0]] + EVIT_BODY])
    tokens = Tokens(x=x, size=t([[1.0] + EVIT_SIZES] * 2), prefix=1)
    # image 1: top-2 = j 0 (0.5) and j 2 (0.2); pruned j 3 (0.15), 1 (0.1), 4 (0.05)
    # fused = 0.15*[3,-1] + 0.1*[0,1] + 0.05*[-2,4] = [0.45-0.1, -0.15+0.1+0.2] = [0.35, 0.15]
    scores = t([EVIT_SCORES, [0.5, 0.1, 0.2, 0.15, 0.05]])
    out = evit(tokens, scores, keep=2, fuse=True)
    close(out.x, [[CLS, [0.0, 1.0], [3.0, -1.0], EVIT_FUSED],
                  [[-7.0, 7.0], [1.0, 0.0], [2.0, 2.0], [0.35, 0.15]]])
    # image 1 sizes: kept j0 = 1, j2 = 3; fused = 2 + 1 + 4
    close(out.size, [[1.0, 2.0, 1.0, 8.0], [1.0, 1.0, 3.0, 7.0]])


def test_evit_tracks_sources():
    tokens = Tokens.start(t([[CLS] + EVIT_BODY]), prefix=1, track_source=True)
    out = evit(tokens, t([EVIT_SCORES]), keep=2, fuse=True)
    close(out.size, [[1.0, 1.0, 1.0, 3.0]])
    close(out.source, [[[0, 0, 0, 0, 0],
                        [0, 1, 0, 0, 0],
                        [0, 0, 0, 1, 0],
                        [1, 0, 1, 0, 1]]])


# ------------------------------------------------------------------------------------------------
# tome
# ------------------------------------------------------------------------------------------------
# prefix 1 (CLS at global 0), n = 6: body j sits at global j + 1, so
#   A (even global, CLS included) = body j 1, 3, 5;  B (odd global) = body j 0, 2, 4.
# metric (cosine; not normalised here on purpose):
#   B0 = [1, 0], B2 = [0, 1], B4 = [-1, 0]
# image 1: A1 = [1, 0.1]  -> best B0, cos = 1/sqrt(1.01)     = 0.995
#          A3 = [1, 0.5]  -> best B0, cos = 1/sqrt(1.25)     = 0.894 (B2: 0.447)
#          A5 = [-1, 1.5] -> best B2, cos = 1.5/sqrt(3.25)   = 0.832 (B4: 0.555)
#   ranking A1 > A3 > A5
# image 2: A1 = [1.5, -1] -> best B0, cos = 1.5/sqrt(3.25)   = 0.832
#          A3 = [0.5, 1]  -> best B2, cos = 1/sqrt(1.25)     = 0.894
#          A5 = [-1, 0.1] -> best B4, cos = 1/sqrt(1.01)     = 0.995
#   ranking A5 > A3 > A1 (unmerged A come out in position order, not by score)
TOME_CLS = [9.0, 9.0]
TOME_BODY = [[4.0, 0.0], [1.0, 2.0], [5.0, 5.0], [0.0, -4.0], [7.0, 1.0], [2.0, 3.0]]
TOME_SIZES = [2.0, 1.0, 1.0, 3.0, 1.0, 1.0]
TOME_METRIC_1 = [[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 0.5], [-1.0, 0.0], [-1.0, 1.5]]
TOME_METRIC_2 = [[1.0, 0.0], [1.5, -1.0], [0.0, 1.0], [0.5, 1.0], [-1.0, 0.0], [-1.0, 0.1]]


def _tome_tokens(images=1):
    return Tokens(x=t([[TOME_CLS] + TOME_BODY] * images), size=t([[1.0] + TOME_SIZES] * images), prefix=1)


def test_tome_two_sources_land_on_one_b_with_size_weighted_average():
    out = tome(_tome_tokens(), t([TOME_METRIC_1]), r=2)
    # A1 and A3 merge into B0:
    #   (2*[4,0] + 1*[1,2] + 3*[0,-4]) / (2+1+3) = [9, -10] / 6
    # output: CLS, unmerged A (A5), then B0', B2, B4
    close(out.x, [[TOME_CLS, [2.0, 3.0], [1.5, -10.0 / 6.0], [5.0, 5.0], [7.0, 1.0]]])
    close(out.size, [[1.0, 1.0, 6.0, 1.0, 1.0]])


def test_tome_batch_per_image_matching_and_position_order():
    out = tome(_tome_tokens(images=2), t([TOME_METRIC_1, TOME_METRIC_2]), r=1)
    # image 1: A1 -> B0: (2*[4,0] + 1*[1,2]) / 3 = [9, 2] / 3; unmerged A3, A5
    # image 2: A5 -> B4: (1*[7,1] + 1*[2,3]) / 2 = [4.5, 2]; unmerged A1, A3 (score order A3, A1)
    close(out.x, [
        [TOME_CLS, [0.0, -4.0], [2.0, 3.0], [3.0, 2.0 / 3.0], [5.0, 5.0], [7.0, 1.0]],
        [TOME_CLS, [1.0, 2.0], [0.0, -4.0], [4.0, 0.0], [5.0, 5.0], [4.5, 2.0]],
    ])
    close(out.size, [[1.0, 3.0, 1.0, 3.0, 1.0, 1.0],
                     [1.0, 1.0, 3.0, 2.0, 1.0, 2.0]])


def test_tome_r_is_capped_at_half_and_cls_is_never_merged():
    out = tome(_tome_tokens(), t([TOME_METRIC_1]), r=10)  # capped at 6 // 2 = 3: every A merges
    # B0' = [9, -10] / 6 (size 6) as above; B2' = (1*[5,5] + 1*[2,3]) / 2 = [3.5, 4] (size 2)
    close(out.x, [[TOME_CLS, [1.5, -10.0 / 6.0], [3.5, 4.0], [7.0, 1.0]]])
    close(out.size, [[1.0, 6.0, 2.0, 1.0]])


def test_tome_r_zero_is_identity():
    tokens = _tome_tokens()
    same(tome(tokens, t([TOME_METRIC_1]), r=0), tokens)


def test_tome_tracks_sources():
    tokens = Tokens.start(t([[TOME_CLS] + TOME_BODY]), prefix=1, track_source=True)
    out = tome(tokens, t([TOME_METRIC_1]), r=2)
    # all sizes 1: B0' = ([4,0] + [1,2] + [0,-4]) / 3 = [5/3, -2/3]
    close(out.x, [[TOME_CLS, [2.0, 3.0], [5.0 / 3.0, -2.0 / 3.0], [5.0, 5.0], [7.0, 1.0]]])
    close(out.size, [[1.0, 1.0, 3.0, 1.0, 1.0]])
    close(out.source, [[[0, 0, 0, 0, 0, 0],
                        [0, 0, 0, 0, 0, 1],
                        [1, 1, 0, 1, 0, 0],
                        [0, 0, 1, 0, 0, 0],
                        [0, 0, 0, 0, 1, 0]]])


def test_tome_two_prefix_tokens():
    # prefix 2 (CLS global 0, DIST global 1), n = 5: body j at global j + 2, so
    #   A = body j 0, 2, 4 (global 2, 4, 6); B = body j 1, 3 (global 3, 5).
    # metric: B1 = [1,0], B3 = [0,1]
    #   A0 = [1, 0.1] -> B1, cos 0.995;  A2 = [0.2, 1] -> B3, cos 1/sqrt(1.04) = 0.981;
    #   A4 = [1, 1.2] -> B3, cos 1.2/sqrt(2.44) = 0.768
    body = [[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 3.0], [-1.0, 5.0]]
    metric = t([[[1.0, 0.1], [1.0, 0.0], [0.2, 1.0], [0.0, 1.0], [1.0, 1.2]]])
    tokens = Tokens.start(t([[CLS, DIST] + body]), prefix=2)

    out = tome(tokens, metric, r=1)
    # A0 -> B1: ([2,0] + [0,2]) / 2 = [1, 1]; output CLS, DIST, A2, A4, B1', B3
    assert out.prefix == 2
    close(out.x, [[CLS, DIST, [1.0, 1.0], [-1.0, 5.0], [1.0, 1.0], [3.0, 3.0]]])
    close(out.size, [[1.0, 1.0, 1.0, 1.0, 2.0, 1.0]])

    out = tome(tokens, metric, r=5)  # capped at 5 // 2 = 2: A0 -> B1, A2 -> B3
    # B3' = ([1,1] + [3,3]) / 2 = [2, 2]
    close(out.x, [[CLS, DIST, [-1.0, 5.0], [1.0, 1.0], [2.0, 2.0]]])
    close(out.size, [[1.0, 1.0, 1.0, 2.0, 2.0]])


# ------------------------------------------------------------------------------------------------
# ppt
# ------------------------------------------------------------------------------------------------
# prefix 1, n = 4, r = 1. Body j at global j+1: A = j 1, 3; B = j 0, 2.
# metric: B0 = [1,0], B2 = [0,1]; A1 = [1, 0.2] -> B0 cos 0.981; A3 = [1, 2] -> B2 cos 0.894.
PPT_CLS = [9.0, 9.0]
PPT_BODY = [[2.0, 4.0], [4.0, 0.0], [1.0, 1.0], [0.0, 3.0]]
PPT_SIZES = [1.0, 3.0, 1.0, 2.0]
PPT_METRIC = [[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [1.0, 2.0]]
# flat: mean 0.25, deviations .01, -.01, 0, 0 -> unbiased var = 0.0002 / 3 = 6.67e-5
FLAT = [0.26, 0.24, 0.25, 0.25]
# peaked: deviations .15, -.2, .1, -.05 -> var = (.0225+.04+.01+.0025) / 3 = 0.025
PEAKED = [0.4, 0.05, 0.35, 0.2]
# pooled (ToMe, A1 -> B0): (1*[2,4] + 3*[4,0]) / 4 = [14, 4] / 4 = [3.5, 1]; output CLS, A3, B0', B2
POOLED_X, POOLED_SIZE = [PPT_CLS, [0.0, 3.0], [3.5, 1.0], [1.0, 1.0]], [1.0, 2.0, 4.0, 1.0]
# pruned (peaked): drop j 1 (0.05); keep j 0, 2, 3 with their sizes
PRUNED_X, PRUNED_SIZE = [PPT_CLS, [2.0, 4.0], [1.0, 1.0], [0.0, 3.0]], [1.0, 1.0, 1.0, 2.0]
# pruned (flat): drop j 1 (0.24), the same tokens survive
FLAT_PRUNED_X, FLAT_PRUNED_SIZE = PRUNED_X, PRUNED_SIZE


def _ppt_tokens(images):
    return Tokens.start(t([[PPT_CLS] + PPT_BODY] * images), prefix=1, track_source=True).replace(
        size=t([[1.0] + PPT_SIZES] * images))


def test_ppt_pools_flat_images_and_prunes_peaked_ones_in_one_batch():
    out = ppt(_ppt_tokens(2), t([FLAT, PEAKED]), t([PPT_METRIC] * 2), r=1, tau=1e-3, tau_mode="var")
    assert out.x.shape == (2, 4, 2)  # both images leave 1 + 4 - 1 tokens
    close(out.x, [POOLED_X, PRUNED_X])
    close(out.size, [POOLED_SIZE, PRUNED_SIZE])
    close(out.source, [[[0, 0, 0, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0]],
                       [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]])

    # the other image order puts the results back in that order
    swapped = ppt(_ppt_tokens(2), t([PEAKED, FLAT]), t([PPT_METRIC] * 2), r=1, tau=1e-3, tau_mode="var")
    close(swapped.x, [PRUNED_X, POOLED_X])
    close(swapped.size, [PRUNED_SIZE, POOLED_SIZE])


def test_ppt_batch_equals_each_image_alone():
    batch = ppt(_ppt_tokens(2), t([FLAT, PEAKED]), t([PPT_METRIC] * 2), r=1, tau=1e-3, tau_mode="var")
    for i, scores in enumerate((FLAT, PEAKED)):
        alone = ppt(_ppt_tokens(1), t([scores]), t([PPT_METRIC]), r=1, tau=1e-3, tau_mode="var")
        assert_close(batch.x[i:i + 1], alone.x, rtol=0, atol=0)
        assert_close(batch.size[i:i + 1], alone.size, rtol=0, atol=0)
        assert_close(batch.source[i:i + 1], alone.source, rtol=0, atol=0)
    close(ppt(_ppt_tokens(1), t([FLAT]), t([PPT_METRIC]), 1, 1e-3, "var").x, [POOLED_X])
    close(ppt(_ppt_tokens(1), t([PEAKED]), t([PPT_METRIC]), 1, 1e-3, "var").x, [PRUNED_X])


def test_ppt_cv2_flips_the_decision():
    # tau = 5e-4. var: flat 6.67e-5 < tau -> pool.
    # cv2: flat 6.67e-5 * 4^2 = 1.07e-3 >= tau -> prune; peaked .025 * 16 = .4 -> prune.
    scores, metric = t([FLAT, PEAKED]), t([PPT_METRIC] * 2)
    var = ppt(_ppt_tokens(2), scores, metric, r=1, tau=5e-4, tau_mode="var")
    close(var.x, [POOLED_X, PRUNED_X])
    cv2 = ppt(_ppt_tokens(2), scores, metric, r=1, tau=5e-4, tau_mode="cv2")
    close(cv2.x, [FLAT_PRUNED_X, PRUNED_X])
    close(cv2.size, [FLAT_PRUNED_SIZE, PRUNED_SIZE])


def test_ppt_r_zero_and_cap():
    tokens = _ppt_tokens(2)
    same(ppt(tokens, t([FLAT, PEAKED]), t([PPT_METRIC] * 2), r=0, tau=1e-3, tau_mode="var"), tokens)
    # r = 9 is capped at 4 // 2 = 2 in both branches: 1 + 2 tokens each
    out = ppt(tokens, t([FLAT, PEAKED]), t([PPT_METRIC] * 2), r=9, tau=1e-3, tau_mode="var")
    # flat: A1 -> B0 ([3.5,1], size 4), A3 -> B2: (1*[1,1] + 2*[0,3]) / 3 = [1/3, 7/3] (size 3)
    # peaked: keep the top 2, j 0 (0.4) and j 2 (0.35)
    close(out.x, [[PPT_CLS, [3.5, 1.0], [1.0 / 3.0, 7.0 / 3.0]],
                  [PPT_CLS, [2.0, 4.0], [1.0, 1.0]]])
    close(out.size, [[1.0, 4.0, 3.0], [1.0, 1.0, 1.0]])


# ------------------------------------------------------------------------------------------------
# tps
# ------------------------------------------------------------------------------------------------
# prefix 1, n = 5, keep 2. scores [0.4, 0.1, 0.3, 0.15, 0.05] -> kept j 0, 2; pruned j 1, 3, 4.
# kept:  K0 = [1, 0], K2 = [0, 2]
# pruned j1 = [3, 4]:  cos K0 = 0.6,  cos K2 = 0.8 -> host K2 (cos 0.8)
#        j3 = [5, 0]:  cos K0 = 1.0,  cos K2 = 0   -> host K0 (cos 1)
#        j4 = [-3, 4]: cos K0 = -0.6, cos K2 = 0.8 -> host K2 (cos 0.8)
TPS_CLS = [7.0, -7.0]
TPS_BODY = [[1.0, 0.0], [3.0, 4.0], [0.0, 2.0], [5.0, 0.0], [-3.0, 4.0]]
TPS_SIZES = [1.0, 2.0, 3.0, 4.0, 5.0]
TPS_SCORES = [0.4, 0.1, 0.3, 0.15, 0.05]


def _tps_tokens():
    return Tokens(x=t([[TPS_CLS] + TPS_BODY]), size=t([[1.0] + TPS_SIZES]), prefix=1)


def test_tps_temperature_one():
    out = tps(_tps_tokens(), t([TPS_SCORES]), keep=2, temperature=1.0)
    # K0' = (e*[1,0] + e^1*[5,0]) / (e + e) = [3, 0]
    # K2' = (e*[0,2] + e^.8*[3,4] + e^.8*[-3,4]) / (e + 2 e^.8) = [0, (2e + 8 e^.8) / (e + 2 e^.8)]
    #     = [0, 23.240891 / 7.169364] = [0, 3.241695]
    k2 = (2 * E + 8 * math.exp(0.8)) / (E + 2 * math.exp(0.8))
    close(out.x, [[TPS_CLS, [3.0, 0.0], [0.0, k2]]], rtol=1e-6, atol=1e-6)
    close(out.x[0, 2, 1], 3.241695, rtol=1e-6, atol=1e-6)
    # sizes add: K0 1 + j3 4 = 5; K2 3 + j1 2 + j4 5 = 10
    close(out.size, [[1.0, 5.0, 10.0]])


def test_tps_temperature_half():
    # The host weighs exp(1 / T) (its similarity to itself is 1), at the same temperature as its
    # guests. (This test used to expect the published code's constant host weight e.)
    out = tps(_tps_tokens(), t([TPS_SCORES]), keep=2, temperature=0.5)
    # weights exp(cos / 0.5): hosts e^2, j3 -> e^2, j1 and j4 -> e^1.6
    # K0' = (e^2*[1,0] + e^2*[5,0]) / (e^2 + e^2) = [3, 0]
    # K2' = [0, (2e^2 + 8 e^1.6) / (e^2 + 2 e^1.6)] = [0, 54.402370 / 17.295121] = [0, 3.145533]
    k2 = (2 * E ** 2 + 8 * math.exp(1.6)) / (E ** 2 + 2 * math.exp(1.6))
    close(out.x, [[TPS_CLS, [3.0, 0.0], [0.0, k2]]])
    close(out.x[0, 2, 1], 3.145533, rtol=1e-6, atol=1e-6)
    close(out.size, [[1.0, 5.0, 10.0]])


def test_tps_low_temperature_does_not_overflow():
    # T = 0.01: exp(1 / T) = e^100 overflows float32; the softmax is computed shifted by -1/T.
    # K0' = (1*[1,0] + e^0*[5,0]) / 2 = [3, 0]; K2's guests weigh e^(-20) = 2.1e-9 each:
    # K2' = [0, (2 + 8 e^-20) / (1 + 2 e^-20)] = [0, 2 + 4e^-20 - ...] = [0, 2.0000000082]
    out = tps(_tps_tokens(), t([TPS_SCORES]), keep=2, temperature=0.01)
    close(out.x, [[TPS_CLS, [3.0, 0.0], [0.0, 2.0]]])


def test_tps_keep_all_is_identity():
    tokens = _tps_tokens()
    same(tps(tokens, t([TPS_SCORES]), keep=5, temperature=1.0), tokens)


# ------------------------------------------------------------------------------------------------
# bat
# ------------------------------------------------------------------------------------------------
# 1-D points a=0, b=1, c=3, d=8, e=9, f=9.5, knn = 2 (mean squared distance to the 2 nearest;
# 1-D, so the sqrt(C) scaling is 1). log rho = -that mean:
#   a: b 1, c 3    -> (1 + 9) / 2     = 5      log rho = -5
#   b: a 1, c 2    -> (1 + 4) / 2     = 2.5    log rho = -2.5
#   c: b 2, a 3    -> (4 + 9) / 2     = 6.5    log rho = -6.5
#   d: e 1, f 1.5  -> (1 + 2.25) / 2  = 1.625  log rho = -1.625
#   e: f .5, d 1   -> (.25 + 1) / 2   = 0.625  log rho = -0.625 (densest: always a centre)
#   f: e .5, d 1.5 -> (.25 + 2.25) / 2 = 1.25  log rho = -1.25
# delta (distance to the nearest denser point) and log rho + log delta:
#   b: d at 7   -> -2.5 + ln 7   = -0.554
#   d: e at 1   -> -1.625 + 0    = -1.625
#   f: e at .5  -> -1.25 - ln 2  = -1.943
#   a: b at 1   -> -5 + 0        = -5
#   c: b at 2   -> -6.5 + ln 2   = -5.807
# centres by rank: e (cluster 0), b (cluster 1), then d (cluster 2 when c = 3).
DPC_POINTS = [0.0, 1.0, 3.0, 8.0, 9.0, 9.5]


def test_density_peak_clusters_two_clusters():
    # with the constant second channel C = 2: distances / sqrt 2 halve every log rho; the ranking
    # (b -0.554 - ln sqrt 2 ... above d) and so the clusters stay as in 1-D
    x = t([[[p, 1.0] for p in DPC_POINTS], [[p, 1.0] for p in reversed(DPC_POINTS)]])
    assign = density_peak_clusters(x, clusters=2, knn=2)
    # a, b, c join b (cluster 1); d, e, f join e (cluster 0). Image 2 is image 1 reversed.
    assert assign.tolist() == [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]


def test_density_peak_clusters_centres_are_the_expected_points():
    x = t([[[p] for p in DPC_POINTS]])
    # third centre d: d heads cluster 2; f (log rho -1.25, denser than d) may only join a denser
    # centre, e (the nearest denser one); a and c join b
    assert density_peak_clusters(x, clusters=3, knn=2).tolist() == [[1, 1, 1, 2, 0, 0]]
    assert density_peak_clusters(x, clusters=1, knn=2).tolist() == [[0, 0, 0, 0, 0, 0]]


def test_density_peak_clusters_join_the_nearest_denser_centre():
    # A chain 0, .25, .5, .75, 1 (knn 1: log rho -.0625 each; ties go to the earlier point, so 0 is
    # the densest) and a sparser pair 1.9, 2.3 (log rho -.16).
    #   centre scores: chain points -.0625 + ln .25 = -1.449; 1.9: delta .9 (to 1) -> -.16 + ln .9 = -.265;
    #   2.3: delta .4 -> -1.076. Centres: 0 (cluster 0) and 1.9 (cluster 1).
    # The chain's end 1 is nearer to 1.9 (.9) than to 0 (1), but 1.9 is less dense than it: it joins 0.
    x = t([[[0.0], [0.25], [0.5], [0.75], [1.0], [1.9], [2.3]]])
    assert density_peak_clusters(x, clusters=2, knn=1).tolist() == [[0, 0, 0, 0, 0, 1, 1]]


def test_density_peak_clusters_break_ties_by_position():
    # Two pairs of equal points: every log rho is 0. Ties go to the earlier token: the first is
    # the densest (centre 0); the second has delta 0 (log delta -inf); the third is 5 away from
    # every denser token and is centre 1; the fourth, 0 from it, joins it.
    x = t([[[0.0], [0.0], [5.0], [5.0]], [[5.0], [5.0], [0.0], [0.0]]])
    for _ in range(3):
        assert density_peak_clusters(x, clusters=2, knn=1).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


def _partition(assign: list[int]) -> list[list[int]]:
    return sorted(sorted(i for i, a in enumerate(assign) if a == cluster) for cluster in set(assign))


def test_density_peak_clusters_at_real_scale():
    """44 tokens of width 384 with DeiT-S-like norms (about 41) in 4 well-separated groups
    (nearest-neighbour squared distance about 175, between groups about 2400): exp(-175)
    underflows to 0 in float32, so computed on raw distances every density tied at 0 and the
    groups broke up. Scaled by sqrt(C) and kept in log space, the groups are found exactly,
    batched and per image alike."""
    generator = torch.Generator().manual_seed(0)
    centres = 2.0 * torch.randn(4, 384, generator=generator)
    sizes = [9, 10, 11, 14]
    x = torch.cat([centre + 0.5 * torch.randn(size, 384, generator=generator)
                   for centre, size in zip(centres, sizes)])
    labels = [group for group, size in enumerate(sizes) for _ in range(size)]
    order = torch.randperm(len(x), generator=generator)
    x, labels = x[order], [labels[i] for i in order]
    assert 35 < float(x.norm(dim=1).mean()) < 50
    batch = torch.stack([x, x.flip(0)])
    assign = density_peak_clusters(batch, clusters=4, knn=5)
    assert _partition(assign[0].tolist()) == _partition(labels)
    assert _partition(assign[1].tolist()) == _partition(labels[::-1])
    assert density_peak_clusters(x[None], clusters=4, knn=5)[0].tolist() == assign[0].tolist()


def test_merge_attentive_pairs_takes_the_most_similar_disjoint_pairs():
    # cosines: t0 [1, 0], t1 [.6, .8], t2 [1, .1], t3 [0, 1], t4 [.8, .6]
    #   t0-t2 .995, t1-t4 .96, t2-t4 .856, t0-t4 .8, t1-t3 .8, t1-t2 .677, t3-t4 .6, ...
    # Greedy disjoint pairs: t0+t2 (.995) first; then t1+t4 (.96). ToMe's bipartite matching
    # (A = t0, t2, t4; B = t1, t3) would have sent all three A tokens into t1.
    x = t([[[1.0, 0.0], [0.6, 0.8], [1.0, 0.1], [0.0, 1.0], [0.8, 0.6]]])
    scores = t([[0.3, 0.1, 0.1, 0.2, 0.3]])
    part = Tokens(x=x, size=t([[1.0, 2.0, 1.0, 1.0, 1.0]]), prefix=0)
    out = merge_attentive_pairs(part, scores, pairs=2)
    # t0+t2 at t0's place: (.3*[1,0] + .1*[1,.1]) / .4 = [1, .025]
    # t1+t4 at t1's place: (.1*[.6,.8] + .3*[.8,.6]) / .4 = [.3, .26] / .4 = [.75, .65]; t3 as it was
    close(out.x, [[[1.0, 0.025], [0.75, 0.65], [0.0, 1.0]]])
    close(out.size, [[2.0, 3.0, 1.0]])
    assert torch.equal(out.x[0, 2], x[0, 3])  # untouched tokens are exact
    same(merge_attentive_pairs(part, scores, pairs=0), part)
    # one pair only: the best
    close(merge_attentive_pairs(part, scores, pairs=1).x,
          [[[1.0, 0.025], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]]])


def test_bat_output_tokens():
    # prefix 1, n = 9, keep 3, pairs 1, clusters 2, knn 2 -> 1 + 3 - 1 + 2 = 5 tokens.
    # attentive (top 3 scores): j 2 (.2), 7 (.18), 5 (.15) -> position order 2, 5, 7.
    # inattentive j 0,1,3,4,6,8 are the DPC points a, b, c, d, e, f (second channel 1).
    cls = [7.0, 7.0]
    body = [[0.0, 1.0], [1.0, 1.0], [5.0, 5.0], [3.0, 1.0], [8.0, 1.0],
            [2.0, -2.0], [9.0, 1.0], [4.0, 6.0], [9.5, 1.0]]
    sizes = [1.0, 1.0, 1.0, 1.0, 2.0, 3.0, 1.0, 1.0, 1.0]
    scores = [0.05, 0.1, 0.2, 0.02, 0.08, 0.15, 0.12, 0.18, 0.03]
    # attentive cosines: j2-j7 50 / (sqrt 50 sqrt 52) = .981; j2-j5 0; j5-j7 -.196 -> merge j2, j7
    tokens = Tokens(x=t([[cls] + body]), size=t([[1.0] + sizes]), prefix=1)
    out = bat(tokens, t([scores]), keep=3, clusters=2, knn=2, pairs=1)
    assert out.x.shape == (1, 5, 2)
    # merged pair at j2's place: (.2*[5,5] + .18*[4,6]) / .38 = [1.72, 2.08] / .38; then j5
    # cluster 0 {d, e, f} (centre e), score weights .08, .12, .03 (sum .23):
    #   (.08*8 + .12*9 + .03*9.5) / .23 = (.64 + 1.08 + .285) / .23 = 2.005 / .23 = 8.7173913
    # cluster 1 {a, b, c} (centre b), weights .05, .1, .02 (sum .17):
    #   (.05*0 + .1*1 + .02*3) / .17 = .16 / .17 = 0.9411765
    close(out.x, [[cls, [1.72 / 0.38, 2.08 / 0.38], [2.0, -2.0], [2.005 / 0.23, 1.0], [0.16 / 0.17, 1.0]]])
    close(out.x[0, 3:, 0], [8.7173913, 0.9411765])
    # sizes: pair 1 + 1; j5 3; cluster 0: 2 + 1 + 1; cluster 1: 1 + 1 + 1
    close(out.size, [[1.0, 2.0, 3.0, 4.0, 3.0]])

    # keep >= n: unchanged
    same(bat(tokens, t([scores]), keep=9, clusters=2, knn=2, pairs=1), tokens)


def test_bat_traces_with_torch_export():
    """No data-dependent Python control flow: the exported graph, traced on one input, gives the
    eager result on other data of the same shape."""
    class Bat(torch.nn.Module):
        def forward(self, x, scores):
            out = bat(Tokens(x=x, size=torch.ones(x.shape[:2]), prefix=1), scores, keep=10, clusters=3, knn=3, pairs=2)
            return out.x, out.size

    generator = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(2, 21, 16, generator=generator), torch.rand(2, 20, generator=generator)) for _ in range(2)]
    exported = torch.export.export(Bat(), inputs[0]).module()
    for x, scores in inputs:
        for got, expected in zip(exported(x, scores), Bat()(x, scores)):
            assert_close(got, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# sait
# ------------------------------------------------------------------------------------------------

SAIT_CLS = [9.0, 9.0]


def test_sait_value_based_keeps_top_in_position_order():
    body = [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]
    tokens = Tokens.start(t([[SAIT_CLS] + body]), prefix=1)
    out = sait(tokens, t([[0.1, 0.3, 0.2, 0.4]]), keep=2)  # top 2: j 3 (.4), j 1 (.3)
    close(out.x, [[SAIT_CLS, [2.0, 2.0], [4.0, 4.0]]])
    assert out.valid is None
    same(sait(tokens, t([[0.1, 0.3, 0.2, 0.4]]), keep=4), tokens)


@pytest.mark.parametrize("mass, count", [(0.7, 2), (0.85, 3), (0.5, 1), (0.95, 4)])
def test_sait_mass_counts(mass, count):
    # scores [0.5, 0.3, 0.1, 0.1]: running sums 0.5, 0.8, 0.9, 1.0
    # 0.7 -> 2 (0.8 >= 0.7); 0.85 -> 3 (0.9); 0.5 -> 1 (0.5 reaches it exactly); 0.95 -> 4
    tokens = Tokens.start(t([[SAIT_CLS, [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]]), prefix=1)
    out = sait_mass(tokens, t([[0.5, 0.3, 0.1, 0.1]]), mass)
    assert out.x.shape[1] == 1 + count
    assert out.valid.tolist() == [[True] * (1 + count)]
    close(out.x[0, :3], [SAIT_CLS, [1.0, 0.0], [2.0, 0.0]][: 1 + count])


def test_sait_mass_one_keeps_every_token_unpadded():
    tokens = Tokens.start(t([[SAIT_CLS, [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]]), prefix=1)
    same(sait_mass(tokens, t([[0.5, 0.3, 0.1, 0.1]]), 1.0), tokens)
    assert sait_mass(tokens, t([[0.5, 0.3, 0.1, 0.1]]), 1.0).valid is None


# SaiT's Eq. 1 normalises the token importance over all tokens, CLS included; CLS is always
# kept, so its share counts toward the mass. Hand case, prefix 1, H = 1, N = 5 (CLS + 4):
#   attention rows (queries) over keys [CLS, j0, j1, j2, j3]:
#     CLS [.5, .25, .125, .0625, .0625]    j0 [.5, .25, .125, .125, 0]     j1 [.25, .5, .25, 0, 0]
#     j2  [.5, .25, 0, .25, 0]             j3 [.125, .25, .25, .125, .25]
#   column sums: CLS 1.875, j0 1.5, j1 .75, j2 .5625, j3 .3125 (total 5)
#   shares: CLS .375, j0 .3, j1 .15, j2 .1125, j3 .0625
#   kept mass, CLS first: .375, + j0 .675, + j1 .825, + j2 .9375, + j3 1
SAIT_PROBS = t([[[[0.5, 0.25, 0.125, 0.0625, 0.0625],
                  [0.5, 0.25, 0.125, 0.125, 0.0],
                  [0.25, 0.5, 0.25, 0.0, 0.0],
                  [0.5, 0.25, 0.0, 0.25, 0.0],
                  [0.125, 0.25, 0.25, 0.125, 0.25]]]])


def _sait_scores():
    qkv = torch.zeros(1, 1, 5, 2)
    return token_scores("tis", 1, qkv, qkv, qkv, 1.0, None, SAIT_PROBS)


def test_tis_is_normalised_over_all_tokens_cls_included():
    close(_sait_scores(), [[0.3, 0.15, 0.1125, 0.0625]])


# Renormalised over the patch tokens alone (.48, .24, .18, .1; running sums .48, .72, .9, 1), as
# this reducer used to do, M .6 kept 2, M .8 kept 3 and M .92 kept 4.
@pytest.mark.parametrize("mass, count", [
    (0.3, 1),    # CLS alone (.375) reaches it, but one patch token is always kept
    (0.6, 1),    # .675
    (0.68, 2),   # .825
    (0.8, 2),    # .825
    (0.92, 3),   # .9375
    (0.95, 4),   # 1
])
def test_sait_mass_counts_the_cls_share(mass, count):
    body = [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]
    tokens = Tokens.start(t([[SAIT_CLS] + body]), prefix=1)
    out = sait_mass(tokens, _sait_scores(), mass)
    assert out.x.shape[1] == 1 + count
    close(out.x[0, 1:], body[:count])  # shares fall with position here


def test_sait_mass_exact_boundary():
    # dyadic scores: running sums .5, .75 exactly -> mass .75 is reached by 2 tokens
    tokens = Tokens.start(t([[SAIT_CLS, [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]]), prefix=1)
    out = sait_mass(tokens, t([[0.125, 0.5, 0.125, 0.25]]), 0.75)
    close(out.x, [[SAIT_CLS, [2.0, 0.0], [4.0, 0.0]]])  # descending score: j 1 (.5), j 3 (.25)


def test_sait_mass_pads_a_batch_with_different_counts():
    x = t([[SAIT_CLS, [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]],
           [[-9.0, 9.0], [0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 4.0]]])
    tokens = Tokens.start(x, prefix=1, track_source=True).replace(size=t([[1, 1, 2, 3, 4], [1, 5, 6, 7, 8]]))
    # image 0: descending j 1 (.5), j 3 (.3), j 2 (.15), j 0 (.05); sums .5, .8 -> mass .7 keeps 2
    # image 1: descending j 0 (.3), j 3 (.28), j 1 (.22), j 2 (.2); sums .3, .58, .8 -> keeps 3
    scores = t([[0.05, 0.5, 0.15, 0.3], [0.3, 0.22, 0.2, 0.28]])
    out = sait_mass(tokens, scores, 0.7)
    assert out.prefix == 1
    # padded to 1 + 3; image 0's third slot is padding (its next-ranked token j 2)
    close(out.x, [[SAIT_CLS, [2.0, 0.0], [4.0, 0.0], [3.0, 0.0]],
                  [[-9.0, 9.0], [0.0, 1.0], [0.0, 4.0], [0.0, 2.0]]])
    assert out.valid.tolist() == [[True, True, True, False], [True, True, True, True]]
    close(out.size, [[1.0, 2.0, 4.0, 3.0], [1.0, 5.0, 8.0, 6.0]])
    close(out.source, [[[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]],
                       [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]]])
    # padding is masked as a key
    bias = out.attn_bias(prop_attn=False)
    assert bias.shape == (2, 1, 1, 4)
    assert bias[0, 0, 0].tolist() == [0.0, 0.0, 0.0, float("-inf")]
    assert bias[1, 0, 0].tolist() == [0.0, 0.0, 0.0, 0.0]

    # each image alone gives its valid tokens
    for i, count in ((0, 2), (1, 3)):
        alone = sait_mass(Tokens.start(x[i:i + 1], prefix=1), scores[i:i + 1], 0.7)
        assert alone.x.shape[1] == 1 + count
        assert bool(alone.valid.all())
        assert_close(alone.x, out.x[i:i + 1, :1 + count], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# token scores
# ------------------------------------------------------------------------------------------------
# H = 2, N = 3, d = 2, prefix 1, scale 0.5 with q0 = [2, 0] -> CLS logits = k_j[0]:
#   head 0: k_j[0] = 0, ln 2, ln 5 -> softmax [1, 2, 5] / 8 = [.125, .25, .625]
#   head 1: k_j[0] = 0, 0, ln 2    -> softmax [1, 1, 2] / 4 = [.25, .25, .5]
# v: token 1 = head0 [3,0] | head1 [0,4] -> ||v|| = 5; token 2 = [2,0] | [0,0] -> 2
def _qkv():
    q = t([[[[2.0, 0.0], [1.0, -1.0], [0.5, 3.0]],
            [[2.0, 0.0], [-2.0, 1.0], [4.0, 0.0]]]])
    k = t([[[[0.0, 1.0], [LN2, -3.0], [LN5, 2.0]],
            [[0.0, 5.0], [0.0, 0.0], [LN2, -1.0]]]])
    v = t([[[[7.0, 7.0], [3.0, 0.0], [2.0, 0.0]],
            [[7.0, 7.0], [0.0, 4.0], [0.0, 0.0]]]])
    return q, k, v


# probs [1, 2, 3, 3] for tis / mean / entropy
PROBS = t([[[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]],
            [[0.25, 0.5, 0.25], [0.5, 0.25, 0.25], [0.0, 0.0, 1.0]]]])


def test_score_cls():
    q, k, v = _qkv()
    # mean over heads of [.25, .625] and [.25, .5]
    close(token_scores("cls", 1, q, k, v, 0.5, None, None), [[0.25, 0.5625]])
    # prefix 2: only token 2 is scored
    close(token_scores("cls", 2, q, k, v, 0.5, None, None), [[0.5625]])


def test_score_cls_with_log_size_bias():
    q, k, v = _qkv()
    tokens = Tokens(x=torch.zeros(1, 3, 2), size=t([[1.0, 3.0, 1.0]]), prefix=1)
    bias = tokens.attn_bias(prop_attn=True)  # log size = [0, ln 3, 0] on the keys
    # head 0: [1, 2*3, 5] / 12 -> [.5, 5/12];  head 1: [1, 1*3, 2] / 6 -> [.5, 1/3]
    # mean: [.5, (5/12 + 4/12) / 2] = [.5, .375]   (token 1 rises from .25, token 2 falls)
    close(token_scores("cls", 1, q, k, v, 0.5, bias, None), [[0.5, 0.375]])


def test_score_cls_vnorm():
    q, k, v = _qkv()
    # sum over heads: [.25 + .25, .625 + .5] = [.5, 1.125]; x ||v|| [5, 2] -> [2.5, 2.25]
    # normalised: / 4.75 -> [10/19, 9/19]
    close(token_scores("cls_vnorm", 1, q, k, v, 0.5, None, None), [[10 / 19, 9 / 19]])


def test_score_tis_and_mean():
    q, k, v = _qkv()
    # column sums: head 0 [1 + .5 + 1/3, .5 + 1/3, 1/3] = [11/6, 5/6, 1/3]
    #              head 1 [.25 + .5 + 0, .5 + .25 + 0, .25 + .25 + 1] = [.75, .75, 1.5]
    # total [31/12, 19/12, 22/12], normalised over all tokens, CLS included (SaiT's Eq. 1):
    # [31, 19, 22] / 72, of which the non-prefix tokens' [19, 22] / 72 are returned
    close(token_scores("tis", 1, q, k, v, 0.5, None, PROBS), [[19 / 72, 22 / 72]])
    close(token_scores("tis", 0, q, k, v, 0.5, None, PROBS), [[31 / 72, 19 / 72, 22 / 72]])
    # mean: attention of query j to the CLS key (column 0), head mean, normalised over j >= 1
    #   token 1: head 0 .5, head 1 .5 -> .5;  token 2: head 0 1/3, head 1 0 -> 1/6
    #   normalised: [.5, 1/6] / (2/3) = [.75, .25]   (it no longer ranks as tis: 19 < 22)
    close(token_scores("mean", 1, q, k, v, 0.5, None, PROBS), [[0.75, 0.25]])


def test_score_entropy():
    q, k, v = _qkv()
    # token 1's rows: head 0 [.5, .5, 0] -> ln 2; head 1 [.5, .25, .25] -> 1.5 ln 2; mean 1.25 ln 2
    # token 2's rows: head 0 uniform -> ln 3; head 1 [0, 0, 1] -> 0; mean ln 3 / 2
    # x ||v|| [5, 2] -> [6.25 ln 2, ln 3] = [4.332169, 1.098612]; normalised / 5.430781
    expected = [[6.25 * LN2 / (6.25 * LN2 + LN3), LN3 / (6.25 * LN2 + LN3)]]
    scores = token_scores("entropy", 1, q, k, v, 0.5, None, PROBS)
    close(scores, expected)
    close(scores, [[0.797707, 0.202293]], rtol=1e-5, atol=1e-6)


def test_score_unknown_kind():
    q, k, v = _qkv()
    with pytest.raises(ValueError):
        token_scores("nope", 1, q, k, v, 0.5, None, PROBS)


# ------------------------------------------------------------------------------------------------
# schedule
# ------------------------------------------------------------------------------------------------

def test_keep_count():
    assert keep_count(196, 0.7, None) == 138  # ceil(137.2)
    assert keep_count(100, 0.7, None) == 70   # 0.7 * 100 = 70.00000000000001 must keep 70
    assert keep_count(10, 0.7, None) == 7     # 7.000000000000001
    assert keep_count(10, 0.3, None) == 3     # 3.0000000000000004
    assert keep_count(139, 0.7, None) == 98   # ceil(97.3)
    assert keep_count(10, 1.0, None) == 10
    assert keep_count(3, 0.01, None) == 1     # at least one
    assert keep_count(10, None, 3) == 7
    assert keep_count(10, None, 0) == 10
    assert keep_count(5, None, 10) == 1


def test_merge_count():
    assert merge_count(196, None, 16) == 16
    assert merge_count(20, None, 16) == 10    # capped at n // 2
    assert merge_count(96, None, 50) == 48
    assert merge_count(196, None, 0) == 0
    assert merge_count(196, 0.9, None) == 19  # 196 - ceil(176.4) = 196 - 177
    assert merge_count(100, 0.7, None) == 30  # 100 - 70
    assert merge_count(10, 0.2, None) == 5    # 10 - 2 = 8, capped at 5


def test_bat_counts():
    assert bat_counts(10, 10, 3, 2) == (0, 0)
    assert bat_counts(10, 6, 3, 2) == (2, 3)
    assert bat_counts(10, 6, 9, 9) == (3, 4)  # pairs <= 6 // 2, clusters <= 10 - 6


def _after_each_layer(cfg, n=196, depth=12):
    """Token counts incl. CLS after each reducing layer, read off block_token_counts."""
    counts = block_token_counts(cfg, depth, n)
    layers = cfg.resolved_layers(depth)
    return [counts[layer].out + 1 for layer in layers]


@pytest.mark.parametrize("cfg, expected", [
    (PruneConfig(reducer="evit", layers=(3, 6, 9), keep_rate=0.7), [140, 100, 72]),
    (PruneConfig(reducer="evit", layers=(3, 6, 9), keep_rate=0.7, fuse=False), [139, 98, 69]),
    (PruneConfig(reducer="evit", layers=(3, 6, 9), keep_rate=0.9), [179, 163, 148]),
    (PruneConfig(reducer="evit", layers=(3, 6, 9), keep_rate=0.6), [120, 74, 46]),
    (PruneConfig(reducer="evit", layers=(3, 6, 9), keep_rate=0.5), [100, 52, 28]),
    (PruneConfig(reducer="ppt", layers=(3, 6, 9), r=50), [147, 97, 49]),
])
def test_deit_s_token_figures(cfg, expected):
    assert _after_each_layer(cfg) == expected


def test_deit_s_tome_every_block():
    # 196 -16-> 180 ... 36 -> 20 -> 10 (16 capped at 20 // 2)
    counts = block_token_counts(PruneConfig(reducer="tome", r=16), 12, 196)
    assert [c.mlp + 1 for c in counts] == [181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]
    assert [c.attn for c in counts] == [196, 180, 164, 148, 132, 116, 100, 84, 68, 52, 36, 20]
    assert all(c.out == c.mlp for c in counts)
    assert block_token_counts(PruneConfig(reducer="tome", r=8), 12, 196)[-1].out + 1 == 101
    assert block_token_counts(PruneConfig(reducer="tome", r=13), 12, 196)[-1].out + 1 == 41


def test_block_token_counts_evit():
    counts = block_token_counts(PruneConfig(reducer="evit", layers=(3, 6, 9), keep_rate=0.7), 12, 196)
    # attention sees the block input, the MLP the reduced set, which leaves the block
    assert counts == [(196, 196, 196)] * 3 + [(196, 139, 139), (139, 139, 139), (139, 139, 139),
                                               (139, 99, 99), (99, 99, 99), (99, 99, 99), (99, 71, 71),
                                               (71, 71, 71), (71, 71, 71)]
    assert block_token_counts(None, 12, 196) == [(196, 196, 196)] * 12


def test_block_token_counts_sait_block_runs_dense():
    # SaiT's block P (3) runs attention and MLP on all 196 tokens; 98 leave it
    counts = block_token_counts(PruneConfig(reducer="sait", layers=(3,), keep_rate=0.5), 12, 196)
    assert counts[:5] == [(196, 196, 196)] * 3 + [(196, 196, 98), (98, 98, 98)]
    last = block_token_counts(PruneConfig(reducer="sait", layers=(11,), keep_rate=0.5), 12, 196)
    assert last[-1] == (196, 196, 98)  # the final norm sees 98


def test_tokens_after_other_reducers():
    tps_cfg = PruneConfig(reducer="tps", layers=(3,), keep_rate=0.7)
    assert tokens_after(tps_cfg, 0, 196) == 138
    sait_cfg = PruneConfig(reducer="sait", layers=(3,), keep_rate=0.5)
    assert tokens_after(sait_cfg, 0, 196) == 98
    bat_cfg = PruneConfig(reducer="bat", layers=(3,), keep_rate=0.5, clusters=5, knn=3, pairs=4)
    assert tokens_after(bat_cfg, 0, 196) == 98 - 4 + 5
    evit_one = PruneConfig(reducer="evit", layers=(3,), keep_rate=1.0)
    assert tokens_after(evit_one, 0, 196) == 196  # rate 1: dense, no fused token
    evit_r = PruneConfig(reducer="evit", layers=(3, 6), r=(10, 20))
    assert tokens_after(evit_r, 0, 196) == 187  # 186 kept + fused
    assert tokens_after(evit_r, 1, 187) == 168  # 167 kept + fused
    with pytest.raises(ConfigError):
        tokens_after(PruneConfig(reducer="sait", layers=(3,), mass_threshold=0.7), 0, 196)
