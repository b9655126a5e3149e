"""The torch backend's prefill returns the last position's logits in memory of their own: the logits of the
whole prompt piece ([B, T, vocab], 192 MiB for 1K tokens of a 49K vocabulary in fp32) are freed before decoding."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from oryx_core.backend import get_backend  # noqa: E402
from oryx_core.config import preset  # noqa: E402
from oryx_core.init import init_params  # noqa: E402
from oryx_core.weights import save_checkpoint  # noqa: E402


def test_prefill_logits_hold_only_the_last_position(tmp_path):
    cfg = preset("tiny")
    model = get_backend("torch").load(save_checkpoint(tmp_path / "tiny", cfg, init_params(cfg, 1)), device="cpu")
    tokens = np.arange(1, 41, dtype=np.int64)[None]
    cache = model.make_cache(1)
    logits = model.prefill(cache, tokens, np.ones((1, 40), dtype=bool))
    assert tuple(logits.shape) == (1, cfg.vocab_size)
    assert logits.untyped_storage().nbytes() == cfg.vocab_size * logits.element_size()
    np.testing.assert_allclose(logits.numpy(), model.forward(tokens, np.ones((1, 40), dtype=bool))[:, -1],
                               rtol=1e-5, atol=1e-5)
