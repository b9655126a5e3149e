"""Readable per-token Gated DeltaNet recurrence: the torch-side ground truth.

Per sequence and head, with state S in R^{K x V}:
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t
Works in float64 when the inputs are float64 (float32 otherwise) and is differentiable
by autograd, so its gradients are the reference for the chunked implementations.
"""
import torch

from ..sequences import sequence_bounds
from ._inputs import check_inputs, default_scale


def _compute_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                                     output_final_state=False, cu_seqlens=None):
    """Returns (o [B, T, H, V] in v.dtype, final_state [N, H, K, V] fp32/fp64 or None)."""
    check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = default_scale(scale, K)
    dtype = _compute_dtype(q, k, v, g, beta)
    flat = [t.reshape(B * T, *t.shape[2:]).to(dtype) for t in (q, k, v, g, beta)]
    q_, k_, v_, g_, beta_ = flat

    outputs, final_states = [], []
    for n, (row, first, end) in enumerate(sequence_bounds(B, T, cu_seqlens)):
        bos, eos = row * T + first, row * T + end  # on the flattened token axis
        if initial_state is None:
            state = q_.new_zeros(H, K, V)
        else:
            state = initial_state[n].to(dtype)
        for t in range(bos, eos):
            k_t, v_t = k_[t], v_[t]                                   # [H, K], [H, V]
            decayed = torch.exp(g_[t])[:, None, None] * state
            predicted = torch.einsum("hkv,hk->hv", decayed, k_t)      # what S already stores for k_t
            correction = beta_[t][:, None] * (v_t - predicted)
            state = decayed + k_t[:, :, None] * correction[:, None, :]
            outputs.append(scale * torch.einsum("hkv,hk->hv", state, q_[t]))
        final_states.append(state)

    if outputs:
        o = torch.stack(outputs).reshape(B, T, H, V)
    else:
        o = v_.new_zeros(B, T, H, V)
    final_state = torch.stack(final_states) if output_final_state else None
    return o.to(v.dtype), final_state


def gated_delta_rule_step_torch(q, k, v, g, beta, state, scale=None):
    """One token of every sequence at once, `state` [B, H, K, V] updated in place: the torch twin of
    fused_recurrent.gated_delta_rule_decode_step (q, k [B, H, K]; v [B, H, V]; g, beta [B, H]).

    The same arithmetic as the loop above, batched over sequences, so a decode step costs a fixed
    handful of operators whatever the batch. Returns o [B, H, V] in v.dtype.
    """
    scale = default_scale(scale, q.shape[-1])
    dtype = state.dtype
    q, k, v, g, beta = (t if t.dtype == dtype else t.to(dtype) for t in (q, k, v, g, beta))
    decayed = state * torch.exp(g)[..., None, None]
    predicted = torch.einsum("bhkv,bhk->bhv", decayed, k)
    correction = beta[..., None] * (v - predicted)
    state.copy_(torch.addcmul(decayed, k[..., None], correction[..., None, :]))
    o = scale * torch.einsum("bhkv,bhk->bhv", state, q)
    return o if o.dtype == v.dtype else o.to(v.dtype)
