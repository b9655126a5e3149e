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

from ...cpu_linear import mkl_one_thread
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


def head_major(x, length: int, dtype=None):
    """x [B, T, Hkv, F] -> [B, Hkv, length, F] (length >= T) in `dtype` (default x's), zeros after T: one copy. x may
    also be a list of [B, T, Hkv, F_i] or [B, T, Hkv] (one feature) tensors, laid side by side along F."""
    parts = x if isinstance(x, (list, tuple)) else [x]
    B, T, Hkv = parts[0].shape[:3]
    widths = [p.shape[3] if p.dim() == 4 else 1 for p in parts]
    out = parts[0].new_empty(B, Hkv, length, sum(widths), dtype=dtype or parts[0].dtype)
    out[:, :, T:].zero_()
    start = 0
    for part, width in zip(parts, widths):
        out[:, :, :T, start:start + width].copy_((part if part.dim() == 4 else part[..., None]).transpose(1, 2))
        start += width
    return out


def chunk_layout(T: int, chunk_size: int = 64) -> tuple[int, int]:
    """(NT, C): T tokens as NT chunks of C tokens, at most chunk_size each, as equal as they come (the least
    padding: NT * C - T < NT)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    NT = max(1, -(-T // chunk_size))
    return NT, max(1, -(-T // NT))


def _chunk_transitions(packed, K: int, with_outputs: bool, key_norm_eps: float | None = None,
                       factored: bool = False):
    """The WY transform of every chunk: packed [R, C, K + V + 2] (per batch row one chunk's keys, values, log-decays
    and write rates, padded tokens zero) -> (M [R, K, K], P [R, K, V], WU, eG, decay): the chunk's transition
    S' = M S + P, and, `with_outputs`, [-W | U] [R, C, K + V] with e^{G_i} [R, C] (G: the log-decays' prefix sums)
    and e^{G_i - G_j} [R, C, C] (lower triangle) that the outputs read (else None for all three). key_norm_eps: the
    keys in packed are raw and each is read L2-normalised, k / sqrt(|k|^2 + eps), its norm taken from the diagonal of
    the chunk's key products (which the transform computes anyway): a factor per token folded into the factors the
    keys take already, instead of a pass over them (state only). `factored` (state only): the transition's factors
    (T [R, K, C], rhs [R, C, K + V], e^{G_C} [R]) instead, with M = e^{G_C} I + T rhs_K and P = T rhs_V
    (_chain_factored)."""
    R, C, F = packed.shape
    V = F - K - 2
    keys, gate, rate = packed[..., :K], packed[..., K + V], packed[..., K + V + 1]
    Gc = gate.cumsum(-1)                                                             # [R, C]
    eG = Gc.exp()
    # e^{G_i - G_j} on and below the diagonal (at most 1: the gates are <= 0); above it the exponent is >= 0 and may
    # overflow, and tril_ overwrites it with zeros
    decay = (Gc[:, :, None] - Gc[:, None, :]).exp_().tril_()
    # the solves read only the strictly lower triangle of L (beta_i e^{G_i - G_j} k_i.k_j, i > j) and take
    # its diagonal as ones
    L = torch.bmm(keys, keys.transpose(1, 2))
    if key_norm_eps is None:
        L.mul_(decay).mul_(rate[:, :, None])
        key_factor = eG.neg()
        end_factor = (Gc[:, -1:] - Gc).exp_()
    else:  # n_i = 1 / sqrt(k_i.k_i + eps): L_ij n_i n_j, and n_i into each key's other factors
        if with_outputs:
            raise ValueError("key_norm_eps: the outputs read normalised keys (state only)")
        inv_norm = L.diagonal(dim1=-2, dim2=-1).add(key_norm_eps).rsqrt_()           # [R, C]
        L.mul_(decay).mul_((rate * inv_norm)[:, :, None]).mul_(inv_norm[:, None, :])
        key_factor = (eG * inv_norm).neg_()
        end_factor = (Gc[:, -1:] - Gc).exp_().mul_(inv_norm)
    rhs = packed[..., :K + V] * rate[:, :, None]                                     # [beta k | beta v]
    rhs[..., :K].mul_(key_factor[:, :, None])                                        # [-beta e^G k | beta v]
    k_end = keys * end_factor[:, :, None]                                            # [R, C, K]
    # W enters negated (-W | U = X rhs), so K_end^T [-W | U] = [-M' | P] needs no negation
    if not with_outputs:  # [-M' | P] = K_end^T X rhs, with K_end^T X solved for directly: (K_end^T X)(I + L) = K_end^T
        WU = None
        with mkl_one_thread():  # R small solves: MKL's per-call parallel regions cost more than the solves
            transfer = torch.linalg.solve_triangular(L, k_end.transpose(1, 2), upper=False, left=False,
                                                     unitriangular=True)             # [R, K, C]
        if factored:
            return transfer, rhs, eG[:, -1]
        MP = torch.bmm(transfer, rhs)                                                # [R, K, K + V]
    else:
        eye = torch.eye(C, dtype=packed.dtype, device=packed.device)
        X = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False, unitriangular=True)
        WU = torch.bmm(X, rhs)                                                       # [-W | U]
        MP = torch.bmm(k_end.transpose(1, 2), WU)
    M, P = MP[..., :K], MP[..., K:]
    M.diagonal(dim1=-2, dim2=-1).add_(eG[:, -1:])                                    # M = e^{G_C} I - M'
    return M, P, WU, (eG if with_outputs else None), (decay if with_outputs else None)


def _entry_state(initial_state, like, N: int, K: int, V: int):
    """The state entering the first chunk as [N, K, V] in like's dtype: initial_state [B, Hkv, K, V], or zeros."""
    if initial_state is None:
        return like.new_zeros(N, K, V)
    return initial_state.to(like.dtype).reshape(N, K, V)


def _chain(M, P, state, N: int, NT: int, keep_entries: bool):
    """The chunks' transitions applied in turn to state [N, K, V] (M [N * NT, K, K], P [N * NT, K, V], chunk c of
    sequence-head n at row n * NT + c): (the final state, the states entering each chunk [N, NT, K, V] or None)."""
    K, V = P.shape[-2:]
    M, P = M.view(N, NT, K, K).unbind(1), P.view(N, NT, K, V).unbind(1)
    entries = []
    for c in range(NT):
        if keep_entries:
            entries.append(state)
        state = torch.baddbmm(P[c], M[c], state)
    return state, (torch.stack(entries, 1) if keep_entries else None)


def _chain_factored(transfer, rhs, end_decay, state, N: int, NT: int):
    """The final state of _chain from the transitions' factors (_chunk_transitions `factored`): each chunk
    S' = e^{G_C} S + T (rhs_V + rhs_K S), two products of C K V per chunk and sequence-head instead of forming M and P
    (K C (K + V)) and then M S (K K V): a third fewer multiply-adds, in sequential products batched over N rows."""
    K = rhs.shape[-1] - state.shape[-1]
    transfer, rhs = transfer.unflatten(0, (N, NT)), rhs.unflatten(0, (N, NT))
    end_decay = end_decay.view(N, NT, 1, 1)
    for c in range(NT):
        written = torch.baddbmm(rhs[:, c, :, K:], rhs[:, c, :, :K], state)           # beta v - beta e^G k S
        state = torch.baddbmm(state * end_decay[:, c], transfer[:, c], written)
    return state


def grouped_final_state(packed, K: int, NT: int, initial_state=None, key_norm_eps: float | None = None,
                        factored: bool = False):
    """The final state of chunk_gated_delta_rule_grouped (q None) from inputs already laid out as it lays them out:
    packed [B, Hkv, NT * C, K + V + 2] fp32 or fp64, per key/value head its tokens' keys (L2-normalised), values,
    log-decays and write rates, then zeros to NT * C tokens (chunk_layout); with key_norm_eps the keys are raw and
    read L2-normalised with that eps (_chunk_transitions). Returns [B, Hkv, K, V] in packed's dtype; initial_state
    [B, Hkv, K, V] or None (zeros). `factored`: the chunks chained by _chain_factored (fewer multiply-adds in
    sequential products, for a batch of many sequence-heads) instead of _chain."""
    B, Hkv, length, F = packed.shape
    V, N = F - K - 2, B * Hkv
    state = _entry_state(initial_state, packed, N, K, V)
    if factored:
        transfer, rhs, end_decay = _chunk_transitions(packed.view(N * NT, length // NT, F), K, with_outputs=False,
                                                      key_norm_eps=key_norm_eps, factored=True)
        return _chain_factored(transfer, rhs, end_decay, state, N, NT).view(B, Hkv, K, V)
    M, P, _, _, _ = _chunk_transitions(packed.view(N * NT, length // NT, F), K, with_outputs=False,
                                       key_norm_eps=key_norm_eps)
    return _chain(M, P, state, N, NT, keep_entries=False)[0].view(B, Hkv, K, V)


def chunk_gated_delta_rule_grouped(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                   chunk_size=64):
    """chunk_gated_delta_rule_torch for grouped heads, without autograd: q [B, T, H, K] reads key/value head
    h // G of k [B, T, Hkv, K], v [B, T, Hkv, V], g, beta [B, T, Hkv] (H = Hkv * G). The state depends on keys,
    values and gates only, so one state per key/value head [B, Hkv, K, V] serves its G query heads, and the
    work that does not read q (the WY transform, the state recurrence) runs once per group instead of G times.
    q None: only the final state (what a prompt read in another mode leaves for later tokens), without the
    per-token outputs. Returns (o [B, T, H, V] in v.dtype or None, final_state [B, Hkv, K, V] or None).

    Every sequence and key/value head is one batch row of each matrix product, and the chunks are chained by
    their transitions S' = M S + P (M = e^{G_C} I - K_end^T W, P = K_end^T U with K_end = diag(e^{G_C - G}) K):
    one product per chunk runs sequentially, everything else once for all chunks."""
    B, T, Hkv, K = k.shape
    V = v.shape[-1]
    H = Hkv if q is None else q.shape[2]
    if H % Hkv or (q is not None and q.shape != (B, T, H, K)) or v.shape[:3] != (B, T, Hkv) \
            or g.shape != (B, T, Hkv) or beta.shape != (B, T, Hkv):
        raise ValueError(f"grouped heads: q {None if q is None else list(q.shape)}, k {list(k.shape)}, "
                         f"v {list(v.shape)}, g {list(g.shape)}, beta {list(beta.shape)}")
    NT, C = chunk_layout(T, chunk_size)
    G = H // Hkv
    dtype = _compute_dtype(*(t for t in (q, k, v, g, beta) if t is not None))
    N, R = B * Hkv, B * Hkv * NT
    # each token's keys, values and gates in one zero-padded, chunked, head-major copy, one chunk of one sequence's
    # key/value head per batch row [R = B * Hkv * NT, C, K + V + 2]: padded tokens have g = beta = 0, so they leave
    # the state as it is
    packed = head_major([k, v, g, beta], NT * C, dtype)
    if q is None:
        final = grouped_final_state(packed, K, NT, initial_state)
        return None, final if output_final_state else None
    packed = packed.view(R, C, K + V + 2)
    M, P, WU, eG, decay = _chunk_transitions(packed, K, with_outputs=True)
    state, entries = _chain(M, P, _entry_state(initial_state, packed, N, K, V), N, NT, keep_entries=True)
    final = state.view(B, Hkv, K, V) if output_final_state else None
    scale = default_scale(scale, K)
    keys = packed[..., :K]
    S = entries.view(R, K, V)
    delta = torch.baddbmm(WU[..., K:], WU[..., :K], S)                               # U - W S: [R, C, V]
    # each group's G query heads as rows of one matrix per chunk, token-major: [R, C * G, K]
    qc = head_major(q.to(dtype).view(B, T, Hkv, G * K), NT * C).view(R, C * G, K)
    if scale != 1:
        qc = qc.mul_(scale)
    o = torch.bmm(qc, S).view(R, C, G, V).mul_(eG[:, :, None, None])                # e^{G_i} q_i S_0
    scores = torch.bmm(qc, keys.transpose(1, 2))
    scores.view(R, C, G, C).mul_(decay[:, :, None])
    o = o.view(R, C * G, V).baddbmm_(scores, delta)
    o = o.view(B, Hkv, NT * C, G, V)[:, :, :T].transpose(1, 2).reshape(B, T, H, V)
    return o.to(v.dtype), final
