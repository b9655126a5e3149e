"""The MLX KV cache grows in steps of KV_GROWTH tokens: a prompt fed in pieces of any size, one that crosses the
buffer's end from inside it included, leaves the same cache and logits as the prompt fed whole."""
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from oryx_core.config import preset  # noqa: E402
from oryx_core.init import init_params  # noqa: E402
from oryx_mlx.cache import KV_GROWTH  # noqa: E402
from oryx_mlx.model import OryxModel  # noqa: E402


@pytest.fixture(scope="module")
def model():
    cfg = preset("tiny")
    m = OryxModel(cfg)
    m.load_weights([(k, mx.array(v)) for k, v in init_params(cfg, 3).items()], strict=True)
    return m


@pytest.mark.parametrize("pieces", [[10, 300], [KV_GROWTH - 1, 2, 40], [KV_GROWTH, KV_GROWTH + 1], [1, 2 * KV_GROWTH]])
def test_prompt_in_pieces_equals_prompt_whole(model, pieces):
    length = sum(pieces)
    tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (1, length))
    modes = np.ones((1, length), dtype=bool)
    whole = model.make_cache()
    want = model(mx.array(tokens), modes, cache=whole)
    split, start, got = model.make_cache(), 0, []
    for n in pieces:
        got.append(model(mx.array(tokens[:, start:start + n]), modes[:, start:start + n], cache=split))
        start += n
    got = mx.concatenate(got, axis=1)
    assert np.abs(np.array(got) - np.array(want)).max() < 1e-4
    for a, b in zip(split, whole):
        assert a.offset == b.offset == length and a.keys.shape[2] >= length and a.keys.shape[2] % KV_GROWTH == 0
        assert np.array_equal(np.array(a.keys[:, :, :length]), np.array(b.keys[:, :, :length]))
