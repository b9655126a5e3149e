"""Per-token reference of the Mamba-2 (SSD) recurrence, in plain PyTorch.

Head layout shared with the Gated DeltaNet kernels: x = v, B = k, C = q, one B/C per head.
Per batch b and head h, with the state S in R^{K x V}:

    S_t = exp(A_h * dt_t) * S_{t-1} + dt_t * k_t v_t^T
    o_t = S_t^T q_t + D_h * v_t

Readable and autograd-able; it runs in float64 when given float64 inputs, which makes it the
ground truth for every faster path.
"""
import torch

from ..sequences import sequence_bounds
from ._inputs import check_ssd_inputs, compute_dtype


def naive_recurrent_ssd(q, k, v, dt, A, D=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Mamba-2 recurrence, one token at a time.

    q, k: [B, T, H, K]; v: [B, T, H, V]; dt: [B, T, H] (already softplus'd, > 0); A: [H] (negative);
    D: optional [H]; initial_state: optional [N, H, K, V]; cu_seqlens: optional [N + 1] int offsets
    of packed sequences (B must be 1), the state restarting at each sequence.
    Returns (o [B, T, H, V] in v.dtype, final_state [N, H, K, V] or None). States are float32,
    or float64 when the inputs are float64.
    """
    check_ssd_inputs(q, k, v, dt, A, D, initial_state, cu_seqlens)
    dtype = compute_dtype(v)
    q, k, v, dt, A = (x.to(dtype) for x in (q, k, v, dt, A))
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    outputs, finals = [], []
    for n, (b, bos, eos) in enumerate(sequence_bounds(q.shape[0], q.shape[1], cu_seqlens)):
        state = q.new_zeros(H, K, V) if initial_state is None else initial_state[n].to(dtype)
        for t in range(bos, eos):
            decay = torch.exp(A * dt[b, t])[:, None, None]
            write = (dt[b, t][:, None] * k[b, t])[:, :, None] * v[b, t][:, None, :]
            state = decay * state + write
            out = torch.einsum("hkv,hk->hv", state, q[b, t])
            if D is not None:
                out = out + D.to(dtype)[:, None] * v[b, t]
            outputs.append(out)
        finals.append(state)
    o = torch.stack(outputs).reshape(v.shape).to(v.dtype) if outputs else torch.empty_like(v)
    final_state = torch.stack(finals) if output_final_state else None
    return o, final_state


def ssd_step_torch(q, k, v, dt, A, D, state):
    """One token of every sequence at once, `state` [B, H, K, V] updated in place: the torch twin of
    fused_recurrent.ssd_decode_step (q, k [B, H, K]; v [B, H, V]; dt [B, H]; A, D [H], D may be None).

    The loop above batched over sequences. Returns o [B, H, V] in v.dtype.
    """
    dtype = state.dtype
    q, k, v, dt, A = (t if t.dtype == dtype else t.to(dtype) for t in (q, k, v, dt, A))
    decay = torch.exp(A * dt)[..., None, None]
    state.mul_(decay).add_((dt[..., None] * k)[..., None] * v[..., None, :])
    out = torch.einsum("bhkv,bhk->bhv", state, q)
    if D is not None:
        out = out + D.to(dtype)[:, None] * v
    return out if out.dtype == v.dtype else out.to(v.dtype)
