"""fla's GatedDeltaNetForCausalLM (Hugging Face directory) -> Oryx with the Gated DeltaNet mixer.

Exact in recurrent mode: fla's q/k/v projections and SiLU short convs, a/b gates, A_log,
dt_bias, per-head gated RMSNorm (RMSNorm(o) * w * SiLU(g)), output projection and SwiGLU
MLP map one to one (value head size = expand_v * head_dim). Oryx's attention query, which
fla lacks, starts as a copy of the recurrent query.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from oryx_core.config import OryxConfig
from oryx_core.safetensors_io import FormatError

from .sources import (ConvertedModel, SourceTensors, check_config_types, fill_from_init, identity_conv, layer_progress,
                      read_hf_directory, require, tokenizer_json_of)

FLA_GDN_ARCHITECTURES = ("GatedDeltaNetForCausalLM",)


def _mlp_hidden(hf: dict) -> int:
    """GatedMLP's width: intermediate_size, or 2/3 * hidden_ratio * D rounded up to a multiple of 256."""
    if hf.get("intermediate_size"):
        return int(hf["intermediate_size"])
    width = int(hf["hidden_size"] * (hf.get("hidden_ratio") or 4) * 2 / 3)
    return 256 * ((width + 255) // 256)


FLA_KEY_KINDS = {
    "hidden_size": "int", "num_hidden_layers": "int", "vocab_size": "int", "num_heads": "int", "num_v_heads": "int",
    "head_dim": "int", "expand_v": "number", "intermediate_size": "int", "hidden_ratio": "number", "norm_eps": "number",
    "tie_word_embeddings": "bool", "conv_size": "int", "max_position_embeddings": "int", "use_gate": "bool",
    "use_short_conv": "bool", "allow_neg_eigval": "bool", "hidden_act": "str", "output_gate_activation": "str",
    "architectures": "list", "model_type": "str",
}


def _check_supported(hf: dict, where: str) -> None:
    check_config_types(hf, FLA_KEY_KINDS, where)
    if hf.get("model_type") != "gated_deltanet" and not set(hf.get("architectures") or []) & set(FLA_GDN_ARCHITECTURES):
        raise FormatError(f"{where}: not an fla Gated DeltaNet model (model_type {hf.get('model_type')!r}); "
                          f"use the matching --from kind")
    unsupported = {
        "attn": "hybrid softmax-attention layers (attn)",
        "allow_neg_eigval": "allow_neg_eigval",
        "attnres_block_size": "attention residuals (attnres_block_size)",
    }
    for key, what in unsupported.items():
        if hf.get(key):
            raise FormatError(f"{where}: {what} is not supported by the Gated DeltaNet import")
    heads, v_heads = hf.get("num_heads", 6), hf.get("num_v_heads")
    if v_heads not in (None, heads):
        raise FormatError(f"{where}: grouped value heads (num_v_heads {v_heads} != num_heads {heads}) are not supported")
    if hf.get("output_gate_activation", "swish") not in ("swish", "silu"):
        raise FormatError(f"{where}: output_gate_activation {hf['output_gate_activation']!r} is not supported (only swish)")
    if hf.get("hidden_act", "swish") != "swish":
        raise FormatError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only swish: SwiGLU)")


def oryx_config_from_fla(hf: dict, src: SourceTensors) -> OryxConfig:
    where = src.where
    _check_supported(hf, where)
    head_dim = int(hf.get("head_dim", 256))
    value_head_dim = float(hf.get("expand_v", 2.0)) * head_dim
    if value_head_dim != int(value_head_dim):
        raise FormatError(f"{where}: expand_v * head_dim = {value_head_dim} is not an integer")
    n_heads = int(hf.get("num_heads", 6))
    return OryxConfig(
        vocab_size=require(hf, "vocab_size", where), d_model=require(hf, "hidden_size", where),
        n_layers=require(hf, "num_hidden_layers", where), n_heads=n_heads, n_kv_heads=n_heads, head_dim=head_dim,
        value_head_dim=int(value_head_dim), mlp_hidden=_mlp_hidden(hf), norm_eps=float(hf.get("norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), mixer="gdn",
        conv_width=int(hf.get("conv_size", 4)), max_context=int(hf.get("max_position_embeddings", 2048)),
        conv_bias="model.layers.0.attn.q_conv1d.bias" in src, conv_activation="silu",
        output_gate=bool(hf.get("use_gate", True)))


def _conv(src: SourceTensors, name: str, channels: int, cfg: OryxConfig, use_short_conv: bool) -> dict[str, np.ndarray]:
    """Oryx conv taps [C, W] (and bias) from fla's Conv1d weight [C, 1, W]; identity taps without short convs."""
    if not use_short_conv:
        return {"weight": identity_conv(channels, cfg.conv_width)}
    out = {"weight": src.take(name + ".weight", (channels, 1, cfg.conv_width))[:, 0]}
    if cfg.conv_bias:
        out["bias"] = src.take(name + ".bias", (channels,))
    return out


def fla_gdn_to_oryx(hf: dict, src: SourceTensors) -> tuple[OryxConfig, dict[str, np.ndarray]]:
    cfg = oryx_config_from_fla(hf, src)
    D, H, d, dv, F = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.v_head_dim, cfg.mlp_hidden
    use_short_conv = bool(hf.get("use_short_conv", True))
    mapped = {"embed.weight": src.take("model.embeddings.weight", (cfg.vocab_size, D)),
              "norm.weight": src.take("model.norm.weight", (D,))}
    if not cfg.tie_embeddings:
        mapped["lm_head.weight"] = src.take("lm_head.weight", (cfg.vocab_size, D))
    for i in layer_progress(cfg.n_layers, src.where):
        block, layer = f"model.layers.{i}.", f"layers.{i}."
        attn, mix = block + "attn.", layer + "mixer."
        q = src.take(attn + "q_proj.weight", (H * d, D))
        mapped.update({
            layer + "attn_norm.weight": src.take(block + "attn_norm.weight", (D,)),
            mix + "q_rec.weight": q, mix + "q_attn.weight": q.copy(),
            mix + "k_proj.weight": src.take(attn + "k_proj.weight", (H * d, D)),
            mix + "v_proj.weight": src.take(attn + "v_proj.weight", (H * dv, D)),
            mix + "a_proj.weight": src.take(attn + "a_proj.weight", (H, D)),
            mix + "b_proj.weight": src.take(attn + "b_proj.weight", (H, D)),
            mix + "A_log": src.take(attn + "A_log", (H,)),
            mix + "dt_bias": src.take(attn + "dt_bias", (H,)),
            mix + "o_norm.weight": src.take(attn + "o_norm.weight", (dv,)),
            mix + "o_proj.weight": src.take(attn + "o_proj.weight", (D, H * dv)),
            layer + "mlp_norm.weight": src.take(block + "mlp_norm.weight", (D,)),
            layer + "mlp.gate_proj.weight": src.take(block + "mlp.gate_proj.weight", (F, D)),
            layer + "mlp.up_proj.weight": src.take(block + "mlp.up_proj.weight", (F, D)),
            layer + "mlp.down_proj.weight": src.take(block + "mlp.down_proj.weight", (D, F)),
        })
        if cfg.output_gate:
            mapped[mix + "g_proj.weight"] = src.take(attn + "g_proj.weight", (H * dv, D))
        for oryx_name, fla_name, channels in (("conv_q", "q_conv1d", H * d), ("conv_k", "k_conv1d", H * d),
                                              ("conv_v", "v_conv1d", H * dv)):
            for part, value in _conv(src, attn + fla_name, channels, cfg, use_short_conv).items():
                mapped[f"{mix}{oryx_name}.{part}"] = value
    src.finish(ignorable=("lm_head.weight",) if cfg.tie_embeddings else ())
    return cfg, fill_from_init(cfg, mapped, ())


def import_fla_gdn(path: str | Path) -> ConvertedModel:
    hf, src = read_hf_directory(path)
    cfg, params = fla_gdn_to_oryx(hf, src)
    return ConvertedModel(cfg, params, tokenizer_json_of(Path(path)))
