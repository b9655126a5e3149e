"""CPU emulation of the GDN chunk kernel's bf16 rounding, forward and backward, for one chunk.

    python3 experiments/gdn_bf16_emulation.py --round all|none|POINT[,POINT...] [mqar_precision.py options]

Trains MQAR (experiments/mqar_precision.py, fp32 on the CPU) with the GDN recurrence computed by a
torch twin of backends/cuda/oryx_torch/kernels/gdn/chunk.py for sequences of one chunk (T <= 64, no initial
state) that rounds to bf16 at the points the kernel's bf16 path does. On the GPU, trained GDN did
not learn MQAR with the kernel's bf16 path (docs/results.md, section 2); if this emulation learns,
rounding alone does not explain that. (It learned; the cause was a wrong dk from the bf16 kernels at
32-wide keys, now padded to chunk.MIN_KEY_WIDTH: docs/benchmarks.md, "Narrow heads".)
Rounding points: in (q, k, v and beta v), A, X, U, out (forward); do, ddelta, dv, dv_scaled,
dkk_sym, dA_io (backward); "fwd" and "bwd" name each group.
"""
import argparse
import sys

import torch

import mqar_precision

BF16 = torch.bfloat16
FORWARD_POINTS = {"in", "A", "X", "U", "out"}
BACKWARD_POINTS = {"do", "ddelta", "dv", "dv_scaled", "dkk_sym", "dA_io"}
ROUND: set = set()


def parse_points(text: str) -> set:
    points = set()
    for name in text.split(","):
        if name == "all":
            points |= FORWARD_POINTS | BACKWARD_POINTS
        elif name == "fwd":
            points |= FORWARD_POINTS
        elif name == "bwd":
            points |= BACKWARD_POINTS
        elif name in FORWARD_POINTS | BACKWARD_POINTS:
            points.add(name)
        elif name != "none":
            raise ValueError(f"--round: unknown rounding point {name!r}")
    return points


def r(x, point):
    return x.to(BF16).float() if point in ROUND else x


def masks(n):
    i = torch.arange(n)
    return i[:, None] >= i[None, :], i[:, None] > i[None, :]


class Chunk(torch.autograd.Function):
    """One chunk, zero initial state: Delta = U, O = A U; the backward follows _state_bwd_kernel and
    _chunk_bwd_kernel with the state terms (all zero here) left out."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale):
        # q, k [B, H, n, K]; v [B, H, n, V]; g, beta [B, H, n]
        q, k, v = (r(x, "in") for x in (q, k, v))
        n = q.shape[2]
        causal, strict = masks(n)
        G = torch.cumsum(g, -1)
        dec = torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~causal, -float("inf")))
        dec_strict = dec.masked_fill(~strict, 0.0)
        A = r(scale * (q @ k.transpose(-1, -2)) * dec, "A")
        kk = k @ k.transpose(-1, -2)
        L = beta[..., :, None] * kk * dec_strict
        eye = torch.eye(n).expand_as(L)
        X = r(torch.linalg.solve_triangular(eye + L, eye, upper=False, unitriangular=True), "X")
        U = r(X @ r(v * beta[..., None], "in"), "U")
        ctx.save_for_backward(q, k, v, beta, A, X, U, dec, dec_strict, kk)
        ctx.scale = scale
        return r(A @ U, "out")

    @staticmethod
    def backward(ctx, do):
        q, k, v, beta, A, X, U, dec, dec_strict, kk = ctx.saved_tensors
        do = r(do, "do")
        ddelta = r(A.transpose(-1, -2) @ do, "ddelta")
        dA = do @ U.transpose(-1, -2)
        dv_scaled = X.transpose(-1, -2) @ ddelta
        dv = r(dv_scaled * beta[..., None], "dv")
        dL = -(r(dv_scaled, "dv_scaled") @ U.transpose(-1, -2)) * (dec_strict > 0)
        kk_dec = kk * dec_strict
        dbeta = (dv_scaled * v).sum(-1) + (dL * kk_dec).sum(-1)
        dL_g = dL * kk_dec * beta[..., :, None]
        dA_g = dA * A
        dG = dL_g.sum(-1) - dL_g.sum(-2) + dA_g.sum(-1) - dA_g.sum(-2)
        dkk = dL * beta[..., :, None] * dec_strict
        dkk_sym = r(dkk + dkk.transpose(-1, -2), "dkk_sym")
        dA_io = r(dA * ctx.scale * dec, "dA_io")
        dq = dA_io @ k
        dk = dA_io.transpose(-1, -2) @ q + dkk_sym @ k
        dg = dG.sum(-1, keepdim=True) - torch.cumsum(dG, -1) + dG
        return dq, dk, dv, dg, dbeta, None


def emulated_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                              cu_seqlens=None):
    """The model's GDN call, [B, T, H, *] layout, for T <= 64 and no state in or out."""
    if initial_state is not None or output_final_state or cu_seqlens is not None or q.shape[1] > 64:
        raise ValueError("the emulation covers one chunk (T <= 64) with no state in or out and no cu_seqlens")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    heads_first = [x.float().transpose(1, 2) for x in (q, k, v, g, beta)]
    o = Chunk.apply(*heads_first, scale)
    return o.transpose(1, 2).to(v.dtype), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--round", default="all")
    args, rest = parser.parse_known_args()
    try:
        ROUND.update(parse_points(args.round))
    except ValueError as exc:
        parser.error(str(exc))
    from oryx_torch import model as model_module
    model_module.gated_delta_rule = emulated_gated_delta_rule
    sys.argv = ["mqar_precision.py", "--precision", "fp32", *rest]
    mqar_precision.main()


if __name__ == "__main__":
    main()
