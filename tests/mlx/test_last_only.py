"""MLX: a prompt read before sampling projects only its last token onto the vocabulary (last_only), with the
logits of the whole forward's last row; the backend's prefill returns that row."""
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from oryx_core.config import preset  # noqa: E402
from oryx_core.init import init_params  # noqa: E402
from oryx_core.reference import OryxReference  # noqa: E402
from oryx_mlx.backend import MLXModel  # noqa: E402
from oryx_mlx.model import OryxModel  # noqa: E402


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_last_only_is_the_last_row(mixer):
    cfg = preset("tiny", mixer)
    params = {k: v * 8 if v.ndim == 2 else v for k, v in init_params(cfg, seed=3).items()}
    model = OryxModel(cfg)
    model.load_weights([(k, mx.array(v)) for k, v in params.items()], strict=True)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, 9))
    modes = rng.random((2, 9)) < 0.5
    full = np.array(model(mx.array(tokens), modes))
    last = np.array(model(mx.array(tokens), modes, last_only=True))
    assert last.shape == (2, 1, cfg.vocab_size)
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-6)
    backend = MLXModel(model)
    got = np.array(backend.prefill(backend.make_cache(2, 9), tokens, modes))
    want = OryxReference(cfg, params).forward(tokens, modes)[0][:, -1]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
