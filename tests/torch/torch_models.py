"""Test helpers shared by the PyTorch model tests: a model and the float64 reference on the same lively
parameters, a no-grad forward returning numpy, mixed per-sequence plans, and the config variants."""
import numpy as np
import torch

from oryx_core.reference import OryxReference
from oryx_torch.model import OryxModel
from model_params import lively_params

# config flags each model test runs under; "retrofitted_llama" is what a Llama import then retrofit gives
VARIANTS = {
    "default": {},
    "conv_bias_gate_before_norm": dict(conv_bias=True, gate_before_norm=True),
    "o_norm_all": dict(o_norm_grouping="all"),
    "no_gate_no_norm_no_mlp": dict(output_gate=False, output_norm=False, mlp_hidden=0),
    "untied_no_rope_silu": dict(tie_embeddings=False, rope=False, conv_activation="silu"),
    "retrofitted_llama": dict(output_gate=False, output_norm=False, conv_activation="none", recurrent_scale=1.0),
}


def build(cfg, seed=1):
    """(OryxModel in eval mode, OryxReference) holding the same lively parameters of cfg."""
    params = lively_params(cfg, seed)
    model = OryxModel(cfg, seed=None)
    model.load_params(params)
    return model.eval(), OryxReference(cfg, params)


def run(model, tokens, modes, cache=None):
    with torch.no_grad():
        return model(torch.tensor(tokens), torch.tensor(np.asarray(modes)), cache=cache).numpy()


def mixed_modes(rng, B, T):
    """Per-sequence plans in chunks of 4 tokens: A and R alternate along each sequence."""
    return np.repeat(rng.random((B, -(-T // 4))) < 0.5, 4, axis=1)[:, :T]
