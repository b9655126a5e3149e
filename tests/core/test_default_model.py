"""The embedded default model: loadable, within the size limits, and actually trained."""
import math

import pytest

from oryx_core.default import DEFAULT_MODEL
from oryx_core.evaluate import evaluate_text
from oryx_core.spec import parameter_counts
from oryx_core.weights import load_checkpoint

MiB = 2 ** 20


def test_default_model_loads_with_checksums_and_fits_the_limits():
    ckpt = load_checkpoint(DEFAULT_MODEL)  # verifies every shard's sha256, names, shapes, dtype
    shards = sorted(DEFAULT_MODEL.glob("model-*.safetensors"))
    assert shards and all(f.stat().st_size <= 16 * MiB for f in shards)
    assert ckpt.size_on_disk() <= 64 * MiB
    assert (DEFAULT_MODEL / "tokenizer.json").exists()
    assert parameter_counts(ckpt.config)["tied_fraction"] >= 0.90


@pytest.mark.parametrize("plan", ["attention", "recurrent"])
def test_default_model_is_trained(plan):
    """Held-out text scores far below the uniform guess (perplexity = vocab size) in both modes."""
    text = (DEFAULT_MODEL.parents[1] / "data" / "heldout.txt").read_text()
    r = evaluate_text(DEFAULT_MODEL, text, plan=plan, backend="reference", max_tokens=160)
    assert r["tokens"] == 159
    assert r["perplexity"] < 150 < math.exp(math.log(load_checkpoint(DEFAULT_MODEL).config.vocab_size))
