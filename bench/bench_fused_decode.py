"""Decode with the fused per-layer token kernels against the existing decode steps, in one process.

    PYTHONPATH=.:backends/cuda:backends/mlx:convert python bench/bench_fused_decode.py --out $OUT/fused_decode.json
    python bench/bench_fused_decode.py --tiny --out /tmp/fused_decode.json   # CPU smoke run (Triton interpreter)

The model is Oryx-GDN holding a random Llama of SmolLM2-135M's shape (bench_model.oryx_twin; --tiny: a tiny
one; --sharing kv-proj: the default model's sharing), decoding in bfloat16 on CUDA (fp32 on the CPU). The decode
steps, each run by oryx_torch.generate.DecodeRunner (under CUDA graphs on CUDA, the greedy pick inside the step):
    eager           the torch step with ORYX_FUSED_DECODE=0
    compiled        the torch.compile'd step (ORYX_COMPILED_DECODE=1)
    fused           the torch step with each mixer's token through kernels/decode_step.py (ORYX_FUSED_DECODE=1,
                    ORYX_FUSED_MATVEC=0, ORYX_FUSED_SPLIT_HEADS=0)
    fused+matvec    fused, with each projection one kernel with its norm and its residual add or activation
                    (kernels/decode_matvec.py, ORYX_FUSED_MATVEC=1) at every batch of at most 32 (the default
                    runs it at batch 1 only: model.FUSED_MATVEC_MAX_BATCH); larger ones run as fused
    fused+matvec+split  fused+matvec, with the recurrent token kernel one program per query head instead of per
                    key/value head at small batches (ORYX_FUSED_SPLIT_HEADS=1): the CUDA default at batch 1
    fused+pdl, fused+matvec+split+pdl  with the decode kernels launched as programmatic dependents of the
                    kernel before them (kernels/pdl.py, ORYX_PDL=1; Hopper and later): the CUDA default there
    fused+compiled  fused and compiled
For each plan (attention: prompt and decode in attention, recurrent state kept; recurrent: everything recurrent,
KV cache kept; dropped: prompt in attention, KV cache dropped, decode recurrent; attention-only: attention with the
recurrent state dropped after the prompt, what `oryx generate --plan attention` runs) and batch size: tokens/s with
one token read back to the host per step (as a server does) and with the pick fed to the next step on the device
(graph replays back to back), and how many of each step's greedy tokens equal the eager step's (the uncompiled
variants at every batch size run first; the fused+matvec ones also against the fused step's), and batch 1 after
a --long-context prompt (32768 tokens; the uncompiled variants, attention and recurrent). Also CUDA kernels
per step at batch 1 (or --launch-batches; a step run without a graph, counted by torch.profiler; on the CPU aten
operators) with their GPU time by kernel, and in fp32 the first step's logits of the fused variants against the
eager step's and how many of 16 greedy steps (3 with --tiny) agree; then (--matvec-sweep-s) each projection's
matvec kernel against the operators it replaces and over block sizes, in microseconds a launch under a CUDA graph.
Rows that would start after --budget-s seconds are listed as skipped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path

# variant: (compiled, fused, matvec, recurrent token split by query head, programmatic dependent launch)
VARIANTS = {"eager": (False, False, False, False, False), "fused": (False, True, False, False, False),
            "fused+matvec": (False, True, True, False, False), "fused+matvec+split": (False, True, True, True, False),
            "fused+pdl": (False, True, False, False, True), "fused+matvec+split+pdl": (False, True, True, True, True),
            "fused+compiled": (True, True, False, False, False), "compiled": (True, False, False, False, False)}
# plan: (prompt in attention, decode step in attention, drop the KV cache after the prompt, drop the recurrent state
# after the prompt)
PLANS = {"attention": (True, True, False, False), "recurrent": (False, False, False, False),
         "dropped": (True, False, True, False), "attention-only": (True, True, False, True)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU through the Triton interpreter")
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--launch-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1],
                        help="batch sizes of the kernels-per-step rows and their GPU time by kernel (default 1)")
    parser.add_argument("--prompt-length", type=int, default=None)
    parser.add_argument("--decode-tokens", type=int, default=None)
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("--plans", type=lambda s: s.split(","), default=list(PLANS))
    parser.add_argument("--sharing", choices=("kv", "kv-proj"), default="kv",
                        help="what the modes share: the keys and values (kv) or only their projections, the "
                             "recurrence with convolutions of its own (kv-proj, the default model's)")
    parser.add_argument("--long-context", type=int, default=None,
                        help="also batch-1 rows (eager and fused, attention and recurrent) after a prompt this long "
                             "(default 32768 on CUDA, 300 with --tiny; 0: none)")
    parser.add_argument("--attention-split", type=int, default=None,
                        help="attention token kernel: split a cache of more than this many slots between programs "
                             "of this many slots each (a multiple of 64; 0: one program; default: the library's rule, "
                             "decode_step.attention_split)")
    parser.add_argument("--attention-combine", choices=("last-split", "launch"),
                        help="a split attention token's partial results combined by the last split to finish or "
                             "by a second launch (default: the library's, ATTENTION_COMBINE_IN_LAST_SPLIT)")
    parser.add_argument("--budget-s", type=float, default=170.0, help="start no row after this many seconds")
    parser.add_argument("--matvec-sweep-s", type=float, default=None,
                        help="seconds for timing each projection's matvec kernel against the unfused operators "
                             "and over block sizes, after the decode rows (default 150 on CUDA, 5 with --tiny; "
                             "0: none)")
    args = parser.parse_args(argv)
    defaults = dict(batches=[1, 2], prompt_length=8, decode_tokens=3, long_context=300, matvec_sweep_s=5.0) \
        if args.tiny else dict(batches=[1, 8, 32], prompt_length=512, decode_tokens=64, long_context=32768,
                               matvec_sweep_s=150.0)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, chosen, known in (("--variants", args.variants, VARIANTS), ("--plans", args.plans, PLANS)):
        if not set(chosen) <= set(known):
            parser.error(f"{name}: expected some of {','.join(known)}, got {','.join(chosen)}")
    if args.attention_split is not None and (args.attention_split < 0 or args.attention_split % 64):
        parser.error(f"--attention-split: expected 0 or a positive multiple of 64, got {args.attention_split}")
    if min(args.batches) < 1 or args.prompt_length < 1 or args.decode_tokens < 1 or args.long_context < 0:
        parser.error("--batches, --prompt-length and --decode-tokens must be positive, --long-context >= 0")
    return args


def use(variant: str) -> tuple[bool, bool]:
    """(compiled, fused) for a variant, with the fused switches set accordingly."""
    from oryx_torch import model as model_module

    from oryx_torch.kernels import pdl

    compiled, fused, matvec, split, launch_pdl = VARIANTS[variant]
    pdl.ENABLED = launch_pdl
    model_module.FUSED_DECODE = fused
    model_module.FUSED_MATVEC = matvec
    model_module.FUSED_SPLIT_HEADS = split
    if matvec:  # the kernel at every batch it takes, not only where the default runs it
        from oryx_torch.kernels.decode_matvec import MAX_ROWS

        model_module.FUSED_MATVEC_MAX_BATCH = MAX_ROWS
    return compiled, fused


def synchronize(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefilled(oryx, prompt, plan: str, extra: int):
    """(cache after the prompt under `plan`, its greedy next tokens on the host)."""
    prompt_mode, _, drop_kv, drop_state = PLANS[plan]
    cache = oryx.make_cache(prompt.shape[0], prompt.shape[1] + extra)
    tokens = oryx(prompt, prompt_mode, cache=cache, last_only=True)[:, -1].argmax(-1).cpu()
    if drop_kv:
        cache.drop_kv()
    if drop_state:
        cache.drop_recurrent()
    return cache, tokens


def timed_decode(oryx, prompt, plan: str, variant: str, n: int, device) -> tuple[dict, "torch.Tensor"]:
    """One row: 2 untimed steps (warm-up and compile, then graph capture), n timed steps read back one by one,
    n fed on the device. Returns (row, the greedy tokens of the prompt and the read-back steps [B, n + 3])."""
    import torch

    from oryx_torch.generate import DecodeRunner

    compiled, _ = use(variant)
    cache, next_tokens = prefilled(oryx, prompt, plan, 2 * n + 8)
    decode_mode = PLANS[plan][1]
    runner = DecodeRunner(oryx, cache, compiled=compiled)
    picked = [next_tokens]
    start = time.perf_counter()
    for _ in range(2):
        next_tokens = runner.greedy_step(next_tokens, decode_mode).cpu()
        picked.append(next_tokens)
    setup = time.perf_counter() - start
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        next_tokens = runner.greedy_step(next_tokens, decode_mode).cpu()
        picked.append(next_tokens)
    host = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        runner.greedy_step(None, decode_mode)
    synchronize(device)
    fed = time.perf_counter() - start
    batch = prompt.shape[0]
    row = dict(plan=plan, variant=variant, batch=batch, prompt=prompt.shape[1], tokens_per_s=batch * n / host,
               ms_per_step=host / n * 1e3, device_fed_tokens_per_s=batch * n / fed, device_fed_ms=fed / n * 1e3,
               setup_s=setup)
    return row, torch.stack(picked, 1)


def launches(oryx, plan: str, variant: str, prompt_length: int, device, batch: int = 1) -> dict:
    """Kernels (CUDA) or outermost aten operators (CPU) in one step of `batch` sequences run without a CUDA
    graph."""
    import torch

    from bench_model import count_launches
    from oryx_torch.generate import DecodeRunner

    compiled, _ = use(variant)
    prompt = torch.randint(0, oryx.cfg.vocab_size, (batch, prompt_length),
                           generator=torch.Generator().manual_seed(4))
    cache, token = prefilled(oryx, prompt.to(device), plan, 8)
    runner = DecodeRunner(oryx, cache, cuda_graphs=False, compiled=compiled)
    decode_mode = PLANS[plan][1]
    token = runner.greedy_step(token, decode_mode).cpu()  # warm-up (and compile)
    count = count_launches(lambda: runner.greedy_step(token, decode_mode), device)
    row = dict(plan=plan, variant=variant, batch=batch,
               unit="CUDA kernels" if device.type == "cuda" else "aten operators",
               per_step=count, per_layer=count / oryx.cfg.n_layers)
    if device.type == "cuda":
        try:  # the count stands even if the timing breaks
            row["kernel_time"] = kernel_time(lambda: runner.greedy_step(token, decode_mode))
        except Exception as error:
            row["kernel_time_error"] = f"{type(error).__name__}: {error}"[:500]
    return row


def kernel_time(fn, top: int = 12) -> dict:
    """GPU time of one call of fn (no graph) by kernel name, as torch.profiler records it: the total, and the
    `top` names by time with their launch count and microseconds."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by_name: dict = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            count, us = by_name.get(event.name, (0, 0.0))
            by_name[event.name] = (count + 1, us + event.time_range.elapsed_us())
    ranked = sorted(by_name.items(), key=lambda item: -item[1][1])[:top]
    return dict(total_us=sum(us for _, us in by_name.values()),
                top=[dict(name=name[:90], launches=count, us=us) for name, (count, us) in ranked])


# (BN, BK, warps) launches of the matvec kernel the --matvec-sweep-s section times at each projection's shape, in
# a fixed shuffled order (a sweep cut short by its budget still samples every block size)
MATVEC_CONFIGS = [(block, chunk, warps) for block in (4, 8, 16, 32) for chunk in (64, 128, 256, 512, 1024)
                  for warps in (4, 8, 2)]
random.Random(0).shuffle(MATVEC_CONFIGS)


def projection_shapes(oryx) -> dict:
    """{name: (weight, kind)} for the first layer's products of a decode step (kind: norm, add or gated),
    the weights as the fused step passes them."""
    layer = oryx.layers[0]
    mixer = layer.mixer
    whole = mixer._fused_weight()
    sizes = [getattr(mixer, name).out_features for name in mixer.projection_order]
    first, last = mixer._shared_rows
    shapes = {"in_proj recurrent": (whole[sum(sizes[:first]):], "norm"),
              "in_proj attention": (whole[:sum(sizes[:last])], "norm"),
              "o_proj + residual": (mixer.o_proj.weight, "add")}
    if layer.mlp is not None:
        shapes["[gate; up] + SiLU*mul"] = (layer.mlp._fused_weight(), "gated")
        shapes["down + residual"] = (layer.mlp.down_proj.weight, "add")
    return shapes


def per_launch_us(make_fn, weights, device, replays: int = 20) -> float:
    """Microseconds a launch of make_fn(weight) takes, captured once per weight copy in one CUDA graph (the
    copies together exceed the L2 cache, as a step's 30 layers do) and replayed; on the CPU one eager pass."""
    import torch

    fns = [make_fn(w) for w in weights]
    for fn in fns:
        fn()  # compile, warm up
    if device.type != "cuda":
        start = time.perf_counter()
        for fn in fns:
            fn()
        return (time.perf_counter() - start) / len(fns) * 1e6
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) * 1e3 / (replays * len(fns))


def matvec_kernel_rows(oryx, batches, device, budget_s: float) -> list[dict]:
    """Each projection of a decode step at each batch (<= the matvec's rows): the unfused operators the fused
    step runs for it (the norm kernel, the library matmul, the activation kernel) against the matvec kernel with
    its default blocks and with each of MATVEC_CONFIGS (as many as fit budget_s), in microseconds a launch."""
    import torch
    import torch.nn.functional as F

    from triton.runtime.errors import OutOfResources

    from oryx_torch.kernels.decode_matvec import ELEMENTWISE_ROWS, MAX_ROWS, launch_matvec, matvec_blocks
    from oryx_torch.kernels.decode_step import rms_norm_rows, silu_mul

    began = time.perf_counter()
    norm = oryx.layers[0].attn_norm
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    cases = []  # (row fields, the weight copies, x, residual, kind)
    for name, (weight, kind) in projection_shapes(oryx).items():
        copies = max(2, min(64, -(-120 * 2 ** 20 // (weight.numel() * weight.element_size()))))
        weights = [weight.clone() for _ in range(copies if device.type == "cuda" else 2)]
        K = weight.shape[1]
        N = weight.shape[0] // 2 if kind == "gated" else weight.shape[0]
        for batch in [b for b in batches if b <= MAX_ROWS]:
            x = torch.randn(batch, K, device=device, dtype=weight.dtype)
            residual = torch.randn(batch, N, device=device, dtype=weight.dtype)
            cases.append((dict(projection=name, batch=batch, N=N, K=K), weights, x, residual, kind))

    def unfused(x, kind):
        if kind == "norm":
            return lambda w: (lambda: F.linear(rms_norm_rows(x, norm.weight, norm.eps), w))
        if kind == "gated":
            return lambda w: (lambda: silu_mul(F.linear(rms_norm_rows(x, norm.weight, norm.eps), w)))
        return lambda w: (lambda: F.linear(x, w))

    def fused(x, residual, kind, block=None, chunk=None, warps=4):
        return lambda w: (lambda: launch_matvec(x, w, None if kind == "add" else norm.weight, norm.eps,
                                                residual if kind == "add" else None, kind == "gated", block, chunk,
                                                warps))

    rows = []
    for base, weights, x, residual, kind in cases:  # the baselines and the default blocks first, then the sweep
        block, chunk = matvec_blocks(base["batch"], base["N"], base["K"], sms, kind == "gated")
        rows.append(dict(base, variant="unfused operators", us=per_launch_us(unfused(x, kind), weights, device)))
        rows.append(dict(base, variant="cuBLAS matmul alone",
                         us=per_launch_us(lambda w: (lambda: F.linear(x, w)), weights, device)))
        rows.append(dict(base, variant="matvec default", block=block, chunk=chunk, warps=4,
                         us=per_launch_us(fused(x, residual, kind), weights, device)))
    for block, chunk, warps in MATVEC_CONFIGS:
        for base, weights, x, residual, kind in cases:
            if time.perf_counter() - began > budget_s:
                return rows
            dots = base["batch"] > ELEMENTWISE_ROWS
            if -(-base["N"] // block) < 16 or (block < 16 if dots else base["batch"] * block * chunk > 16384):
                continue
            row = dict(base, variant="matvec", block=block, chunk=chunk, warps=warps)
            try:
                row["us"] = per_launch_us(fused(x, residual, kind, block, chunk, warps), weights, device)
            except OutOfResources as error:  # a block too large for this card's shared memory: not a candidate
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            rows.append(row)
    return rows


def summary(report: dict) -> str:
    """The report in short: tokens/s by plan, batch and variant (host read-back / device-fed), kernels a step and
    their GPU time, and for each projection the unfused operators, the matvec kernel's default blocks and the
    fastest blocks the sweep found, in microseconds a launch."""
    lines = []
    for row in report["decode"]:
        extra = "".join(f" {key}={row[key]}" for key in ("tokens_equal_to_eager", "tokens_equal_to_fused",
                                                             "tokens_compared") if key in row)
        lines.append(f"decode {row['plan']:9} b{row['batch']:<3} {row['variant']:18} "
                     f"{'long ' if row.get('long_context') else ''}{row['tokens_per_s']:9.0f} / "
                     f"{row['device_fed_tokens_per_s']:9.0f} tok/s{extra}")
    for row in report["launches"]:
        lines.append(f"launches {row['plan']:9} b{row.get('batch', 1):<3} {row['variant']:18} "
                     f"{row['per_step']} a step, "
                     f"{row.get('kernel_time', {}).get('total_us', float('nan')):.0f} us")
    best: dict = {}
    for row in report["matvec_kernels"]:
        key = (row["projection"], row["batch"])
        if row["variant"] == "matvec":
            if "us" not in row:  # did not fit the card
                continue
            if key not in best or row["us"] < best[key]["us"]:
                best[key] = row
            continue
        blocks = f" (BN {row['block']}, BK {row['chunk']}, {row['warps']} warps)" if "block" in row else ""
        lines.append(f"matvec {row['projection']:22} b{row['batch']:<3} {row['variant']:20} {row['us']:7.2f} us"
                     f"{blocks}")
    for (projection, batch), row in best.items():
        lines.append(f"matvec {projection:22} b{batch:<3} {'fastest swept':20} {row['us']:7.2f} us (BN {row['block']}, "
                     f"BK {row['chunk']}, {row['warps']} warps)")
    return "\n".join(lines)


def fp32_parity(oryx, plan: str, variant: str, prompt, steps: int) -> dict:
    """The fused variant against the eager step on the same fp32 model: the first step's logits (largest
    difference over the largest eager logit) and how many of `steps` greedy steps pick the same tokens."""
    import torch

    from oryx_torch.generate import DecodeRunner

    out = {}
    for name in ("eager", variant):
        compiled, _ = use(name)
        cache, token = prefilled(oryx, prompt, plan, steps + 8)
        runner = DecodeRunner(oryx, cache, compiled=compiled)
        decode_mode = PLANS[plan][1]
        logits = runner.step(token, decode_mode).float().cpu()
        token = logits.argmax(-1)
        tokens = [token]
        for _ in range(steps - 1):
            token = runner.greedy_step(token, decode_mode).cpu()
            tokens.append(token)
        out[name] = (logits, torch.stack(tokens, 1))
    (ref_logits, ref_tokens), (logits, tokens) = out["eager"], out[variant]
    return dict(plan=plan, variant=variant, batch=prompt.shape[0], dtype="float32",
                first_logits_error=float((logits - ref_logits).abs().max() / ref_logits.abs().max()),
                equal_tokens=int((tokens == ref_tokens).sum()), tokens=int(ref_tokens.numel()))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:  # before triton is imported: the fused kernels run on the CPU through the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from bench_model import SMOLLM2_135M, TINY, hf_config_dict, llama_model, oryx_twin
    from oryx_core.atomic import atomic_write_bytes

    from oryx_torch.kernels import decode_step

    if args.attention_split is not None:
        decode_step.ATTENTION_SPLIT_FROM = decode_step.ATTENTION_SPLIT = args.attention_split
    if args.attention_combine is not None:
        decode_step.ATTENTION_COMBINE_IN_LAST_SPLIT = args.attention_combine == "last-split"
    began = time.perf_counter()
    device = torch.device("cpu" if args.tiny else "cuda")
    hf = hf_config_dict(TINY if args.tiny else SMOLLM2_135M)
    oryx = oryx_twin(hf, llama_model(hf, None, seed=0), args.sharing).to(device)
    report = dict(card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command=" ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
                  torch=torch.__version__, shape=hf, sharing=args.sharing, attention_split=args.attention_split,
                  attention_combine="last-split" if decode_step.ATTENTION_COMBINE_IN_LAST_SPLIT else "launch",
                  parity_fp32=[], decode=[], launches=[],
                  matvec_kernels=[],
                  skipped=[], errors=[])

    def save():  # after every row, so that a run cut short still leaves what it measured
        report["seconds"] = time.perf_counter() - began
        if args.out:
            atomic_write_bytes(args.out, (json.dumps(report, indent=1) + "\n").encode())

    def attempt(section: str, what: dict, fn):
        if time.perf_counter() - began > args.budget_s:
            report["skipped"].append(dict(section=section, **what))
            return None
        try:
            result = fn()
        except Exception as error:  # one failing variant is reported; the others still run
            report["errors"].append(dict(section=section, **what, error=f"{type(error).__name__}: {error}"[:1500]))
            print(f"{section} {what}: {type(error).__name__}: {error}"[:1500], flush=True)
            return None
        print(f"{section}: {result if not isinstance(result, tuple) else result[0]}", flush=True)
        return result

    with torch.no_grad():
        parity_prompt = torch.randint(0, hf["vocab_size"], (4, min(args.prompt_length, 64)),
                                      generator=torch.Generator().manual_seed(5)).to(device)
        for plan in args.plans:  # fp32 first: the eager and fused steps of the model as built
            # the uncompiled fused variants (compiling again in fp32 costs too long)
            for variant in [v for v in args.variants if VARIANTS[v][1] and not VARIANTS[v][0]]:
                row = attempt("parity_fp32", dict(plan=plan, variant=variant),
                              lambda: fp32_parity(oryx, plan, variant, parity_prompt, 3 if args.tiny else 16))
                if row:
                    report["parity_fp32"].append(row)
                    save()
        if device.type == "cuda":
            oryx = oryx.to(torch.bfloat16)
        prompts = {batch: torch.randint(0, hf["vocab_size"], (batch, args.prompt_length),
                                        generator=torch.Generator().manual_seed(3)).to(device)
                   for batch in args.batches}
        eager_tokens, fused_tokens = {}, {}
        if args.long_context:  # batch 1 after a long prompt, uncompiled: flat in context where recurrent?
            prompt = torch.randint(0, hf["vocab_size"], (1, args.long_context),
                                   generator=torch.Generator().manual_seed(6)).to(device)
            for plan in [p for p in ("recurrent", "attention") if p in args.plans]:
                for variant in [v for v in ("eager", "fused", "fused+matvec", "fused+matvec+split",
                                                         "fused+matvec+split+pdl")
                                if v in args.variants]:
                    result = attempt("decode", dict(plan=plan, variant=variant, batch=1, prompt=args.long_context),
                                     lambda: timed_decode(oryx, prompt, plan, variant, args.decode_tokens, device))
                    if result is not None:
                        result[0]["long_context"] = True
                        report["decode"].append(result[0])
                        save()
            del prompt
        # the uncompiled steps at every batch size first: the compiled ones spend most of the budget compiling
        for group in ([v for v in args.variants if not VARIANTS[v][0]], [v for v in args.variants if VARIANTS[v][0]]):
            # kernels per step first: the batch-1 compile it pays is the one the batch-1 rows need anyway
            for launch_batch in args.launch_batches:
                for plan in args.plans:
                    for variant in group:
                        row = attempt("launches", dict(plan=plan, variant=variant, batch=launch_batch),
                                      lambda: launches(oryx, plan, variant, min(args.prompt_length, 64), device,
                                                       launch_batch))
                        if row:
                            report["launches"].append(row)
                            save()
            for batch in args.batches:
                for plan in args.plans:
                    for variant in group:
                        result = attempt("decode", dict(plan=plan, variant=variant, batch=batch),
                                         lambda: timed_decode(oryx, prompts[batch], plan, variant,
                                                              args.decode_tokens, device))
                        if result is None:
                            continue
                        row, tokens = result
                        if variant == "eager":
                            eager_tokens[batch, plan] = tokens
                        elif (batch, plan) in eager_tokens:
                            same = (tokens == eager_tokens[batch, plan]).all(0)
                            row.update(tokens_equal_to_eager=int((tokens == eager_tokens[batch, plan]).sum()),
                                       tokens_compared=int(tokens.numel()),
                                       first_differing_step=None if bool(same.all()) else int((~same).nonzero()[0, 0]))
                        if variant == "fused":
                            fused_tokens[batch, plan] = tokens
                        elif variant.startswith("fused+matvec") and (batch, plan) in fused_tokens:
                            row.update(tokens_equal_to_fused=int((tokens == fused_tokens[batch, plan]).sum()),
                                       tokens_compared=int(tokens.numel()))
                        report["decode"].append(row)
                        save()
        # after the decode rows, with its own budget (not --budget-s)
        if args.matvec_sweep_s > 0 and any(v.startswith("fused+matvec") for v in args.variants):
            try:
                report["matvec_kernels"] = matvec_kernel_rows(oryx, args.batches, device, args.matvec_sweep_s)
            except Exception as error:  # the decode rows stand
                report["errors"].append(dict(section="matvec_kernels", error=f"{type(error).__name__}: {error}"[:1500]))
                print(f"matvec_kernels: {type(error).__name__}: {error}"[:1500], flush=True)
    use("eager")
    save()
    print("== summary ==")
    print(summary(report))
    print(f"{report['card']} {report['date']}: {len(report['decode'])} decode rows, {len(report['launches'])} "
          f"launch counts, {len(report['skipped'])} skipped, {len(report['errors'])} errors, "
          f"{report['seconds']:.0f} s")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
