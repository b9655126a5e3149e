"""The attention of one layer under a mixed plan, by method: causal SDPA over every row ("dense"), FlexAttention
over the rows as they are ("flex"), over each sequence's attention rows packed to its first rows ("packed", the
gathers included) and over every row under a plain causal block mask ("flex-causal": FlexAttention's cost for
the work dense does, so flex-causal ÷ dense is the price of a FlexAttention block against a flash one).

    python bench/bench_mixed_attention.py [--json OUT]   # CUDA, bf16: SmolLM2-135M's attention shape, B=8 T=2048
    python bench/bench_mixed_attention.py --tiny         # a CPU smoke run (forward only, FlexAttention eagerly)

Each method runs as one torch.compile'd function, forward then backward (as in a compiled training step), timed
as the median over CUDA-synchronised repeats, and once under torch.profiler for the summed kernel time (which
leaves out host overhead). Plans: bench_model's mixed plan (half of the 64-token chunks, a fixed draw) and one
draw of the training sampler (oryx_core.plan.sample_training_modes). Before timing, every method's output on
the attention rows is compared with dense SDPA's (relative error, worst element or norm, the larger), and its
gradients with dense's under an upstream gradient on those rows only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from oryx_core.atomic import atomic_write_bytes

SHAPE = dict(batch=8, length=2048, heads=9, kv_heads=3, head_dim=64)
TINY = dict(batch=2, length=256, heads=4, kv_heads=2, head_dim=16)
METHODS = ("dense", "flex", "packed", "flex-causal")


def plans(batch: int, length: int) -> dict[str, torch.Tensor]:
    from oryx_core.plan import sample_training_modes

    chunks = np.random.default_rng(0).random((batch, -(-length // 64))) < 0.5  # bench_model.plan_modes("mixed")
    return {"bench_mixed": torch.from_numpy(np.repeat(chunks, 64, axis=1)[:, :length]),
            "training_sampler": torch.from_numpy(sample_training_modes(np.random.default_rng(1), batch, length))}


def attend(method: str, q, k, v, plan, scale: float):
    """The layer's attention output [B, H, T, dv] by `method` (attention.MIXED_ATTENTION already set to it, the
    plan prepared under it)."""
    from oryx_torch import attention

    if method == "flex-causal":
        return attention.flex_attention_function()(q, k, v, block_mask=plan.causal_mask, scale=scale,
                                                   enable_gqa=q.shape[1] != k.shape[1])
    return attention.plan_attention(q, k, v, plan, scale)


def prepared_plan(method: str, modes: torch.Tensor, device):
    from oryx_torch import attention

    plan = attention.AttentionPlan(modes.to(device), 0, modes).prepare()
    if method == "flex-causal":
        plan.causal_mask = attention.plan_block_mask(torch.ones_like(modes), modes.shape[1], 0, device)
    return plan


def relative(got, want) -> float:
    diff = (got.double() - want.double()).abs()
    return float(max(diff.norm() / want.double().norm(), diff.max() / want.double().abs().max()))


def run(args) -> dict:
    from oryx_torch import attention

    settings = attention.MIXED_ATTENTION, attention.FLEX_ON_CPU
    try:
        return measure(args)
    finally:
        attention.MIXED_ATTENTION, attention.FLEX_ON_CPU = settings


def measure(args) -> dict:
    from oryx_torch import attention

    cuda = not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    shape = TINY if args.tiny else SHAPE
    B, T, H, Hkv, d = (shape[k] for k in ("batch", "length", "heads", "kv_heads", "head_dim"))
    dtype = torch.bfloat16 if cuda else torch.float32
    scale = d ** -0.5
    if not cuda:
        attention.FLEX_ON_CPU = True
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(B, H, T, d, generator=gen), torch.randn(B, Hkv, T, d, generator=gen),
              torch.randn(B, Hkv, T, d, generator=gen)]
    q, k, v = (t.to(device, dtype).requires_grad_(cuda) for t in leaves)
    results = {}
    default_method = attention.MIXED_ATTENTION
    for plan_name, modes in plans(B, T).items():
        upstream = (torch.randn(B, H, T, d, generator=gen) * modes[:, None, :, None]).to(device, dtype)
        row = {"attention_share": float(modes.float().mean())}
        reference = None
        for method in METHODS:
            attention.MIXED_ATTENTION = "flex" if method == "flex-causal" else method
            plan = prepared_plan(method, modes, device)
            if method == "flex":
                row["flex_area"] = plan.active_area()
            if method == "packed":
                row["packed_area"] = plan.packed_rows(T).area
            fn = torch.compile(lambda q, k, v, plan=plan, method=method: attend(method, q, k, v, plan, scale)) \
                if cuda else (lambda q, k, v, plan=plan, method=method: attend(method, q, k, v, plan, scale))

            def step():
                out = fn(q, k, v)
                if cuda:
                    out.backward(upstream)
                return out

            for t in (q, k, v):
                t.grad = None
            out = step()
            got = [out.detach()] + ([t.grad.clone() for t in (q, k, v)] if cuda else [])
            rows = modes.to(device)[:, None, :, None].expand_as(out)
            if reference is None:
                reference = got
            else:
                row[f"{method}_error_out"] = relative(got[0][rows], reference[0][rows])
                for name, g, want in zip("qkv", got[1:], reference[1:]):
                    row[f"{method}_error_d{name}"] = relative(g, want)
            row[f"{method}_ms"] = median_ms(step, device, args.warmup, args.repeat)
            row[f"{method}_kernel_ms"] = kernel_ms(step, device) if cuda else None
            attention.MIXED_ATTENTION = default_method
        for method in METHODS[1:]:
            row[f"{method}_vs_dense"] = row[f"{method}_ms"] / row["dense_ms"]
        results[plan_name] = row
        print(plan_name + ": " + ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                                           for key, value in row.items()), flush=True)
    return dict(shape=shape, dtype=str(dtype), results=results)


def median_ms(fn, device, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def kernel_ms(fn, device, steps: int = 3) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize(device)
    return sum(e.device_time_total for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3 / steps


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a CPU smoke run: small shape, forward only")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.warmup = (1 if args.tiny else 3) if args.warmup is None else args.warmup
    args.repeat = (2 if args.tiny else 20) if args.repeat is None else args.repeat
    if args.warmup < 0 or args.repeat < 1:
        parser.error(f"--warmup must be >= 0 and --repeat positive, got {args.warmup} and {args.repeat}")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --tiny for the CPU smoke run")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    report.update(card=torch.cuda.get_device_name() if not args.tiny else "cpu", torch=torch.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command=" ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))))
    print(f"{report['card']}, {report['date']}, torch {report['torch']}: {report['command']}")
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(report, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
