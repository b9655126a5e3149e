"""The PyTorch model under each `sharing` ("kv", "none", "qkv") against the float64 reference (CPU, fp32): every
plan, prefill then decode steps, dropped KV cache or recurrent state, fused and separate projections, training."""
import numpy as np
import pytest
import torch

from oryx_core.config import preset
from oryx_core.plan import ModePlan
from oryx_core.reference import OryxReference, Stepper
from oryx_core.spec import parameter_counts, parameter_specs
from oryx_torch.model import OryxMixer, OryxModel
from model_params import lively_params
from error_metrics import relative_error

TOL = 1e-4
SHARINGS = ["kv", "none", "qkv"]


def build(cfg, seed=1):
    params = lively_params(cfg, seed)
    model = OryxModel(cfg, seed=None)
    model.load_params(params)
    return model.eval(), OryxReference(cfg, params)


def run(model, tokens, modes, cache=None):
    with torch.no_grad():
        return model(torch.tensor(tokens), torch.tensor(np.asarray(modes)), cache=cache).numpy()


def chunked_modes(rng, B, T):
    return np.repeat(rng.random((B, -(-T // 4))) < 0.5, 4, axis=1)[:, :T]


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
    plans = {"A": np.ones(T, bool), "R": np.zeros(T, bool), "mixed": chunked_modes(rng, B, T),
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
    modes = chunked_modes(rng, B, T)
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


@pytest.mark.parametrize("sharing", ["none", "qkv"])
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
