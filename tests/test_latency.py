"""Latency tables: the closed-form prediction on hand-made tables, calibration and its cache."""

import dataclasses
import json

import pytest
import torch

from autoprune import ConfigError, PruneConfig, apply, calibrate, predict_throughput
from autoprune.latency import LatencyError, LatencyTable, predict_seconds, reduce_kind
from autoprune.latency import excess, measure, table as table_module
from autoprune.patch import Reduction, TokenReducer, architecture, attention_half, reductions
from conftest import make_model

PATCHES, DEPTH = 8, 3


def synthetic_table(batch_size: int = 2, architecture_digest: str = "synthetic") -> LatencyTable:
    """Times linear in the token count n (so interpolation between grid points is exact):
    block none 1 + n, prop 2 + n, mask 3 + n; attention half none 0.5 + n/2, prop 1 + n/2
    (so the MLP half is 0.5 + n/2); explicit attention costs n/10 more; embed 0.2, head 0.1."""
    grid = [1, 4, 8]
    def line(a: float, b: float) -> list[float]:
        return [a + b * n for n in grid]

    constant = [[(0.5, 0.05), (1.0, 0.05)] for _ in grid]
    return LatencyTable(
        meta={"architecture": architecture_digest}, batch_size=batch_size, patches=PATCHES, prefix=1,
        depth=DEPTH, grid=grid, embed=0.2, head=[0.1] * 3,
        block={"none": line(1, 1), "prop": line(2, 1), "mask": line(3, 1)},
        attention={"none": line(0.5, 0.5), "prop": line(1, 0.5)},
        probs_extra={"none": line(0, 0.1)},
        reduce={
            # evit at 8 tokens: 0.3 s keeping half, 0.5 s keeping all; 0.01 * n elsewhere
            "evit": [[(0.5, 0.01), (1.0, 0.01)], [(0.5, 0.04), (1.0, 0.04)], [(0.5, 0.3), (1.0, 0.5)]],
            "tome": constant, "sait-mass": constant,
            "ppt/pool": [[(0.5, 1.0), (1.0, 1.0)]] * 3, "ppt/prune": [[(0.5, 2.0), (1.0, 2.0)]] * 3,
            "ppt/mixed": [[(0.5, 4.0), (1.0, 4.0)]] * 3,
        },
    )


def test_fixed_schedule_prediction_by_hand():
    table = synthetic_table()
    # evit 0.5 at block 1 keeps 4 of 8 plus the fused token: blocks see 8, 8 -> 5, 5 tokens
    cfg = PruneConfig(reducer="evit", layers=(1,), keep_rate=0.5)
    reduce = 0.3 + (0.5 - 0.3) * (5 / 8 - 0.5) / 0.5  # ratio 5/8 between the two samples at 8 tokens
    expected = 0.2 + (1 + 8) + ((0.5 + 4) + reduce + (0.5 + 2.5)) + (1 + 5) + 0.1
    assert predict_seconds(table, cfg) == pytest.approx(expected)
    assert predict_seconds(table, None) == pytest.approx(0.2 + 3 * (1 + 8) + 0.1)
    # tome r 2 in every block, with proportional attention: the key bias in every block
    tome = PruneConfig(reducer="tome", r=2)
    blocks = [(1 + n / 2) + 0.05 + (0.5 + (n - 2) / 2) for n in (8, 6, 4)]
    assert predict_seconds(table, tome) == pytest.approx(0.2 + sum(blocks) + 0.1)
    # between grid points (6 tokens) the table is read linearly
    assert table.block_seconds("prop", 6) == pytest.approx(8)


def test_ppt_is_expected_over_which_branch_each_image_takes():
    table = synthetic_table(batch_size=2)
    cfg = PruneConfig(reducer="ppt", layers=(0,), r=4)
    rest = 0.2 + (1 + 4) + (0.5 + 2) + 2 * (2 + 4) + 0.1  # attention prop at 8, MLP at 4, two blocks at 4
    pooled = Reduction(block=0, counts=torch.full((4,), 4), merged_only=torch.tensor([True, False, False, False]))
    p = 0.25
    mixed = p * 1.0 + (1 - p) * 2.0 + (4.0 - 1.5)  # the half-and-half batch costs 2.5 over the branches' mean
    expected = p ** 2 * 1.0 + (1 - p) ** 2 * 2.0 + (1 - p ** 2 - (1 - p) ** 2) * mixed
    assert predict_seconds(table, cfg, [pooled]) == pytest.approx(rest + expected)
    uninformed = 0.25 * 1.0 + 0.25 * 2.0 + 0.5 * (1.5 + 2.5)
    assert predict_seconds(table, cfg) == pytest.approx(rest + uninformed)
    one = synthetic_table(batch_size=1)  # one image never mixes
    assert predict_seconds(one, cfg, [pooled]) == pytest.approx(rest + p * 1.0 + (1 - p) * 2.0)


def test_mass_sait_counts_the_padding_a_batch_computes():
    table = synthetic_table(batch_size=2)
    cfg = PruneConfig(reducer="sait", layers=(0,), mass_threshold=0.6)
    kept = Reduction(block=0, counts=torch.tensor([2, 4, 4, 8]), merged_only=torch.zeros(4, dtype=torch.bool))

    def cost(k: int) -> float:  # block 0 all dense (+ explicit probabilities; it prunes as tokens leave), later blocks masked
        return 0.2 + (0.5 + 4) + 0.8 + 0.05 + (0.5 + 8 / 2) + 2 * (3 + k) + 0.1

    # two images drawn from the four: the batch runs at the larger count
    chances = {2: (1 / 4) ** 2, 4: (3 / 4) ** 2 - (1 / 4) ** 2, 8: 1 - (3 / 4) ** 2}
    assert predict_seconds(table, cfg, [kept]) == pytest.approx(sum(p * cost(k) for k, p in chances.items()))


def test_a_whole_forward_costs_its_parts_plus_the_excess_calibrated_for_it():
    parts = synthetic_table()
    table = dataclasses.replace(parts, forward_excess=0.5, reduce_excess=(0.2, 0.1))
    assert predict_seconds(table, None) == pytest.approx(predict_seconds(parts, None) + 0.5)
    evit = PruneConfig(reducer="evit", layers=(1,), keep_rate=0.5)
    assert predict_seconds(table, evit) == pytest.approx(predict_seconds(parts, evit) + 0.5 + 0.2 + 0.1)
    tome = PruneConfig(reducer="tome", r=2)  # every one of the 3 blocks reduces
    assert predict_seconds(table, tome) == pytest.approx(predict_seconds(parts, tome) + 0.5 + 0.2 + 3 * 0.1)
    assert LatencyTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table


def test_the_excess_is_fitted_from_the_probe_forwards(tmp_path, images, one_thread):
    """Forwards built to cost their parts + 0.3 s (dense) and + 0.02 s a reduced forward + 0.01 s a
    reducing block beyond that: the fit recovers the three figures when the rounds resolve them."""
    model = make_model()
    table = dataclasses.replace(tiny_calibration(model, tmp_path), forward_excess=0.0, reduce_excess=(0.0, 0.0))
    parts = measure._Parts(apply(model, None), 2, torch.device("cpu"), {measure.reduce_kind(k): k for k in TINY_KINDS})
    # one probe per reducer, alternating between the middle block and every block but the first
    assert {kind: cfg.layers for kind, (cfg, _) in parts.probes.items()} == \
        {"tome": (2,), "ppt": (1, 2, 3), "sait-mass": (2,)}
    seconds = {("forward", "dense"): predict_seconds(table, None) + 0.3}
    for kind, (cfg, probe) in parts.probes.items():
        found = reductions(probe, parts.images) if cfg.adaptive or cfg.reducer == "ppt" else None
        seconds[("forward", kind)] = predict_seconds(table, cfg, found) + 0.3 + 0.02 + 0.01 * len(cfg.layers)
    def same_parts(_: dict) -> LatencyTable:  # every round's parts as the table's
        return table

    steady = {key: [value] * 5 for key, value in seconds.items()}  # rounds that agree resolve any excess
    fitted = excess.with_forward_excess(table, same_parts, steady, parts.probes, parts.images)
    assert fitted.forward_excess == pytest.approx(0.3)
    assert fitted.reduce_excess == pytest.approx((0.02, 0.01))
    dense_only = excess.with_forward_excess(table, same_parts, steady, {}, parts.images)  # no reducer timed
    assert dense_only.forward_excess == pytest.approx(0.3) and dense_only.reduce_excess == (0.0, 0.0)
    # rounds spread by +-1 s resolve the 0.3 s dense excess no more than the smaller terms: none is kept
    noisy = {key: [value - 1, value, value + 1] for key, value in seconds.items()}
    unresolved = excess.with_forward_excess(table, same_parts, noisy, parts.probes, parts.images)
    assert unresolved.forward_excess == 0.0 and unresolved.reduce_excess == (0.0, 0.0)
    # the dense excess resolved, the probes' not: the dense one alone is kept
    noisy[("forward", "dense")] = [seconds[("forward", "dense")]] * 3
    assert excess.with_forward_excess(table, same_parts, noisy, parts.probes, parts.images).forward_excess == pytest.approx(0.3)
    # forwards that drift with their round's parts: the same excess every round, kept
    slow = dataclasses.replace(table, embed=table.embed + 1.0)
    drifting = {key: [value, value + 1.0, value] for key, value in seconds.items()}
    by_round = iter([table, slow, table] * 10)
    drifted = excess.with_forward_excess(table, lambda _: next(by_round), drifting, parts.probes, parts.images)
    assert drifted.forward_excess == pytest.approx(0.3) and drifted.reduce_excess == pytest.approx((0.02, 0.01))


def test_predict_throughput_checks_its_inputs():
    model = make_model()
    table = synthetic_table(architecture_digest=table_module.architecture_digest(model))
    table.patches = model.patch_embed.num_patches
    with pytest.raises(LatencyError, match="another model"):
        predict_throughput(make_model("registers"), None, table)
    with pytest.raises(ConfigError, match="pass images"):
        predict_throughput(model, PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.5), table)
    with pytest.raises(LatencyError, match="no timings for reducer 'tps'"):
        predict_throughput(model, PruneConfig(reducer="tps", layers=(1,), keep_rate=0.5), table)


def test_reduce_kinds_name_what_changes_the_work():
    assert reduce_kind(PruneConfig(reducer="evit", keep_rate=0.5)) == "evit"
    assert reduce_kind(PruneConfig(reducer="evit", keep_rate=0.5, fuse=False)) == "evit-nofuse"
    assert reduce_kind(PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.5)) == "sait-mass"
    assert reduce_kind(PruneConfig(reducer="tps", keep_rate=0.5, score="tis")) == "tps[tis]"


def test_architecture_ignores_the_reduction_applied():
    model = make_model()
    dense = architecture(model)
    apply(model, PruneConfig(reducer="tome", r=2))
    assert architecture(model) == dense
    assert architecture(make_model("layerscale_qknorm")) != dense


TINY_KINDS = (PruneConfig(reducer="tome", layers=(0,), r=1), PruneConfig(reducer="ppt", layers=(0,), r=1),
              PruneConfig(reducer="sait", layers=(0,), mass_threshold=0.5))


def tiny_calibration(model, tmp_path, batch_size=2, **options):
    options = {"rounds": 1, **options}
    return calibrate(model, batch_size, grid=[1, 16, 64], kinds=TINY_KINDS, cache_dir=tmp_path, **options)


def test_calibration_times_every_part_and_predicts(tmp_path, images, one_thread):
    model = make_model()
    lines = []
    table = tiny_calibration(model, tmp_path, progress=lines.append)
    assert any("round 1/1" in line for line in lines) and "written" in lines[-1]
    assert table.grid == [1, 16, 64] and table.depth == 4 and table.batch_size == 2
    assert set(table.block) == {"none", "prop", "mask"} and set(table.probs_extra) == {"none"}
    assert set(table.reduce) == {"tome", "ppt/pool", "ppt/prune", "ppt/mixed", "sait-mass"}
    assert all(value > 0 for series in table.block.values() for value in series)
    assert table.meta["grid_rounds"] == 1 and len(table.reduce_excess) == 2
    assert LatencyTable.load(next(tmp_path.glob("*.json"))) == table  # the excess is kept with the table
    for cfg in (None, PruneConfig(reducer="tome", r=3), PruneConfig(reducer="ppt", layers=(1, 2), r=8)):
        assert 0 < predict_throughput(model, cfg, table) < float("inf")
    assert predict_throughput(model, PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.6), table,
                              images=images) > 0
    assert type(model).__name__ == "VisionTransformer"  # left as it was


def test_calibration_rounds_fill_the_time_target_within_bounds(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(measure, "ROUNDS_TARGET_SECONDS", 1e-9)
    assert tiny_calibration(make_model(), tmp_path / "least", rounds=None).meta["grid_rounds"] == measure.ROUNDS_RANGE[0]
    monkeypatch.setattr(measure, "ROUNDS_TARGET_SECONDS", 1e9)
    monkeypatch.setattr(measure, "ROUNDS_RANGE", (1, 7))
    assert tiny_calibration(make_model(), tmp_path / "most", rounds=None).meta["grid_rounds"] == 7


def test_the_excess_is_kept_only_where_fixed_costs_dominate_a_block(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(excess, "OVERHEAD_BOUND", 1e9)  # no block is that overhead-bound
    table = tiny_calibration(make_model(), tmp_path / "compute")
    assert table.forward_excess == 0.0 and table.reduce_excess == (0.0, 0.0)
    monkeypatch.setattr(excess, "OVERHEAD_BOUND", 0.0)  # every block is: one round resolves any
    # difference (no spread), and a forward never takes exactly the sum of its parts
    assert tiny_calibration(make_model(), tmp_path / "overhead").forward_excess != 0.0


def test_ppt_mixed_calibration_really_mixes():
    """Half the calibration images repeat one token: flat scores, so ppt pools them and prunes the rest."""
    model = make_model()
    parts = measure._Parts(model, 4, torch.device("cpu"), {})
    start = parts._tokens(16, seed=0, identical_half=True)
    tokens, q, k, v, _ = attention_half(model.blocks[0], start, start.attn_bias(True), False)
    reducer = TokenReducer(measure._amount(TINY_KINDS[1], 16, 0.75, "mixed"), 0)
    out = reducer(tokens, q, k, v, q.shape[-1] ** -0.5, start.attn_bias(True), None)
    kept_mass = torch.isclose(out.size.sum(1), tokens.size.sum(1))
    assert kept_mass.tolist() == [False, False, True, True]


def test_tables_are_cached_by_model_device_batch_and_versions(tmp_path, monkeypatch):
    measured = []

    def fake_measure(model, identity, batch_size, *rest):  # caching is under test, not timing
        measured.append(identity)
        table = synthetic_table(batch_size)
        table.meta = identity
        return table

    monkeypatch.setattr(measure, "_measure", fake_measure)
    model = make_model()
    first = tiny_calibration(model, tmp_path)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["meta"]["batch_size"] == 2
    assert tiny_calibration(apply(model, PruneConfig(reducer="tome", r=2)), tmp_path) == first
    assert len(measured) == 1  # read back, whatever reduction the model carries
    tiny_calibration(model, tmp_path, batch_size=1)
    tiny_calibration(make_model("layerscale_qknorm"), tmp_path)
    tiny_calibration(model, tmp_path, dtype=torch.bfloat16)
    with monkeypatch.context() as patched:
        patched.setattr(table_module, "__version__", "99.0")
        tiny_calibration(model, tmp_path)
    assert len(measured) == len(list(tmp_path.glob("*.json"))) == 5
    assert {"architecture", "device", "batch_size", "dtype", "torch", "timm", "autoprune"} <= set(first.meta)
    assert first.meta["device"]["threads"] == torch.get_num_threads()
    tiny_calibration(model, tmp_path, refresh=True)
    files[0].write_text("{damaged")
    tiny_calibration(model, tmp_path)
    assert len(measured) == 7  # refreshed, then a damaged table measured again
    calibrate(model, 2, kinds=TINY_KINDS + (PruneConfig(reducer="tps", layers=(0,), keep_rate=0.5),),
              cache_dir=tmp_path)
    assert len(measured) == 8  # a cached table without the reducer asked for is measured again
