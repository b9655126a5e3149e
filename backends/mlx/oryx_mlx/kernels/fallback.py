"""Pure-MLX forms of the unified recurrence (see _inputs.py), for machines without
Metal: a per-token loop (decode, short inputs) and a chunked form for prefill
that uses the same UT-transform algebra as chunked_metal.py with batched matmuls.
"""
from __future__ import annotations

import mlx.core as mx

from ._inputs import Recurrence

# Evaluate the lazy graph every so many tokens so that it stays small.
TOKENS_PER_EVAL = 128
FALLBACK_CHUNK = 64


def _token_step(state, q, k, v, log_decay, strength, out_scale, skip, delta_rule: bool):
    """One token for all (b, h): state [B,H,K,V]; q, k [B,H,K]; v [B,H,V]; scalars [B,H]."""
    state = state * mx.exp(log_decay)[..., None, None]
    update = v
    if delta_rule:
        update = v - (k[..., None, :] @ state)[..., 0, :]
    state = state + k[..., :, None] * (strength[..., None] * update)[..., None, :]
    out = out_scale[:, None] * (q[..., None, :] @ state)[..., 0, :] + skip[:, None] * v
    return state, out


_compiled_steps = {rule: mx.compile(lambda *a, rule=rule: _token_step(*a, delta_rule=rule)) for rule in (True, False)}


def run_tokenwise(r: Recurrence) -> tuple[mx.array, mx.array]:
    step = _compiled_steps[r.delta_rule]
    q, k, v = (x.astype(mx.float32) for x in (r.q, r.k, r.v))
    state = r.state
    outs = []
    for t in range(q.shape[1]):
        state, out = step(state, q[:, t], k[:, t], v[:, t], r.log_decay[:, t], r.strength[:, t], r.out_scale, r.skip)
        outs.append(out)
        if (t + 1) % TOKENS_PER_EVAL == 0:
            mx.eval(state, outs)
    return mx.stack(outs, axis=1).astype(r.v.dtype), state


def _to_chunks(x: mx.array, chunk: int) -> mx.array:
    """[B, T, H, ...] zero-padded to whole chunks -> [B, H, N, C, ...]."""
    batch, seq_len, heads = x.shape[:3]
    n_chunks = -(-seq_len // chunk)
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, n_chunks * chunk - seq_len)
    x = mx.pad(x, pad).reshape(batch, n_chunks, chunk, heads, *x.shape[3:])
    return mx.moveaxis(x, 3, 1)


def run_chunked(r: Recurrence, chunk: int = FALLBACK_CHUNK) -> tuple[mx.array, mx.array]:
    batch, seq_len, heads, _ = r.k.shape
    q, k, v = (_to_chunks(x.astype(mx.float32), chunk) for x in (r.q, r.k, r.v))  # [B,H,N,C,D]
    gamma = mx.cumsum(_to_chunks(r.log_decay, chunk), axis=-1)  # [B,H,N,C]; padding decays by 1
    strength = _to_chunks(r.strength, chunk)  # padding writes nothing
    scale = r.out_scale[:, None, None, None]

    causal = mx.tril(mx.ones((chunk, chunk), mx.bool_))
    gap = gamma[..., :, None] - gamma[..., None, :]
    decay = mx.exp(mx.where(causal, gap, -mx.inf))  # exp(gamma_t - gamma_s), s <= t
    k_t = mx.swapaxes(k, -1, -2)
    if r.delta_rule:
        lower = strength[..., :, None] * mx.tril(decay, -1) * (k @ k_t)
        eye = mx.eye(chunk, dtype=mx.float32)
        solve = mx.linalg.tri_inv(eye + lower, upper=False, stream=mx.cpu) * strength[..., None, :]
        u = solve @ v
        w_neg = -(solve * mx.exp(gamma)[..., None, :]) @ k
    else:
        u = strength[..., None] * v
    intra = scale * decay * (q @ k_t)
    q_decayed = scale * mx.exp(gamma)[..., None] * q
    k_decayed_t = mx.swapaxes(mx.exp(gamma[..., -1:] - gamma)[..., None] * k, -1, -2)
    chunk_decay = mx.exp(gamma[..., -1])[..., None, None]

    state = r.state
    outs = []
    for n in range(q.shape[2]):
        resid = u[:, :, n] + w_neg[:, :, n] @ state if r.delta_rule else u[:, :, n]
        outs.append(q_decayed[:, :, n] @ state + intra[:, :, n] @ resid)
        state = chunk_decay[:, :, n] * state + k_decayed_t[:, :, n] @ resid
        if (n + 1) % max(1, TOKENS_PER_EVAL // chunk) == 0:
            mx.eval(state, outs)
    out = mx.stack(outs, axis=2)  # [B,H,N,C,V]
    out = mx.moveaxis(out.reshape(batch, heads, -1, out.shape[-1]), 1, 2)[:, :seq_len]
    out = out + r.skip[:, None] * r.v.astype(mx.float32)
    return out.astype(r.v.dtype), state


def gated_delta_final_state(k, v, g, beta, state=None, chunk: int = FALLBACK_CHUNK) -> mx.array:
    """The Gated DeltaNet state after tokens none of which reads it (no outputs): k [B,T,H,K] (L2-normalised),
    v [B,T,H,V], g (log decay), beta [B,T,H]; state [B,H,K,V] float32 (zeros if None) -> [B,H,K,V] float32.

    The chunked algebra of `run_chunked` reduced to each chunk's transition S' = M S + P, with
    M = e^{G_C} I - K_end^T X A, P = K_end^T X B (A = diag(beta e^G) K, B = diag(beta) V, K_end = diag(e^{G_C - G}) K,
    X = (I + L)^{-1}): the transitions of every chunk at once, then one product per chunk in sequence. The chunks
    are as equal as T allows, each at most `chunk` tokens."""
    batch, seq_len, heads, dk = k.shape
    dv = v.shape[-1]
    n_chunks = max(1, -(-seq_len // chunk))
    size = max(1, -(-seq_len // n_chunks))
    k, v = (_to_chunks(x.astype(mx.float32), size) for x in (k, v))                # [B,H,N,C,D]
    gamma = mx.cumsum(_to_chunks(g.astype(mx.float32), size), axis=-1)              # [B,H,N,C]; padding keeps S
    strength = _to_chunks(beta.astype(mx.float32), size)
    causal = mx.tril(mx.ones((size, size), mx.bool_), -1)
    decay = mx.exp(mx.where(causal, gamma[..., :, None] - gamma[..., None, :], -mx.inf))
    eye = mx.eye(size, dtype=mx.float32)
    lower = eye + strength[..., :, None] * decay * (k @ mx.swapaxes(k, -1, -2))    # I + L
    k_end = mx.exp(gamma[..., -1:] - gamma)[..., None] * k                         # [B,H,N,C,K]
    # (K_end^T X)^T = X^T K_end, from the transposed (upper triangular) system
    transfer = mx.swapaxes(mx.linalg.solve_triangular(mx.swapaxes(lower, -1, -2), k_end, upper=True,
                                                      stream=mx.cpu), -1, -2)      # [B,H,N,K,C]
    rhs = mx.concatenate([(strength * mx.exp(gamma))[..., None] * k, strength[..., None] * v], axis=-1)
    mp = transfer @ rhs                                                             # [B,H,N,K,K+V]
    m = mx.exp(gamma[..., -1])[..., None, None] * mx.eye(dk, dtype=mx.float32) - mp[..., :dk]
    p = mp[..., dk:]
    state = mx.zeros((batch, heads, dk, dv), mx.float32) if state is None else state.astype(mx.float32)
    for n in range(m.shape[2]):
        state = m[:, :, n] @ state + p[:, :, n]
    return state
