"""Gated DeltaNet kernels on the GPU: correctness checks at real sizes, then timings.

Run from the repo root: `python3 bench/bench_gdn.py [--sweep] [--compare OLD_CHUNK_PY ... [--compare-only]]`.
--sweep times each kernel's launch shapes (each shape first checked for correctness) and
keeps the fastest; --compare times other versions of chunk.py in the same process. Checks use fresh random
inputs and the allocator poisoned with NaN (so unwritten outputs fail), against float64
references (naive per-token loop; chunked torch, itself tested against naive on CPU)
and against fla where installed. Timings: triton.testing.do_bench medians, bf16,
H=16, K=V=128. The table comes last.
"""
import argparse
import datetime
import importlib.util
import time

import torch
import triton
from triton.testing import do_bench

from oryx_torch.kernels.gdn import chunk as chunk_module
from oryx_torch.kernels.gdn import (chunk_gated_delta_rule, chunk_gated_delta_rule_torch,
                                   fused_recurrent_gated_delta_rule, gated_delta_rule_decode_step,
                                   naive_recurrent_gated_delta_rule)
from gdn_inputs import random_inputs
from profile_gdn import chunk_calls, kernel_times

FAILURES = []
START = time.perf_counter()


def poison_allocator():
    """Fill the caching allocator's free blocks with NaN so torch.empty returns NaN memory."""
    free = torch.cuda.mem_get_info()[0]
    blob = torch.empty(int(free * 0.5) // 4, dtype=torch.float32, device="cuda")
    blob.fill_(float("nan"))
    del blob


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def check(name, out, ref, tol):
    err = rel_err(out, ref)
    ok = err <= tol
    if not ok:
        FAILURES.append(name)
    print(f"CHECK {name:55s} rel={err:.2e} tol={tol:.0e} {'PASS' if ok else 'FAIL'} "
          f"[{time.perf_counter() - START:.0f} s]", flush=True)


def load_fla():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent
        return fla_chunk, fla_recurrent
    except Exception as exc:  # report why, keep benchmarking ours
        print(f"fla import failed: {type(exc).__name__}: {exc}")
        return None, None


def forward_backward(fn, inputs, grad_o, grad_final, cu_seqlens=None):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o, final = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True, cu_seqlens=cu_seqlens)
    torch.autograd.backward([o, final], [grad_o.to(o.dtype), grad_final.to(final.dtype)])
    return o, final, [x.grad for x in leaves]


def check_chunk(label, B, T, H, K, V, dtype, tol, reference, cu=None, seed=0, ours=chunk_gated_delta_rule):
    num_seqs = B if cu is None else len(cu) - 1
    cu_seqlens = None if cu is None else torch.tensor(cu, device="cuda", dtype=torch.int32)
    inputs = random_inputs(B, T, H, K, V, dtype, device="cuda", seed=seed, num_seqs=num_seqs)
    grad_o = torch.randn(B, T, H, V, device="cuda")
    grad_final = torch.randn(num_seqs, H, K, V, device="cuda")
    ref = forward_backward(reference, [x.double() for x in inputs], grad_o.double(), grad_final.double(), cu_seqlens)
    poison_allocator()
    out = forward_backward(ours, inputs, grad_o.to(dtype), grad_final, cu_seqlens)
    check(f"{label} o", out[0], ref[0], tol)
    check(f"{label} final", out[1], ref[1], tol)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), out[2], ref[2]):
        check(f"{label} {name}", a, b, tol)


def run_chunk_checks(fla_chunk):
    naive, torch_chunk = naive_recurrent_gated_delta_rule, chunk_gated_delta_rule_torch
    check_chunk("chunk bf16 vs naive B2 T130", 2, 130, 4, 128, 128, torch.bfloat16, 1e-2, naive, seed=1)
    check_chunk("chunk fp32 vs naive B2 T130 K64 V128", 2, 130, 4, 64, 128, torch.float32, 1e-4, naive, seed=2)
    check_chunk("chunk fp32 varlen vs naive", 1, 300, 2, 32, 64, torch.float32, 1e-4, naive,
                cu=[0, 1, 64, 65, 200, 300], seed=3)
    check_chunk("chunk fp32 vs naive B1 T200 K128 V64", 1, 200, 2, 128, 64, torch.float32, 1e-4, naive, seed=12)
    check_chunk("chunk bf16 vs torch-fp64 B2 T2048 H16", 2, 2048, 16, 128, 128, torch.bfloat16, 1e-2,
                torch_chunk, seed=4)
    check_chunk("chunk fp16 vs torch-fp64 B1 T1000 H4", 1, 1000, 4, 128, 128, torch.float16, 1e-2, torch_chunk, seed=5)
    for B, T in ((16, 2048), (4, 8192)):
        q, k, v, g, beta, _ = random_inputs(B, T, 16, 128, 128, torch.bfloat16, device="cuda", seed=6, with_state=False)
        with torch.no_grad():
            ref, _ = torch_chunk(q.double(), k.double(), v.double(), g.double(), beta.double())
            poison_allocator()
            out, _ = chunk_gated_delta_rule(q, k, v, g, beta)
            check(f"chunk bf16 fwd vs torch-fp64 B{B} T{T}", out, ref, 1e-2)
            if fla_chunk is not None:
                check(f"fla chunk bf16 fwd vs torch-fp64 B{B} T{T}", fla_chunk(q, k, v, g, beta)[0], ref, 1e-2)


def run_recurrent_checks(fla_recurrent):
    """Token loop and decode step."""
    naive = naive_recurrent_gated_delta_rule
    B, T, H, K, V = 4, 64, 8, 128, 128
    q, k, v, g, beta, h0 = random_inputs(B, T, H, K, V, torch.bfloat16, device="cuda", seed=7)
    o_ref, s_ref = naive(q.double(), k.double(), v.double(), g.double(), beta.double(), initial_state=h0.double(),
                         output_final_state=True)
    poison_allocator()
    o, s = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    check("fused_recurrent bf16 o", o, o_ref, 1e-2)
    check("fused_recurrent bf16 final", s, s_ref, 1e-2)
    if fla_recurrent is not None:
        o_fla, _ = fla_recurrent(q, k, v, g=g, beta=beta, initial_state=h0, output_final_state=True)
        check("fla fused_recurrent bf16 o (same inputs)", o_fla, o_ref, 1e-2)
    state = h0.clone()
    k_cache = torch.full((B, H, T, K), float("nan"), device="cuda", dtype=q.dtype)
    v_cache = torch.full((B, H, T, V), float("nan"), device="cuda", dtype=q.dtype)
    steps = [gated_delta_rule_decode_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, k_cache=k_cache,
                                          v_cache=v_cache, k_append=k[:, t], v_append=v[:, t],
                                          cache_pos=torch.full((B,), t, device="cuda"))
             for t in range(T)]
    check("decode_step bf16 o", torch.stack(steps, 1), o_ref, 1e-2)
    check("decode_step bf16 state", state, s_ref, 1e-2)
    check("decode_step kv append", torch.cat([k_cache, v_cache], -1),
          torch.cat([k, v], -1).transpose(1, 2), 0.0)


def time_chunk(B, T, fla_chunk, rows, ours=chunk_gated_delta_rule, label="chunk"):
    """Times the forward two ways: under no_grad (inference; it keeps nothing for a backward) and with
    inputs that require grad, which is what fla's own benchmarks time as "fwd" (benchmarks/ops/run.py)
    and the forward a training step runs (ours then keeps the chunk states and Delta)."""
    bench = lambda run: do_bench(run, warmup=50, rep=300, return_mode="median")  # noqa: E731
    fwd, train_fwd, fwd_bwd = chunk_calls(B, T, ours)
    timed = dict(fwd=bench(fwd), fwd_grad=bench(train_fwd), fb=bench(fwd_bwd))
    if fla_chunk is not None:
        fwd, train_fwd, fwd_bwd = chunk_calls(B, T, fla_chunk)
        timed["fla_fwd"] = bench(fwd)
        timed["fla_fwd_grad"] = bench(train_fwd)
        try:
            timed["fla_fb"] = do_bench(fwd_bwd, warmup=20, rep=200, return_mode="median")
        except Exception as exc:
            print(f"fla fwd+bwd B{B} T{T} failed: {type(exc).__name__}: {str(exc)[:200]}")
    rows.append((f"{label} B={B} T={T}", timed))
    # printed as measured too: a compared version that faults ends the process before the table
    print(f"timed {label} B={B} T={T}: " + ", ".join(f"{key} {ms:.3f} ms" for key, ms in timed.items()), flush=True)


def decode_calls(B, fla_recurrent):
    """{"ours": ..., "fla": ...}: one decode token of B sequences (bf16, H=16, K=V=128) as a call without
    arguments; fla = fused_recurrent with T=1, left out when fla is not installed."""
    q, k, v, g, beta, h0 = random_inputs(B, 1, 16, 128, 128, torch.bfloat16, device="cuda", seed=9)
    state = h0.clone()
    calls = {"ours": lambda: gated_delta_rule_decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state)}
    if fla_recurrent is not None:
        calls["fla"] = lambda: fla_recurrent(q, k, v, g=g, beta=beta, initial_state=h0, output_final_state=True)
    return calls


def time_decode(B, fla_recurrent, rows):
    """One token. Eager, both calls are bound by the host's launch work (docs/benchmarks.md, "Decode step"),
    which do_bench's timing partly hides, so the GPU time of the kernels is printed beside it;
    the model's decode replays the step as a CUDA graph."""
    timed = {}
    for name, run in decode_calls(B, fla_recurrent).items():
        timed[name] = do_bench(run, warmup=20, rep=200, return_mode="median")
        gpu_ms = sum(ms for _, _, ms in kernel_times(run))
        print(f"decode step B={B} {name}: do_bench {timed[name]:.4f} ms, GPU time of its kernels {gpu_ms:.4f} ms",
              flush=True)
    rows.append((f"decode step B={B}", dict(fwd=timed["ours"], fla_fwd=timed.get("fla"))))


def kernel_breakdown(B=16, T=2048):
    """Per-kernel GPU time of one forward (inference) and one forward+backward, via the profiler."""
    fwd, _, fwd_bwd = chunk_calls(B, T, seed=11)
    for _ in range(3):
        fwd_bwd()

    def inference_then_training_step():
        fwd()
        fwd_bwd()

    print(f"kernel breakdown B={B} T={T} (inference fwd, then training fwd + bwd):")
    for kernel, launches, ms in kernel_times(inference_then_training_step, calls=1):
        print(f"  {kernel[:60]:60s} calls={launches:2d} total={ms:.3f} ms")


def sweep_is_correct(reference, inputs, grad_o):
    """Output and input gradients of the current launch shapes against the fp64 reference."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o = chunk_gated_delta_rule(*leaves)[0]
    out = [o, *torch.autograd.grad(o, leaves, grad_o.to(o.dtype))]
    worst = max(rel_err(a, b) for a, b in zip(out, reference))
    return worst <= 1e-2, worst


def sweep(kernel, configs, run, verify):
    """Times `run` under each launch shape of one kernel; keeps the fastest correct one in chunk.LAUNCH."""
    best = (None, chunk_module.LAUNCH[kernel])
    for config in configs:
        chunk_module.LAUNCH[kernel] = config
        try:
            ok, err = verify()
            ms = do_bench(run, warmup=20, rep=100, return_mode="median")
        except Exception as exc:
            print(f"sweep {kernel} {config}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        print(f"sweep {kernel} {config}: {ms:.3f} ms, max rel err {err:.2e} {'ok' if ok else 'WRONG'} "
              f"[{time.perf_counter() - START:.0f} s]", flush=True)
        if ok and (best[0] is None or ms < best[0]):
            best = (ms, config)
    chunk_module.LAUNCH[kernel] = best[1]
    print(f"best {kernel}: {best[1]} ({best[0] or float('nan'):.3f} ms)", flush=True)


def sweep_launch_shapes():
    """Sweeps each kernel's launch shapes in turn (forward kernels timed on the forward, backward
    kernels on forward + backward), each shape first checked for correctness."""
    # the sweep starts from, and writes into, LAUNCH: this card's own rows (chunk.CARD_LAUNCH, with its TMA
    # rows, as the timed bf16 calls with whole chunks take them) join it first
    card = chunk_module._card(0)
    chunk_module.LAUNCH.update(chunk_module._card_rows(card, few_pairs=False, with_tma=True))
    chunk_module.FEW_PAIRS_LAUNCH.update(chunk_module._card_rows(card, few_pairs=True, with_tma=True))
    chunk_module.CARD_LAUNCH.pop(card, None)

    fwd, _, fwd_bwd = chunk_calls(16, 2048, seed=10)
    # H=16 and no initial or final state, as timed, so that no kernel compiles twice; 16 x 16
    # (sequence, head) pairs, at least the SM count, so the checked launch shapes are the swept
    # LAUNCH ones and not chunk.FEW_PAIRS_LAUNCH; T=130 ends in a partial chunk (pointer loads), T=128 is
    # whole chunks (where a shape asking for TMA takes it)
    checked = []
    for T in (130, 128):
        small = random_inputs(16, T, 16, 128, 128, torch.bfloat16, device="cuda", seed=13, with_state=False)[:5]
        small_grad_o = torch.randn(16, T, 16, 128, device="cuda")
        checked.append((reference_outputs(small, small_grad_o), small, small_grad_o))

    def verify():
        results = [sweep_is_correct(*case) for case in checked]
        return all(ok for ok, _ in results), max(err for _, err in results)

    def shapes(*triples, **extra):
        return [dict(BV=b, num_warps=w, num_stages=st, **extra) for b, w, st in triples]

    # DIAG: width of the diagonal blocks of I + L inverted as a batch (64 = full-width doubling)
    wy_fwd = [dict(BK=64, BV=64, DIAG=d, num_warps=w, num_stages=1) for d in (16, 32, 64) for w in (4, 8)]
    wy_fwd += [dict(BK=64, BV=64, DIAG=16, num_warps=w, num_stages=2) for w in (4, 8)]
    sweep("wy_fwd", wy_fwd, fwd, verify)
    # TMA=True: tiles moved by the TMA unit (chunk._launch), which pays with two or more pipeline stages
    sweep("state_fwd", shapes((64, 4, 2), (64, 4, 1), (64, 8, 2), (64, 8, 1), (128, 8, 1), (128, 4, 1))
          + shapes((64, 4, 2), (64, 8, 2), TMA=True), fwd, verify)
    sweep("state_bwd", shapes((64, 4, 2), (64, 4, 1), (64, 8, 1), (128, 8, 2), (128, 8, 1))
          + shapes((64, 8, 2), (128, 8, 2), TMA=True), fwd_bwd, verify)
    sweep("chunk_bwd", shapes((64, 4, 1), (64, 4, 2), (64, 8, 1), (128, 8, 1), BK=64)
          + shapes((64, 8, 1), (128, 8, 1), BK=128) + shapes((64, 4, 2), (64, 8, 2), BK=64, TMA=True),
          fwd_bwd, verify)
    print("launch shapes after the safe sweep:", chunk_module.LAUNCH, flush=True)
    # Last, as they may fault: a BV=32 shape of state_fwd can hit an illegal address on an H200,
    # which ends the process. Narrow blocks mean more programs or fewer spills.
    launch = chunk_module.LAUNCH
    sweep("chunk_bwd", [launch["chunk_bwd"], *shapes((32, 4, 1), (32, 8, 1), BK=32), *shapes((32, 8, 1), BK=128)],
          fwd_bwd, verify)
    sweep("state_fwd", [launch["state_fwd"], *shapes((32, 4, 2), (32, 8, 1))], fwd, verify)


def reference_outputs(inputs, grad_o):
    """fp64 chunked-torch output and gradients w.r.t. q, k, v, g, beta."""
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    o = chunk_gated_delta_rule_torch(*leaves)[0]
    return [o, *torch.autograd.grad(o, leaves, grad_o.double())]


def load_chunk_file(path, index):
    """Another version of chunk.py (e.g. the one before a change), to time against this one."""
    spec = importlib.util.spec_from_file_location(f"oryx_torch.kernels.gdn._compared_chunk_{index}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.chunk_gated_delta_rule


def check_version(label, version):
    """The two checks every timed version of chunk.py passes first: bf16 at a real width, fp32 varlen."""
    check_chunk(f"{label} bf16 vs torch-fp64 B2 T2048 H16", 2, 2048, 16, 128, 128, torch.bfloat16,
                1e-2, chunk_gated_delta_rule_torch, seed=4, ours=version)
    check_chunk(f"{label} fp32 varlen vs naive", 1, 300, 2, 32, 64, torch.float32, 1e-4,
                naive_recurrent_gated_delta_rule, cu=[0, 1, 64, 65, 200, 300], seed=3, ours=version)


def print_kernel_resources():
    """Registers, spills and shared memory of every compiled GDN kernel (from Triton's cache)."""
    for name in ("_wy_fwd_kernel", "_state_fwd_kernel", "_state_bwd_kernel", "_chunk_bwd_kernel"):
        fn = getattr(chunk_module, name)
        try:
            cache = fn.device_caches[torch.cuda.current_device()][0]
        except Exception as exc:
            print(f"{name}: no cache info ({type(exc).__name__})")
            continue
        for compiled in cache.values():
            meta = compiled.metadata
            print(f"{name:20s} warps={meta.num_warps} stages={meta.num_stages} regs={compiled.n_regs} "
                  f"spills={compiled.n_spills} smem={meta.shared}")


def print_table(rows):
    columns = (("ours fwd", "fwd"), ("ours fwd(g)", "fwd_grad"), ("ours f+b", "fb"), ("fla fwd", "fla_fwd"),
               ("fla fwd(g)", "fla_fwd_grad"), ("fla f+b", "fla_fb"))
    ratios = (("f+b/fwd", "fb", "fwd"), ("f+b/fwd(g)", "fb", "fwd_grad"), ("fla/ours fwd", "fla_fwd", "fwd"),
              ("fla/ours fwd(g)", "fla_fwd_grad", "fwd_grad"))
    print(f"\n{'case':26s} " + " ".join(f"{title:>11s}" for title, _ in columns) + " "
          + " ".join(f"{title:>15s}" for title, _, _ in ratios))
    for name, timed in rows:
        times = " ".join(f"{timed[key]:11.3f}" if timed.get(key) is not None else f"{'-':>11s}" for _, key in columns)
        quotients = " ".join(f"{timed[top] / timed[bottom]:14.2f}x" if timed.get(top) and timed.get(bottom)
                             else f"{'-':>15s}" for _, top, bottom in ratios)
        print(f"{name:26s} {times} {quotients}")
    print("(ms, median of do_bench; fwd: under no_grad; fwd(g): inputs requiring grad, the training forward and "
          "fla's benchmarks' \"fwd\"; decode rows: one token, fla = fused_recurrent with T=1)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true",
                        help="also sweep launch shapes (each checked for correctness), then check and time again")
    parser.add_argument("--compare", metavar="CHUNK_PY", nargs="+", default=[],
                        help="other versions of chunk.py (e.g. before a change) to time in the same process")
    parser.add_argument("--compare-only", action="store_true",
                        help="with --compare: check this version as the compared ones are checked, instead of "
                             "the full check suite, and time the chunk kernels alone (a short GPU call)")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {props.name}, "
          f"{props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    fla_chunk, fla_recurrent = load_fla()
    if args.compare_only:
        check_version("ours", chunk_gated_delta_rule)
    else:
        run_chunk_checks(fla_chunk)
        run_recurrent_checks(fla_recurrent)
        kernel_breakdown()
        print_kernel_resources()
    rows = []
    for B, T in ((16, 2048), (4, 8192)):
        time_chunk(B, T, fla_chunk, rows)
    for index, path in enumerate(args.compare):
        print(f"compared {index}: {path}")
        compared = load_chunk_file(path, index)
        check_version(f"compared {index}", compared)  # timed only after the same kind of checks as ours
        for B, T in ((16, 2048), (4, 8192)):
            time_chunk(B, T, None, rows, ours=compared, label=f"compared {index}")
    if not args.compare_only:
        for B in (1, 16):
            time_decode(B, fla_recurrent, rows)
    if args.sweep:
        print_table(rows)
        sweep_launch_shapes()
        print("launch shapes after the sweep:", chunk_module.LAUNCH)
        print("checks again, with the swept launch shapes:")
        run_chunk_checks(None)
        kernel_breakdown()
        print_kernel_resources()
        rows = []
        for B, T in ((16, 2048), (4, 8192)):
            time_chunk(B, T, fla_chunk, rows)
    print_table(rows)
    print("checks:", "ALL PASS" if not FAILURES else f"FAILED: {FAILURES}")


if __name__ == "__main__":
    main()
