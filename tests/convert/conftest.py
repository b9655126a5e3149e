"""Shared builders for the conversion tests: tiny random source models written the way their libraries write them."""
from __future__ import annotations

import numpy as np
import pytest


def relative_error(out, ref) -> float:
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


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


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_llama_dir(request, tmp_path_factory):
    """(directory saved with save_pretrained(safe_serialization=True), the model) of a tiny random Llama."""
    model = build_hf_llama(tie=request.param, seed=1)
    path = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(path, safe_serialization=True)
    return path, model
