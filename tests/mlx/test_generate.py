"""The MLX generation API: greedy == float64 reference decoding, sampling, prompt cache reuse, KV and
recurrent-state drop policies, CLI."""
import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from oryx_core import cli as oryx_cli  # noqa: E402
from oryx_core.config import preset  # noqa: E402
from oryx_core.init import init_params  # noqa: E402
from oryx_core.plan import ModePlan  # noqa: E402
from oryx_core.reference import OryxReference, Stepper  # noqa: E402
from oryx_core.tokenizer import byte_level_tokenizer  # noqa: E402
from oryx_core.weights import save_checkpoint  # noqa: E402
from oryx_mlx.generate import apply_repetition_penalty, generate, load, sample, stream_generate  # noqa: E402

PROMPT = "Oryx switches modes"


class cli:
    @staticmethod
    def main(argv) -> int:
        """`oryx` in-process: its exit status, argparse's refusals (SystemExit) included."""
        try:
            return oryx_cli.main(argv)
        except SystemExit as e:
            return e.code


@pytest.fixture(scope="module", params=["gdn", "mamba2"])
def checkpoint(request, tmp_path_factory):
    cfg = preset("tiny", request.param)
    # matrices 8x their init scale: at init scale a tiny model repeats one token, which tests nothing
    params = {k: v * 8 if v.ndim == 2 else v for k, v in init_params(cfg, seed=11).items()}
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    save_checkpoint(path, cfg, params, tokenizer_json=byte_level_tokenizer().to_str())
    return path, OryxReference(cfg, params)


def reference_greedy(ref, prompt_ids, n_tokens, plan, repetition_penalty=1.0):
    """Greedy decoding with the float64 Stepper, one token at a time, modes from the same plan;
    logits of tokens already in the text divided (> 0) or multiplied (< 0) by repetition_penalty."""
    modes = ModePlan.parse(plan).resolve(len(prompt_ids) + n_tokens, prompt_length=len(prompt_ids))
    stepper, out = Stepper(ref), []
    for position, token in enumerate(prompt_ids):
        logits = stepper.step(np.array([token]), modes[position])
    for position in range(len(prompt_ids), len(prompt_ids) + n_tokens):
        scores = logits[0].copy()
        seen = sorted(set(prompt_ids) | set(out))
        scores[seen] = np.where(scores[seen] > 0, scores[seen] / repetition_penalty, scores[seen] * repetition_penalty)
        out.append(int(np.argmax(scores)))
        logits = stepper.step(np.array([out[-1]]), modes[position])
    return out


@pytest.mark.parametrize("plan, kv_policy, prefill_step_size", [("prefill-attention", "drop", 2048),
                                                                ("A:0-4,R:4-22,A:22-", "keep", 7),
                                                                ("recurrent", "drop", 5)])
def test_greedy_matches_reference_decoding(checkpoint, plan, kv_policy, prefill_step_size):
    path, ref = checkpoint
    model, tokenizer = load(path)
    ids = tokenizer.encode(PROMPT).ids
    tokens = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=12, plan=plan, kv_policy=kv_policy,
                                               stop_at_end_of_text=False, prefill_step_size=prefill_step_size)]
    assert tokens == reference_greedy(ref, ids, 12, plan)


def test_responses_report_modes_speeds_and_memory(checkpoint):
    path, _ = checkpoint
    model, tokenizer = load(path)
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=5, plan="prefill-attention",
                                     stop_at_end_of_text=False))
    assert [r.stats.generation_tokens for r in responses] == [1, 2, 3, 4, 5]
    assert [r.finish_reason for r in responses] == [None] * 4 + ["length"]
    assert not any(r.is_attention for r in responses)  # generated tokens run recurrent under this plan
    last = responses[-1]
    assert last.stats.prompt_tokens == len(tokenizer.encode(PROMPT).ids)
    assert last.stats.prompt_tps > 0 and last.stats.generation_tps > 0 and last.stats.peak_memory_bytes > 0
    assert "".join(r.text for r in responses) == tokenizer.decode([r.token for r in responses])


def test_prompt_cache_continues_across_calls(checkpoint):
    path, _ = checkpoint
    model, tokenizer = load(path)
    first, second = "Oryx ", "switches modes"
    cache = model.make_cache()
    prefilled = generate(model, tokenizer, first, max_tokens=0, plan="attention", prompt_cache=cache)
    assert prefilled.text == "" and prefilled.tokens == [] and prefilled.finish_reason == "length"
    continued = generate(model, tokenizer, second, max_tokens=8, plan="every:2:4", prompt_cache=cache,
                         stop_at_end_of_text=False)
    whole = generate(model, tokenizer, first + second, max_tokens=8, plan="every:2:4", stop_at_end_of_text=False)
    assert continued.tokens == whole.tokens and continued.text == whole.text and len(whole.tokens) == 8


def test_kv_drop_decodes_in_constant_memory(checkpoint):
    path, _ = checkpoint
    model, tokenizer = load(path)
    cache = model.make_cache()
    sizes = [sum(layer.nbytes for layer in cache)
             for _ in stream_generate(model, tokenizer, PROMPT, max_tokens=40, plan="prefill-attention",
                                      kv_policy="drop", prompt_cache=cache, stop_at_end_of_text=False)]
    assert cache[0].kv_dropped and len(set(sizes)) == 1
    kept = model.make_cache()
    list(stream_generate(model, tokenizer, PROMPT, max_tokens=40, plan="prefill-attention", prompt_cache=kept,
                         stop_at_end_of_text=False))
    assert sum(layer.nbytes for layer in kept) > sizes[0]


def _capture_made_caches(model):
    """Records the caches stream_generate makes for itself (not visible to the caller otherwise)."""
    made, make = [], model.make_cache
    model.make_cache = lambda: made.append(make()) or made[-1]
    return made


@pytest.mark.parametrize("plan", ["attention", "R:0-5,A:5-"])
def test_state_drop_policy_same_tokens_and_automatic(checkpoint, plan):
    """state_policy "auto" drops the recurrent state of a cache the call made once the plan has no recurrent
    token left, "keep" never does; both decode the reference's greedy tokens."""
    path, ref = checkpoint
    model, tokenizer = load(path)
    made = _capture_made_caches(model)
    options = dict(max_tokens=10, plan=plan, stop_at_end_of_text=False, prefill_step_size=4)
    tokens = {policy: [r.token for r in stream_generate(model, tokenizer, PROMPT, state_policy=policy, **options)]
              for policy in ("auto", "keep")}
    assert tokens["auto"] == tokens["keep"] == reference_greedy(ref, tokenizer.encode(PROMPT).ids, 10, plan)
    assert made[0][0].recurrent_dropped and made[0][0].recurrent is None
    assert not made[1][0].recurrent_dropped and made[1][0].recurrent is not None


def test_state_drop_policy_on_a_callers_cache(checkpoint):
    """A caller's cache is kept under "auto" (a later call may continue it in recurrent mode); "drop" drops it,
    and a later recurrent-mode token then gets a clear error; a plan with recurrent tokens ahead drops nothing."""
    path, _ = checkpoint
    model, tokenizer = load(path)
    options = dict(max_tokens=3, plan="attention", stop_at_end_of_text=False)
    kept, dropped, mixed = model.make_cache(), model.make_cache(), model.make_cache()
    generate(model, tokenizer, PROMPT, prompt_cache=kept, **options)
    generate(model, tokenizer, PROMPT, prompt_cache=dropped, state_policy="drop", **options)
    generate(model, tokenizer, PROMPT, prompt_cache=mixed, state_policy="drop", **{**options, "plan": "every:2:4"})
    assert not kept[0].recurrent_dropped and dropped[0].recurrent_dropped and not mixed[0].recurrent_dropped
    assert generate(model, tokenizer, "x", max_tokens=2, plan="recurrent", prompt_cache=kept)  # continues
    with pytest.raises(ValueError, match="recurrent state was dropped; use state_policy='keep'"):
        generate(model, tokenizer, "x", max_tokens=2, plan="recurrent", prompt_cache=dropped)


def test_stop_strings_and_stop_token(checkpoint):
    path, _ = checkpoint
    model, tokenizer = load(path)
    options = dict(max_tokens=16, plan="every:2:4")
    responses = list(stream_generate(model, tokenizer, PROMPT, stop_at_end_of_text=False, **options))
    full = "".join(r.text for r in responses)
    stop = full[6:9]
    cut = list(stream_generate(model, tokenizer, PROMPT, stop_strings=["never there", stop], **options))
    assert "".join(r.text for r in cut) == full[:full.find(stop)]
    assert cut[-1].finish_reason == "stop_string"

    stopped = list(stream_generate(model, tokenizer, PROMPT, stop_token_ids={responses[2].token}, **options))
    assert [r.finish_reason for r in stopped][-1] == "stop_token" and len(stopped) == 3


def test_sampling():
    logits = mx.array([0.5, 3.0, 2.9, -1.0, 1.0])
    key = mx.random.key(0)
    def sample_token(logits, key, temperature, top_k, top_p):
        return int(sample(logits[None], temperature, top_k, top_p, key)[0])

    assert sample_token(logits, key, 0.0, 0, 1.0) == 1
    assert sample_token(logits, key, 5.0, 1, 1.0) == 1  # top-k 1 is greedy at any temperature
    assert sample_token(logits, key, 5.0, 0, 0.01) == 1  # so is a tiny nucleus
    draws = {sample_token(logits, k, 1.0, 2, 1.0) for k in mx.random.split(key, 64)}
    assert draws == {1, 2}
    # rows sample apart: each row's nucleus is its own two tokens
    rows = mx.array([[0.0, 0.0, 5.0, 5.0], [5.0, 5.0, 0.0, 0.0]] * 100)
    nucleus = np.array(sample(rows, 1.0, 0, 0.5, key)).reshape(100, 2)
    assert set(nucleus[:, 0]) == {2, 3} and set(nucleus[:, 1]) == {0, 1}
    top1 = np.array(sample(mx.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]), 3.0, 1, 1.0, key))
    assert top1.tolist() == [2, 0]
    same_seed = [sample_token(logits, mx.random.key(7), 1.0, 0, 1.0) for _ in range(3)]
    assert len(set(same_seed)) == 1
    penalised = apply_repetition_penalty(mx.array([2.0, -2.0, 1.0]), mx.array([True, True, False]), 2.0)
    np.testing.assert_allclose(np.array(penalised), [1.0, -4.0, 1.0])


def test_bad_arguments_give_clear_errors(checkpoint):
    path, _ = checkpoint
    model, tokenizer = load(path)
    bad = [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"),
           (dict(kv_policy="forget"), "kv_policy"), (dict(state_policy="never"), "state_policy"),
           (dict(repetition_penalty=0.0), "repetition_penalty"),
           (dict(max_tokens=-1), "max_tokens"), (dict(plan="sometimes"), "plan"),
           (dict(prefill_step_size=0), "prefill_step_size")]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=name):
            generate(model, tokenizer, PROMPT, **{"max_tokens": 3, **kwargs})
    with pytest.raises(ValueError, match="prompt"):
        generate(model, tokenizer, "", max_tokens=3)
    with pytest.raises(ValueError, match="dtype"):
        load(path, dtype="float64")


def test_oryx_generate_backend_mlx(checkpoint, capsys):
    path, ref = checkpoint
    assert cli.main(["generate", str(path), "--prompt", PROMPT, "--max-tokens", "6", "--backend", "mlx",
                     "--kv-policy", "drop", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["backend"] == "mlx" and result["generation_tokens"] == 6 and result["finish_reason"] == "length"
    tokenizer = byte_level_tokenizer()
    expected = reference_greedy(ref, tokenizer.encode(PROMPT).ids, 6, "prefill-attention")
    assert result["tokens"] == expected and result["text"] == tokenizer.decode(expected)
    assert cli.main(["generate", str(path), "--prompt", PROMPT, "--backend", "mlx", "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_oryx_generate_repetition_penalty_flag(checkpoint, capsys):
    """--repetition-penalty reaches the MLX generator and gives the penalised reference's greedy tokens."""
    path, ref = checkpoint
    assert cli.main(["generate", str(path), "--prompt", PROMPT, "--max-tokens", "8", "--backend", "mlx",
                     "--repetition-penalty", "1.7", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    prompt_ids = byte_level_tokenizer().encode(PROMPT).ids
    assert result["tokens"] == reference_greedy(ref, prompt_ids, 8, "prefill-attention", repetition_penalty=1.7)
    assert result["tokens"] != reference_greedy(ref, prompt_ids, 8, "prefill-attention")  # it acts here
    assert cli.main(["generate", str(path), "--prompt", PROMPT, "--backend", "mlx", "--repetition-penalty", "0"]) == 2
    assert "--repetition-penalty" in capsys.readouterr().err


@pytest.mark.parametrize("policy", ["auto", "keep", "drop"])
def test_oryx_generate_state_policy_flag(checkpoint, capsys, policy):
    """--state-policy reaches the MLX generator; every policy gives the reference's greedy tokens."""
    path, ref = checkpoint
    assert cli.main(["generate", str(path), "--prompt", PROMPT, "--max-tokens", "5", "--backend", "mlx",
                     "--plan", "attention", "--state-policy", policy, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    tokenizer = byte_level_tokenizer()
    assert result["tokens"] == reference_greedy(ref, tokenizer.encode(PROMPT).ids, 5, "attention")


@pytest.mark.parametrize("options", [dict(plan="prefill-attention", kv_policy="drop"),
                                     dict(plan="A:0-4,R:4-22,A:22-"), dict(plan="every:2:4", stop="token"),
                                     dict(plan="every:2:4", stop="string")])
def test_greedy_tokens_run_ahead_with_the_same_result(checkpoint, options):
    """oryx_core.generation on MLXModel with its greedy chain (picks fed back unevaluated) and without it."""
    from oryx_core import generation
    from oryx_core.tokenizer import tokenizer_for
    from oryx_mlx.backend import load as load_backend

    path, _ = checkpoint
    options = dict(options)
    stop = options.pop("stop", None)
    tokenizer = tokenizer_for(path)
    plain, ahead = load_backend(path), load_backend(path)
    plain.greedy_chain = None
    made, chain = [], ahead.greedy_chain
    ahead.greedy_chain = lambda cache: made.append(cache) or chain(cache)
    free = generation.generate(plain, tokenizer, PROMPT, 16, stop_at_end_of_text=False, **options)
    if stop == "token":
        options["stop_token_ids"] = {free.tokens[4]}
    elif stop == "string":
        options["stop_strings"] = [free.text[6:9]]
    want = generation.generate(plain, tokenizer, PROMPT, 16, stop_at_end_of_text=False, **options)
    got = generation.generate(ahead, tokenizer, PROMPT, 16, stop_at_end_of_text=False, **options)
    assert len(made) == 1 and got.tokens == want.tokens and got.text == want.text
    assert got.stats.finish_reason == want.stats.finish_reason == {None: "length", "token": "stop_token",
                                                                   "string": "stop_string"}[stop]
