"""Crafted bad converter sources (Hugging Face style directories for Llama, fla GatedDeltaNet and mamba-ssm
Mamba-2; Oryx torch/MLX containers): mistyped config keys, index shard names leaving the directory,
non-regular shard files. Each ends in one FormatError naming the file and key, and nothing is written."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("gguf")

from oryx_convert.api import convert  # noqa: E402
from oryx_core.files import FormatError  # noqa: E402
from oryx_core.safetensors_io import encode  # noqa: E402

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 256,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "max_position_embeddings": 256}
FLA = {"model_type": "gated_deltanet", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 256, "num_heads": 2,
       "head_dim": 16, "expand_v": 2.0, "intermediate_size": 128, "tie_word_embeddings": True}
MAMBA = {"d_model": 64, "n_layer": 2, "vocab_size": 256, "d_intermediate": 0, "tie_embeddings": True,
         "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16}}


def hf_dir(tmp_path, config: dict, kind: str):
    """A directory with config.json and a one-tensor model.safetensors (the config is checked first)."""
    path = tmp_path / "src"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(encode({"x": np.zeros(2, np.float32)}))
    return path, kind


def changed(base, **changes):
    return {**base, **changes}


CONFIG_CASES = [
    ("llama tie_word_embeddings \"false\"", changed(LLAMA, tie_word_embeddings="false"), "llama", "'tie_word_embeddings' must be a bool"),
    ("llama num_hidden_layers \"2\"", changed(LLAMA, num_hidden_layers="2"), "llama", "'num_hidden_layers' must be an int"),
    ("llama hidden_size 64.0", changed(LLAMA, hidden_size=64.0), "llama", "'hidden_size' must be an int"),
    ("llama max_position_embeddings a list", changed(LLAMA, max_position_embeddings=[256]), "llama",
     "'max_position_embeddings' must be an int"),
    ("llama rms_norm_eps \"1e-5\"", changed(LLAMA, rms_norm_eps="1e-5"), "llama", "'rms_norm_eps' must be a number"),
    ("llama rope_theta true", changed(LLAMA, rope_theta=True), "llama", "'rope_theta' must be a number"),
    ("llama rope_scaling a list", changed(LLAMA, rope_scaling=[1]), "llama", "'rope_scaling' must be an object"),
    ("llama rope_parameters.rope_theta a string", changed(LLAMA, rope_parameters={"rope_theta": "1e4"}), "llama",
     r"\(RoPE parameters\): config key 'rope_theta' must be a number"),
    ("llama attention_bias \"no\"", changed(LLAMA, attention_bias="no"), "llama", "'attention_bias' must be a bool"),
    ("llama num_hidden_layers 10**8", changed(LLAMA, num_hidden_layers=10**8), "llama", "n_layers must be a positive integer"),
    ("llama hidden_size missing", {k: v for k, v in LLAMA.items() if k != "hidden_size"}, "llama", "config has no 'hidden_size'"),
    ("fla use_gate \"true\"", changed(FLA, use_gate="true"), "fla-gdn", "'use_gate' must be a bool"),
    ("fla head_dim 16.5", changed(FLA, head_dim=16.5), "fla-gdn", "'head_dim' must be an int"),
    ("fla expand_v \"2\"", changed(FLA, expand_v="2"), "fla-gdn", "'expand_v' must be a number"),
    ("fla use_short_conv 0", changed(FLA, use_short_conv=0), "fla-gdn", "'use_short_conv' must be a bool"),
    ("mamba ssm_cfg a list", changed(MAMBA, ssm_cfg=[1]), "mamba2", "'ssm_cfg' must be an object"),
    ("mamba ssm_cfg.conv_bias \"false\"", changed(MAMBA, ssm_cfg={**MAMBA["ssm_cfg"], "conv_bias": "false"}), "mamba2",
     r"\(ssm_cfg\): config key 'conv_bias' must be a bool"),
    ("mamba ssm_cfg.dt_limit 5", changed(MAMBA, ssm_cfg={**MAMBA["ssm_cfg"], "dt_limit": 5}), "mamba2",
     "'dt_limit' must be a list"),
    ("mamba ssm_cfg.expand \"2\"", changed(MAMBA, ssm_cfg={**MAMBA["ssm_cfg"], "expand": "2"}), "mamba2",
     "'expand' must be an int"),
    ("mamba tie_embeddings null ok, d_model \"64\"", changed(MAMBA, tie_embeddings=None, d_model="64"), "mamba2",
     "'d_model' must be an int"),
]


@pytest.mark.parametrize("config, kind, message", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_mistyped_source_config_is_refused(tmp_path, config, kind, message):
    src, kind = hf_dir(tmp_path, config, kind)
    with pytest.raises(FormatError, match=message) as info:
        convert(src, tmp_path / "dst", from_kind=kind)
    assert "\n" not in str(info.value) and not (tmp_path / "dst").exists()


def with_index(weight_map) -> callable:
    def make(path, tmp_path):
        (path / "model.safetensors").unlink()
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return make


def shard_replaced(make_file):
    def make(path, tmp_path):
        (path / "model.safetensors").unlink()
        make_file(path / "model.safetensors", tmp_path)
    return make


def outside(path, tmp_path):
    (tmp_path / "elsewhere.safetensors").write_bytes(encode({"x": np.zeros(2, np.float32)}))
    with_index({"x": "../elsewhere.safetensors"})(path, tmp_path)


FILE_CASES = [
    ("index names ../", outside, "is not a plain file name"),
    ("index names an absolute path", with_index({"x": "/etc/hostname"}), "is not a plain file name"),
    ("index weight_map a list", with_index([["x", "model.safetensors"]]), "weight_map must map"),
    ("index shard name a number", with_index({"x": 3}), "weight_map must map"),
    ("model.safetensors a FIFO", shard_replaced(lambda p, t: os.mkfifo(p)), "a FIFO"),
    ("model.safetensors a symlink to /dev/zero", shard_replaced(lambda p, t: p.symlink_to("/dev/zero")), "resolves outside"),
    ("model.safetensors with trailing bytes", shard_replaced(
        lambda p, t: p.write_bytes(encode({"x": np.zeros(2, np.float32)}) + b"\0")), "bytes after the last tensor"),
    ("config.json a FIFO", lambda p, t: ((p / "config.json").unlink(), os.mkfifo(p / "config.json")), "a FIFO"),
    ("config.json 100k deep", lambda p, t: (p / "config.json").write_bytes(b"[" * 100_000 + b"]" * 100_000), "nested deeper"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_source_files_are_refused(tmp_path, make, message):
    src, _ = hf_dir(tmp_path, LLAMA, "llama")
    make(src, tmp_path)
    with pytest.raises(FormatError, match=message):
        convert(src, tmp_path / "dst", from_kind="llama")
    assert not (tmp_path / "dst").exists()


def test_source_tokenizer_that_is_a_fifo_is_refused(tmp_path):
    from oryx_convert.sources import tokenizer_json_of

    os.mkfifo(tmp_path / "tokenizer.json")
    with pytest.raises(FormatError, match="a FIFO"):
        tokenizer_json_of(tmp_path)
