"""The command line: bench on a tiny model, and bad input ending with exit 2 and one line."""

import json
import os
import re
import shutil

import pytest

from autoprune.cli import UsageError, build_parser, load_configs, main, parse_model_kwargs
from autoprune.cli.search import _search_options
from autoprune.study_attrs import DEFAULT_STORAGE

TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=8,depth=4"]


def test_bench_prints_dense_and_each_config(capsys, tmp_path):
    configs = tmp_path / "configs.yaml"
    configs.write_text("evit half: {reducer: evit, layers: [1], keep_rate: 0.5}\n")
    code = main(["bench", *TINY, "--config", str(configs), "--config", '{"reducer": "tome", "r": 2}',
                 "--batch-size", "2", "--rounds", "2", "--warmup", "0", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    rows = json.loads(out.strip().splitlines()[-1])
    assert [row["name"] for row in rows] == ["dense", "evit half", "evit half [floor]", "tome r=2 @all",
                                             "tome r=2 @all [floor]"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["ideal_speedup"] > 1.0
    assert "| evit half |" in out


def test_bench_through_torch_compile(capsys):
    """Inductor for real (a C++ compiler on CPU): compile time and graph breaks per model; a fixed
    schedule compiles whole, mass-based SaiT's per-batch token count splits the graph. Each config
    is compiled and timed in its own group, beside the dense model and its floor."""
    if shutil.which("g++") is None:
        pytest.skip("needs a C++ compiler for torch.compile's CPU kernels (apt-get install -y g++)")
    cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    code = main(["bench", *TINY, "--config", '{"reducer": "tome", "r": 2}',
                 "--config", '{"reducer": "sait", "layers": [1], "mass_threshold": 0.5}', "--backend", "compile",
                 "--batch-size", "2", "--rounds", "2", "--warmup", "1", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = {row["name"]: row for row in json.loads(captured.out.strip().splitlines()[-1])}
    tome, sait = "tome r=2 @all", "sait mass_threshold=0.5 @1"
    assert list(rows) == ["dense", tome, f"{tome} [floor]", sait, f"{sait} [floor]"]
    assert all(row["refused"] is None and row["images_per_s"] > 0 and row["compile_seconds"] > 0
               for row in rows.values())
    assert rows["dense"]["graph_breaks"] == rows[tome]["graph_breaks"] == rows[f"{tome} [floor]"]["graph_breaks"] == 0
    assert rows[sait]["graph_breaks"] >= 1
    assert rows[tome]["overhead"] is not None and rows[sait]["overhead"] is not None
    assert "torch.compile (inductor" in captured.out and "| compile s | graph breaks |" in captured.out
    assert "a config at a time with the dense model and its floor" in captured.out
    assert f"group 1/2: dense, {tome}, {tome} [floor]" in captured.err
    assert f"group 2/2: dense, {sait}, {sait} [floor]" in captured.err
    assert "Graph break" not in captured.err  # dynamo's warnings stay out: the table counts breaks
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == cache_dir  # the fresh cache folder was only for the run


def test_bench_compile_without_a_compiler_exits_2_with_one_line(capsys, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["bench", *TINY, "--backend", "compile"]) == 2
    err = capsys.readouterr().err
    assert "--backend compile: torch.compile needs a C++ compiler" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["bench", "--model", "vit_nonexistent"], "--model: unknown timm model 'vit_nonexistent'"),
    (["bench", *TINY[:2], "--model-kwargs", "img_size"], "--model-kwargs: 'img_size' is not KEY=VALUE"),
    (["bench", *TINY[:2], "--model-kwargs", "colour=red"], "--model-kwargs: vit_tiny_patch16_224 does not accept"),
    (["bench", *TINY, "--config", "no/such/file.yaml"], "neither a file nor an inline JSON object"),
    (["bench", *TINY, "--config", '{"reducer": "evit", "keep_rate": 2}'], "keep_rate: 2 is invalid"),
    (["bench", *TINY, "--config", '{"reducer": "evit", "layers": [7], "keep_rate": 0.5}'],
     "layers: 7 is out of range"),
    (["bench", *TINY, "--device", "cuda"] , "no CUDA device"),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, message):
    import torch
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bad_numbers_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--rounds", "0"])
    assert exit_info.value.code == 2
    assert "--rounds: 0 is invalid" in capsys.readouterr().err


def test_config_files_name_their_entries(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("good: {reducer: tome, r: 3}\nbad: {reducer: tome, r: 3, fuse: true}\n")
    with pytest.raises(Exception, match=r"c.yaml: bad: PruneConfig.fuse"):
        load_configs([str(path)])
    path.write_text("{reducer: sait, layers: [3], mass_threshold: 0.7}\n")
    assert list(load_configs([str(path)])) == ["sait mass_threshold=0.7 @3"]


def test_model_kwargs_are_typed():
    assert parse_model_kwargs("img_size=64,patch_size=8,qk_norm=true,mlp_ratio=2.5") == {
        "img_size": 64, "patch_size": 8, "qk_norm": True, "mlp_ratio": 2.5}


def _options(tmp_path, config: str, *flags: str) -> dict:
    path = tmp_path / "search.yaml"
    path.write_text(config)
    return _search_options(build_parser().parse_args(["search", "--config", str(path), *flags]))


def test_search_flags_override_the_config_even_when_they_equal_the_default(tmp_path):
    config = "budget: 60%\ntrials: 8\nstorage: sqlite:///exp.db\nconcurrency: 2\n"
    options = _options(tmp_path, config, "--trials", "32", "--storage", DEFAULT_STORAGE, "--concurrency", "1")
    assert (options["trials"], options["storage"], options["concurrency"]) == (32, DEFAULT_STORAGE, 1)
    options = _options(tmp_path, config)
    assert (options["trials"], options["storage"], options["concurrency"]) == (8, "sqlite:///exp.db", 2)
    assert options["preset"] == "deit_small" and options["seed"] is None  # defaults fill what neither gives


@pytest.mark.parametrize("line, message", [
    ("trials: abc", "--trials: 'abc' is invalid; accepted: a positive integer"),
    ("trials: 2.5", "--trials: 2.5 is invalid"),
    ("seed: abc", "--seed: 'abc' is invalid; accepted: an integer from 0 to 4294967295"),
    ("seed: 4294967296", "--seed: 4294967296 is invalid"),
    ("cpus_per_trial: 0", "--cpus-per-trial: 0 is invalid; accepted: a positive integer"),
    ("gpus_per_trial: -1", "--gpus-per-trial: -1 is invalid; accepted: a number >= 0"),
    ("epochs: 0", "--epochs: 0 is invalid; accepted: a positive number"),
    ("pretrained: 'no'", "pretrained: 'no' is invalid; accepted: true or false"),
    ("early_stopping: true", "--early-stopping: ASHA early stopping was replaced by successive halving"),
    ("screen: -1", "--screen: -1 is invalid; accepted: an integer >= 0 (0: no screening)"),
    ("screen: 2.5", "--screen: 2.5 is invalid"),
    ("screen_images: 0", "--screen-images: 0 is invalid; accepted: an integer >= 1"),
    ("halving: 1", "--halving: 1 is invalid; accepted: 0 (off) or an integer >= 2"),
    ("halving: x", "--halving: 'x' is invalid"),
    ("data: [synthetic]", "data: ['synthetic'] is invalid; accepted: a single value"),
])
def test_search_options_from_a_config_are_checked(tmp_path, capsys, line, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        _options(tmp_path, f"budget: 60%\n{line}\n")
    path = tmp_path / "search.yaml"
    assert main(["search", "--config", str(path)]) == 2  # before anything is built or trained
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_search_flags_are_checked_like_the_config(capsys):
    assert main(["search", "--budget", "60%", "--seed", "-1"]) == 2
    assert "--seed: -1 is invalid" in capsys.readouterr().err
    for flags, message in ((["--screen", "-3"], "--screen: -3 is invalid"),
                           (["--screen-images", "0"], "--screen-images: 0 is invalid"),
                           (["--halving", "1"], "--halving: 1 is invalid"),
                           (["--early-stopping"], "--early-stopping: ASHA early stopping was replaced")):
        assert main(["search", "--budget", "60%", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
