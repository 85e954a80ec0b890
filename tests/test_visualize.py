import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffuser_graph import PatternSpec, build_graph, dense_mask  # noqa: E402
from diffuser_graph.cli import main  # noqa: E402
from diffuser_graph.visualize import (  # noqa: E402
    adjacency_density,
    draw_adjacency,
    draw_degree_histogram,
    draw_receptive_field,
)


def test_adjacency_density_is_exact_without_blocks():
    g = build_graph(40, PatternSpec(window=2, num_random=1))
    density, block = adjacency_density(g, max_pixels=64)
    assert block == 1
    assert np.array_equal(density, dense_mask(g).numpy().astype(float))


def test_adjacency_density_blocks_count_every_edge():
    g = build_graph(1000, PatternSpec(window=5, num_global=1, num_random=2))
    density, block = adjacency_density(g, max_pixels=64)
    assert block == 16 and density.shape == (63, 63)
    sizes = np.minimum(block, 1000 - np.arange(63) * block)
    assert np.isclose((density * np.outer(sizes, sizes)).sum(), g.num_edges())
    assert density.max() <= 1.0


def test_drawings_label_their_axes():
    g = build_graph(36, PatternSpec(kind="grid", image_size=(6, 6), window=1))
    fig, axes = plt.subplots(1, 3)
    draw_adjacency(axes[0], g)
    draw_degree_histogram(axes[1], g)
    draw_receptive_field(axes[2], g, query=14, hops=2, image_size=(6, 6))
    assert axes[0].get_xlabel() == "key token u" and axes[0].get_ylabel() == "query token v"
    assert "2-hop receptive field of token 14: 25 of 36" in axes[2].get_title()
    plt.close(fig)


def test_pattern_command_writes_a_png(tmp_path, capsys):
    out = tmp_path / "pattern.png"
    assert main(["pattern", "--length", "512", "window=8", "num_random=2", "--out", str(out),
                 "--hops", "2", "--query", "3"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = plt.imread(out)
    assert image.shape[0] > 300 and image.shape[1] > 900 and image.std() > 0.05
    assert "wrote" in capsys.readouterr().out


def test_pattern_command_reads_a_config_file(tmp_path, capsys):
    config = tmp_path / "pattern.yaml"
    config.write_text("pattern:\n  window: 3\n  num_global: 1\n")
    assert main(["pattern", "--config", str(config), "num_random=1", "--length", "64",
                 "--json"]) == 0
    assert '"num_random": 1' in capsys.readouterr().out
    for args, message in ((["--config", str(tmp_path / "none.yaml")], "does not exist"),
                          (["--query", "64"], "--query must be in \\[0, 64\\)")):
        assert main(["pattern", "--length", "64", *args]) == 2
        assert re.search(message, capsys.readouterr().err)
