"""The PyTorch model against the float64 reference (CPU, fp32): both mixers, config flags, mode plans,
step-by-step decoding, KV drop, save/load, `oryx eval --backend torch`, bad inputs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from oryx_core.cli import main as oryx_main
from oryx_core.config import OryxConfig, preset
from oryx_core.plan import ModePlan
from oryx_core.reference import Stepper
from oryx_core.spec import parameter_specs
from oryx_core.weights import load_checkpoint
from oryx_torch.attention import AttentionPlan, causal_sdpa, plan_attention, plan_block_mask
from oryx_torch.model import OryxModel
from error_metrics import relative_error as worst_relative_error
from torch_models import VARIANTS, assert_backward_tables_are_the_transpose, build, mixed_modes, run

TOL = 1e-4


def rel(got, want):
    return worst_relative_error(got, want)


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_reference(mixer, variant):
    cfg = preset("tiny", mixer, **VARIANTS[variant])  # tiny has GQA: 4 query heads over 2 kv heads
    model, ref = build(cfg)
    rng = np.random.default_rng(0)
    B, T = 2, 21
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    plans = {"A": np.ones(T, bool), "R": np.zeros(T, bool),
             "A-R-A": np.array([True] * 7 + [False] * 7 + [True] * 7), "per_sequence": mixed_modes(rng, B, T)}
    outputs = {}
    for name, modes in plans.items():
        want = ref.forward(tokens, modes)[0]
        outputs[name] = run(model, tokens, modes)
        assert rel(outputs[name], want) < TOL, name
    assert rel(outputs["A"], outputs["R"]) > 1e-2  # the modes really differ


def test_state_dict_names_are_the_spec():
    for cfg in (preset("tiny", "gdn", conv_bias=True, tie_embeddings=False), preset("tiny", "mamba2", mlp_hidden=0)):
        model = OryxModel(cfg)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
            {s.name: s.shape for s in parameter_specs(cfg)}


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_prefill_then_steps_match_reference(mixer):
    cfg = preset("tiny", mixer, conv_bias=True)
    model, ref = build(cfg, seed=2)
    rng = np.random.default_rng(1)
    B, P, T = 2, 9, 24
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    modes = mixed_modes(rng, B, T)
    want = ref.forward(tokens, modes)[0]
    cache = model.make_cache(B, T)
    pieces = [run(model, tokens[:, :P], modes[:, :P], cache)]
    pieces.append(run(model, tokens[:, P:P + 5], modes[:, P:P + 5], cache))  # a second prefill chunk
    with torch.no_grad():
        for t in range(P + 5, T):
            pieces.append(model.step(torch.tensor(tokens[:, t]), torch.tensor(modes[:, t]), cache).numpy()[:, None])
    assert cache.length == T
    assert rel(np.concatenate(pieces, 1), want) < TOL


def test_steps_match_reference_stepper():
    cfg = preset("tiny", "gdn")
    model, ref = build(cfg, seed=3)
    stepper = Stepper(ref, batch=1)
    rng = np.random.default_rng(2)
    cache = model.make_cache(1, 12)
    for t in range(12):
        token, is_attention = rng.integers(0, cfg.vocab_size, 1), bool(t % 3 == 0)
        want = stepper.step(token, is_attention)
        with torch.no_grad():
            got = model.step(torch.tensor(token), is_attention, cache).numpy()
        assert rel(got, want) < TOL, t


def test_kv_drop_same_logits_and_constant_memory():
    cfg = preset("tiny", "mamba2")
    model, _ = build(cfg, seed=4)
    rng = np.random.default_rng(3)
    P, T = 6, 16
    tokens = rng.integers(0, cfg.vocab_size, (1, T))
    modes = np.arange(T) < P  # attention prefill, then recurrent only
    caches = {policy: model.make_cache(1, T + 1) for policy in ("keep", "drop")}
    logits, sizes = {}, []
    for policy, cache in caches.items():
        out = [run(model, tokens[:, :P], modes[:P], cache)[0]]
        with torch.no_grad():
            for t in range(P, T):
                if policy == "drop" and not ModePlan.parse("prefill-attention").attention_after(t, P) and cache.has_kv:
                    cache.drop_kv()
                out.append(model.step(torch.tensor(tokens[:, t]), False, cache).numpy())
                if policy == "drop":
                    sizes.append(cache.nbytes())
        logits[policy] = np.concatenate(out)
    assert not caches["drop"].has_kv and caches["keep"].has_kv
    np.testing.assert_array_equal(logits["drop"], logits["keep"])
    assert len(set(sizes)) == 1 and sizes[0] < caches["keep"].nbytes()
    with pytest.raises(ValueError, match="KV"):
        model.step(torch.tensor([1]), True, caches["drop"])


def test_block_mask_skips_recurrent_query_blocks():
    B, T, S, block = 2, 40, 56, 8
    rng = np.random.default_rng(4)
    modes = torch.tensor(rng.random((B, T)) < 0.15)
    offset = S - T
    mask = plan_block_mask(modes, S, q_offset=offset, block=block).to_dense()  # [B, 1, n_q, n_kv] block flags
    for b in range(B):
        for i in range(-(-T // block)):
            rows = range(i * block, min(T, (i + 1) * block))
            for j in range(-(-S // block)):
                needed = any(modes[b, t] and j * block <= t + offset for t in rows)
                assert bool(mask[b, 0, i, j]) == needed, (b, i, j)


def test_block_mask_backward_tables_are_the_transpose():
    """The per-key-block tables the backward pass reads == the ones torch derives from the forward tables."""
    B, T, S, block = 3, 45, 61, 8
    modes = torch.tensor(np.random.default_rng(5).random((B, T)) < 0.2)
    ours = plan_block_mask(modes, S, q_offset=S - T, block=block)
    assert_backward_tables_are_the_transpose(ours, block, T, S)


@pytest.mark.parametrize("q_offset", [0, 13])
def test_flex_path_matches_rows_path(q_offset):
    """FlexAttention (run eagerly on CPU) under the plan's block mask == SDPA over the attention rows."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    gen = torch.Generator().manual_seed(1)
    B, H, Hkv, T, d, dv, block = 2, 4, 2, 40, 8, 16, 8
    S = T + q_offset
    q = torch.randn(B, H, T, d, generator=gen)
    k, v = torch.randn(B, Hkv, S, d, generator=gen), torch.randn(B, Hkv, S, dv, generator=gen)
    modes = torch.rand(B, T, generator=gen) < 0.2
    plan = AttentionPlan(modes, q_offset)
    want = plan_attention(q, k, v, plan, scale=0.4)  # the CPU path
    mask = plan_block_mask(modes, S, q_offset, block=block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        got = flex_attention(q, k, v, block_mask=mask, scale=0.4, enable_gqa=True)
    rows = modes[:, None, :, None].expand_as(want)
    assert rel(got[rows], want[rows]) < 1e-6


@pytest.mark.gpu
def test_flex_path_gradients_match_rows_path(monkeypatch):
    """Gradients through FlexAttention under the plan's block mask (its backward reads the transposed
    tables; FlexAttention has no backward on CPU) == gradients of SDPA over the attention rows."""
    from oryx_torch import attention
    from oryx_torch.attention import _rows_attention

    monkeypatch.setattr(attention, "MIXED_ATTENTION", "flex")  # not the default

    gen = torch.Generator().manual_seed(2)
    B, H, Hkv, T, d, dv = 2, 4, 2, 700, 64, 128
    leaves = [torch.randn(B, H, T, d, generator=gen), torch.randn(B, Hkv, T, d, generator=gen),
              torch.randn(B, Hkv, T, dv, generator=gen)]
    modes = torch.rand(B, T, generator=gen) < 0.05
    upstream = torch.randn(B, H, T, dv, generator=gen) * modes[:, None, :, None]  # only attention rows count
    grads = {}
    for path in ("rows", "flex"):
        q, k, v = (t.cuda().requires_grad_() for t in leaves)
        out = (_rows_attention(q, k, v, torch.nonzero(modes.any(0)).flatten().cuda(), 0, 0.4) if path == "rows" else
               plan_attention(q, k, v, AttentionPlan(modes.cuda(), 0, modes), scale=0.4))
        (out * upstream.cuda()).sum().backward()
        grads[path] = [q.grad, k.grad, v.grad]
    for got, want in zip(grads["flex"], grads["rows"]):
        assert rel(got, want) < 1e-4  # fp32; FlexAttention may use TF32 dots


@pytest.mark.parametrize("d, dv, kv_heads", [(8, 16, 4), (16, 8, 4), (8, 16, 2), (16, 16, 1)])
def test_causal_sdpa_pads_unequal_head_dims(d, dv, kv_heads):
    """The all-attention CUDA path (zero-padded to equal head sizes, kv heads expanded in fp32)
    against the CPU row path."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, d, generator=gen), torch.randn(2, kv_heads, 9, d, generator=gen)
    v = torch.randn(2, kv_heads, 9, dv, generator=gen)
    want = plan_attention(q, k, v, AttentionPlan(torch.ones(2, 9, dtype=torch.bool)), scale=0.3)
    got = causal_sdpa(q, k, v, 0.3)
    assert got.shape == want.shape and rel(got, want) < 1e-6


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_bit_exact(tmp_path, dtype):
    cfg = preset("tiny", "gdn", tie_embeddings=False)
    model = OryxModel(cfg, seed=5).to(getattr(torch, dtype))
    model.save(tmp_path / "ck", tokenizer_json=None)
    ckpt = load_checkpoint(tmp_path / "ck")
    assert ckpt.dtype == dtype
    loaded = OryxModel.from_checkpoint(tmp_path / "ck")
    assert loaded.dtype == getattr(torch, dtype)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a.view(torch.int16) if dtype == "bfloat16" else a,
                           b.view(torch.int16) if dtype == "bfloat16" else b), name


def test_bf16_close_to_reference():
    cfg = preset("tiny", "gdn")
    model, ref = build(cfg, seed=6)
    model = model.to(torch.bfloat16)
    rng = np.random.default_rng(5)
    tokens, modes = rng.integers(0, cfg.vocab_size, (2, 16)), mixed_modes(rng, 2, 16)
    with torch.no_grad():
        got = model(torch.tensor(tokens), torch.tensor(modes)).float().numpy()
    assert rel(got, ref.forward(tokens, modes)[0]) < 5e-2


def test_bad_inputs_are_named():
    cfg = preset("tiny", "gdn")
    model = OryxModel(cfg)
    tokens = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="tokens: id 260 is outside"):
        model(torch.tensor([[1, 260]]), True)
    with pytest.raises(ValueError, match="tokens: id -1"):
        model(torch.tensor([[1, -1]]), True)
    with pytest.raises(ValueError, match="modes: shape \\[4\\]"):
        model(tokens, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="modes: expected bools"):
        model(tokens, torch.ones(5))
    with pytest.raises(ValueError, match="tokens: expected integer"):
        model(tokens.float(), True)
    with pytest.raises(ValueError, match="capacity"):
        model(tokens, True, cache=model.make_cache(1, 4))
    with pytest.raises(ValueError, match="batch"):
        model(tokens, True, cache=model.make_cache(2, 8))


def test_eval_torch_matches_reference(tmp_path, capsys):
    ck, text = tmp_path / "ck", tmp_path / "t.txt"
    assert oryx_main(["init", str(ck), "--preset", "tiny", "--mixer", "mamba2", "--seed", "3"]) == 0
    text.write_text("The quick brown fox jumps over the lazy dog; every word counts twice. " * 3)
    results = {}
    for backend in ("torch", "reference"):
        capsys.readouterr()
        assert oryx_main(["eval", str(ck), "--text", str(text), "--backend", backend, "--plan", "every:2:16",
                          "--window", "100", "--json"]) == 0
        results[backend] = json.loads(capsys.readouterr().out)
    assert results["torch"]["tokens"] == results["reference"]["tokens"] > 100
    assert abs(results["torch"]["nll"] - results["reference"]["nll"]) <= 1e-5 * results["reference"]["nll"]


def test_fused_decode_kernels_under_triton_interpreter():
    """The CUDA decode path (Triton decode steps with fused KV append) run by Triton's CPU interpreter."""
    pytest.importorskip("triton")
    here = os.path.abspath(__file__)
    helpers = [os.path.join(os.path.dirname(os.path.dirname(here)), "core"), os.path.dirname(here)]  # as pytest's pythonpath
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (*helpers, os.environ.get("PYTHONPATH")) if p)}
    code = ("import sys, importlib.util; "
            "spec = importlib.util.spec_from_file_location('cuda_test_model', sys.argv[2]); "
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
            "module.fused_decode_check()")
    tests_dir = os.path.dirname(os.path.dirname(here))
    result = subprocess.run([sys.executable, "-c", code, tests_dir, here], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def fused_decode_check():
    """Run in a TRITON_INTERPRET=1 subprocess: Triton head sizes (>= 16), GQA, both mixers, A/R switches."""
    from oryx_torch.generate import DecodeRunner

    for mixer in ("gdn", "mamba2"):
        cfg = OryxConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                         value_head_dim=32, mlp_hidden=0, mixer=mixer)
        model, ref = build(cfg, seed=7)
        rng = np.random.default_rng(6)
        P, T = 5, 11
        tokens = rng.integers(0, cfg.vocab_size, (1, T))
        modes = np.array([1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 1], bool)
        cache = model.make_cache(1, T)
        out = [run(model, tokens[:, :P], modes[:P], cache)[0]]
        runner = DecodeRunner(model, cache)
        with torch.no_grad():
            for t in range(P, T):
                out.append(runner.step([int(tokens[0, t])], modes[t:t + 1]).numpy().copy())
        err = rel(np.concatenate(out), ref.forward(tokens, modes)[0][0])
        assert err < TOL, (mixer, err)


@pytest.mark.gpu
@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_cuda_paths_match_reference(mixer):
    """On CUDA: FlexAttention (mixed per-sequence plan), SDPA without the math fallback (all attention),
    Triton recurrences, and prefill + CUDA-graph decode switching A -> R -> A."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from oryx_torch.generate import DecodeRunner

    cfg = OryxConfig(vocab_size=300, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                     value_head_dim=64, mlp_hidden=256, max_context=1024, mixer=mixer)
    model, ref = build(cfg, seed=8)
    model = model.cuda()
    rng = np.random.default_rng(7)
    B, T = 2, 300
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    fast = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    for modes in (mixed_modes(rng, B, T), np.ones(T, bool), np.zeros(T, bool)):
        with torch.no_grad(), sdpa_kernel(fast):
            got = model(torch.tensor(tokens), torch.tensor(modes)).cpu().numpy()
        assert rel(got, ref.forward(tokens, modes)[0]) < TOL
    P, steps = 200, 60
    modes = np.concatenate([np.ones(P + 10, bool), np.zeros(30, bool), np.ones(20, bool)])
    cache = model.make_cache(1, P + steps)
    with torch.no_grad():
        logits = [model(torch.tensor(tokens[:1, :P]), modes[:P], cache=cache)[0]]
        runner = DecodeRunner(model, cache, cuda_graphs=True)
        for t in range(P, P + steps):
            logits.append(runner.step([int(tokens[0, t])], modes[t:t + 1]).clone())
    got = torch.cat([logits[0], torch.cat(logits[1:])]).cpu().numpy()
    assert len(runner.graphs) == 2  # attention and recurrent variants, each captured once
    assert rel(got, ref.forward(tokens[:1, :P + steps], modes)[0][0]) < TOL


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_per_layer_modes_match_reference(mixer):
    """Modes per layer [L, B, T] (the shape every backend takes) in the parallel form and [L, B] per step."""
    cfg = preset("tiny", mixer)
    model, ref = build(cfg, seed=6)
    rng = np.random.default_rng(6)
    B, P, T = 2, 7, 12
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    modes = np.stack([mixed_modes(rng, B, T) for _ in range(cfg.n_layers)])  # layers disagree
    assert not (modes == modes[:1]).all()
    want = ref.forward(tokens, modes)[0]
    assert rel(run(model, tokens, modes), want) < TOL
    shared = ref.forward(tokens, modes[0])[0]
    assert rel(want, shared) > 1e-3  # the per-layer modes change the result
    cache = model.make_cache(B, T)
    pieces = [run(model, tokens[:, :P], modes[:, :, :P], cache)]
    with torch.no_grad():
        for t in range(P, T):
            pieces.append(model.step(torch.tensor(tokens[:, t]), torch.tensor(modes[:, :, t]), cache).numpy()[:, None])
    assert rel(np.concatenate(pieces, 1), want) < TOL
    with pytest.raises(ValueError, match=r"modes: shape \[3, 2, 12\] does not broadcast to \[n_layers="):
        run(model, tokens, np.ones((3, B, T), dtype=bool))
