"""Mamba-2 (SSD) kernels on the GPU: correctness at real sizes, then timings against mamba-ssm.

Run from the repo root: python3 bench/bench_mamba2.py [--budget SECONDS] [--sweep] [--skip-mamba] [--only TEXT ...]
Sections stop being started once --budget seconds have passed (what ran is still printed).
Results go to stdout (a table last) and, when $OUT is set, to $OUT/bench_mamba2.json.

mamba-ssm is used through its Triton ops only (a wheel built with MAMBA_SKIP_CUDA_BUILD): its
package __init__ imports the missing CUDA extension, so `mamba_ssm` is registered here as a bare
namespace for its own folder and the submodules are imported from it directly.
"""

import argparse
import datetime
import importlib.util
import json
import os
import sys
import time
import types

import torch
import torch.nn.functional as F
import triton

from oryx_torch.kernels.mamba2 import chunk as chunk_module
from oryx_torch.kernels.mamba2 import chunk_ssd, chunk_ssd_torch, fused_recurrent_ssd, naive_recurrent_ssd, ssd_decode_step

RESULTS = {"correctness": [], "timings": []}
START = time.time()


def log(*parts):
    print(*parts, flush=True)


def relative_error(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def import_mamba_ssm():
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None:
        return None
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["mamba_ssm"] = package
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return types.SimpleNamespace(combined=mamba_chunk_scan_combined, minimal=ssd_minimal_discrete)


def make_inputs(B, T, H, K, V, dtype, num_seqs=None, seed=0, with_state=True, a_range=(0.5, 8.0)):
    """Fresh random inputs: dt = softplus(N(-2, 0.5)) (about 0.13), A uniform in -[a_range]."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device="cuda") * scale

    return dict(
        q=randn(B, T, H, K, scale=K ** -0.5).to(dtype),
        k=randn(B, T, H, K, scale=K ** -0.5).to(dtype),
        v=randn(B, T, H, V).to(dtype),
        dt=F.softplus(randn(B, T, H, scale=0.5) - 2.0),
        A=-(torch.rand(H, generator=gen, device="cuda") * (a_range[1] - a_range[0]) + a_range[0]),
        D=randn(H),
        initial_state=randn(num_seqs or B, H, K, V, scale=0.1) if with_state else None,
    )


def run_with_grads(fn, inputs, seed=1, **kwargs):
    """Outputs and gradients of <o, do> + <final_state, dh> (fixed random cotangents)."""
    leaves = {n: (None if t is None else t.detach().clone().requires_grad_()) for n, t in inputs.items()}
    o, ht = fn(**leaves, **kwargs)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, device="cuda").to(o.dtype)).sum()
    if ht is not None:
        loss = loss + (ht * torch.randn(ht.shape, generator=gen, device="cuda").to(ht.dtype)).sum()
    loss.backward()
    return (o, ht), {n: t.grad for n, t in leaves.items() if t is not None}


def record_check(name, errors, tol):
    # dA sums decay gradients that largely cancel; in bf16 (tol >= 1e-2) it is held to 5e-2.
    limits = {n: (5e-2 if n == "dA" and tol >= 1e-2 else tol) for n in errors}
    ok = all(e < limits[n] for n, e in errors.items())
    RESULTS["correctness"].append(dict(name=name, errors=errors, tol=tol, ok=ok))
    log(f"[{'ok' if ok else 'FAIL'}] {name}: worst {max(errors.values()):.2e} (tol {tol:.0e}, dA {limits.get('dA', tol):.0e}) " +
        " ".join(f"{n}={e:.1e}" for n, e in errors.items()))


def compare_all(name, got, ref, tol):
    (o, ht), g = got
    (o_ref, ht_ref), g_ref = ref
    errors = {"o": relative_error(o, o_ref)}
    if ht is not None:
        errors["ht"] = relative_error(ht, ht_ref)
    errors.update({f"d{n}": relative_error(g[n], g_ref[n]) for n in g_ref})
    record_check(name, errors, tol)


def check_chunk_against_references():
    as64 = lambda x: {n: (None if t is None else t.double()) for n, t in x.items()}  # noqa: E731
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        x = make_inputs(2, 300, 4, 128, 64, dtype, seed=10)
        ref = run_with_grads(naive_recurrent_ssd, as64(x), output_final_state=True)
        got = run_with_grads(chunk_ssd, x, output_final_state=True)
        compare_all(f"chunk_ssd {dtype} B2 T300 H4 K128 V64 vs naive fp64", got, ref, tol)

        cu = torch.tensor([0, 1, 64, 64, 200, 517], device="cuda")
        x = make_inputs(1, 517, 3, 64, 128, dtype, num_seqs=5, seed=11)
        ref = run_with_grads(naive_recurrent_ssd, as64(x), output_final_state=True, cu_seqlens=cu)
        got = run_with_grads(chunk_ssd, x, output_final_state=True, cu_seqlens=cu)
        compare_all(f"chunk_ssd {dtype} varlen N5 T517 H3 K64 V128 vs naive fp64", got, ref, tol)

    x = make_inputs(2, 4096, 4, 128, 128, torch.bfloat16, seed=12)
    ref = run_with_grads(chunk_ssd_torch, as64(x), output_final_state=True)
    got = run_with_grads(chunk_ssd, x, output_final_state=True)
    compare_all("chunk_ssd bf16 B2 T4096 H4 K128 V128 vs chunk_ssd_torch fp64", got, ref, 2e-2)


def check_recurrent_and_decode():
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = make_inputs(3, 200, 4, 128, 64, dtype, seed=20)
        o_ref, ht_ref = naive_recurrent_ssd(**{n: t.double() for n, t in x.items()}, output_final_state=True)
        o, ht = fused_recurrent_ssd(**x, output_final_state=True)
        record_check(f"fused_recurrent_ssd {dtype} B3 T200 K128 V64 vs naive fp64",
                     {"o": relative_error(o, o_ref), "ht": relative_error(ht, ht_ref)}, tol)
        state = x["initial_state"].clone()
        k_cache = torch.full((3, 2, 256, 128), float("nan"), device="cuda", dtype=dtype)
        v_cache = torch.full((3, 2, 256, 64), float("nan"), device="cuda", dtype=dtype)
        start = torch.tensor([0, 17, 50], device="cuda")
        outs = []
        for t in range(x["q"].shape[1]):
            outs.append(ssd_decode_step(
                x["q"][:, t], x["k"][:, t], x["v"][:, t], x["dt"][:, t], x["A"], x["D"], state,
                k_cache=k_cache, v_cache=v_cache, k_append=x["k"][:, t, :2], v_append=x["v"][:, t, :2],
                cache_pos=start + t,
            ))
        cache_ok = all(
            torch.equal(k_cache[b, :, s:s + 200], x["k"][b, :, :2].transpose(0, 1))
            and torch.equal(v_cache[b, :, s:s + 200], x["v"][b, :, :2].transpose(0, 1))
            for b, s in enumerate(start.tolist())
        )
        errors = {"o": relative_error(torch.stack(outs, 1), o_ref), "state": relative_error(state, ht_ref),
                  "cache_mismatch": 0.0 if cache_ok else 1.0}
        record_check(f"ssd_decode_step x200 {dtype} B3 K128 V64 + KV append vs naive fp64", errors, tol)


def check_against_mamba(mamba):
    """Ours vs mamba-ssm's mamba_chunk_scan_combined (ngroups = nheads) and ssd_minimal_discrete,
    both against a float64 reference, with fast (A in -[0.5, 8]) and slow (A in -[0.01, 0.1]) decay."""

    def mamba_ssd(q, k, v, dt, A, D, initial_state=None):
        return mamba.combined(v, dt, A, k, q, chunk_size=256, D=D), None

    for decay, a_range in (("fast decay", (0.5, 8.0)), ("slow decay", (0.01, 0.1))):
        x = make_inputs(2, 2048, 8, 128, 128, torch.bfloat16, seed=30, with_state=False, a_range=a_range)
        x64 = {n: (None if t is None else t.double()) for n, t in x.items()}
        ref = run_with_grads(chunk_ssd_torch, x64)
        ours = run_with_grads(chunk_ssd, x)
        theirs = run_with_grads(mamba_ssd, x)
        compare_all(f"ours bf16 B2 T2048 H8 K=V=128 {decay} vs chunk_ssd_torch fp64", ours, ref, 2e-2)
        compare_all(f"mamba_chunk_scan_combined bf16 (same inputs) {decay} vs fp64", theirs, ref, 2e-2)
        record_check(f"ours vs mamba_chunk_scan_combined (o) {decay}", {"o": relative_error(ours[0][0], theirs[0][0])}, 2e-2)
    y_min, _ = mamba.minimal(x64["v"] * x64["dt"][..., None], x64["A"] * x64["dt"], x64["k"], x64["q"], 64)
    y_min = y_min + x64["D"][:, None] * x64["v"]
    record_check("chunk_ssd_torch fp64 vs mamba ssd_minimal_discrete fp64", {"o": relative_error(ref[0][0], y_min)}, 1e-10)


def bench_ms(fn, grad_tensors=None):
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_tensors, return_mode="median")


def time_pair(label, shape, forward):
    """Median ms of forward and of forward + backward; `forward(leaves)` returns the output."""
    leaves, grad_out = forward.make()
    fwd = bench_ms(lambda: forward(leaves))

    def fwd_bwd():
        forward(leaves).backward(grad_out)

    both = bench_ms(fwd_bwd, list(leaves.values()))
    RESULTS["timings"].append(dict(op=label, shape=shape, fwd_ms=fwd, fwd_bwd_ms=both))
    log(f"{label:48s} {shape:34s} fwd {fwd:7.3f} ms   fwd+bwd {both:7.3f} ms")


class Forward:
    """A differentiable op over fresh bf16 inputs in a given layout, for time_pair."""

    def __init__(self, call, B, T, H, K, V, groups=None):
        self.call, self.dims, self.groups = call, (B, T, H, K, V), groups

    def make(self):
        B, T, H, K, V = self.dims
        x = make_inputs(B, T, H, K, V, torch.bfloat16, seed=40, with_state=False)
        if self.groups is not None:  # mamba-ssm's shared B/C groups
            x["q"], x["k"] = x["q"][:, :, : self.groups].contiguous(), x["k"][:, :, : self.groups].contiguous()
        leaves = {n: x[n].requires_grad_() for n in ("q", "k", "v", "dt", "A", "D")}
        return leaves, torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)

    def __call__(self, leaves):
        return self.call(**leaves)


def ours(q, k, v, dt, A, D, chunk_size=64):
    return chunk_ssd(q, k, v, dt, A, D, chunk_size=chunk_size)[0]


def mamba_forward(mamba):
    def call(q, k, v, dt, A, D):
        return mamba.combined(v, dt, A, k, q, chunk_size=256, D=D)

    return call


def profile_kernels(label, forward, steps=5):
    """Per-kernel device time of forward + backward (torch profiler), to see where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    leaves, grad_out = forward.make()
    forward(leaves).backward(grad_out)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            forward(leaves).backward(grad_out)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:10]
    RESULTS.setdefault("profiles", {})[label] = [
        dict(kernel=e.key[:80], ms_per_step=e.device_time_total / 1e3 / steps) for e in rows]
    for e in rows:
        log(f"   {label}: {e.device_time_total / 1e3 / steps:8.3f} ms/step  {e.key[:90]}")


def time_decode():
    for B in (1, 16):
        x = make_inputs(B, 1, 16, 128, 128, torch.bfloat16, seed=50)
        state = x["initial_state"].clone()
        args = (x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], x["dt"][:, 0], x["A"], x["D"], state)
        plain = bench_ms(lambda: ssd_decode_step(*args))
        k_cache = torch.zeros(B, 16, 4096, 128, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        pos = torch.full((B,), 1000, device="cuda")
        cached = bench_ms(lambda: ssd_decode_step(*args, k_cache=k_cache, v_cache=v_cache, cache_pos=pos))
        RESULTS["timings"].append(dict(op="ssd_decode_step", shape=f"B{B} H16 K128 V128", fwd_ms=plain,
                                       with_kv_append_ms=cached))
        log(f"{'ssd_decode_step':48s} B{B} H16 K=V=128 {'':17s} {plain * 1e3:7.1f} us   +KV append {cached * 1e3:7.1f} us")


def within_budget(budget, section):
    left = budget - (time.time() - START)
    if left < 0:
        log(f"-- skipped (budget): {section}")
        return False
    log(f"-- {section} ({left:.0f} s left)")
    return True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=360.0)
    parser.add_argument("--sweep", action="store_true", help="also time KERNEL_SETTINGS and chunk-size variants")
    parser.add_argument("--skip-mamba", action="store_true")
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="run only the sections whose name contains a TEXT")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    RESULTS["env"] = dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                          date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"))
    log(RESULTS["env"])
    mamba = None if args.skip_mamba else import_mamba_ssm()
    log("mamba-ssm:", "imported" if mamba else "not used")

    shapes = {"B16 T2048 H16 K=V=128": (16, 2048, 16, 128, 128), "B4 T8192 H16 K=V=128": (4, 8192, 16, 128, 128)}
    sections = [("correctness: chunk vs references", check_chunk_against_references),
                ("correctness: recurrent + decode", check_recurrent_and_decode)]
    for shape_name, dims in shapes.items():
        sections.append((f"time ours {shape_name}", lambda d=dims, s=shape_name: time_pair("ours chunk_ssd", s, Forward(ours, *d))))
    for shape_name, dims in shapes.items():
        sections.append((f"profile ours {shape_name}", lambda d=dims, s=shape_name: profile_kernels(f"ours {s}", Forward(ours, *d))))
    sections.append(("time decode", time_decode))
    if mamba:  # its autotuning compiles some 140 kernel configurations
        sections.append(("correctness: vs mamba-ssm", lambda: check_against_mamba(mamba)))
        for shape_name, (B, T, H, K, V) in shapes.items():
            sections.append((f"time mamba our layout {shape_name}", lambda d=(B, T, H, K, V), s=shape_name: time_pair(
                "mamba-ssm, ngroups=nheads=16, headdim 128", s, Forward(mamba_forward(mamba), *d))))
            sections.append((f"time mamba anchor layout {shape_name}", lambda B=B, T=T, s=shape_name: time_pair(
                "mamba-ssm, 32 heads x 64, 1 group", s.replace("H16 K=V=128", "H32 P64 N128 G1"),
                Forward(mamba_forward(mamba), B, T, 32, 128, 64, groups=1))))
    if args.sweep:  # last: whatever the budget leaves
        variants = [dict(chunk_size=32), dict(num_stages=1), dict(fwd_block_v=128), dict(dv_warps=4),
                    dict(chunk_size=32, num_stages=1), dict(fwd_warps=4)]
        for variant in variants:
            sections.append((f"sweep {variant}", lambda v=variant: sweep_variant(v, shapes)))
    if args.only:
        sections = [(name, run) for name, run in sections if any(text in name for text in args.only)]
    for section, run in sections:
        if within_budget(args.budget, section):
            try:
                run()
            except Exception as error:  # keep going: one broken section must not hide the others
                log(f"[ERROR] {section}: {type(error).__name__}: {error}")
                RESULTS.setdefault("errors", []).append(f"{section}: {type(error).__name__}: {error}")
    print_table()


def sweep_variant(variant, shapes):
    settings = {n: v for n, v in variant.items() if n != "chunk_size"}
    chunk_size = variant.get("chunk_size", 64)
    saved = dict(chunk_module.KERNEL_SETTINGS)
    chunk_module.KERNEL_SETTINGS.update(settings)
    try:
        for shape_name, dims in shapes.items():
            call = lambda **x: ours(**x, chunk_size=chunk_size)  # noqa: E731
            time_pair(f"ours {variant}", shape_name, Forward(call, *dims))
    finally:
        chunk_module.KERNEL_SETTINGS.clear()
        chunk_module.KERNEL_SETTINGS.update(saved)


def print_table():
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_mamba2.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
    failed = [c["name"] for c in RESULTS["correctness"] if not c["ok"]]
    log("\n==== Mamba-2 SSD summary", RESULTS["env"])
    log(f"correctness: {len(RESULTS['correctness']) - len(failed)}/{len(RESULTS['correctness'])} checks ok" +
        (f"; FAILED: {failed}" if failed else ""))
    log(f"{'op':48s} {'shape':26s} {'fwd ms':>8s} {'fwd+bwd ms':>11s}")
    for t in RESULTS["timings"]:
        log(f"{t['op']:48s} {t['shape']:26s} {t['fwd_ms']:8.3f} {t.get('fwd_bwd_ms', float('nan')):11.3f}")
    for e in RESULTS.get("errors", []):
        log("error:", e)


if __name__ == "__main__":
    main()
