"""The PyTorch model under each `sharing` ("kv", "none", "qkv", "kv-proj") against the float64 reference (CPU, fp32): every
plan, prefill then decode steps, dropped KV cache or recurrent state, fused and separate projections, training."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from oryx_core.config import OryxConfig, preset
from oryx_core.plan import ModePlan
from oryx_core.reference import Stepper
from oryx_core.spec import parameter_counts, parameter_specs
from oryx_torch.model import OryxMixer, OryxModel
from error_metrics import relative_error
from torch_models import build, mixed_modes, run

TOL = 1e-4
SHARINGS = ["kv", "none", "qkv", "kv-proj"]


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
@pytest.mark.parametrize("sharing", SHARINGS)
def test_forward_matches_reference_in_every_plan(mixer, sharing):
    cfg = preset("tiny", mixer, sharing=sharing, conv_bias=True)
    model, ref = build(cfg, seed=31)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {s.name: s.shape for s in parameter_specs(cfg)}
    assert sum(p.numel() for p in model.parameters()) == parameter_counts(cfg)["total"]
    rng = np.random.default_rng(32)  # fresh inputs
    B, T = 2, 21
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    plans = {"A": np.ones(T, bool), "R": np.zeros(T, bool), "mixed": mixed_modes(rng, B, T),
             "per_layer": rng.random((cfg.n_layers, B, T)) < 0.5}
    out = {}
    for name, modes in plans.items():
        want = ref.forward(tokens, modes)[0]
        for fused in (True, False) if name == "mixed" else (True,):
            OryxMixer.fuse_projections = fused
            try:
                out[name] = run(model, tokens, modes)
            finally:
                OryxMixer.fuse_projections = True
            assert relative_error(out[name], want) < TOL, (name, fused)
    assert relative_error(out["A"], out["R"]) > 1e-2


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
@pytest.mark.parametrize("sharing", SHARINGS)
def test_prefill_then_steps_match_reference(mixer, sharing):
    cfg = preset("tiny", mixer, sharing=sharing)
    model, ref = build(cfg, seed=33)
    rng = np.random.default_rng(34)
    B, P, T = 2, 9, 22
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    modes = mixed_modes(rng, B, T)
    want = ref.forward(tokens, modes)[0]
    cache = model.make_cache(B, T)
    pieces = [run(model, tokens[:, :P], modes[:, :P], cache), run(model, tokens[:, P:P + 5], modes[:, P:P + 5], cache)]
    with torch.no_grad():
        for t in range(P + 5, T):
            pieces.append(model.step(torch.tensor(tokens[:, t]), torch.tensor(modes[:, t]), cache).numpy()[:, None])
    assert relative_error(np.concatenate(pieces, 1), want) < TOL
    stepper, cache = Stepper(ref, 1), model.make_cache(1, 10)  # steps alone, the reference's stepper
    for t in range(10):
        token, is_attention = rng.integers(0, cfg.vocab_size, 1), bool(t % 3 == 0)
        with torch.no_grad():
            got = model.step(torch.tensor(token), is_attention, cache).numpy()
        assert relative_error(got, stepper.step(token, is_attention)) < TOL, t


@pytest.mark.parametrize("sharing", ["none", "qkv", "kv-proj"])
def test_dropping_either_part_keeps_the_logits(sharing):
    cfg = preset("tiny", "gdn", sharing=sharing)
    model, ref = build(cfg, seed=35)
    rng = np.random.default_rng(36)
    P, T = 6, 14
    tokens = rng.integers(0, cfg.vocab_size, (1, T))
    for plan, drop, mode in (("A:0-6,R:6-", "drop_kv", False), ("R:0-6,A:6-", "drop_recurrent", True)):
        modes = ModePlan.parse(plan).resolve(T)
        want = ref.forward(tokens, modes)[0]
        cache = model.make_cache(1, T)
        out = [run(model, tokens[:, :P], modes[:P], cache)[0]]
        getattr(cache, drop)()
        with torch.no_grad():
            for t in range(P, T):
                out.append(model.step(torch.tensor(tokens[:, t]), mode, cache).numpy())
        assert relative_error(np.concatenate(out)[None], want) < TOL, plan
        if drop == "drop_recurrent":
            assert not set(cache.layers[0].conv) & {"q", "k_rec", "v_rec"}


@pytest.mark.parametrize("sharing", SHARINGS)
def test_mixed_training_step_reaches_every_weight(sharing):
    """A mixed plan's loss has a gradient on every tensor (the recurrence's own k/v too); a pure plan's only on the
    tensors its mode reads."""
    cfg = preset("tiny", "mamba2", sharing=sharing)
    model = OryxModel(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    modes = {s.name: s.mode for s in parameter_specs(cfg)}
    for plan, reached in (("every:2:4", {"shared", "attention", "recurrent"}), ("attention", {"shared", "attention"}),
                          ("recurrent", {"shared", "recurrent"})):
        model.zero_grad(set_to_none=True)
        model(tokens, torch.tensor(ModePlan.parse(plan).resolve(8))).logsumexp(-1).mean().backward()
        got = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        want = {name for name, mode in modes.items() if mode in reached}
        assert got == want, (plan, sorted(got ^ want)[:4])


def test_fused_decode_kernels_under_triton_interpreter():
    """The CUDA decode path (Triton decode steps, the KV append fused into them) for the other sharings (test_model.py
    checks the default), run by Triton's CPU interpreter in a subprocess."""
    pytest.importorskip("triton")
    here = os.path.abspath(__file__)
    tests_dir = os.path.dirname(os.path.dirname(here))
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (os.path.join(tests_dir, "core"), os.path.dirname(here),
                                                           os.environ.get("PYTHONPATH")) if p)}
    code = ("import sys, importlib.util; "
            "spec = importlib.util.spec_from_file_location('sharing_test', sys.argv[1]); "
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
            "module.fused_decode_check()")
    result = subprocess.run([sys.executable, "-c", code, here], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok") == 6, result.stdout


def fused_decode_check():
    """Run under TRITON_INTERPRET=1: prefill, then decode steps switching modes, against the reference."""
    from oryx_torch.generate import DecodeRunner

    for sharing in ("none", "qkv", "kv-proj"):
        for mixer in ("gdn", "mamba2"):
            cfg = OryxConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                             value_head_dim=32, mlp_hidden=0, mixer=mixer, sharing=sharing)
            model, ref = build(cfg, seed=37)
            tokens = np.random.default_rng(38).integers(0, cfg.vocab_size, (1, 11))
            modes = np.array([1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 1], bool)
            cache = model.make_cache(1, 11)
            out = [run(model, tokens[:, :5], modes[:5], cache)[0]]
            runner = DecodeRunner(model, cache)
            with torch.no_grad():
                for t in range(5, 11):
                    out.append(runner.step([int(tokens[0, t])], modes[t:t + 1]).numpy().copy())
            error = relative_error(np.concatenate(out), ref.forward(tokens, modes)[0][0])
            assert error < TOL, (sharing, mixer, error)
            print("ok", sharing, mixer)


@pytest.mark.gpu
@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
@pytest.mark.parametrize("sharing", ["none", "qkv", "kv-proj"])
def test_cuda_paths_match_reference(mixer, sharing):
    """On CUDA: FlexAttention (mixed per-sequence plan) and the Triton recurrences forward, a bf16-autocast training
    step reaching every tensor, prefill + CUDA-graph decode switching A -> R -> A."""
    from oryx_torch.generate import DecodeRunner

    cfg = OryxConfig(vocab_size=300, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                     value_head_dim=64, mlp_hidden=256, max_context=1024, mixer=mixer, sharing=sharing)
    model, ref = build(cfg, seed=39)
    model = model.cuda()
    rng = np.random.default_rng(40)
    B, T = 2, 300
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    for modes in (mixed_modes(rng, B, T), np.ones(T, bool), np.zeros(T, bool)):
        with torch.no_grad():
            got = model(torch.tensor(tokens), torch.tensor(modes)).cpu().numpy()
        assert relative_error(got, ref.forward(tokens, modes)[0]) < TOL
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(torch.tensor(tokens).cuda(), torch.tensor(mixed_modes(rng, B, T))).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    P, steps = 200, 60
    modes = np.concatenate([np.ones(P + 10, bool), np.zeros(30, bool), np.ones(20, bool)])
    cache = model.make_cache(1, P + steps)
    with torch.no_grad():
        logits = [model(torch.tensor(tokens[:1, :P]), modes[:P], cache=cache)[0]]
        runner = DecodeRunner(model, cache, cuda_graphs=True)
        for t in range(P, P + steps):
            logits.append(runner.step([int(tokens[0, t])], modes[t:t + 1]).clone())
    got = torch.cat([logits[0], torch.cat(logits[1:])]).cpu().numpy()
    assert relative_error(got, ref.forward(tokens[:1, :P + steps], modes)[0][0]) < TOL
