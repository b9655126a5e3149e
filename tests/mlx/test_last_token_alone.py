"""MLX: an all-attention prompt whose caller reads only the last token's logits (last_only) computes the last layer for
that token alone (its query, one unmasked attention row, output and MLP) while the cache still takes every token:
logits against the float64 reference and the full computation, and every cache array against the full
computation's, fresh and continued caches, state dropped and kept, over block variants."""
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from oryx_mlx.cache import drop_recurrent  # noqa: E402
from oryx_mlx.model import OryxMixer  # noqa: E402
from error_metrics import relative_error  # noqa: E402
from mlx_models import perturbed_gdn  # noqa: E402

TOL = 1e-4    # a model's logits against the float64 reference
SAME = 1e-5   # against the full computation: the same function up to rounding

VARIANTS = {"default": {}, "gate_norm_all": dict(o_norm_grouping="all", gate_before_norm=True),
            "no_gate_no_norm_no_rope": dict(output_gate=False, output_norm=False, rope=False),
            "llama_like": dict(output_gate=False, output_norm=False, conv_activation="none", n_kv_heads=2)}


def cache_arrays(cache):
    return [np.array(a) for layer in cache for a in (layer.keys, layer.values, layer.conv, layer.recurrent)
            if a is not None]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_last_token_alone_against_reference(variant, monkeypatch):
    model, ref = perturbed_gdn(VARIANTS[variant], seed=5)
    tokens = np.random.default_rng(5).integers(0, model.cfg.vocab_size, (2, 40))
    want = ref.forward(tokens, np.ones((2, 40), bool))[0][:, -1]
    calls = []
    last_query = OryxMixer.last_query
    monkeypatch.setattr(OryxMixer, "last_query", lambda self, *a: calls.append(1) or last_query(self, *a))
    for keep_state in (False, True):
        logits, caches = [], []
        for last_only in (True, False):
            cache = model.make_cache()
            if not keep_state:
                drop_recurrent(cache)
            model(mx.array(tokens[:, :25]), True, cache, last_only=last_only)
            out = model(mx.array(tokens[:, 25:]), True, cache, last_only=last_only)
            logits.append(np.array(out[:, -1]))
            caches.append(cache_arrays(cache))
        assert relative_error(logits[0], want) < TOL
        assert relative_error(logits[0], logits[1]) < SAME
        assert len(caches[0]) == len(caches[1]) > 0
        for a, b in zip(*caches):
            assert relative_error(a, b) < SAME
    assert len(calls) == 4  # the last layer of each last_only call, and of no other call
