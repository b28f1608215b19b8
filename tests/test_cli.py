"""The command line: bench on a tiny model, and bad input ending with exit 2 and one line."""

import json

import pytest

from autoprune.cli import load_configs, main, parse_model_kwargs

TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=8,depth=4"]


def test_bench_prints_dense_and_each_config(capsys, tmp_path):
    configs = tmp_path / "configs.yaml"
    configs.write_text("evit half: {reducer: evit, layers: [1], keep_rate: 0.5}\n")
    code = main(["bench", *TINY, "--config", str(configs), "--config", '{"reducer": "tome", "r": 2}',
                 "--batch-size", "2", "--rounds", "2", "--warmup", "0", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    rows = json.loads(out.strip().splitlines()[-1])
    assert [row["name"] for row in rows] == ["dense", "evit half", "tome r=2 @all"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["ideal_speedup"] > 1.0
    assert "| evit half |" in out


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
