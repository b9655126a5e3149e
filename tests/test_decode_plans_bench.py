"""bench/decode_plans_cpu.py's synthetic context: on either backend, a cache filled to N tokens that way holds as many
tokens and bytes as one a real N-token prompt filled, and decoding continues from it under every plan."""

import numpy as np
import pytest

from oryx_core.backend import get_backend
from oryx_core.config import preset
from oryx_core.generation import stream_generate
from oryx_core.init import init_params
from oryx_core.plan import ModePlan
from oryx_core.weights import save_checkpoint
from bench_scripts import load_bench_script


def bench_module():
    return load_bench_script("decode_plans_cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = preset("tiny")
    return save_checkpoint(tmp_path_factory.mktemp("bench") / "tiny", cfg, init_params(cfg, 4))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("plan", ["attention", "recurrent", "prefill-attention", "last:10%", "every:4:64"])
def test_synthetic_context_matches_a_real_prompt(checkpoint, backend, plan):
    pytest.importorskip({"torch": "torch", "mlx": "mlx.core"}[backend])
    bench = bench_module()
    model = get_backend(backend).load(checkpoint, device="cpu", dtype="float32")
    context, tokens = 300, 4
    ids = [int(t) for t in np.random.default_rng(0).integers(0, 256, context)]
    options = dict(kv_policy="drop", state_policy="drop", stop_token_ids=[], stop_at_end_of_text=False)
    real = list(stream_generate(model, None, ids, tokens, plan, **options))[-1].stats
    cache = bench.synthetic_context(backend, model, ids[:-1], ModePlan.parse(plan), context + tokens)
    assert model.cache_length(cache) == context - 1
    synthetic = list(stream_generate(model, None, ids[-1:], tokens, plan, prompt_cache=cache, **options))[-1].stats
    assert synthetic.generation_tokens == real.generation_tokens == tokens
    assert synthetic.cache_bytes == real.cache_bytes > 0
    assert model.cache_length(cache) == context + tokens - 1
