"""Generation with the PyTorch model (CPU): sampling, determinism, greedy == reference argmax, stops, KV drop, CLI."""
import json

import numpy as np
import pytest
import torch

from oryx_core.cli import main
from error_metrics import relative_error


def oryx_main(argv) -> int:
    """`oryx` in-process: its exit status, argparse's refusals (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code
from oryx_core.config import preset
from oryx_core.init import init_params
from oryx_core.plan import ModePlan
from oryx_core.reference import OryxReference
from oryx_core.tokenizer import byte_level_tokenizer, end_of_text_id
from oryx_core.generation import SamplingParams
from oryx_torch.generate import apply_repetition_penalty, generate, sample, stream_generate
from oryx_torch.model import OryxModel


def tiny_model(matrix_scale: float):
    """(torch model, float64 reference, tokenizer) of the tiny preset, its non-embedding matrices
    scaled up from their init scale by `matrix_scale`."""
    cfg = preset("tiny", "gdn")
    params = {n: (p * matrix_scale if p.ndim == 2 and "embed" not in n else p) for n, p in init_params(cfg, 11).items()}
    model = OryxModel(cfg, seed=None)
    model.load_params(params)
    return model.eval(), OryxReference(cfg, params), byte_level_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(8)


def test_greedy_is_reference_argmax(tiny):
    model, ref, tok = tiny
    prompt = tok.encode("Oryx mixes modes").ids
    for plan in ("prefill-attention", "A:0-4,R:4-20,A:20-"):
        tokens = generate(model, tok, prompt, 12, plan, stop_at_end_of_text=False).tokens
        sequence = np.array([prompt + tokens])
        modes = ModePlan.parse(plan).resolve(len(prompt) + 12, prompt_length=len(prompt))[:sequence.shape[1]]
        logits = ref.forward(sequence, modes)[0][0]
        expected = logits[len(prompt) - 1:-1].argmax(-1)
        np.testing.assert_array_equal(tokens, expected, err_msg=plan)


def test_repetition_penalty_greedy_is_penalised_reference_argmax():
    # at init scale the tiny model repeats one token, which the penalty has to break
    model, ref, tok = tiny_model(1)
    prompt, penalty, plan = tok.encode("Oryx mixes modes").ids, 5.0, "A:0-4,R:4-20,A:20-"
    tokens = generate(model, tok, prompt, 12, plan, repetition_penalty=penalty, stop_at_end_of_text=False).tokens
    modes = ModePlan.parse(plan).resolve(len(prompt) + 12, prompt_length=len(prompt))
    expected = []
    for _ in range(12):
        sequence = prompt + expected
        logits = ref.forward(np.array([sequence]), modes[:len(sequence)])[0][0][-1].copy()
        seen = sorted(set(sequence))
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
        expected.append(int(logits.argmax()))
    assert tokens == expected
    assert tokens != generate(model, tok, prompt, 12, plan, stop_at_end_of_text=False).tokens  # it acts here


def test_apply_repetition_penalty_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0], [4.0, 4.0, -1.0]])
    seen = torch.tensor([True, True, False])
    np.testing.assert_allclose(apply_repetition_penalty(logits, seen, 2.0), [[1.0, -4.0, 1.0], [2.0, 2.0, -1.0]])
    assert apply_repetition_penalty(logits, seen, 1.0) is logits
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0.0)


def test_seeded_sampling_is_deterministic(tiny):
    model, _, tok = tiny
    run = lambda seed: generate(model, tok, "abc", 16, temperature=1.0, top_k=50, top_p=0.9, seed=seed,  # noqa: E731
                                stop_at_end_of_text=False)
    first, again, other = run(1), run(1), run(2)
    assert first.tokens == again.tokens and len(first.tokens) == 16
    assert first.tokens != other.tokens


def test_sample_filters():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]]).repeat(200, 1)
    assert torch.all(sample(logits, 0.0, 0, 1.0, gen) == 4)
    top2 = sample(logits, 5.0, 2, 1.0, gen)
    assert set(top2.tolist()) == {3, 4}
    nucleus = sample(torch.tensor([[0.0, 0.0, 5.0, 5.0]]).repeat(200, 1), 1.0, 0, 0.5, gen)
    assert set(nucleus.tolist()) <= {2, 3}
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_stop_token_and_stop_string(tiny):
    model, _, tok = tiny
    free = generate(model, tok, "xyz", 10, stop_at_end_of_text=False)
    assert free.stats.finish_reason == "length" and len(free.tokens) == 10
    third = free.tokens[2]
    stopped = generate(model, tok, "xyz", 10, stop_token_ids={third})
    assert stopped.stats.finish_reason == "stop_token"
    assert stopped.tokens == free.tokens[:free.tokens.index(third)]
    stop = free.text[3:5]
    cut = generate(model, tok, "xyz", 10, stop_at_end_of_text=False, stop_strings=[stop])
    assert cut.stats.finish_reason == "stop_string" and cut.text == free.text[:free.text.find(stop)]
    assert end_of_text_id(tok) is not None


def test_stream_pieces_join_to_text(tiny):
    model, _, tok = tiny
    pieces = list(stream_generate(model, tok, "héllo wörld", 24, temperature=0.7, seed=3, stop_at_end_of_text=False))
    whole = generate(model, tok, "héllo wörld", 24, temperature=0.7, seed=3, stop_at_end_of_text=False)
    assert "".join(p.text for p in pieces) == whole.text
    assert whole.stats.generation_tokens == 24 and whole.stats.prompt_tokens == len(tok.encode("héllo wörld").ids)


def test_kv_drop_same_tokens(tiny):
    model, _, tok = tiny
    keep = generate(model, tok, "drop me", 12, plan="prefill-attention", kv_policy="keep", stop_at_end_of_text=False)
    drop = generate(model, tok, "drop me", 12, plan="prefill-attention", kv_policy="drop", stop_at_end_of_text=False)
    assert keep.tokens == drop.tokens
    assert drop.stats.cache_bytes < keep.stats.cache_bytes
    # dropped mid-decode (prompt of 7 tokens, attention until 10), and with attention coming back: never dropped
    for plan in ("A:0-10,R:10-", "A:0-3,R:3-9,A:9-"):
        keep = generate(model, tok, "drop me", 12, plan=plan, kv_policy="keep", stop_at_end_of_text=False)
        drop = generate(model, tok, "drop me", 12, plan=plan, kv_policy="drop", stop_at_end_of_text=False)
        assert keep.tokens == drop.tokens
        assert (drop.stats.cache_bytes < keep.stats.cache_bytes) == plan.startswith("A:0-10")


def test_state_drop_same_tokens(tiny):
    model, _, tok = tiny
    # attention from token 9 on: the recurrent state is freed once the prompt (7 tokens) and 2 more are in
    plan = "R:0-9,A:9-"
    keep = generate(model, tok, "drop me", 12, plan=plan, state_policy="keep", stop_at_end_of_text=False)
    drop = generate(model, tok, "drop me", 12, plan=plan, state_policy="drop", stop_at_end_of_text=False)
    assert keep.tokens == drop.tokens
    cfg = model.cfg
    state_bytes = cfg.n_layers * cfg.n_heads * cfg.head_dim * (cfg.v_head_dim * 4 + (cfg.conv_width - 1) * 4)
    assert keep.stats.cache_bytes - drop.stats.cache_bytes == state_bytes
    # "auto" drops from the call's own cache too; a plan whose recurrence comes back never drops
    assert generate(model, tok, "drop me", 12, plan=plan, stop_at_end_of_text=False).stats.cache_bytes == \
        drop.stats.cache_bytes
    back = generate(model, tok, "drop me", 12, plan="R:0-9,A:9-12,R:12-", state_policy="drop",
                    stop_at_end_of_text=False)
    assert back.stats.cache_bytes == keep.stats.cache_bytes


def step_by_step_and_ahead(model, tok, prompt, n, **kwargs):
    """oryx_core.generation.generate on the same model twice: with greedy_chain taken away (a sampled token fed
    back from the host each step) and as it is (greedy tokens run ahead on the device); also how many chains the
    second asked for."""
    from oryx_core import generation
    from oryx_torch.backend import TorchModel

    plain = TorchModel(model)
    plain.greedy_chain = None
    ahead, made = TorchModel(model), []
    chain = ahead.greedy_chain
    ahead.greedy_chain = lambda cache: made.append(cache) or chain(cache)
    return (generation.generate(plain, tok, prompt, n, **kwargs), generation.generate(ahead, tok, prompt, n, **kwargs),
            len(made))


@pytest.mark.parametrize("kwargs", [dict(plan="prefill-attention", kv_policy="drop"),
                                    dict(plan="R:0-9,A:9-", state_policy="drop"),
                                    dict(plan="A:0-3,R:3-9,A:9-"), dict(plan="every:2:1", max_tokens=1)])
def test_greedy_tokens_run_ahead_with_the_same_result(tiny, kwargs):
    model, _, tok = tiny
    kwargs = dict(dict(max_tokens=12, stop_at_end_of_text=False), **kwargs)
    n = kwargs.pop("max_tokens")
    plain, ahead, chains = step_by_step_and_ahead(model, tok, "drop me", n, **kwargs)
    assert chains == 1 and plain.tokens == ahead.tokens and len(ahead.tokens) == n
    assert plain.text == ahead.text and ahead.stats.finish_reason == "length"
    assert plain.stats.cache_bytes == ahead.stats.cache_bytes


def test_greedy_run_ahead_stops_where_step_by_step_does(tiny):
    model, _, tok = tiny
    free = generate(model, tok, "xyz", 10, stop_at_end_of_text=False)
    third = free.tokens[2]
    plain, ahead, chains = step_by_step_and_ahead(model, tok, "xyz", 10, stop_token_ids={third})
    assert chains == 1 and ahead.stats.finish_reason == "stop_token" and plain.tokens == ahead.tokens
    stop = free.text[3:5]
    plain, ahead, _ = step_by_step_and_ahead(model, tok, "xyz", 10, stop_at_end_of_text=False, stop_strings=[stop])
    assert ahead.stats.finish_reason == "stop_string" and plain.text == ahead.text == free.text[:free.text.find(stop)]


def test_sampling_penalties_and_prompt_caches_go_step_by_step(tiny):
    """Only greedy decoding on the call's own cache runs ahead: a caller's cache must end without the last token."""
    from oryx_core import generation
    from oryx_torch.backend import TorchModel

    model, _, tok = tiny
    for kwargs in (dict(temperature=0.7, seed=1), dict(repetition_penalty=1.3)):
        _, _, chains = step_by_step_and_ahead(model, tok, "xyz", 6, stop_at_end_of_text=False, **kwargs)
        assert chains == 0, kwargs
    backend = TorchModel(model)
    made = []
    chain = backend.greedy_chain
    backend.greedy_chain = lambda cache: made.append(cache) or chain(cache)
    cache = backend.make_cache(1, 64)
    prompt = tok.encode("xyz").ids
    first = generation.generate(backend, tok, prompt, 5, "recurrent", stop_at_end_of_text=False, prompt_cache=cache)
    assert not made and backend.cache_length(cache) == len(prompt) + 4  # the last token is not in it yet
    whole = generate(model, tok, prompt + first.tokens, 3, "recurrent", stop_at_end_of_text=False)
    second = generation.generate(backend, tok, first.tokens[-1:], 3, "recurrent", stop_at_end_of_text=False,
                                 prompt_cache=cache)
    assert second.tokens == whole.tokens


def test_dropped_parts_refuse_their_mode(tiny):
    model, _, _ = tiny
    with torch.inference_mode():
        cache = model.make_cache(1, 8)
        model(torch.tensor([[1, 2, 3]]), torch.tensor([True, True, True]), cache=cache)
        assert not cache.layers[0].recurrent_dropped
        cache.drop_recurrent()
        assert cache.layers[0].recurrent_dropped and not cache.layers[0].kv_dropped
        model.step(torch.tensor([4]), True, cache)  # attention still runs
        with pytest.raises(ValueError, match="recurrent-mode token at position >= 4 after the recurrent state"):
            model.step(torch.tensor([5]), False, cache)
        cache.drop_kv()
        with pytest.raises(ValueError, match="attention-mode token at position >= 4 after the KV cache"):
            model(torch.tensor([[5]]), torch.tensor([True]), cache=cache)


def test_prefill_chunks_do_not_change_tokens(tiny):
    model, _, tok = tiny
    whole = generate(model, tok, "a longer prompt of text", 8, plan="last:30%", stop_at_end_of_text=False)
    chunked = generate(model, tok, "a longer prompt of text", 8, plan="last:30%", stop_at_end_of_text=False, prefill_step_size=5)
    assert whole.tokens == chunked.tokens


def test_cli_generate(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert oryx_main(["init", str(ck), "--preset", "tiny"]) == 0
    capsys.readouterr()
    args = ["generate", str(ck), "--prompt", "Hi", "--max-tokens", "6", "--temperature", "0.9", "--seed", "4"]
    assert oryx_main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["generation_tokens"] == 6 or result["finish_reason"] != "length"
    assert result["backend"] == "torch" and len(result["tokens"]) == result["generation_tokens"]
    assert oryx_main(args) == 0
    assert capsys.readouterr().out.rstrip("\n") == result["text"]
    assert oryx_main(args + ["--top-p", "1.5"]) == 2
    assert "--top-p: must be <= 1.0" in capsys.readouterr().err
    assert oryx_main(["generate", str(ck), "--prompt", "Hi", "--plan", "A:0-2"]) == 2
    assert "plan" in capsys.readouterr().err
    assert oryx_main(args + ["--state-policy", "drop", "--json"]) == 0  # prefill-attention: the state stays needed
    assert json.loads(capsys.readouterr().out)["tokens"] == result["tokens"]
    assert oryx_main(args + ["--repetition-penalty", "-1"]) == 2
    assert "--repetition-penalty: must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_bfloat16_decode_on_cpu_tracks_float32(mixer):
    """Regression: the CPU step path once returned fp32 recurrent outputs into bf16 projections."""
    from oryx_torch.generate import DecodeRunner

    cfg = preset("tiny", mixer)
    params = init_params(cfg, 3)
    plan = ModePlan.parse("A:0-4,R:4-7,A:7-")
    prompt, steps = [5, 17, 99, 3], [42, 7, 250, 11, 60]
    modes = plan.resolve(len(prompt) + len(steps))
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = OryxModel(cfg, seed=None)
        model.load_params(params)
        model = model.to(dtype).eval()
        with torch.inference_mode():
            cache = model.make_cache(1, len(prompt) + len(steps))
            out = [model(torch.tensor([prompt]), modes[None, :len(prompt)], cache=cache)[:, -1]]
            runner = DecodeRunner(model, cache, cuda_graphs=False)
            for i, token in enumerate(steps[:-1]):
                out.append(runner.step([token], modes[len(prompt) + i:len(prompt) + i + 1]))
        logits[dtype] = torch.cat(out).float()
    assert relative_error(logits[torch.bfloat16], logits[torch.float32]) < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_cuda_graph_generation_with_drops_matches_cpu(mixer):
    """On CUDA (Triton decode step, graph per step variant, variants released after a drop) every policy gives
    the CPU's greedy tokens, with and without CUDA graphs."""
    cfg = preset("tiny", mixer).replace(head_dim=32)  # the Triton kernels take heads of 16 to 256
    params = {n: (p * 8 if p.ndim == 2 and "embed" not in n else p) for n, p in init_params(cfg, 11).items()}
    models = {}
    for device in ("cpu", "cuda"):
        models[device] = OryxModel(cfg, seed=None)
        models[device].load_params(params)
        models[device] = models[device].to(device).eval()
    tok = byte_level_tokenizer()
    cases = [("A:0-4,R:4-14,A:14-", {}), ("A:0-14,R:14-", dict(kv_policy="drop")),
             ("R:0-14,A:14-", dict(state_policy="drop")), ("prefill-attention", dict(kv_policy="drop"))]
    for plan, policy in cases:
        want = generate(models["cpu"], tok, "Oryx on a GPU", 16, plan, stop_at_end_of_text=False, **policy)
        for graphs in (False, True):
            got = generate(models["cuda"], tok, "Oryx on a GPU", 16, plan, stop_at_end_of_text=False,
                           cuda_graphs=graphs, **policy)
            assert got.tokens == want.tokens, (plan, policy, graphs)
            assert got.stats.peak_memory_bytes > 0 and got.stats.cache_bytes == want.stats.cache_bytes


def pooled_backend(model):
    """A TorchModel that pools its caches on the CPU too (the default pools only where CUDA graphs run), with the
    caches its make_cache handed out, in order."""
    from oryx_torch.backend import TorchModel

    backend, made = TorchModel(model, pool_caches=True), []
    make = backend.make_cache
    backend.make_cache = lambda *a, **k: made.append(make(*a, **k)) or made[-1]
    return backend, made


@pytest.mark.parametrize("first, policy", [("attention", {}), ("prefill-attention", dict(kv_policy="drop")),
                                           ("R:0-14,A:14-", dict(state_policy="drop"))])
def test_pooled_cache_is_reused_emptied(tiny, first, policy):
    """A cache given back after a call (its parts dropped by the call's policy) comes back to the next call of a
    fitting size, emptied, and that call gives a fresh cache's tokens; a call that needs more than it holds, or
    less than half, gets a new one."""
    from oryx_core import generation

    model, _, tok = tiny
    backend, made = pooled_backend(model)
    kwargs = dict(stop_at_end_of_text=False)
    generation.generate(backend, tok, "the first text", 12, first, **kwargs, **policy)
    for plan in ("recurrent", "A:0-3,R:3-9,A:9-", "attention"):
        want = generate(model, tok, "another prompt", 9, plan, **kwargs)
        got = generation.generate(backend, tok, "another prompt", 9, plan, **kwargs)
        assert got.tokens == want.tokens, plan
        assert made[-1] is made[0] and got.stats.cache_bytes >= want.stats.cache_bytes
    generation.generate(backend, tok, "a", 2, "recurrent", **kwargs)  # 3 tokens: under half the pooled 26
    longer = generation.generate(backend, tok, "a much longer prompt than before", 9, "recurrent", **kwargs)
    assert made[-2] is not made[0] and made[-1] is not made[0]
    assert longer.tokens == generate(model, tok, "a much longer prompt than before", 9, "recurrent", **kwargs).tokens


def test_refilled_cache_equals_a_fresh_one(tiny):
    model, _, _ = tiny
    with torch.inference_mode():
        cache = model.make_cache(1, 16)
        model(torch.tensor([[1, 2, 3, 4]]), torch.tensor([True, False, True, False]), cache=cache)
        kept = [t for layer in cache.layers for t in layer.tensors()]
        cache.drop_recurrent()
        cache.refill()
        fresh = model.make_cache(1, 16)
        assert cache.length == 0 and not bool(cache.position.any()) and cache.has_recurrent and cache.has_kv
        for got, want in zip((t for layer in cache.layers for t in layer.tensors()),
                             (t for layer in fresh.layers for t in layer.tensors()), strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype and not bool(got.any())
        refilled = [t for layer in cache.layers for t in layer.tensors()]
        assert all(any(t is k for k in kept) for t in refilled if t.dim() == 4 and t.shape[2] == 16)  # KV in place


def test_pooled_caches_are_forgotten_when_the_weights_move(tiny):
    """A captured step reads the weights by address: once they are elsewhere (a cast, a move, training mode
    rebuilding the fused projections) no pooled cache is handed out again."""
    from oryx_core import generation

    model, _, tok = tiny
    backend, made = pooled_backend(model)
    generation.generate(backend, tok, "text", 4, "recurrent", stop_at_end_of_text=False)
    model.train()
    model.eval()
    try:
        generation.generate(backend, tok, "text", 4, "recurrent", stop_at_end_of_text=False)
        assert made[1] is not made[0]
        generation.generate(backend, tok, "text", 4, "recurrent", stop_at_end_of_text=False)
        assert made[2] is made[1]
    finally:
        model.eval()


def test_generation_reuses_one_backend_per_model_and_copies_do_not_share_it(tiny):
    import copy
    import pickle

    from oryx_torch.generate import as_loaded_model

    model, _, tok = tiny
    generate(model, tok, "text", 2, "recurrent", stop_at_end_of_text=False)
    assert as_loaded_model(model) is as_loaded_model(model) and model._loaded_models.keys() == {True}
    # what a copy or a pickle of the model takes of it
    assert copy.deepcopy(model._loaded_models) == {} and pickle.loads(pickle.dumps(model._loaded_models)) == {}
