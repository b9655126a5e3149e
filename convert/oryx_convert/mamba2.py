"""mamba-ssm's MambaLMHeadModel with Mamba-2 layers -> Oryx with the Mamba-2 mixer.

Exact in recurrent mode. mamba-ssm's in_proj packs [z, x, B, C, dt]; x is Oryx's value,
B its key, C its recurrent query, z its output gate, dt its dt_proj. Its conv1d (with bias,
SiLU) runs over [x, B, C] and splits the same way. B and C are shared by the heads of a
group, so they are repeated per head (each head then carries the same key/query: exact).
Its gated norm is RMSNorm(y * SiLU(z)) * w over all heads at once (ngroups == 1), i.e.
`gate_before_norm=True, o_norm_grouping="all"`. Oryx's attention query starts as a copy of
the recurrent query.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from oryx_core.config import OryxConfig
from oryx_core.safetensors_io import FormatError

from .sources import (ConvertedModel, SourceTensors, check_config_types, fill_from_init, layer_progress,
                      read_hf_directory, require, tokenizer_json_of)

MAMBA2_DEFAULTS = dict(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, rmsnorm=True, norm_before_gate=False,
                       D_has_hdim=False, bias=False, conv_bias=True, d_ssm=None, dt_limit=(0.0, math.inf))
MAMBA_NORM_EPS = 1e-5  # mamba-ssm's block norms and gated norm both use 1e-5


MAMBA_KEY_KINDS = {"d_model": "int", "n_layer": "int", "d_intermediate": "int", "vocab_size": "int",
                   "tie_embeddings": "bool", "rms_norm": "bool", "ssm_cfg": "object", "attn_layer_idx": "list"}
SSM_KEY_KINDS = {"d_state": "int", "d_conv": "int", "expand": "int", "headdim": "int", "ngroups": "int",
                 "D_has_hdim": "bool", "bias": "bool", "conv_bias": "bool", "norm_before_gate": "bool", "rmsnorm": "bool",
                 "d_ssm": "int", "layer": "str", "dt_limit": "list"}


def _ssm_settings(hf: dict, where: str) -> dict:
    if "ssm_cfg" not in hf:
        raise FormatError(f"{where}: not a mamba-ssm MambaLMHeadModel (its config.json has no ssm_cfg); "
                          f"use the matching --from kind")
    check_config_types(hf, MAMBA_KEY_KINDS, where)
    ssm = {**MAMBA2_DEFAULTS, **(hf.get("ssm_cfg") or {})}
    check_config_types(ssm, SSM_KEY_KINDS, f"{where} (ssm_cfg)")
    if ssm.get("layer", "Mamba1") != "Mamba2":
        raise FormatError(f"{where}: ssm_cfg.layer {ssm.get('layer', 'Mamba1')!r} is not supported (only Mamba2)")
    if hf.get("attn_layer_idx"):
        raise FormatError(f"{where}: hybrid attention layers (attn_layer_idx) are not supported")
    if not hf.get("rms_norm", True):
        raise FormatError(f"{where}: LayerNorm blocks (rms_norm=false) are not supported (Oryx uses RMSNorm)")
    problems = {
        "ngroups": ssm["ngroups"] != 1 and "ngroups != 1 (the gated norm then normalises per group)",
        "D_has_hdim": ssm["D_has_hdim"] and "D_has_hdim (a skip weight per channel)",
        "bias": ssm["bias"] and "in_proj/out_proj biases",
        "dt_limit": tuple(ssm["dt_limit"]) != (0.0, math.inf) and "a clamped dt (dt_limit)",
    }
    for key, problem in problems.items():
        if problem:
            raise FormatError(f"{where}: {problem} is not supported by the Mamba-2 import (ssm_cfg.{key})")
    d_inner = ssm["expand"] * require(hf, "d_model", where)
    if ssm["d_ssm"] not in (None, d_inner):
        raise FormatError(f"{where}: d_ssm {ssm['d_ssm']} != expand * d_model (a parallel gated MLP in the mixer) "
                          f"is not supported")
    return {**ssm, "d_inner": d_inner, "nheads": d_inner // ssm["headdim"]}


def oryx_config_from_mamba(hf: dict, ssm: dict, src: SourceTensors) -> OryxConfig:
    where = src.where
    # GatedMLP rounds d_intermediate up to a multiple of 128: its width is what fc1 holds (two halves)
    mlp_hidden = src.take("backbone.layers.0.mlp.fc1.weight").shape[0] // 2 if hf.get("d_intermediate") else 0
    return OryxConfig(
        vocab_size=int(src.take("backbone.embedding.weight").shape[0]), d_model=require(hf, "d_model", where),
        n_layers=require(hf, "n_layer", where), n_heads=ssm["nheads"], n_kv_heads=ssm["nheads"],
        head_dim=ssm["d_state"], value_head_dim=ssm["headdim"], mlp_hidden=mlp_hidden, norm_eps=MAMBA_NORM_EPS,
        tie_embeddings=bool(hf.get("tie_embeddings", True)), mixer="mamba2", conv_width=ssm["d_conv"],
        conv_bias=bool(ssm["conv_bias"]), conv_activation="silu", gate_before_norm=not ssm["norm_before_gate"],
        o_norm_grouping="all", output_norm=bool(ssm["rmsnorm"]))


def _per_head(rows: np.ndarray, nheads: int) -> np.ndarray:
    """A group's B or C rows [d_state, ...] repeated for each of its heads -> [nheads * d_state, ...]."""
    return np.tile(rows, (nheads,) + (1,) * (rows.ndim - 1))


def mamba2_to_oryx(hf: dict, src: SourceTensors) -> tuple[OryxConfig, dict[str, np.ndarray]]:
    ssm = _ssm_settings(hf, src.where)
    cfg = oryx_config_from_mamba(hf, ssm, src)
    D, H, N, P, W = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.v_head_dim, cfg.conv_width
    d_inner = H * P
    # in_proj rows: z [d_inner], x [d_inner], B [N], C [N], dt [H]; conv channels: x, B, C
    z_x_b_c_dt = np.cumsum([0, d_inner, d_inner, N, N, H])
    x_b_c = np.cumsum([0, d_inner, N, N])
    mapped = {"embed.weight": src.take("backbone.embedding.weight", (cfg.vocab_size, D)),
              "norm.weight": src.take("backbone.norm_f.weight", (D,))}
    if not cfg.tie_embeddings:
        mapped["lm_head.weight"] = src.take("lm_head.weight", (cfg.vocab_size, D))
    for i in layer_progress(cfg.n_layers, src.where):
        block, layer = f"backbone.layers.{i}.", f"layers.{i}."
        mixer, mix = block + "mixer.", layer + "mixer."
        z, x, b, c, dt = np.split(src.take(mixer + "in_proj.weight", (z_x_b_c_dt[-1], D)), z_x_b_c_dt[1:-1])
        conv_x, conv_b, conv_c = np.split(src.take(mixer + "conv1d.weight", (x_b_c[-1], 1, W))[:, 0], x_b_c[1:-1])
        q = _per_head(c, H)
        mapped.update({
            layer + "attn_norm.weight": src.take(block + "norm.weight", (D,)),
            mix + "g_proj.weight": z, mix + "v_proj.weight": x, mix + "k_proj.weight": _per_head(b, H),
            mix + "q_rec.weight": q, mix + "q_attn.weight": q.copy(), mix + "dt_proj.weight": dt,
            mix + "conv_v.weight": conv_x, mix + "conv_k.weight": _per_head(conv_b, H),
            mix + "conv_q.weight": _per_head(conv_c, H),
            mix + "dt_bias": src.take(mixer + "dt_bias", (H,)), mix + "A_log": src.take(mixer + "A_log", (H,)),
            mix + "D_skip": src.take(mixer + "D", (H,)),
            mix + "o_proj.weight": src.take(mixer + "out_proj.weight", (D, d_inner)),
        })
        if cfg.conv_bias:
            bias_x, bias_b, bias_c = np.split(src.take(mixer + "conv1d.bias", (x_b_c[-1],)), x_b_c[1:-1])
            mapped.update({mix + "conv_v.bias": bias_x, mix + "conv_k.bias": _per_head(bias_b, H),
                           mix + "conv_q.bias": _per_head(bias_c, H)})
        if cfg.output_norm:
            mapped[mix + "o_norm.weight"] = src.take(mixer + "norm.weight", (d_inner,))
        if cfg.mlp_hidden:
            F = cfg.mlp_hidden
            # mamba-ssm's GatedMLP: fc1 -> (y, gate) halves, y * SiLU(gate), fc2
            up, gate = np.split(src.take(block + "mlp.fc1.weight", (2 * F, D)), 2)
            mapped.update({layer + "mlp_norm.weight": src.take(block + "norm2.weight", (D,)),
                           layer + "mlp.up_proj.weight": up, layer + "mlp.gate_proj.weight": gate,
                           layer + "mlp.down_proj.weight": src.take(block + "mlp.fc2.weight", (D, F))})
    src.finish(ignorable=("lm_head.weight",) if cfg.tie_embeddings else ())
    return cfg, fill_from_init(cfg, mapped, ())


def import_mamba2(path: str | Path) -> ConvertedModel:
    hf, src = read_hf_directory(path)
    cfg, params = mamba2_to_oryx(hf, src)
    return ConvertedModel(cfg, params, tokenizer_json_of(Path(path)))
