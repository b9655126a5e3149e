"""Where an eager Gated DeltaNet decode step's time goes, ours against fla's fused_recurrent (one token).

Run from the repo root on a GPU: `python3 bench/decode_host.py` (fla's rows only where fla is installed). Per batch size and
implementation it prints the host time per call (2,000 calls without a sync), the same with the sync,
do_bench's median, and the GPU time of each kernel a call launches (torch profiler); then a cProfile of
the host side of ours. Eager, a call is bound by its host work; the model's decode replays the step as a
CUDA graph, where only the kernels count.
"""
import cProfile
import io
import pstats
import time

import torch
from triton.testing import do_bench

from bench_gdn import decode_calls, load_fla
from profile_gdn import kernel_times


def host_ms(fn, calls=2000):
    """(ms per call as the host issues them, ms per call once the GPU has caught up)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    return (issued - start) / calls * 1e3, (time.perf_counter() - start) / calls * 1e3


def main():
    _, fla_recurrent = load_fla()
    print(torch.cuda.get_device_name(0))
    for B in (1, 16):
        runs = decode_calls(B, fla_recurrent)
        for name, fn in runs.items():
            issued, synced = host_ms(fn)
            bench = do_bench(fn, warmup=20, rep=200, return_mode="median")
            kernels = ", ".join(f"{kernel[:40]} {ms * 1e3:.2f} us" for kernel, _, ms in kernel_times(fn))
            print(f"B={B} {name}: host {issued:.4f} ms/call, with sync {synced:.4f}, do_bench {bench:.4f}; "
                  f"kernels: {kernels}", flush=True)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(2000):
            runs["ours"]()
        profiler.disable()
        torch.cuda.synchronize()
        report = io.StringIO()
        pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(12)
        print(report.getvalue())


if __name__ == "__main__":
    main()
