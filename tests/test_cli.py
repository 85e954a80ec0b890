import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from diffuser_graph import PatternSpec, build_graph, spectral_stats
from diffuser_graph.cli import main

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "seq_lens": [64, 128],
    "variants": {"window": {"window": 2}, "window+random": {"window": 2, "num_random": 2},
                 "official": {"kind": "official", "window": 16, "num_random": 2,
                              "num_global": 2, "max_len": 64}},
    "regular_like": "window+random",
    "coverage_hops": 4,
    "histogram_len": 64,
    "diffusion": {"seq_len": 32, "pattern": {"window": 1}, "head_dim": 4},
}


def test_spectral_command_writes_every_output(tmp_path, capsys):
    config = tmp_path / "spectral.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    assert main(["spectral", str(config), "seed=1", "--out", str(out), "--quiet"]) == 0
    for name in ("results.json", "results.csv", "results.md", "config.yaml", "gap_vs_length.png",
                 "coverage.png", "eigenvalue_histograms.png", "diffusion_spectrum.png"):
        assert (out / name).stat().st_size > 0, name
    frame = pd.read_csv(out / "results.csv")
    # the official pattern stops at its max_len (64); every other variant covers both lengths
    assert sorted(frame.groupby("variant").size().items()) == [
        ("complete", 2), ("official", 1), ("random regular", 2), ("window", 2),
        ("window+random", 2)]
    row = frame[(frame.variant == "window+random") & (frame.n == 128)].iloc[0]
    direct = spectral_stats(build_graph(128, PatternSpec(window=2, num_random=2, seed=1)))
    assert row.lambda_2 == pytest.approx(direct.lambda_2)
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["seed"] == 1 and len(results["rows"]) == len(frame)
    gaps = {name: s["spectral_gap"] for name, s in results["diffusion"].items()}
    assert gaps["ppr_inf"] > gaps["A"]
    assert "| window+random" in (out / "results.md").read_text()
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 1
    assert "results.md" in capsys.readouterr().out


def test_spectral_command_reports_config_errors(tmp_path, capsys):
    config = tmp_path / "spectral.yaml"
    config.write_text(yaml.safe_dump({**TINY, "seq_len": [64]}))
    assert main(["spectral", str(config), "--quiet"]) == 2
    assert "seq_len: Extra inputs are not permitted" in capsys.readouterr().err


def test_shipped_spectral_config_is_valid():
    from diffuser_graph.config import load_config
    from diffuser_graph.spectral_sweep import SpectralConfig

    config = load_config(REPO / "configs" / "spectral.yaml", SpectralConfig)
    assert config.seq_lens[0] == 512 and config.seq_lens[-1] == 16384
    assert {"window", "official"} <= set(config.variants)


def test_pattern_command(capsys):
    assert main(["pattern", "--length", "256", "window=4", "num_random=2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = build_graph(256, PatternSpec(window=4, num_random=2)).num_edges()
    assert report["directed_edges"] == expected
    assert report["ua_conditions"]["self_loops"]["holds"] is True
    assert main(["pattern", "--length", "128", "kind=official"]) == 0
    assert "directed edges" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["pattern", "--length", "64", "window=-1"], "window: Input should be greater"),
    (["pattern", "--length", "64", "num_global=100"], "num_global=100 exceeds"),
    (["pattern", "--length", "64", "windw=3"], "windw"),
])
def test_pattern_command_errors(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "diffuser_graph.cli", "spectral", "--help"],
                            capture_output=True, text=True, check=True)
    assert "examples:" in result.stdout and "key.path=value" in result.stdout


def test_examples_command_draws_images_and_prints_text(tmp_path, capsys):
    out = tmp_path / "pf.png"
    small = ["task.train_size=6", "task.val_size=2", "task.test_size=2"]
    assert main(["examples", str(REPO / "configs" / "pathfinder-small.yaml"), *small,
                 "--count", "4", "--out", str(out)]) == 0
    assert "wrote 4 train examples" in capsys.readouterr().out
    import matplotlib.image

    picture = matplotlib.image.imread(out)
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture[..., :3].std() > 0.1
    assert main(["examples", str(REPO / "configs" / "text-small.yaml"), *small, "--count", "2",
                 "--chars", "50"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("--- train example") == 2 and "label" in printed


@pytest.mark.parametrize("args,message", [
    (["configs/pathfinder-small.yaml", "task.train_size=2", "task.val_size=1", "task.test_size=1"],
     "holds images: pass --out PNG"),
    (["configs/text-small.yaml", "--count", "0"], "--count and --chars must be at least 1"),
])
def test_examples_command_errors(args, message, capsys):
    args[0] = str(REPO / args[0])
    assert main(["examples", *args]) == 2
    assert message in capsys.readouterr().err
