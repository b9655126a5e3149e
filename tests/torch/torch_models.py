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


def assert_backward_tables_are_the_transpose(mask, block: int, T: int, S: int) -> None:
    """A FlexAttention BlockMask's per-key-block tables (what the backward pass reads) equal the ones torch derives
    from its forward per-query-block tables, over the used entries of each row."""
    from torch.nn.attention.flex_attention import BlockMask

    theirs = BlockMask.from_kv_blocks(mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
                                      mask.full_kv_indices, BLOCK_SIZE=block, seq_lengths=(T, S))
    for counts, indices in (("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        n_blocks = getattr(theirs, counts)
        assert torch.equal(getattr(mask, counts), n_blocks)
        for b, j in np.ndindex(n_blocks.shape[0], n_blocks.shape[-1]):
            used = int(n_blocks[b, 0, j])
            assert torch.equal(getattr(mask, indices)[b, 0, j, :used], getattr(theirs, indices)[b, 0, j, :used])
