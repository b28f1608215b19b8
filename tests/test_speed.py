"""Speed on the command line: speed budgets, `autoprune calibrate`, and bench's slicing floor."""

import json

import pytest
import torch

from autoprune import PruneConfig, apply
from autoprune.bench import benchmark, slicing_floor
from autoprune.cli import main
from autoprune.search.budget import ACCEPTED, BudgetError, parse_budget
from conftest import make_model

TINY = ["--model", "vit_tiny_patch16_224",
        "--model-kwargs", "img_size=32,patch_size=8,depth=2,embed_dim=32,num_heads=2"]


@pytest.mark.parametrize("text, speedup, rate", [
    ("2x", 2.0, None), ("1.5X", 1.5, None), (" 3 x", 3.0, None), ("0.8x", 0.8, None),
    ("1500img/s", None, 1500.0), ("1500 img/s", None, 1500.0), ("2.5e3 images/s", None, 2500.0),
])
def test_speed_budgets(text, speedup, rate):
    budget = parse_budget(text)
    assert budget.speed and (budget.speedup, budget.images_per_s) == (speedup, rate)
    assert budget.flops is None and budget.fraction is None
    required = speedup * 400.0 if speedup else rate
    assert budget.required_throughput(400.0) == pytest.approx(required)
    assert budget.throughput_shortfall(required, 400.0) == pytest.approx(0)  # just fits
    assert budget.throughput_shortfall(required - 1, 400.0) > 0
    with pytest.raises(BudgetError, match="speed budget"):
        budget.resolve(4.6e9)


def test_speed_budget_needs_the_dense_throughput_and_flops_budgets_have_none():
    assert str(parse_budget("2x")) == "2x dense throughput" and str(parse_budget("1500img/s")) == "1500 img/s"
    with pytest.raises(BudgetError, match="dense_throughput"):
        parse_budget("2x").required_throughput(float("nan"))
    with pytest.raises(BudgetError, match="FLOPs budget"):
        parse_budget("2.6G").required_throughput(400.0)
    assert not parse_budget("56%").speed


@pytest.mark.parametrize("text", ["0x", "-2x", "infx", "nanx", "x", "2xx", "2 x faster", "1500 img/min",
                                  "0img/s", "-5img/s", "img/s", "1500img", "1500/s"])
def test_bad_speed_budgets(text):
    with pytest.raises(BudgetError) as caught:
        parse_budget(text)
    message = str(caught.value)
    assert message.startswith(f"--budget: {text!r} ") and message.endswith(f"accepted: {ACCEPTED}")
    assert "\n" not in message


@pytest.mark.parametrize("argv", [
    ["--budget", "-1GFLOPs"], ["--budget=-1GFLOPs"], ["--budget", "-56%"], ["--budget", "-2x"], ["--budget", "fast"],
])
def test_bad_budgets_on_the_command_line_exit_2_with_one_line(tmp_path, capsys, argv):
    assert main(["search", *argv, "--preset", "quickstart", "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    captured = capsys.readouterr()
    value = argv[-1].removeprefix("--budget=")
    assert captured.err.startswith(f"autoprune: --budget: {value!r} ")
    assert captured.err.count("\n") == 1 and ACCEPTED in captured.err and "usage:" not in captured.err
    assert not (tmp_path / "x.db").exists()


def test_a_negative_budget_in_a_config_file_gets_the_same_line(tmp_path, capsys):
    config = tmp_path / "search.yaml"
    config.write_text("budget: -1G\npreset: quickstart\n")
    assert main(["search", "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith("autoprune: --budget: '-1G' is not positive; accepted: ")


def test_a_speed_budget_out_of_reach_is_refused_before_any_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["search", "--budget", "50x", "--preset", "quickstart", "--storage", storage]) == 2
    err = capsys.readouterr().err
    assert "--budget: 50x dense throughput asks for more than the fastest config the search space" in err, err
    assert "accepted: at most " in err and err.count("\n") == 1
    assert not (tmp_path / "studies" / "baselines").exists()  # refused before the baseline trained
    assert list((tmp_path / "studies" / "latency").glob("*.json"))  # the table it was judged on stays cached


def test_a_bad_serve_batch_exits_2_with_one_line(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["search", "--budget", "2x", "--preset", "quickstart", "--serve-batch", "0", "--storage", storage]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoprune: --serve-batch: 0 is invalid; accepted: a positive integer") or \
        "serve_batch: 0 is invalid; accepted: a positive integer" in err, err
    assert err.count("\n") == 1


def test_calibrate_command(tmp_path, capsys, one_thread):
    out = tmp_path / "tables"
    code = main(["calibrate", *TINY, "--batch-size", "1,2", "--grid", "1,8", "--rounds", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert text.count("round 1/1 done") == 2 and text.count("img/s predicted") == 2
    tables = sorted(out.glob("*.json"))
    assert [json.loads(p.read_text())["batch_size"] for p in tables] == [1, 2]
    assert json.loads(tables[0].read_text())["grid"] == [1, 8, 16]  # all 16 patches always timed
    assert main(["calibrate", *TINY, "--batch-size", "2", "--out", str(out)]) == 0  # cached: no timing
    assert "latency table cached" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size: '0' is invalid; accepted: integers >= 1"),
    (["--batch-size", "1,x"], "--batch-size: '1,x' is invalid"),
    (["--grid", "1,99"], "--grid: '1,99' is invalid; accepted: token counts from 1 to 16"),
    (["--num-classes", "0"], "--num-classes: 0 is invalid"),
    (["--device", "cuda"], "no CUDA device"),
])
def test_calibrate_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["calibrate", *TINY, *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.glob("*.json"))


def test_the_slicing_floor_runs_the_same_schedule_without_the_reducers_work(images):
    dense = make_model()
    for cfg in (PruneConfig(reducer="tome", r=5), PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.6)):
        reduced = apply(make_model(), cfg)
        floor = slicing_floor(dense, reduced, images)
        with torch.inference_mode():
            reduced(images)
            floor(images)
        assert floor.final_tokens.x.shape == reduced.final_tokens.x.shape  # padded count for mass sait
        assert floor.final_tokens.valid is None and (floor.final_tokens.size == 1).all()
        assert type(dense).__name__ == "VisionTransformer"  # the dense model is copied, not patched


def test_bench_reports_each_config_over_its_floor(capsys, one_thread):
    configs = {"tome": PruneConfig(reducer="tome", r=2),
               "sait": PruneConfig(reducer="sait", layers=(0,), keep_rate=0.5)}
    rows = benchmark(make_model(), configs, batch_size=2, rounds=1, warmup=0)
    assert [row.name for row in rows] == ["dense", "tome", "tome [floor]", "sait", "sait [floor]"]
    by_name = {row.name: row for row in rows}
    for name in configs:
        floor = by_name[f"{name} [floor]"]
        assert floor.floor_of == name and floor.gflops == pytest.approx(by_name[name].gflops)
        assert by_name[name].overhead == pytest.approx(floor.images_per_s / by_name[name].images_per_s - 1)
    assert by_name["dense"].overhead is None
    assert [row.name for row in benchmark(make_model(), configs, batch_size=2, rounds=1, warmup=0,
                                          floor=False)] == ["dense", "tome", "sait"]
    assert main(["bench", *TINY, "--config", '{"reducer": "tome", "r": 2}', "--batch-size", "2", "--rounds", "1",
                 "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "| over floor |" in out and "| tome r=2 @all [floor] |" in out


def test_the_search_speed_model_prices_mass_sait_from_the_calibration_scores(tmp_path, images, one_thread):
    """No forward pass per threshold: the counts the FLOPs calibration holds give the same
    prediction as running the reduced model on the same images."""
    from autoprune import calibrate, predict_throughput
    from autoprune.search.calibration import Calibration
    from autoprune.search.speed import SpeedModel
    from conftest import make_model

    model = make_model()
    kinds = (PruneConfig(reducer="sait", layers=(0,), mass_threshold=0.5),
             PruneConfig(reducer="ppt", layers=(0,), r=1))
    table = calibrate(model, 4, grid=[1, 16, 64], rounds=1, kinds=kinds, cache_dir=tmp_path)
    speed = SpeedModel(model, table, Calibration(model, images))
    for mass in (0.4, 0.6, 0.8):
        cfg = PruneConfig(reducer="sait", layers=(1,), mass_threshold=mass)
        assert speed.throughput(cfg) == pytest.approx(predict_throughput(model, cfg, table, images=images), rel=1e-9)
    ppt = PruneConfig(reducer="ppt", layers=(1, 2), r=8)
    assert speed.throughput(ppt) == pytest.approx(predict_throughput(model, ppt, table, images=images), rel=1e-9)
    assert speed.dense == pytest.approx(predict_throughput(model, None, table))


def test_the_serving_batch_defaults_to_1_on_a_cpu_and_64_on_cuda():
    from autoprune.search.speed import default_serve_batch

    assert default_serve_batch("cpu") == 1
    assert default_serve_batch("cuda") == default_serve_batch("cuda:1") == 64
