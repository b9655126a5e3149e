"""Llama (Hugging Face directory, GGUF) -> Oryx: attention mode equals transformers' LlamaForCausalLM."""
from __future__ import annotations

import json

import numpy as np
import pytest

from convert_helpers import backend_logits, build_hf_llama, hf_logits, relative_error
from oryx_convert.api import convert
from oryx_convert.llama import import_hf_llama
from oryx_core.reference import OryxReference
from oryx_core.safetensors_io import FormatError
from oryx_core.weights import load_checkpoint

pytest.importorskip("transformers")

TOKENS = np.random.default_rng(7).integers(0, 260, size=(2, 11))


def test_hf_llama_attention_mode_matches_transformers(hf_llama_dir):
    path, model = hf_llama_dir
    imported = import_hf_llama(path)
    assert imported.config.tie_embeddings == model.config.tie_word_embeddings
    assert not imported.config.output_gate and not imported.config.output_norm
    logits, _ = OryxReference(imported.config, imported.params).forward(TOKENS, True)
    assert relative_error(logits, hf_logits(model, TOKENS)) < 1e-4


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_hf_llama_recurrent_mode_runs_with_initialised_gates(hf_llama_dir, tmp_path, mixer):
    path, model = hf_llama_dir
    imported = import_hf_llama(path, mixer=mixer, seed=3)
    p = imported.params
    assert np.array_equal(p["layers.0.mixer.q_rec.weight"], p["layers.0.mixer.q_attn.weight"])
    assert np.array_equal(p["layers.1.mixer.conv_k.weight"][:, -1], np.ones(p["layers.1.mixer.conv_k.weight"].shape[0]))
    logits, _ = OryxReference(imported.config, p).forward(TOKENS, False)
    assert relative_error(logits, hf_logits(model, TOKENS)) > 1e-3  # recurrent mode is a different function
    # ... which the PyTorch backend computes as the float64 reference does, from the converted checkpoint
    converted = convert(path, tmp_path / "oryx", from_kind="llama", mixer=mixer, seed=3)
    assert relative_error(backend_logits("torch", converted, TOKENS, attention=False), logits) < 1e-4


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_converted_checkpoint_runs_on_backend(hf_llama_dir, tmp_path, backend):
    path, model = hf_llama_dir
    logits = backend_logits(backend, convert(path, tmp_path / "oryx", from_kind="llama"), TOKENS, attention=True)
    assert relative_error(logits, hf_logits(model, TOKENS)) < 1e-4


@pytest.mark.parametrize("attention", [True, False])
def test_torch_and_mlx_backends_agree_on_a_converted_checkpoint(hf_llama_dir, tmp_path, attention):
    pytest.importorskip("oryx_torch.model")
    pytest.importorskip("oryx_mlx.generate")
    checkpoint = convert(hf_llama_dir[0], tmp_path / "oryx", from_kind="llama", mixer="mamba2")
    torch_logits = backend_logits("torch", checkpoint, TOKENS, attention=attention)
    mlx_logits = backend_logits("mlx", checkpoint, TOKENS, attention=attention)
    assert relative_error(mlx_logits, torch_logits) < 1e-4


def test_tokenizer_json_is_carried(hf_llama_dir, tmp_path):
    from oryx_core.tokenizer import byte_level_tokenizer

    path, _ = hf_llama_dir
    src = tmp_path / "with_tokenizer"
    src.mkdir()
    for f in path.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "tokenizer.json").write_text(byte_level_tokenizer().to_str())
    out = convert(src, tmp_path / "oryx")
    assert (out / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()


def _hf_dir(tmp_path, config_changes=None, tensor_changes=None):
    """A saved tiny Llama whose config.json / tensors were then edited."""
    from oryx_core.safetensors_io import encode, load_file

    model = build_hf_llama(tie=True)
    model.save_pretrained(tmp_path / "src", safe_serialization=True)
    src = tmp_path / "src"
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    if tensor_changes:
        tensors, _ = load_file(src / "model.safetensors")
        tensors = {k: v for k, v in tensors.items()}
        tensor_changes(tensors)
        (src / "model.safetensors").write_bytes(encode(tensors))
    return src


@pytest.mark.parametrize("config_changes, message", [
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "RoPE scaling"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "not a Llama model"),
])
def test_unsupported_llama_configs_fail_clearly(tmp_path, config_changes, message):
    src = _hf_dir(tmp_path, config_changes)
    with pytest.raises(FormatError, match=message):
        convert(src, tmp_path / "dst", from_kind="llama")
    assert not (tmp_path / "dst").exists()


def test_missing_misshapen_and_unknown_tensors_fail_clearly(tmp_path):
    def drop(t):
        del t["model.layers.1.mlp.up_proj.weight"]

    def reshape(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]

    def add_bias(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)

    for change, message in ((drop, "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
                            (reshape, "'model.layers.0.self_attn.k_proj.weight' has shape"),
                            (add_bias, "q_proj.bias")):
        src = _hf_dir(tmp_path / change.__name__, tensor_changes=change)
        with pytest.raises(FormatError, match=message):
            convert(src, tmp_path / change.__name__ / "dst", from_kind="llama")
        assert not (tmp_path / change.__name__ / "dst").exists()


def test_failed_conversion_keeps_an_existing_destination(tmp_path):
    src = _hf_dir(tmp_path, {"attention_bias": True})
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(FormatError):
        convert(src, dst, from_kind="llama")
    assert (dst / "keep.txt").read_text() == "old"


def test_written_checkpoint_loads_and_matches_in_memory_import(hf_llama_dir, tmp_path):
    path, _ = hf_llama_dir
    out = convert(path, tmp_path / "oryx", dtype="bfloat16")
    ckpt = load_checkpoint(out)
    assert ckpt.dtype == "bfloat16"
    imported = import_hf_llama(path)
    for name, value in imported.params.items():
        assert np.array_equal(ckpt.params[name], value.astype(ckpt.params[name].dtype)), name


def test_bfloat16_safetensors_import_exactly(tmp_path):
    import torch

    model = build_hf_llama(tie=False).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16", safe_serialization=True)
    imported = import_hf_llama(tmp_path / "bf16")
    sd = {n: t.float().numpy() for n, t in model.state_dict().items()}
    p = imported.params
    assert np.array_equal(p["layers.1.mixer.q_attn.weight"], sd["model.layers.1.self_attn.q_proj.weight"])
    assert np.array_equal(p["layers.0.mlp.down_proj.weight"], sd["model.layers.0.mlp.down_proj.weight"])
    assert np.array_equal(p["lm_head.weight"], sd["lm_head.weight"])
