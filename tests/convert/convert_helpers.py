"""Builders shared by the conversion tests: tiny random source models, written the way their libraries write them."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
from error_metrics import relative_error as worst_relative_error


def relative_error(out, ref) -> float:
    return worst_relative_error(out, ref)


def randomize_(module, seed: int, scale: float = 0.15) -> None:
    """Random weights everywhere (norms around 1, gates and biases perturbed), so no mapping error hides in a default."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if p.ndim == 1 or "conv" in name:
                p.add_(0.3 * noise)  # norms, A_log, dt_bias, D, conv taps and biases: perturb their init
            else:
                p.copy_(scale * noise)


LLAMA_SHAPE = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256)


def build_hf_llama(tie: bool, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA_SHAPE, "tie_word_embeddings": tie, **overrides})
    config.rope_parameters = {"rope_type": "default", "rope_theta": 5000.0}
    model = LlamaForCausalLM(config).eval()
    randomize_(model, seed)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.double().numpy()


# ----- GGUF -----
GGUF_FLOAT_TYPES = ("F32", "F16")  # stored as NumPy arrays; the other types go through gguf.quants.quantize


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter's Q/K row order (convert_hf_to_gguf's permute), the inverse of what we undo."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_round_trip(weight: np.ndarray, type_name: str) -> np.ndarray:
    """The float32 values a tensor stored as type_name decodes to, by the gguf package's own dequantiser."""
    import gguf

    if type_name == "F32":
        return weight
    if type_name == "F16":
        return weight.astype(np.float16).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[type_name]
    return gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype).astype(np.float32)


# where the one float16 scale (and min) of each K-quant block sits: byte offsets of d (and dmin)
K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_k_quant(shape: tuple[int, ...], type_name: str, seed: int) -> np.ndarray:
    """Stored bytes of a K-quant tensor (the gguf package cannot quantise to these types): random blocks
    whose float16 scales are small and finite, so the decoded values are weight-sized."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(int(np.prod(shape)) // block_elems, block_bytes), dtype=np.uint8)
    for offset in K_QUANT_SCALES[type_name]:
        scale = rng.uniform(2e-5, 2e-4, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(*shape[:-1], shape[-1] // block_elems * block_bytes)


def _gguf_tensor(writer, name: str, value: np.ndarray, type_name) -> None:
    import gguf

    if callable(type_name):
        type_name = type_name(name, value)
    if value.ndim == 1 or type_name == "F32":
        writer.add_tensor(name, value.astype(np.float32))
    elif type_name == "F16":
        writer.add_tensor(name, value.astype(np.float16))
    elif type_name in K_QUANT_SCALES:
        qtype = gguf.GGMLQuantizationType[type_name]
        writer.add_tensor(name, random_k_quant(value.shape, type_name, zlib.crc32(name.encode())), raw_dtype=qtype)
    else:
        qtype = gguf.GGMLQuantizationType[type_name]
        writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)


# a byte-level vocabulary with two merges and two control tokens, like a (very) small GPT-2 BPE
GGUF_MERGES = ["Ġ t", "h e"]
GGUF_SPECIALS = ["<|endoftext|>", "<|im_start|>"]


def gguf_vocab() -> tuple[list[str], list[int]]:
    from oryx_core.tokenizer import _byte_symbols

    tokens = _byte_symbols() + ["Ġt", "he"] + GGUF_SPECIALS
    types = [1] * (len(tokens) - len(GGUF_SPECIALS)) + [3] * len(GGUF_SPECIALS)
    return tokens, types


def write_llama_gguf(path, model, type_name, pre: str = "smollm", add_bos: bool = False, vocab=None) -> None:
    """Writes an HF LlamaForCausalLM as llama.cpp would: GGUF names, permuted Q/K, norms in F32.

    type_name is a GGUF type, or a function (GGUF name, value) -> type; a K-quant type stores
    random blocks instead of the model's values (compare against a reader of the same file)."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    if vocab is not None:
        vocab(writer)  # writes its own tokenizer.ggml.* keys
    else:
        tokens, types = gguf_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(GGUF_MERGES)
        writer.add_bos_token_id(tokens.index(GGUF_SPECIALS[0]))
        writer.add_add_bos_token(add_bos)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not c.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    layer_names = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
                   "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
                   "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                   "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                   "mlp.down_proj.weight": "ffn_down.weight"}
    for name, value in names.items():
        _gguf_tensor(writer, value, sd[name], type_name)
    for i in range(c.num_hidden_layers):
        for hf_name, gguf_name in layer_names.items():
            value = sd[f"model.layers.{i}.{hf_name}"]
            if gguf_name == "attn_q.weight":
                value = llama_cpp_permute(value, c.num_attention_heads)
            elif gguf_name == "attn_k.weight":
                value = llama_cpp_permute(value, c.num_key_value_heads)
            _gguf_tensor(writer, f"blk.{i}.{gguf_name}", value, type_name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def as_stored_in_gguf(model, type_name: str):
    """A copy of an HF Llama whose matrices hold what a GGUF of type_name decodes to (norms stay F32)."""
    import copy

    import torch

    stored = copy.deepcopy(model)
    with torch.no_grad():
        for p in stored.parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(gguf_round_trip(p.numpy(), type_name)))
    return stored


def sentencepiece_vocab_writer(model_file: str):
    """A function writing a SentencePiece model's pieces, scores and token types as llama.cpp's converter does."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)

    def token_type(i: int) -> int:  # llama.cpp's token types
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        if sp.is_unused(i):
            return 5
        return 1

    def write(writer):
        n = sp.get_piece_size()
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
        writer.add_token_scores([sp.get_score(i) for i in range(n)])
        writer.add_token_types([token_type(i) for i in range(n)])
        writer.add_bos_token_id(sp.bos_id())
        writer.add_eos_token_id(sp.eos_id())
        writer.add_unk_token_id(sp.unk_id())

    return write


# ----- fla Gated DeltaNet -----
def build_fla_gdn(seed: int = 0, **overrides):
    """A tiny fla GatedDeltaNetForCausalLM with torch (unfused) norms and MLP, random weights."""
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    config = GatedDeltaNetConfig(**{**dict(hidden_size=64, head_dim=16, num_heads=2, num_hidden_layers=2, vocab_size=100,
                                           hidden_ratio=2, fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False,
                                           norm_eps=1e-5), **overrides})
    model = GatedDeltaNetForCausalLM(config).eval()
    randomize_(model, seed)
    return model


def fla_gdn_logits(model, tokens: np.ndarray) -> np.ndarray:
    """fla's model computed with fla's own reference ops, on CPU (its Triton kernels need a GPU).

    The pieces fla runs through Triton are replaced by fla's references: the gate
    (naive_gdn_gate), the recurrence (naive_recurrent_gated_delta_rule), the gated norm
    (rms_norm_ref, norm before gate); the short conv is its nn.Conv1d forward (causal
    padding, then SiLU) and l2norm fla's formula x / sqrt(sum x^2 + 1e-6).
    """
    import torch
    import torch.nn.functional as F
    from fla.modules.norm.layernorm_gated import rms_norm_ref
    from fla.ops.gated_delta_rule.gate import naive_gdn_gate
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    def short_conv(conv, x):
        return F.silu(torch.nn.Conv1d.forward(conv, x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2))

    def l2norm(x):
        return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)

    model = model.double()
    with torch.no_grad():
        x = model.model.embeddings(torch.from_numpy(tokens))
        for block in model.model.layers:
            attn, h = block.attn, block.attn_norm(x)
            heads = lambda t, d: t.unflatten(-1, (attn.num_heads, d))  # noqa: E731
            q = l2norm(heads(short_conv(attn.q_conv1d, attn.q_proj(h)), attn.head_k_dim))
            k = l2norm(heads(short_conv(attn.k_conv1d, attn.k_proj(h)), attn.head_k_dim))
            v = heads(short_conv(attn.v_conv1d, attn.v_proj(h)), attn.head_v_dim)
            g = naive_gdn_gate(attn.a_proj(h), attn.A_log, attn.dt_bias)
            o, _ = naive_recurrent_gated_delta_rule(q, k, v, torch.sigmoid(attn.b_proj(h)), g)
            o = rms_norm_ref(o, attn.o_norm.weight, None, z=heads(attn.g_proj(h), attn.head_v_dim), eps=attn.o_norm.eps,
                             norm_before_gate=True)
            x = x + attn.o_proj(o.flatten(-2).to(x.dtype))
            h, mlp = block.mlp_norm(x), block.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        return model.lm_head(model.model.norm(x)).numpy()


# ----- mamba-ssm Mamba-2 -----
def import_mamba_ssm():
    """mamba_ssm's Mamba-2 model classes on a machine without its CUDA extensions.

    Its Mamba-1 module imports the `selective_scan_cuda` extension at import time (only its
    Mamba-1 kernels call it); a placeholder stands in while importing, and is removed again
    so no one else mistakes it for the extension.
    """
    import importlib.util
    import sys
    import types

    placeholder = "selective_scan_cuda" not in sys.modules and importlib.util.find_spec("selective_scan_cuda") is None
    if placeholder:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    try:
        import mamba_ssm.modules.mamba2 as mamba2_module
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    finally:
        if placeholder:
            del sys.modules["selective_scan_cuda"]
    return mamba2_module, MambaConfig, MambaLMHeadModel


def build_mamba2(seed: int = 0, d_intermediate: int = 64, tie: bool = False, **ssm):
    _, MambaConfig, MambaLMHeadModel = import_mamba_ssm()
    config = MambaConfig(d_model=32, d_intermediate=d_intermediate, n_layer=2, vocab_size=50,
                         ssm_cfg=dict(layer="Mamba2", d_state=16, headdim=16, expand=2, **ssm), rms_norm=True,
                         fused_add_norm=False, tie_embeddings=tie)
    model = MambaLMHeadModel(config).eval()
    randomize_(model, seed)
    return model


def mamba2_logits(model, tokens: np.ndarray) -> np.ndarray:
    """mamba-ssm's model on CPU, token by token through Mamba2.step's torch path.

    Its Triton pieces are replaced by mamba-ssm's references: block norms by
    layer_norm.rms_norm_ref, the gated norm by layernorm_gated.rms_norm_ref, and
    selective_state_update set to None so step() takes its einsum recurrence.
    """
    import torch
    from mamba_ssm.ops.triton.layer_norm import rms_norm_ref
    from mamba_ssm.ops.triton.layernorm_gated import rms_norm_ref as gated_rms_norm_ref

    mamba2_module, _, _ = import_mamba_ssm()
    mamba2_module.selective_state_update = None
    model = model.double()
    B, T = tokens.shape
    with torch.no_grad():
        x = model.backbone.embedding(torch.from_numpy(tokens))
        for block in model.backbone.layers:
            mixer = block.mixer
            norm = mixer.norm
            norm.forward = lambda y, z, n=norm: gated_rms_norm_ref(y, n.weight, None, z=z, eps=n.eps,
                                                                   group_size=n.group_size,
                                                                   norm_before_gate=n.norm_before_gate)
            h = rms_norm_ref(x, block.norm.weight, None, eps=block.norm.eps)
            conv_state, ssm_state = mixer.allocate_inference_cache(B, T, dtype=x.dtype)
            x = x + torch.cat([mixer.step(h[:, t:t + 1], conv_state, ssm_state)[0] for t in range(T)], 1)
            if hasattr(block, "mlp") and block.mlp is not None:
                x = x + block.mlp(rms_norm_ref(x, block.norm2.weight, None, eps=block.norm2.eps))
        return model.lm_head(rms_norm_ref(x, model.backbone.norm_f.weight, None, eps=model.backbone.norm_f.eps)).numpy()


# ----- the Oryx backends on a converted checkpoint -----
def backend_logits(backend: str, checkpoint, tokens: np.ndarray, attention: bool) -> np.ndarray:
    """float32 logits of a checkpoint on the torch or MLX backend, all tokens in one mode
    (the test is skipped where that backend is not installed)."""
    pytest.importorskip({"torch": "oryx_torch.model", "mlx": "oryx_mlx.generate"}[backend])
    if backend == "torch":
        import torch
        from oryx_torch.model import OryxModel

        model = OryxModel.from_checkpoint(checkpoint, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(torch.from_numpy(tokens), attention).double().numpy()
    import mlx.core as mx
    from oryx_mlx.generate import load_model

    return np.array(load_model(checkpoint)(mx.array(tokens), attention).astype(mx.float32))
