"""Llama-style models (Hugging Face LlamaForCausalLM directories, llama.cpp GGUF files) -> Oryx.

The mapping is exact in attention mode: Llama's Q/K/V/O become Oryx's q_attn and the shared
K/V/O; Llama has no short conv, so the convs get identity taps with no activation; no
output gate or norm (`output_gate=False, output_norm=False`). The recurrent query starts as
a copy of the attention query and the recurrence's own gates get the design's init, as
Mamba-in-the-Llama reuses attention projections for its linear layers.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from oryx_core.config import OryxConfig
from oryx_core.safetensors_io import FormatError

from .gguf import read_gguf, tokenizer_json_from_gguf, unpermute_rope_rows
from .sources import (ConvertedModel, SourceTensors, check_config_types, fill_from_init, identity_conv, layer_progress,
                      read_hf_directory, require, tokenizer_json_of)

LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)
# The recurrence's own parameters, which Llama lacks: they get oryx_core.init's values.
RECURRENT_GATES = ("a_proj.weight", "b_proj.weight", "dt_proj.weight", "A_log", "dt_bias", "D_skip")


def _float32_literal(x: float) -> float:
    """The shortest decimal of a float32 (GGUF stores 1e-5 as 9.99999974e-06; HF configs say 1e-05)."""
    return float(str(np.float32(x)))


LLAMA_KEY_KINDS = {
    "hidden_size": "int", "num_attention_heads": "int", "num_hidden_layers": "int", "num_key_value_heads": "int",
    "head_dim": "int", "intermediate_size": "int", "vocab_size": "int", "max_position_embeddings": "int",
    "rms_norm_eps": "number", "rope_theta": "number", "tie_word_embeddings": "bool", "attention_bias": "bool",
    "mlp_bias": "bool", "hidden_act": "str", "rope_scaling": "object", "rope_parameters": "object",
    "architectures": "list", "model_type": "str",
}


def _rope_theta(hf: dict, where: str) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    check_config_types(params, {"rope_theta": "number", "rope_type": "str", "type": "str"}, f"{where} (RoPE parameters)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise FormatError(f"{where}: RoPE scaling {rope_type!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def oryx_config_from_llama(hf: dict, mixer: str, where: str) -> OryxConfig:
    check_config_types(hf, LLAMA_KEY_KINDS, where)
    architectures = hf.get("architectures") or []
    if hf.get("model_type") != "llama" and not set(architectures) & set(LLAMA_ARCHITECTURES):
        raise FormatError(f"{where}: not a Llama model (model_type {hf.get('model_type')!r}, "
                          f"architectures {architectures}); use the matching --from kind")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise FormatError(f"{where}: {flag}=true is not supported (Oryx projections have no bias)")
    if hf.get("hidden_act", "silu") != "silu":
        raise FormatError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (Oryx's MLP is SwiGLU)")
    d_model = require(hf, "hidden_size", where)
    n_heads = require(hf, "num_attention_heads", where)
    return OryxConfig(
        vocab_size=require(hf, "vocab_size", where), d_model=d_model, n_layers=require(hf, "num_hidden_layers", where),
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads, mlp_hidden=require(hf, "intermediate_size", where),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope=True, rope_theta=_rope_theta(hf, where),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), mixer=mixer,
        max_context=int(hf.get("max_position_embeddings", 2048)),
        conv_activation="none", output_norm=False, output_gate=False)


def llama_to_oryx(hf: dict, src: SourceTensors, mixer: str, seed: int = 0) -> tuple[OryxConfig, dict[str, np.ndarray]]:
    """Maps HF Llama tensor names to Oryx's; `src` must hold the HF names."""
    cfg = oryx_config_from_llama(hf, mixer, src.where)
    D, H, Hkv, d, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_hidden
    mapped = {"embed.weight": src.take("model.embed_tokens.weight", (cfg.vocab_size, D)),
              "norm.weight": src.take("model.norm.weight", (D,))}
    if not cfg.tie_embeddings:
        mapped["lm_head.weight"] = src.take("lm_head.weight", (cfg.vocab_size, D))
    for i in layer_progress(cfg.n_layers, src.where):
        hf_layer, layer = f"model.layers.{i}.", f"layers.{i}."
        attn, mixer_p = hf_layer + "self_attn.", layer + "mixer."
        q = src.take(attn + "q_proj.weight", (H * d, D))
        mapped.update({
            layer + "attn_norm.weight": src.take(hf_layer + "input_layernorm.weight", (D,)),
            mixer_p + "q_attn.weight": q, mixer_p + "q_rec.weight": q.copy(),
            mixer_p + "k_proj.weight": src.take(attn + "k_proj.weight", (Hkv * d, D)),
            mixer_p + "v_proj.weight": src.take(attn + "v_proj.weight", (Hkv * d, D)),
            mixer_p + "o_proj.weight": src.take(attn + "o_proj.weight", (D, H * d)),
            mixer_p + "conv_k.weight": identity_conv(Hkv * d, cfg.conv_width),
            mixer_p + "conv_v.weight": identity_conv(Hkv * d, cfg.conv_width),
            mixer_p + "conv_q.weight": identity_conv(H * d, cfg.conv_width),
            layer + "mlp_norm.weight": src.take(hf_layer + "post_attention_layernorm.weight", (D,)),
            layer + "mlp.gate_proj.weight": src.take(hf_layer + "mlp.gate_proj.weight", (F, D)),
            layer + "mlp.up_proj.weight": src.take(hf_layer + "mlp.up_proj.weight", (F, D)),
            layer + "mlp.down_proj.weight": src.take(hf_layer + "mlp.down_proj.weight", (D, F)),
        })
    # a tied checkpoint may still carry a copy of the embedding as lm_head; rotary caches are derived data
    src.finish(ignorable=("rotary_emb.inv_freq",) + (("lm_head.weight",) if cfg.tie_embeddings else ()))
    return cfg, fill_from_init(cfg, mapped, RECURRENT_GATES, seed)


def import_hf_llama(path: str | Path, mixer: str = "gdn", seed: int = 0) -> ConvertedModel:
    hf, src = read_hf_directory(path)
    cfg, params = llama_to_oryx(hf, src, mixer, seed)
    return ConvertedModel(cfg, params, tokenizer_json_of(Path(path)))


# ----- GGUF -----
GGUF_LAYER_NAMES = {  # llama.cpp name in block i -> HF name in layer i
    "attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                     "output.weight": "lm_head.weight"}


GGUF_KEY_KINDS = {
    "general.architecture": "str", "llama.expert_count": "int", "llama.rope.scaling.type": "str",
    "llama.attention.head_count": "positive int", "llama.attention.head_count_kv": "positive int",
    "llama.embedding_length": "positive int", "llama.attention.key_length": "positive int",
    "llama.rope.dimension_count": "int", "llama.block_count": "positive int", "llama.feed_forward_length": "positive int",
    "llama.attention.layer_norm_rms_epsilon": "number", "llama.rope.freq_base": "number",
    "llama.context_length": "positive int", "llama.vocab_size": "positive int",
}


def gguf_llama_as_hf(path: str | Path) -> tuple[dict, SourceTensors, str]:
    """(HF-style config, HF-named dequantised tensors, tokenizer.json text) of a llama GGUF file."""
    g = read_gguf(path)
    check_config_types(g.metadata, GGUF_KEY_KINDS, f"{g.path} (GGUF metadata)")
    arch = g.require("general.architecture")
    if arch != "llama":
        raise FormatError(f"{g.path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    if g.get("llama.expert_count"):
        raise FormatError(f"{g.path}: mixture-of-experts Llama is not supported")
    scaling = g.get("llama.rope.scaling.type", "none")
    n_heads = int(g.require("llama.attention.head_count"))
    n_kv = int(g.get("llama.attention.head_count_kv", n_heads))
    d_model = int(g.require("llama.embedding_length"))
    head_dim = int(g.get("llama.attention.key_length", d_model // n_heads))
    if int(g.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise FormatError(f"{g.path}: partial RoPE (llama.rope.dimension_count != head size {head_dim}) is not supported")
    hf = {
        "model_type": "llama", "hidden_size": d_model, "num_hidden_layers": int(g.require("llama.block_count")),
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": head_dim,
        "intermediate_size": int(g.require("llama.feed_forward_length")),
        "rms_norm_eps": _float32_literal(g.require("llama.attention.layer_norm_rms_epsilon")),
        "rope_parameters": {"rope_type": "default" if scaling == "none" else scaling,
                            "rope_theta": _float32_literal(g.get("llama.rope.freq_base", 10000.0))},
        "max_position_embeddings": int(g.get("llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in g.tensor_types,
    }
    tensors = GGUFLlamaTensors(g, n_heads, n_kv)
    hf["vocab_size"] = int(tensors.shape("model.embed_tokens.weight")[0]) if "model.embed_tokens.weight" in tensors \
        else int(g.require("llama.vocab_size"))
    return hf, SourceTensors(tensors, str(g.path)), tokenizer_json_from_gguf(g)


class GGUFLlamaTensors(Mapping):
    """A Llama GGUF's tensors under HF names, each dequantised (and its RoPE rows restored) only when read,
    with a progress bar over the reads."""

    def __init__(self, g, n_heads: int, n_kv_heads: int):
        self._g = g
        self._sources = {}  # HF name -> (GGUF name, heads whose RoPE rows to restore, or 0)
        for name in g.tensor_types:
            parts, heads, hf_name = name.split(".", 2), 0, name
            if parts[0] == "blk" and len(parts) == 3 and parts[2] in GGUF_LAYER_NAMES:
                heads = {"attn_q.weight": n_heads, "attn_k.weight": n_kv_heads}.get(parts[2], 0)
                hf_name = f"model.layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}"
            self._sources[GGUF_GLOBAL_NAMES.get(hf_name, hf_name)] = (name, heads)  # unknown names stay; `finish` reports them
        self._progress = None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._g.shape(self._sources[name][0])

    def __getitem__(self, name: str) -> np.ndarray:
        from tqdm.auto import tqdm

        gguf_name, heads = self._sources[name]
        if self._progress is None:
            self._progress = tqdm(total=len(self._sources), desc=f"reading {self._g.path.name}", unit="tensor",
                                  disable=None, leave=False)
        value = self._g.tensor(gguf_name)
        self._progress.update(1)
        return unpermute_rope_rows(value, heads) if heads else value

    def __iter__(self):
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def import_gguf_llama(path: str | Path, mixer: str = "gdn", seed: int = 0, dtype=None) -> ConvertedModel:
    """`dtype` (a numpy dtype) casts each tensor as it is read, so the import holds the output, not float32."""
    hf, src, tokenizer_json = gguf_llama_as_hf(path)
    src.dtype = dtype
    cfg, params = llama_to_oryx(hf, src, mixer, seed)
    return ConvertedModel(cfg, params, tokenizer_json)
