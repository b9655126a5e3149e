"""Where the GDN chunk kernels' fwd+bwd time goes, on a GPU: inference forward, training forward alone,
forward + backward (eager and replayed as a CUDA graph), and per-kernel device times averaged over 20 calls.

    python3 bench/profile_gdn.py

bf16, H=16, K=V=128, at the two benchmark shapes of bench_gdn.py. The training forward keeps the chunk states,
Delta and X for the backward; its difference from the inference forward is what keeping them costs.
"""
import torch
from oryx_torch.kernels.gdn import chunk_gated_delta_rule
from gdn_inputs import random_inputs
from triton.testing import do_bench


def graph_time(fn):
    """Median ms of `fn` captured as one CUDA graph (no launch overhead), or None if it cannot be captured."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return do_bench(graph.replay, warmup=50, rep=300, return_mode="median")
    except RuntimeError as exc:
        print(f"graph capture failed: {str(exc)[:200]}")
        return None


def kernel_times(fn, calls=20):
    """[(kernel, launches per call, ms per call)] over `calls` calls, longest first."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total]
    return [(e.key, e.count // calls, e.device_time_total / 1e3 / calls)
            for e in sorted(events, key=lambda e: -e.device_time_total)]


def chunk_calls(B, T, fn=chunk_gated_delta_rule, seed=8):
    """(inference forward, training forward, forward + backward) of `fn` as calls without arguments, on bf16
    inputs at H=16, K=V=128 that require grad: the training forward is what fla's own benchmarks time as
    "fwd"; the inference one runs under no_grad and keeps nothing for a backward."""
    q, k, v, g, beta, _ = random_inputs(B, T, 16, 128, 128, torch.bfloat16, device="cuda", seed=seed, with_state=False)
    grad_o = torch.randn(B, T, 16, 128, device="cuda", dtype=torch.bfloat16)
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta)]

    def fwd():
        with torch.no_grad():
            return fn(*leaves)

    def train_fwd():
        return fn(*leaves)[0]

    def fwd_bwd():
        return torch.autograd.grad(fn(*leaves)[0], leaves, grad_o)

    return fwd, train_fwd, fwd_bwd


def profile(B, T):
    fwd, train_fwd, fwd_bwd = chunk_calls(B, T)
    times = {name: do_bench(fn, warmup=50, rep=300, return_mode="median")
             for name, fn in (("fwd", fwd), ("train_fwd", train_fwd), ("fwd_bwd", fwd_bwd))}
    times["fwd_bwd_graph"] = graph_time(fwd_bwd)
    print(f"B={B} T={T}: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in times.items() if ms is not None)
          + f"; fwd_bwd/fwd {times['fwd_bwd'] / times['fwd']:.2f}x; bwd alone {times['fwd_bwd'] - times['train_fwd']:.3f} ms",
          flush=True)
    for name, fn in (("inference fwd", fwd), ("training step", fwd_bwd)):
        print(f"  {name}, per call over 20:")
        for kernel, launches, ms in kernel_times(fn):
            print(f"    {kernel[:70]:70s} x{launches:<2d} {ms:.3f} ms")


def main():
    print(torch.cuda.get_device_name(0), torch.__version__, flush=True)
    for B, T in ((16, 2048), (4, 8192)):
        profile(B, T)


if __name__ == "__main__":
    main()
