"""The parameter spec: every tensor's canonical name, shape and which mode uses it.

This is the one place tensor names live. Backends, the weight format, the converter
and `oryx info` all derive from `parameter_specs(config)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import OryxConfig

SHARED, ATTENTION, RECURRENT = "shared", "attention", "recurrent"


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    mode: str  # SHARED, ATTENTION or RECURRENT
    init: str  # how `oryx init` fills it: normal, zeros, ones, conv, A_log, dt_bias, normal_out

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


def layer_specs(cfg: OryxConfig, i: int) -> list[ParamSpec]:
    D, H, Hkv, d, dv, W = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim, cfg.conv_width
    p = f"layers.{i}."
    m = p + "mixer."
    norm_width = dv if cfg.o_norm_grouping == "head" else H * dv
    # sharing "kv": both modes read k_proj/v_proj (through conv_k/conv_v), each has its own query;
    # "none": those are attention-only and the recurrence has its own (k_rec/v_rec, conv_k_rec/conv_v_rec);
    # "qkv": the recurrence also reads q_attn (through its own conv_q), and there is no q_rec;
    # "kv-proj": both modes read k_proj/v_proj, attention through conv_k/conv_v, the recurrence through its own
    # conv_k_rec/conv_v_rec (a retrofit can teach the recurrence short convolutions attention must not have).
    kv_mode = ATTENTION if cfg.sharing == "none" else SHARED
    conv_kv_mode = ATTENTION if cfg.recurrent_kv_convs else SHARED
    specs = [
        ParamSpec(p + "attn_norm.weight", (D,), SHARED, "ones"),
        ParamSpec(m + "k_proj.weight", (Hkv * d, D), kv_mode, "normal"),
        ParamSpec(m + "v_proj.weight", (Hkv * dv, D), kv_mode, "normal"),
        ParamSpec(m + "conv_k.weight", (Hkv * d, W), conv_kv_mode, "conv"),
        ParamSpec(m + "conv_v.weight", (Hkv * dv, W), conv_kv_mode, "conv"),
        ParamSpec(m + "o_proj.weight", (D, H * dv), SHARED, "normal_out"),
        ParamSpec(m + "q_attn.weight", (H * d, D), SHARED if cfg.sharing == "qkv" else ATTENTION, "normal"),
    ]
    if cfg.sharing != "qkv":
        specs.append(ParamSpec(m + "q_rec.weight", (H * d, D), RECURRENT, "normal"))
    specs.append(ParamSpec(m + "conv_q.weight", (H * d, W), RECURRENT, "conv"))
    if cfg.sharing == "none":
        specs += [
            ParamSpec(m + "k_rec.weight", (Hkv * d, D), RECURRENT, "normal"),
            ParamSpec(m + "v_rec.weight", (Hkv * dv, D), RECURRENT, "normal"),
        ]
    if cfg.recurrent_kv_convs:
        specs += [
            ParamSpec(m + "conv_k_rec.weight", (Hkv * d, W), RECURRENT, "conv"),
            ParamSpec(m + "conv_v_rec.weight", (Hkv * dv, W), RECURRENT, "conv"),
        ]
    if cfg.output_gate:
        specs.append(ParamSpec(m + "g_proj.weight", (H * dv, D), SHARED, "normal"))
    if cfg.output_norm:
        specs.append(ParamSpec(m + "o_norm.weight", (norm_width,), SHARED, "ones"))
    if cfg.conv_bias:
        specs += [
            ParamSpec(m + "conv_k.bias", (Hkv * d,), conv_kv_mode, "zeros"),
            ParamSpec(m + "conv_v.bias", (Hkv * dv,), conv_kv_mode, "zeros"),
            ParamSpec(m + "conv_q.bias", (H * d,), RECURRENT, "zeros"),
        ]
        if cfg.recurrent_kv_convs:
            specs += [
                ParamSpec(m + "conv_k_rec.bias", (Hkv * d,), RECURRENT, "zeros"),
                ParamSpec(m + "conv_v_rec.bias", (Hkv * dv,), RECURRENT, "zeros"),
            ]
    if cfg.mixer == "gdn":
        specs += [
            ParamSpec(m + "a_proj.weight", (Hkv, D), RECURRENT, "normal"),
            ParamSpec(m + "b_proj.weight", (Hkv, D), RECURRENT, "normal"),
            ParamSpec(m + "A_log", (Hkv,), RECURRENT, "A_log"),
            ParamSpec(m + "dt_bias", (Hkv,), RECURRENT, "dt_bias"),
        ]
    else:
        specs += [
            ParamSpec(m + "dt_proj.weight", (Hkv, D), RECURRENT, "normal"),
            ParamSpec(m + "A_log", (Hkv,), RECURRENT, "A_log"),
            ParamSpec(m + "dt_bias", (Hkv,), RECURRENT, "dt_bias"),
            ParamSpec(m + "D_skip", (Hkv,), RECURRENT, "ones"),
        ]
    if cfg.mlp_hidden:
        F = cfg.mlp_hidden
        specs += [
            ParamSpec(p + "mlp_norm.weight", (D,), SHARED, "ones"),
            ParamSpec(p + "mlp.gate_proj.weight", (F, D), SHARED, "normal"),
            ParamSpec(p + "mlp.up_proj.weight", (F, D), SHARED, "normal"),
            ParamSpec(p + "mlp.down_proj.weight", (D, F), SHARED, "normal_out"),
        ]
    return specs


def parameter_specs(cfg: OryxConfig) -> list[ParamSpec]:
    specs = [ParamSpec("embed.weight", (cfg.vocab_size, cfg.d_model), SHARED, "normal")]
    for i in range(cfg.n_layers):
        specs += layer_specs(cfg, i)
    specs.append(ParamSpec("norm.weight", (cfg.d_model,), SHARED, "ones"))
    if not cfg.tie_embeddings:
        specs.append(ParamSpec("lm_head.weight", (cfg.vocab_size, cfg.d_model), SHARED, "normal"))
    return specs


def parameter_counts(cfg: OryxConfig) -> dict:
    """Parameters by mode, and the tied fraction (shared / all)."""
    counts = {SHARED: 0, ATTENTION: 0, RECURRENT: 0}
    for s in parameter_specs(cfg):
        counts[s.mode] += s.numel
    total = sum(counts.values())
    return {
        "total": total,
        "shared": counts[SHARED],
        "attention_only": counts[ATTENTION],
        "recurrent_only": counts[RECURRENT],
        "attention_mode_total": counts[SHARED] + counts[ATTENTION],
        "recurrent_mode_total": counts[SHARED] + counts[RECURRENT],
        "tied_fraction": counts[SHARED] / total,
    }
