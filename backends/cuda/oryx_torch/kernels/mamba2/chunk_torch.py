"""Chunked Mamba-2 (SSD) in pure PyTorch: the readable twin of the Triton kernel in chunk.py.

The sequence is cut into chunks of `chunk_size` tokens. Inside a chunk, with the folded key
k~_s = dt_s k_s and the chunk-local cumulative log-decay b_t = sum_{j <= t} A dt_j:

    o_t = sum_{s <= t} exp(b_t - b_s) (q_t . k~_s) v_s      (masked-decay quadratic form)
        + exp(b_t) S_prev^T q_t                               (state carried in from earlier chunks)
        + D v_t
    S   = exp(b_last) S_prev + sum_s exp(b_last - b_s) k~_s v_s^T

Only chunk-local differences of b are exponentiated, so nothing overflows on long sequences.
Autograd-able; used on CPU.
"""
import torch
import torch.nn.functional as F

from ..sequences import sequence_bounds
from ._inputs import check_ssd_inputs, compute_dtype


def _chunk_ssd_batched(q, k, v, dt, A, D, initial_state, chunk_size):
    """All sequences of equal length: q, k [B, T, H, K], v [B, T, H, V], dt [B, T, H]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(q.dtype)
    if T == 0:
        return v.new_zeros(B, 0, H, V), state
    pad = (-T) % chunk_size
    # Padding tokens get dt = 0: no decay and no write, so they leave the state untouched.
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    dt = F.pad(dt, (0, 0, 0, pad))
    num_chunks = (T + pad) // chunk_size

    def by_chunk(x):  # [B, T, H, ...] -> [B, H, chunks, chunk_size, ...]
        x = x.reshape(B, num_chunks, chunk_size, H, *x.shape[3:])
        return x.movedim(3, 1)

    q, k, v, dt = by_chunk(q), by_chunk(k), by_chunk(v), by_chunk(dt)
    log_decay = torch.cumsum(A[None, :, None, None] * dt, dim=-1)  # b_t, [B, H, C, L]
    k_folded = k * dt[..., None]

    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    pair_log_decay = log_decay[..., :, None] - log_decay[..., None, :]
    pair_decay = torch.exp(pair_log_decay.masked_fill(~causal, float("-inf")))
    scores = torch.einsum("bhctk,bhcsk->bhcts", q, k_folded) * pair_decay
    o = torch.einsum("bhcts,bhcsv->bhctv", scores, v)

    decay_to_end = torch.exp(log_decay[..., -1:] - log_decay)
    chunk_writes = torch.einsum("bhcsk,bhcsv->bhckv", k_folded * decay_to_end[..., None], v)
    chunk_decay = torch.exp(log_decay[..., -1])  # [B, H, C]

    inter = []
    for c in range(num_chunks):
        inter.append(torch.einsum("bhtk,bhkv->bhtv", q[:, :, c] * torch.exp(log_decay[:, :, c])[..., None], state))
        state = chunk_decay[:, :, c, None, None] * state + chunk_writes[:, :, c]
    o = o + torch.stack(inter, dim=2)
    if D is not None:
        o = o + D[None, :, None, None, None] * v
    o = o.movedim(1, 3).reshape(B, T + pad, H, V)[:, :T]
    return o, state


def chunk_ssd_torch(q, k, v, dt, A, D=None, initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=64):
    """Chunked SSD; same arguments and results as naive_recurrent_ssd, plus `chunk_size`."""
    check_ssd_inputs(q, k, v, dt, A, D, initial_state, cu_seqlens)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    dtype = compute_dtype(v)
    out_dtype = v.dtype
    q, k, v, dt, A = (x.to(dtype) for x in (q, k, v, dt, A))
    D = None if D is None else D.to(dtype)
    if cu_seqlens is None:
        o, final_state = _chunk_ssd_batched(q, k, v, dt, A, D, initial_state, chunk_size)
    else:
        outputs, finals = [], []
        for n, (_, bos, eos) in enumerate(sequence_bounds(1, q.shape[1], cu_seqlens)):
            h0 = None if initial_state is None else initial_state[n : n + 1]
            o_n, s_n = _chunk_ssd_batched(
                q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], dt[:, bos:eos], A, D, h0, chunk_size
            )
            outputs.append(o_n)
            finals.append(s_n)
        o, final_state = torch.cat(outputs, dim=1), torch.cat(finals)
    return o.to(out_dtype), (final_state if output_final_state else None)
