"""Time the pure-MLX recurrence fallbacks (per-token loop vs chunked) for prefill,
and one decode step, on whatever device MLX uses by default (CPU on Linux).

    python bench/bench_mlx_kernels.py --tokens 1024 4096 16384 --heads 8

Prints one markdown table row per measurement, with the CPU model and date.
(The Metal kernels cannot be timed here: no Mac. mx.fast.gated_delta_update is
timed alongside as the built-in reference.)
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import mlx.core as mx

from oryx_mlx.kernels import fallback, run_fast_gated_delta
from oryx_mlx.kernels._inputs import gated_delta_inputs, ssd_inputs


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_recurrence(mixer: str, batch: int, tokens: int, heads: int, dk: int, dv: int, dtype):
    mx.random.seed(0)
    q = mx.random.normal((batch, tokens, heads, dk))
    k = mx.random.normal((batch, tokens, heads, dk))
    q, k = (x / mx.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    v = mx.random.normal((batch, tokens, heads, dv))
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    if mixer == "gdn":
        g = -mx.random.uniform(0.0, 0.3, (batch, tokens, heads))
        beta = mx.random.uniform(0.1, 1.0, (batch, tokens, heads))
        return gated_delta_inputs(q, k, v, g, beta)
    dt = mx.random.uniform(0.05, 0.5, (batch, tokens, heads))
    return ssd_inputs(q, k, v, dt, -mx.ones((heads,)), mx.ones((heads,)))


def seconds(function, recurrence, repeat: int) -> float:
    """Median wall time of `repeat` runs after one warm-up (which compiles)."""
    mx.eval(*function(recurrence))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        mx.eval(*function(recurrence))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--mixers", nargs="+", default=["gdn", "ssd"], choices=["gdn", "ssd"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dk", type=int, default=128)
    parser.add_argument("--dv", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--decode-repeat", type=int, default=50)
    parser.add_argument("--skip-tokenwise-above", type=int, default=16384,
                        help="longest prompt for which to time the slow per-token loop")
    args = parser.parse_args()
    dtype = getattr(mx, args.dtype)

    print(f"{cpu_model()}, {mx.default_device()}, mlx {mx.__version__}, "
          f"{datetime.date.today().isoformat()}, B={args.batch} H={args.heads} "
          f"K={args.dk} V={args.dv} {args.dtype}")
    print("| mixer | op | T | per-token loop | chunked | mx.fast.gated_delta_update |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mixer in args.mixers:
        for tokens in args.tokens:
            r = make_recurrence(mixer, args.batch, tokens, args.heads, args.dk, args.dv, dtype)
            repeat = args.repeat if tokens <= 4096 else 1
            loop = (f"{seconds(fallback.run_tokenwise, r, repeat) * 1e3:.0f} ms"
                    if tokens <= args.skip_tokenwise_above else "-")
            chunked = f"{seconds(fallback.run_chunked, r, repeat) * 1e3:.0f} ms"
            fast = f"{seconds(run_fast_gated_delta, r, repeat) * 1e3:.0f} ms" if mixer == "gdn" else "-"
            print(f"| {mixer} | prefill | {tokens} | {loop} | {chunked} | {fast} |", flush=True)
        r = make_recurrence(mixer, args.batch, 1, args.heads, args.dk, args.dv, dtype)
        step = f"{seconds(fallback.run_tokenwise, r, args.decode_repeat) * 1e6:.0f} µs"
        fast = f"{seconds(run_fast_gated_delta, r, args.decode_repeat) * 1e6:.0f} µs" if mixer == "gdn" else "-"
        print(f"| {mixer} | decode step | 1 | {step} | - | {fast} |", flush=True)


if __name__ == "__main__":
    main()
