"""Chunked Gated DeltaNet in plain PyTorch: the readable twin of the Triton kernel (chunk.py).

Inside a chunk of C tokens with local log-decay prefix sums G_i = g_1 + ... + g_i, the
recurrence S_t = e^{g_t} S_{t-1} + k_t delta_t^T has per-token corrections
    delta_t = beta_t (v_t - e^{g_t} S_{t-1}^T k_t),
which satisfy a unit lower-triangular system (the WY / UT transform):
    (I + L) Delta = diag(beta) V - diag(beta e^G) K S_0,
    L_ij = beta_i e^{G_i - G_j} k_i.k_j   (i > j).
With X = (I + L)^{-1}, W = X diag(beta e^G) K and U = X diag(beta) V, every chunk is
    Delta = U - W S_0
    O     = scale diag(e^G) Q S_0 + (scale Q K^T * e^{G_i - G_j} [i >= j]) Delta
    S_C   = e^{G_C} S_0 + (diag(e^{G_C - G}) K)^T Delta.
Only the last three lines run sequentially over chunks; the rest is batched.
"""
import torch
import torch.nn.functional as F

from ..sequences import sequence_bounds
from ._inputs import check_inputs, default_scale
from .naive import _compute_dtype


def _to_chunks(x, chunk_size):
    """[L, H, ...] -> [H, NT, C, ...], zero-padded: padded tokens have g = beta = 0, so
    they leave the state untouched and the last chunk's total decay unchanged."""
    length = x.shape[0]
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length
    x = F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad))
    x = x.reshape(num_chunks, chunk_size, *x.shape[1:])
    return x.movedim(2, 0)


def _chunked_sequence(q, k, v, g, beta, state, scale, chunk_size):
    """One sequence: q, k [L, H, K], v [L, H, V], g, beta [L, H], state [H, K, V]."""
    length = q.shape[0]
    q, k, v, g, beta = (_to_chunks(x, chunk_size) for x in (q, k, v, g, beta))
    G = torch.cumsum(g, dim=-1)                                      # [H, NT, C]
    idx = torch.arange(chunk_size, device=q.device)
    causal = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    log_decay = G[..., :, None] - G[..., None, :]                    # G_i - G_j
    decay_causal = torch.exp(log_decay.masked_fill(~causal, float("-inf")))
    decay_strict = decay_causal.masked_fill(~strict, 0.0)

    L = beta[..., :, None] * decay_strict * (k @ k.transpose(-1, -2))
    eye = torch.eye(chunk_size, dtype=q.dtype, device=q.device)
    X = torch.linalg.solve_triangular(eye + L, eye.expand_as(L), upper=False, unitriangular=True)
    W = X @ ((beta * torch.exp(G))[..., None] * k)
    U = X @ (beta[..., None] * v)
    intra = scale * (q @ k.transpose(-1, -2)) * decay_causal
    q_decayed = scale * torch.exp(G)[..., None] * q
    decay_to_end = torch.exp(G[..., -1:] - G)[..., None]            # e^{G_C - G_i}

    outputs = []
    for c in range(q.shape[1]):
        delta = U[:, c] - W[:, c] @ state
        outputs.append(q_decayed[:, c] @ state + intra[:, c] @ delta)
        state = torch.exp(G[:, c, -1])[:, None, None] * state \
            + (decay_to_end[:, c] * k[:, c]).transpose(-1, -2) @ delta
    o = torch.stack(outputs, dim=1)                                  # [H, NT, C, V]
    o = o.movedim(0, 2).reshape(-1, o.shape[0], o.shape[-1])[:length]
    return o, state


def chunk_gated_delta_rule_torch(q, k, v, g, beta, scale=None, initial_state=None,
                                 output_final_state=False, cu_seqlens=None, chunk_size=64):
    """Same contract as naive_recurrent_gated_delta_rule, computed chunk by chunk.

    Returns (o [B, T, H, V] in v.dtype, final_state [N, H, K, V] or None); fp32 inside
    (fp64 if any input is fp64). Differentiable by autograd.
    """
    check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = default_scale(scale, K)
    dtype = _compute_dtype(q, k, v, g, beta)
    q_, k_, v_, g_, beta_ = (t.reshape(B * T, *t.shape[2:]).to(dtype) for t in (q, k, v, g, beta))

    outputs, final_states = [], []
    for n, (row, first, end) in enumerate(sequence_bounds(B, T, cu_seqlens)):
        bos, eos = row * T + first, row * T + end  # on the flattened token axis
        state = q_.new_zeros(H, K, V) if initial_state is None else initial_state[n].to(dtype)
        if eos > bos:
            o, state = _chunked_sequence(q_[bos:eos], k_[bos:eos], v_[bos:eos], g_[bos:eos],
                                         beta_[bos:eos], state, scale, chunk_size)
            outputs.append(o)
        final_states.append(state)
    o = torch.cat(outputs) if outputs else v_.new_zeros(0, H, V)
    final_state = torch.stack(final_states) if output_final_state else None
    return o.reshape(B, T, H, V).to(v.dtype), final_state


def chunk_gated_delta_rule_grouped(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                   chunk_size=64):
    """chunk_gated_delta_rule_torch for grouped heads, without autograd: q [B, T, H, K] reads key/value head
    h // G of k [B, T, Hkv, K], v [B, T, Hkv, V], g, beta [B, T, Hkv] (H = Hkv * G). The state depends on keys,
    values and gates only, so one state per key/value head [B, Hkv, K, V] serves its G query heads, and the
    work that does not read q (the WY transform, the state recurrence) runs once per group instead of G times.
    Returns (o [B, T, H, V] in v.dtype, final_state [B, Hkv, K, V] or None)."""
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[-1]
    if H % Hkv or k.shape != (B, T, Hkv, K) or v.shape[:3] != (B, T, Hkv) or g.shape != (B, T, Hkv) \
            or beta.shape != (B, T, Hkv):
        raise ValueError(f"grouped heads: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}, "
                         f"g {list(g.shape)}, beta {list(beta.shape)}")
    G = H // Hkv
    scale = default_scale(scale, K)
    dtype = _compute_dtype(q, k, v, g, beta)
    outputs, finals = [], []
    for b in range(B):
        state = q.new_zeros(Hkv, K, V, dtype=dtype) if initial_state is None else initial_state[b].to(dtype)
        o, state = _grouped_sequence(*(t[b].to(dtype) for t in (q, k, v, g, beta)), state, scale, chunk_size, G)
        outputs.append(o)
        finals.append(state)
    o = torch.stack(outputs).to(v.dtype)
    return o, torch.stack(finals) if output_final_state else None


def _grouped_sequence(q, k, v, g, beta, state, scale, chunk_size, G):
    """One sequence: q [L, H, K], k [L, Hkv, K], v [L, Hkv, V], g, beta [L, Hkv], state [Hkv, K, V]; the
    arithmetic of _chunked_sequence with each group's G query heads stacked as rows."""
    length, H, K = q.shape
    Hkv = k.shape[1]
    k, v, g, beta = (_to_chunks(x, chunk_size) for x in (k, v, g, beta))           # [Hkv, NT, C, ...]
    NT, C = k.shape[1], k.shape[2]
    q = _to_chunks(q.reshape(length, Hkv, G * K), chunk_size)                        # [Hkv, NT, C, G*K]
    q = q.view(Hkv, NT, C, G, K).transpose(2, 3)                                     # [Hkv, NT, G, C, K]
    Gc = torch.cumsum(g, dim=-1)                                                     # [Hkv, NT, C]
    idx = torch.arange(C, device=q.device)
    causal = idx[:, None] >= idx[None, :]
    decay_causal = torch.exp((Gc[..., :, None] - Gc[..., None, :]).masked_fill(~causal, float("-inf")))
    decay_strict = decay_causal.masked_fill(idx[:, None] == idx[None, :], 0.0)
    L = beta[..., :, None] * decay_strict * (k @ k.transpose(-1, -2))
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    X = torch.linalg.solve_triangular(eye + L, eye.expand_as(L), upper=False, unitriangular=True)
    W = X @ ((beta * torch.exp(Gc))[..., None] * k)
    U = X @ (beta[..., None] * v)
    intra = (scale * (q @ k.transpose(-1, -2)[:, :, None])) * decay_causal[:, :, None]   # [Hkv, NT, G, C, C]
    q_decayed = (scale * torch.exp(Gc)[:, :, None, :, None] * q).reshape(Hkv, NT, G * C, K)
    k_to_end = (torch.exp(Gc[..., -1:] - Gc)[..., None] * k).transpose(-1, -2)     # [Hkv, NT, K, C]
    chunk_decay = torch.exp(Gc[..., -1])                                             # [Hkv, NT]
    outputs = []
    for c in range(NT):
        delta = U[:, c] - W[:, c] @ state                                            # [Hkv, C, V]
        outputs.append((q_decayed[:, c] @ state).view(Hkv, G, C, -1) + intra[:, c] @ delta[:, None])
        state = chunk_decay[:, c, None, None] * state + k_to_end[:, c] @ delta
    o = torch.stack(outputs, dim=1)                                                  # [Hkv, NT, G, C, V]
    o = o.permute(1, 3, 0, 2, 4).reshape(NT * C, H, -1)[:length]
    return o, state
