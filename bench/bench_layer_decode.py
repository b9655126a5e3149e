"""GPU bench of the torch model: one layer's cost under a mode plan, decode latency, KV-drop memory.

    python3 bench/bench_layer_decode.py [--quick] [SECTION ...]      (sections: check layer decode memory)

0. check: the model on CUDA (fp32 and bf16) against the float64 reference: parallel form under
   mixed per-sequence plans (FlexAttention path), all-attention (SDPA path), all-recurrent,
   and prefill + graph-captured decode steps switching A -> R -> A.
(a) one Oryx layer at 125m dims, bf16, forward+backward: all-recurrent vs 10% of 128-token
    query blocks in attention (target <= 1.25x), all-attention beside them.
(b) decode latency per token, batch 1, 125m model, CUDA graphs: recurrent and attention mode
    at 1K..32K context (target recurrent 32K/1K <= 1.1).
(c) peak GPU memory of generation with the `drop` KV policy (recurrent plan) vs `keep`.
Prints tables; writes results.json under $OUT when set. Each section reports its own failure.
"""
import datetime
import json
import os
import sys
import time
import traceback

import numpy as np
import torch

from oryx_core.config import OryxConfig, preset
from oryx_core.init import init_params
from oryx_core.reference import OryxReference
from oryx_torch.attention import rope_tables
from oryx_core.generation import generate
from oryx_torch.backend import TorchModel
from oryx_torch.generate import DecodeRunner
from oryx_torch.model import OryxModel

QUICK = "--quick" in sys.argv
SECTIONS = [a for a in sys.argv[1:] if not a.startswith("--")] or ["check", "layer", "decode", "memory"]
RESULTS = {}


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def section(name):
    def wrap(fn):
        def run():
            if name not in SECTIONS:
                return
            start = time.perf_counter()
            print(f"\n=== {name} ===", flush=True)
            try:
                RESULTS[name] = fn()
            except Exception:
                traceback.print_exc()
                RESULTS[name] = {"error": traceback.format_exc(limit=3)}
            print(f"[{name}: {time.perf_counter() - start:.1f} s]", flush=True)
            save()
        return run
    return wrap


def save():
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


# ----- 0. correctness on CUDA -----
def check_config(mixer):
    return OryxConfig(vocab_size=300, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                      value_head_dim=64, mlp_hidden=256, max_context=1024, mixer=mixer)


def lively_params(cfg, seed):
    """init_params with projections scaled up, so both modes change the logits a lot."""
    params = init_params(cfg, seed)
    return {n: (p * 5 if p.ndim == 2 and "embed" not in n else p) for n, p in params.items()}


@section("check")
def check():
    rng = np.random.default_rng(0)
    out = {}
    for mixer in ("gdn", "mamba2"):
        cfg = check_config(mixer)
        params = lively_params(cfg, 1)
        ref = OryxReference(cfg, params)
        B, T = 2, 300
        tokens = rng.integers(0, cfg.vocab_size, (B, T))
        chunks = rng.random((B, -(-T // 64))) < 0.3
        plans = {"mixed_per_sequence": np.repeat(chunks, 64, axis=1)[:, :T],
                 "attention": np.ones(T, bool), "recurrent": np.zeros(T, bool)}
        for dtype in (torch.float32, torch.bfloat16):
            model = OryxModel(cfg, seed=None).to(dtype)
            model.load_params(params)
            model = model.cuda().eval()
            for name, modes in plans.items():
                want = ref.forward(tokens, modes)[0]
                with torch.inference_mode():
                    got = model(torch.tensor(tokens), torch.tensor(modes)).float().cpu().numpy()
                out[f"{mixer}/{str(dtype)[6:]}/{name}"] = rel(got, want)
            # prefill 200 tokens in attention, then decode A x10, R x60, A x30 through CUDA graphs
            P, steps = 200, 100
            modes = np.concatenate([np.ones(P + 10, bool), np.zeros(60, bool), np.ones(30, bool)])
            want = ref.forward(tokens[:1, :P + steps], modes)[0][0]
            with torch.inference_mode():
                cache = model.make_cache(1, P + steps)
                logits = [model(torch.tensor(tokens[:1, :P]), modes[None, :P], cache=cache)[0]]
                runner = DecodeRunner(model, cache, cuda_graphs=True)
                for t in range(P, P + steps):
                    logits.append(runner.step([int(tokens[0, t])], modes[t:t + 1]).clone())
                got = torch.cat([logits[0], torch.stack([x[0] for x in logits[1:]])]).float().cpu().numpy()
            out[f"{mixer}/{str(dtype)[6:]}/prefill+graph_decode"] = rel(got, want)
            out[f"{mixer}/modes_matter"] = rel(ref.forward(tokens, ~plans["mixed_per_sequence"])[0],
                                               ref.forward(tokens, plans["mixed_per_sequence"])[0])
    for k, v in out.items():
        print(f"{k:45s} rel err {v:.2e}")
    return out


# ----- (a) one layer, forward + backward -----
def block_plan(rng, B, T, share, block=128):
    blocks = np.zeros((B, T // block), bool)
    n = max(1, int(round(share * blocks.shape[1])))
    for b in range(B):
        blocks[b, rng.choice(blocks.shape[1], n, replace=False)] = True
    return torch.tensor(np.repeat(blocks, block, axis=1)).cuda()


def kernel_summary(prof, top=8):
    """The heaviest operators of a profile by GPU time, one short line each (full tables go to $OUT).

    Counts operator rows only: the profiler also lists every kernel again under its own name.
    """
    rows = sorted(((e.self_device_time_total, e.count, e.key) for e in prof.key_averages()
                   if e.device_type == torch.autograd.DeviceType.CPU and e.self_device_time_total > 0), reverse=True)
    lines = [f"    GPU busy {sum(r[0] for r in rows) / 1e3:.2f} ms in all profiled calls"]
    lines += [f"    {t / 1e3:7.3f} ms x{n:<4d} {name[:90]}" for t, n, name in rows[:top]]
    return "\n".join(lines)


@section("layer")
def layer_bench():
    from torch.profiler import ProfilerActivity, profile
    from triton.testing import do_bench

    from oryx_torch.attention import AttentionPlan, _compiled_flex_attention, causal_sdpa

    rng = np.random.default_rng(0)
    out = {}
    shapes = [(16, 2048), (4, 8192)]
    profiles = []
    for mixer in ("gdn", "mamba2"):
        cfg = preset("125m", mixer)
        H, d, dv = cfg.n_heads, cfg.head_dim, cfg.v_head_dim
        layer = OryxModel(cfg.replace(n_layers=1), seed=0).layers[0].cuda().to(torch.bfloat16)
        for B, T in shapes:
            x = torch.randn(B, T, cfg.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            grad = torch.randn_like(x)
            rope = rope_tables(cfg.head_dim, cfg.rope_theta, torch.arange(T, device="cuda"))
            plans = {"recurrent": torch.zeros(B, T, dtype=torch.bool, device="cuda"),
                     "attn10%": block_plan(rng, B, T, 0.10),
                     "attention": torch.ones(B, T, dtype=torch.bool, device="cuda")}
            row = {}
            host_plans = {name: modes.cpu() for name, modes in plans.items()}  # plans come from the host (sampler)
            for name, modes in plans.items():
                def fwd_bwd():  # the plan is built per call, as OryxModel.forward does (once for all layers)
                    layer(x, AttentionPlan(modes, 0, host_plans[name]), rope).backward(grad)

                def fwd():
                    with torch.no_grad():
                        layer(x, AttentionPlan(modes, 0, host_plans[name]), rope)

                row[name + "_fwdbwd_ms"] = do_bench(fwd_bwd, warmup=50, rep=300, return_mode="median")
                row[name + "_fwd_ms"] = do_bench(fwd, warmup=50, rep=300, return_mode="median")
                if mixer == "gdn" and B == 16 and name != "attention":
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        for _ in range(3):
                            fwd_bwd()
                        torch.cuda.synchronize()
                    profiles.append((f"{mixer} B={B} T={T} {name} fwd+bwd x3", prof))
            row["ratio_attn10_vs_rec_fwdbwd"] = row["attn10%_fwdbwd_ms"] / row["recurrent_fwdbwd_ms"]
            # the attention part alone, on [B, H, T, *] inputs
            q, k = (torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qk")
            v = torch.randn(B, H, T, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            do = torch.randn(B, H, T, dv, device="cuda", dtype=torch.bfloat16)
            sparse = AttentionPlan(plans["attn10%"])
            flex = _compiled_flex_attention()
            row["flex10%_only_fwdbwd_ms"] = do_bench(
                lambda: flex(q, k, v, block_mask=sparse.block_mask(T)).backward(do), warmup=50, rep=300,
                return_mode="median")
            row["blockmask_build_ms"] = do_bench(
                lambda: AttentionPlan(plans["attn10%"], 0, host_plans["attn10%"]).block_mask(T), warmup=20,
                rep=100, return_mode="median")
            row["sdpa_padded_causal_only_fwdbwd_ms"] = do_bench(
                lambda: causal_sdpa(q, k, v, d ** -0.5).backward(do), warmup=50, rep=300, return_mode="median")
            out[f"{mixer}/B{B}xT{T}"] = row
            print(f"{mixer} B={B} T={T}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    for title, prof in profiles:
        print(f"  profile {title}:\n{kernel_summary(prof)}", flush=True)
        if os.environ.get("OUT"):
            os.makedirs(os.environ["OUT"], exist_ok=True)
            with open(os.path.join(os.environ["OUT"], "profiles.txt"), "a") as f:
                f.write(f"== {title}\n" + prof.key_averages().table(sort_by="self_device_time_total", row_limit=40))
    return out


# ----- (b) decode latency -----
def prefill_random(model, cache, length, rng, chunk=8192):
    for begin in range(0, length, chunk):
        n = min(chunk, length - begin)
        model(torch.tensor(rng.integers(0, model.cfg.vocab_size, (1, n))), torch.zeros(n, dtype=torch.bool),
              cache=cache)


@section("decode")
def decode_bench():
    rng = np.random.default_rng(0)
    contexts = [1024, 2048, 4096] if QUICK else [1024, 2048, 4096, 8192, 16384, 32768]
    steps = 50
    out = {}
    for mixer in ("gdn", "mamba2"):
        model = OryxModel(preset("125m", mixer), seed=0).to(torch.bfloat16).cuda().eval()
        for ctx in contexts:
            row = {}
            with torch.inference_mode():
                cache = model.make_cache(1, ctx + 4 * steps + 8)
                prefill_random(model, cache, ctx, rng)
                for mode_name, is_attention in (("recurrent", False), ("attention", True)):
                    for use_graphs in (True, False):
                        runner = DecodeRunner(model, cache, cuda_graphs=use_graphs)
                        tokens = rng.integers(0, model.cfg.vocab_size, steps + 2)
                        for t in tokens[:2]:  # eager warm-up, then capture
                            runner.step([int(t)], [is_attention])
                        torch.cuda.synchronize()
                        start = time.perf_counter()
                        for t in tokens[2:]:
                            logits = runner.step([int(t)], [is_attention])
                            int(logits[0, 0] > 0)  # the sync a sampler does every token
                        row[f"{mode_name}_{'graph' if use_graphs else 'eager'}_ms"] = \
                            (time.perf_counter() - start) / steps * 1e3
            out[f"{mixer}/ctx{ctx}"] = row
            print(f"{mixer} ctx={ctx}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
        first, last = out[f"{mixer}/ctx{contexts[0]}"], out[f"{mixer}/ctx{contexts[-1]}"]
        out[f"{mixer}/recurrent_ratio_last_vs_first"] = last["recurrent_graph_ms"] / first["recurrent_graph_ms"]
        print(f"{mixer}: recurrent decode {contexts[-1]}/{contexts[0]} = "
              f"{out[f'{mixer}/recurrent_ratio_last_vs_first']:.3f}", flush=True)
        del model
        torch.cuda.empty_cache()
    return out


# ----- (c) memory with the drop policy -----
@section("memory")
def memory_bench():
    rng = np.random.default_rng(0)
    contexts = [1024, 4096] if QUICK else [1024, 4096, 16384, 32768]
    # the context reaches past the preset's max_context, which generation would refuse
    cfg = preset("125m", "gdn").replace(max_context=max(contexts) + 64)
    model = OryxModel(cfg, seed=0).to(torch.bfloat16).cuda().eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"weights_MiB": weights / 2**20}
    for ctx in contexts:
        prompt = rng.integers(0, model.cfg.vocab_size, ctx).tolist()
        for policy in ("drop", "keep"):
            stats = generate(TorchModel(model), None, prompt, 16, "recurrent", kv_policy=policy, state_policy="keep",
                             prefill_step_size=1024).stats
            out[f"ctx{ctx}/{policy}"] = {"peak_MiB": stats.peak_memory_bytes / 2**20,
                                         "cache_MiB": stats.cache_bytes / 2**20,
                                         "generation_tps": stats.generation_tps}
            print(f"ctx={ctx} {policy}: peak {stats.peak_memory_bytes / 2**20:.1f} MiB (weights {weights / 2**20:.1f}), "
                  f"cache {stats.cache_bytes / 2**20:.2f} MiB, {stats.generation_tps:.0f} tok/s", flush=True)
    return out


if __name__ == "__main__":
    RESULTS["env"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(RESULTS["env"], flush=True)
    for run in (check, layer_bench, decode_bench, memory_bench):
        run()
