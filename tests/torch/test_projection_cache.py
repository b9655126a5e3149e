"""The concatenated projections a no-grad call caches (OryxMixer and SwiGLU `_fused_weight`) follow the weights
through training, including writes that do not bump a tensor's version (the fused AdamW, `.data`): an evaluation
after training steps scores the current weights, as a fresh model holding them does."""
import numpy as np
import torch

from oryx_core.config import preset
from oryx_torch.model import OryxModel
from torch_models import build, mixed_modes, run


def unversioned_training_step(model, rng):
    """model.train(), then every weight moved in place without bumping its version (what the fused AdamW does)."""
    model.train()
    with torch.no_grad():
        for param in model.parameters():
            param.data.add_(torch.from_numpy(rng.standard_normal(param.shape).astype(np.float32)) * 0.05)
    model.eval()


def test_evaluation_after_unversioned_weight_writes_reads_the_current_weights():
    cfg = preset("tiny", "gdn")
    model, _ = build(cfg)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, cfg.vocab_size, (2, 24))
    modes = mixed_modes(rng, 2, 24)
    run(model, tokens, modes)                      # the first no-grad call caches the concatenations
    for _ in range(2):
        unversioned_training_step(model, rng)
        got = run(model, tokens, modes)
        fresh = OryxModel(cfg, seed=None)
        fresh.load_state_dict(model.state_dict())
        expected = run(fresh.eval(), tokens, modes)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_generation_keeps_its_cache_in_eval_mode():
    """Outside training (eval mode throughout, as generation and serving run) the cached concatenation is built once
    and reused: a CUDA graph captured on it keeps reading live memory."""
    cfg = preset("tiny", "gdn")
    model, _ = build(cfg)
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, cfg.vocab_size, (1, 8))
    run(model, tokens, np.ones((1, 8), bool))
    cached = [m._fused[1] for m in model.modules() if getattr(m, "_fused", None) is not None]
    assert cached
    model.eval()
    run(model, tokens, np.zeros((1, 8), bool))
    again = [m._fused[1] for m in model.modules() if getattr(m, "_fused", None) is not None]
    assert all(a is b for a, b in zip(cached, again)) and len(again) == len(cached)
