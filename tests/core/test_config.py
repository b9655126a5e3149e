import json

import pytest

from oryx_core.config import PRESETS, ConfigError, OryxConfig, preset
from oryx_core.spec import parameter_counts, parameter_specs


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_every_preset_ties_at_least_90_percent(name, mixer):
    counts = parameter_counts(preset(name, mixer))
    assert counts["tied_fraction"] >= 0.90
    assert counts["total"] == counts["shared"] + counts["attention_only"] + counts["recurrent_only"]


def test_ladder_sizes_are_near_their_names():
    for name, millions in [("20m", 20), ("125m", 125), ("350m", 350), ("760m", 760), ("1.4b", 1400)]:
        total = parameter_counts(preset(name))["total"] / 1e6
        assert 0.85 * millions <= total <= 1.15 * millions, (name, total)


def test_json_round_trip():
    cfg = preset("125m", "mamba2", conv_bias=True, o_norm_grouping="all")
    assert OryxConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["mixer"] == "mamba2"


@pytest.mark.parametrize("change, message", [
    (dict(n_heads=6, n_kv_heads=4), "multiple of n_kv_heads"),
    (dict(mixer="lstm"), "mixer must be one of"),
    (dict(d_model=0), "d_model must be a positive integer"),
    (dict(head_dim=7), "head_dim must be even"),
    (dict(norm_eps=-1.0), "norm_eps"),
    (dict(conv_activation="relu"), "conv_activation"),
    (dict(o_norm_grouping="layer"), "o_norm_grouping"),
])
def test_invalid_configs_name_the_problem(change, message):
    with pytest.raises(ConfigError, match=message):
        preset("tiny", **change)


def test_unknown_and_missing_keys():
    d = preset("tiny").to_dict()
    with pytest.raises(ConfigError, match=r"unknown config keys \['n_expert'\]"):
        OryxConfig.from_dict({**d, "n_expert": 8})
    d.pop("vocab_size")
    with pytest.raises(ConfigError, match=r"missing config keys \['vocab_size'\]"):
        OryxConfig.from_dict(d)
    with pytest.raises(ConfigError, match="not valid JSON"):
        OryxConfig.from_json("{nope")
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("7b")


def test_spec_names_are_unique_and_flags_change_them():
    cfg = preset("tiny")
    names = [s.name for s in parameter_specs(cfg)]
    assert len(names) == len(set(names))
    assert "lm_head.weight" not in names
    llama_like = cfg.replace(output_gate=False, output_norm=False, tie_embeddings=False, conv_bias=True)
    names2 = {s.name for s in parameter_specs(llama_like)}
    assert "lm_head.weight" in names2 and "layers.0.mixer.conv_q.bias" in names2
    assert not any("g_proj" in n or "o_norm" in n for n in names2)
    mamba = {s.name for s in parameter_specs(preset("tiny", "mamba2", mlp_hidden=0))}
    assert "layers.0.mixer.D_skip" in mamba and not any(".mlp" in n for n in mamba)
