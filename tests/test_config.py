import pytest
import yaml

from diffuser_graph.config import ConfigError, apply_overrides, load_config, parse_override
from diffuser_graph.spectral_sweep import SpectralConfig


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("name=null") == (["name"], None)
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match="key.path=value"):
            parse_override(bad)


def test_apply_overrides_creates_levels_and_does_not_mutate():
    data = {"model": {"hops": 5}}
    result = apply_overrides(data, ["model.hops=3", "train.lr=0.001"])
    assert result == {"model": {"hops": 3}, "train": {"lr": 0.001}}
    assert data == {"model": {"hops": 5}}
    with pytest.raises(ConfigError, match="model.hops is not a section"):
        apply_overrides(data, ["model.hops.x=1"])


def write(tmp_path, data):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_load_config_with_overrides(tmp_path):
    path = write(tmp_path, {"seq_lens": [64, 32], "variants": {"w": {"window": 2}},
                            "regular_like": None})
    config = load_config(path, SpectralConfig, ["variants.w.num_random=3", "seed=4"])
    assert config.seq_lens == [32, 64]
    assert config.variants["w"].num_random == 3 and config.seed == 4
    assert config.seeded_variants()["w"].seed == 4


@pytest.mark.parametrize("data,overrides,message", [
    ({"seq_lens": [64], "bogus": 1}, [], "bogus: Extra inputs are not permitted"),
    ({"seq_lens": [64]}, ["coverage_hops=0"], "coverage_hops: Input should be greater"),
    ({"seq_lens": ["x"]}, [], "seq_lens.0: Input should be a valid integer"),
    ({"variants": {"w": {"window": -1}}}, [], "variants.w.window"),
    ({"seq_lens": [64]}, ["regular_like=nope"], "regular_like must name a variant"),
    ({"seq_lens": [4]}, [], "must be >= 16"),
])
def test_config_errors_name_the_key(tmp_path, data, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, data), SpectralConfig, overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", SpectralConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("seq_lens: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, SpectralConfig)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listing, SpectralConfig)
