"""Where a whole-model training step's GPU time goes, per plan: one torch.compile'd step under torch.profiler.

    python bench/profile_model.py [--layers N] [--plans llama,attention,recurrent,mixed,mixed-packed,...] [--json OUT]
    python bench/profile_model.py --tiny     # a smoke run on the CPU in seconds (aten operators, not kernels)

The models are bench_model.py's: SmolLM2-135M's shape with random weights as Hugging Face `LlamaForCausalLM`
and the same weights in Oryx-GDN, bf16 autocast, a training step of forward, fp32 cross-entropy, backward and
fused AdamW at B=8 T=2048. Plans: `llama`; Oryx `attention`, `recurrent`, `mixed` (50% of 64-token chunks in
attention, bench_model's fixed draw, attended as oryx_torch.attention.MIXED_ATTENTION says) and the same plan
under each attention method: `mixed-flex` (FlexAttention with a block mask that skips query blocks without an
attention token), `mixed-packed` (FlexAttention over each sequence's attention rows gathered to its first rows)
and `mixed-dense` (causal SDPA over every row, each token then taking its own mode's output).

Printed per plan: the step's wall time (median, outside the profiler), the kernels' summed time per step and
their count, the time by category (attention, recurrence kernels, convolutions, matmuls, fused elementwise and
reductions, optimizer, copies), then the top kernels by time. `--layers` builds fewer layers than 30 (each layer
runs the same kernels; compiling is faster); per-layer categories divide by it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model  # noqa: E402

from oryx_core.atomic import atomic_write_bytes  # noqa: E402

PLANS = ("llama", "attention", "recurrent", "mixed", "mixed-dense", "mixed-flex", "mixed-packed")
# Kernel name -> category, first match wins. Our recurrence kernels are named in oryx_torch.kernels; inductor
# names its generated kernels triton_poi_ (pointwise), triton_red_ / triton_per_ (reductions) and
# triton_tem_ (templates: FlexAttention here, matmuls only under max-autotune).
CATEGORIES = (
    ("attention", r"flash|fmha|attention|flex|tem_fused|sdpa|cudnn"),
    ("recurrence", r"_wy_fwd|_state_fwd|_state_bwd|_chunk_bwd|_ssd_|_fused_recurrent|_decode_kernel"),
    ("convolution", r"conv|fprop|dgrad|wgrad"),
    ("matmul", r"gemm|nvjet|xmma|cutlass|matmul|splitk|wgmma|_mm_|sm90_|sm80_|::mm$|::bmm$|::addmm$|::linear$"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("elementwise (inductor)", r"^triton_poi"),
    ("reduction (inductor)", r"^triton_(red|per)"),
    ("copy / fill", r"copy|memcpy|memset|fill|cat|index|scatter|gather"),
)


def category(name: str) -> str:
    low = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, low):
            return label
    return "other"


def build(args, device):
    shape = dict(bench_model.TINY if args.tiny else bench_model.SMOLLM2_135M)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    hf = bench_model.hf_config_dict(shape)
    llama = bench_model.llama_model(hf, None, seed=0)
    oryx = bench_model.oryx_twin(hf, llama)
    return hf, llama.to(device), oryx.to(device)


def training_step(hf, llama, oryx, plan: str, args, device, autocast):
    """(step function, the model it trains) for `plan`; the compiled forward inside."""
    from oryx_torch import attention

    B, T = args.batch, args.length
    batch = torch.randint(0, hf["vocab_size"], (B, T + 1), generator=torch.Generator().manual_seed(1)).to(device)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    model = llama if plan == "llama" else oryx
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    torch._dynamo.reset()
    forward = torch.compile(model) if args.compile == "on" else model
    method = plan.split("-")[1] if plan.startswith("mixed-") else None  # MIXED_ATTENTION for this plan
    if plan == "llama":
        run = lambda: forward(input_ids=inputs).logits  # noqa: E731
    else:
        modes = bench_model.plan_modes("mixed" if plan.startswith("mixed") else plan, B, T, device)
        previous = attention.MIXED_ATTENTION
        attention.MIXED_ATTENTION = method or previous
        try:
            tokens, plans = oryx.prepare(inputs, modes)  # what the method reads is built here, on the host
        finally:
            attention.MIXED_ATTENTION = previous
        run = lambda: forward(tokens, plans)  # noqa: E731

    def step():
        previous = attention.MIXED_ATTENTION
        attention.MIXED_ATTENTION = method or previous
        try:
            with autocast:
                logits = run()
        finally:
            attention.MIXED_ATTENTION = previous
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model


def profile_plan(step, args, device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    step()  # compiles
    bench_model.synchronize(device)
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    bench_model.synchronize(device)
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        step()
        bench_model.synchronize(device)
        times.append(time.perf_counter() - start)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            step()
        bench_model.synchronize(device)
    kernels: dict[str, list] = {}
    for event in prof.events():
        if cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            micros = event.device_time_total
        else:
            if not event.name.startswith("aten::") or bench_model._inside_aten(event):
                continue
            micros = event.cpu_time_total
        entry = kernels.setdefault(event.name, [0.0, 0])
        entry[0] += micros / 1e3 / args.profile_steps
        entry[1] += 1
    by_category: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        by_category[category(name)] = by_category.get(category(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    return dict(step_ms=statistics.median(times) * 1e3, compile_s=compile_s,
                kernel_ms=sum(v[0] for v in kernels.values()),
                kernels_per_step=sum(v[1] for v in kernels.values()) / args.profile_steps,
                categories=by_category,
                top=[dict(name=name, ms=ms, calls=calls / args.profile_steps, category=category(name))
                     for name, (ms, calls) in top[:args.top]])


def report_tables(results: dict, layers: int) -> str:
    plans = list(results)
    lines = ["| per step | " + " | ".join(plans) + " |", "| --- |" + " --- |" * len(plans)]
    lines.append("| wall ms (median) | " + " | ".join(f"{results[p]['step_ms']:.2f}" for p in plans) + " |")
    lines.append("| kernel ms (sum) | " + " | ".join(f"{results[p]['kernel_ms']:.2f}" for p in plans) + " |")
    lines.append("| kernels | " + " | ".join(f"{results[p]['kernels_per_step']:.0f}" for p in plans) + " |")
    lines.append("| first step s (compile) | " + " | ".join(f"{results[p]['compile_s']:.1f}" for p in plans) + " |")
    labels = [label for label, _ in CATEGORIES] + ["other"]
    for label in labels:
        values = [results[p]["categories"].get(label, 0.0) for p in plans]
        if any(values):
            lines.append(f"| {label} ms (per layer) | " + " | ".join(f"{v:.2f} ({v / layers:.3f})" for v in values)
                         + " |")
    out = ["\n".join(lines)]
    for plan in plans:
        rows = [f"top kernels, {plan}: ms per step, calls, category"]
        for k in results[plan]["top"]:
            rows.append(f"  {k['ms']:8.3f} {k['calls']:5.0f}  {k['category'][:10]:10s} {k['name'][:88]}")
        out.append("\n".join(rows))
    return "\n\n".join(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: the smoke test")
    parser.add_argument("--plans", type=lambda s: s.split(","), default=list(PLANS))
    parser.add_argument("--layers", type=int, help="layers to build (default: the shape's 30)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--length", type=int)
    parser.add_argument("--compile", choices=("on", "off"), default="on")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    bad = [p for p in args.plans if p not in PLANS]
    if bad:
        parser.error(f"--plans: unknown plan {bad[0]!r}; choose from {', '.join(PLANS)}")
    args.batch = args.batch or (1 if args.tiny else 8)
    args.length = args.length or (128 if args.tiny else 2048)
    for key in ("batch", "length", "repeat", "profile_steps", "top"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be positive, got {args.layers}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --tiny for the CPU smoke run")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    hf, llama, oryx = build(args, device)
    layers = hf["num_hidden_layers"]
    results = {}
    for plan in args.plans:
        step, model = training_step(hf, llama, oryx, plan, args, device, autocast)
        results[plan] = profile_plan(step, args, device)
        model.eval()
        print(report_tables({plan: results[plan]}, layers), flush=True)  # as it comes, in case the run is cut
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)))
    unit = "CUDA kernels" if device.type == "cuda" else "outermost aten operators (CPU time)"
    print(f"{card}, {date}, torch {torch.__version__}: {command}")
    print(f"training step, B={args.batch} T={args.length}, {layers} layers, compile {args.compile}, {unit}")
    print(report_tables(results, layers))
    if args.json:
        report = dict(card=card, date=date, command=command, torch=torch.__version__, layers=layers,
                      batch=args.batch, length=args.length, compile=args.compile, unit=unit, results=results)
        atomic_write_bytes(args.json, (json.dumps(report, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
