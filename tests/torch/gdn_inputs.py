"""Random inputs for the Gated DeltaNet kernels, shared by the kernel tests and the GPU benchmarks
(bench/gdn_inputs.py links here)."""
import torch


def random_inputs(B, T, H, K, V, dtype=torch.float32, device="cpu", seed=0, with_state=True, num_seqs=None):
    """Fresh test inputs in the kernels' domain: L2-normalised k, g <= 0, beta in (0, 1).

    Decays are mostly mild with some strong ones (log-sigmoid of a wide normal), so both
    long memory and fast forgetting are exercised. Returns (q, k, v, g, beta, h0 or None);
    g, beta and h0 ([num_seqs or B, H, K, V]) are fp32, or fp64 when dtype is fp64.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = randn(B, T, H, K)
    k = torch.nn.functional.normalize(randn(B, T, H, K), dim=-1)
    v = randn(B, T, H, V)
    g = torch.nn.functional.logsigmoid(2.0 * randn(B, T, H) + 3.0)
    beta = torch.sigmoid(randn(B, T, H))
    h0 = randn(num_seqs or B, H, K, V) if with_state else None
    to = lambda x, dt: None if x is None else x.to(device=device, dtype=dt)  # noqa: E731
    fp = torch.float64 if dtype == torch.float64 else torch.float32
    return to(q, dtype), to(k, dtype), to(v, dtype), to(g, fp), to(beta, fp), to(h0, fp)
