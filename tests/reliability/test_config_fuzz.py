"""Crafted model configs (OryxConfig.from_dict / from_file) and training-config files: each mistyped,
out-of-range, non-finite, oversized or deeply nested one is refused with one ConfigError / ValueError
naming the field or file."""
from __future__ import annotations

import json
import os

import pytest

from oryx_core.config import PRESETS, ConfigError, OryxConfig

TINY = dict(PRESETS["tiny"])

FIELD_CASES = [
    ("rope", "false", "rope must be true or false"),
    ("rope", 0, "rope must be true or false"),
    ("tie_embeddings", "yes", "tie_embeddings must be true or false"),
    ("gate_before_norm", None, "gate_before_norm must be true or false"),
    ("output_norm", [True], "output_norm must be true or false"),
    ("output_gate", 1.0, "output_gate must be true or false"),
    ("n_layers", 1e8, "n_layers must be a positive integer"),
    ("n_layers", 10**8, "n_layers must be a positive integer"),
    ("n_layers", 0, "n_layers must be a positive integer"),
    ("vocab_size", 2**63, "vocab_size must be a positive integer"),
    ("vocab_size", "260", "vocab_size must be a positive integer"),
    ("d_model", 64.0, "d_model must be a positive integer"),
    ("d_model", True, "d_model must be a positive integer"),
    ("n_heads", 2**13, "n_heads must be a positive integer"),
    ("head_dim", -8, "head_dim must be a positive integer"),
    ("conv_width", 65, "conv_width must be a positive integer"),
    ("max_context", 2**25, "max_context must be a positive integer"),
    ("mlp_hidden", 2**19, "mlp_hidden must be an integer >= 0"),
    ("mlp_hidden", False, "mlp_hidden must be an integer >= 0"),
    ("value_head_dim", 16.5, "value_head_dim must be a positive integer"),
    ("value_head_dim", True, "value_head_dim must be a positive integer"),
    ("norm_eps", float("nan"), "norm_eps must be in"),
    ("norm_eps", True, "norm_eps must be in"),
    ("norm_eps", "1e-5", "norm_eps must be in"),
    ("rope_theta", float("inf"), "rope_theta must be a finite number"),
    ("rope_theta", float("nan"), "rope_theta must be a finite number"),
    ("rope_theta", True, "rope_theta must be a finite number"),
    ("rope_theta", -1.0, "rope_theta must be a finite number"),
    ("mixer", ["gdn"], "mixer must be one of"),
    ("mixer", "GDN", "mixer must be one of"),
    ("conv_activation", "relu", "conv_activation must be one of"),
    ("o_norm_grouping", {"head": 1}, "o_norm_grouping must be one of"),
    ("extra", [1], "extra must be an object"),
]


@pytest.mark.parametrize("field, value, message", FIELD_CASES, ids=[f"{f}={v!r:.20}" for f, v, _ in FIELD_CASES])
def test_mistyped_field_is_refused(field, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        OryxConfig.from_dict({**TINY, field: value}, "cfg.json")
    assert str(info.value).startswith("cfg.json: ") and "\n" not in str(info.value)


def test_every_preset_is_valid_and_round_trips():
    for name in PRESETS:
        for mixer in ("gdn", "mamba2"):
            cfg = OryxConfig(**{**PRESETS[name], "mixer": mixer})
            assert OryxConfig.from_json(cfg.to_json()) == cfg


FILE_CASES = [
    ("100k deep", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper"),
    ("NaN literal", json.dumps({**TINY, "norm_eps": 1e-5}).replace("1e-05", "NaN").encode(), "not valid JSON"),
    ("1e999", json.dumps({**TINY, "rope_theta": 1.0}).replace("1.0", "1e999").encode(), "rope_theta must be a finite"),
    ("duplicate key", b'{"vocab_size": 260, "vocab_size": 261}', "duplicate key"),
    ("not UTF-8", b'{"\xff": 1}', "not UTF-8"),
    ("a list", b"[]", "expected a JSON object"),
]


@pytest.mark.parametrize("data, message", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_config_file_is_refused(tmp_path, data, message):
    path = tmp_path / "cfg.json"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=message):
        OryxConfig.from_file(path)


@pytest.mark.parametrize("kind", ["fifo", "oversized", "directory"])
def test_config_file_that_is_not_a_small_regular_file(tmp_path, kind):
    path = tmp_path / "cfg.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "oversized":
        with open(path, "wb") as f:
            f.truncate(65 << 20)
    else:
        path.mkdir()
    with pytest.raises(ConfigError, match={"fifo": "a FIFO", "oversized": "more than the", "directory": "a directory"}[kind]):
        OryxConfig.from_file(path)


TRAIN_FILES = [
    ("fifo", None, "a FIFO"),
    ("json 100k deep", b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
    ("toml 100k deep", b"a = " + b"[" * 100_000 + b"]" * 100_000, "not valid toml"),
    ("json not UTF-8", b'{"\xff": 1}', "not UTF-8"),
    ("json a list", b"[1]", "expected an object"),
]


@pytest.mark.parametrize("kind, data, message", TRAIN_FILES, ids=[t[0] for t in TRAIN_FILES])
def test_bad_training_config_file_is_refused(tmp_path, kind, data, message):
    pytest.importorskip("torch")
    from oryx_torch.train import load_train_config

    path = tmp_path / ("train.toml" if "toml" in kind else "train.json")
    if data is None:
        os.mkfifo(path)
    else:
        path.write_bytes(data)
    with pytest.raises(ValueError, match=message):
        load_train_config(path)
