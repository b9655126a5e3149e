"""oryx_core.generation without a backend: the incremental detokenizer, the argument checks, the plan and
drop policies of the loop (on a NumPy stand-in model), and `oryx generate`'s refusals of bad flags."""
import numpy as np
import pytest

from oryx_core import backend as backend_registry
from oryx_core.backend import BackendEntry, LoadedModel
from oryx_core.cli import main
from oryx_core.config import preset
from oryx_core.generation import (GenerationResponse, SamplingParams, TextStream, check_generation, generate,
                                  speed_line, stream_generate)
from oryx_core.plan import ModePlan
from oryx_core.tokenizer import byte_level_tokenizer

TOKENIZER = byte_level_tokenizer()


def oryx(argv) -> int:
    """`oryx` in-process: its exit status, argparse's refusals (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def stream_pieces(text_stream, ids):
    pieces, stopped = [], False
    for token in ids:
        piece, stopped = text_stream.add(token)
        pieces.append(piece)
        assert len(text_stream.tail) <= text_stream.holdback + 4  # nothing accumulates: linear in the output
        if stopped:
            break
    return pieces, stopped


# ----- the incremental detokenizer -----
def test_multibyte_characters_split_across_tokens():
    text = "héllo → wörld 😀!"
    ids = TOKENIZER.encode(text).ids
    assert len(ids) == len(text.encode("utf-8"))  # byte-level: one token per byte
    stream = TextStream(TOKENIZER)
    pieces, stopped = stream_pieces(stream, ids)
    assert not stopped and "".join(pieces) + stream.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    # the emoji's four bytes: three tokens give nothing, the fourth the whole character
    emoji_start = len("héllo → wörld ".encode("utf-8"))
    assert pieces[emoji_start:emoji_start + 4] == ["", "", "", "😀"]


def test_invalid_bytes_go_out_as_replacement_characters():
    stream = TextStream(TOKENIZER)
    assert stream.add(0xC3) == ("", False)  # may still become é
    assert stream.add(ord("A")) == ("\ufffdA", False)
    # continuation bytes with no lead byte never complete: out after at most four tokens
    pieces = [stream.add(0x80)[0] for _ in range(4)]
    assert pieces[:3] == ["", "", ""] and pieces[3] == "\ufffd" * 4
    assert stream.add(0xE2) == ("", False)
    assert stream.flush() == "\ufffd"  # an incomplete character at the end


def test_stop_string_split_across_tokens_is_held_back_and_cut():
    text = "one two STOP three"
    stream = TextStream(TOKENIZER, stop_strings=["STOP", "never there"])
    pieces, stopped = stream_pieces(stream, TOKENIZER.encode(text).ids)
    assert stopped and "".join(pieces) == "one two "
    # nothing that could start the stop string went out before the stop string was decided
    emitted = ""
    for piece in pieces:
        emitted += piece
        assert "S" not in emitted
    assert stream.flush() == ""
    with pytest.raises(ValueError, match="already completed"):
        stream.add(ord("x"))


def test_stop_string_with_a_multibyte_character_and_near_misses():
    stream = TextStream(TOKENIZER, stop_strings=["é!"])
    pieces, stopped = stream_pieces(stream, TOKENIZER.encode("aé bé!c").ids)
    assert stopped and "".join(pieces) == "aé b"
    stream = TextStream(TOKENIZER, stop_strings=["é!"])
    pieces, stopped = stream_pieces(stream, TOKENIZER.encode("aé bé c").ids)
    assert not stopped and "".join(pieces) + stream.flush() == "aé bé c"


# ----- a NumPy stand-in backend: the next token is a fixed function of the last one -----
class CountingModel:
    """Implements oryx_core.backend.LoadedModel with logits that pick (token * 5 + 1) % 200, and records what
    the generation loop asks of it."""
    backend, device, dtype = "numpy", "cpu", "float64"

    def __init__(self, max_context=64):
        self.config = preset("tiny").replace(max_context=max_context)
        self.calls = []

    def forward(self, tokens, modes):
        raise NotImplementedError

    def make_cache(self, batch=1, capacity=None, kv=True):
        self.calls.append(("make_cache", capacity, kv))
        return {"length": 0, "kv": kv, "recurrent": True}

    def cache_length(self, cache):
        return cache["length"]

    def cache_nbytes(self, cache):
        return 1000 * cache["kv"] + 10 * cache["recurrent"]

    def _logits(self, cache, tokens, modes):
        if modes.any() and not cache["kv"] or not modes.all() and not cache["recurrent"]:
            raise ValueError("a token in a dropped mode")
        cache["length"] += tokens.shape[1]
        self.calls.append(("modes", cache["length"] - tokens.shape[1], modes[0].tolist()))
        logits = np.zeros((1, self.config.vocab_size))
        logits[0, (int(tokens[0, -1]) * 5 + 1) % 200] = 1.0
        return logits

    def prefill(self, cache, tokens, modes):
        return self._logits(cache, tokens, modes)

    def step(self, cache, tokens, modes):
        return self._logits(cache, tokens[:, None], modes[:, None])

    def drop_kv(self, cache):
        self.calls.append(("drop_kv", cache["length"]))
        cache["kv"] = False

    def drop_recurrent(self, cache):
        self.calls.append(("drop_recurrent", cache["length"]))
        cache["recurrent"] = False

    def sampler(self, sampling, prompt_ids):
        return lambda logits: int(np.argmax(logits[0]))

    def reset_peak_memory(self):
        pass

    def peak_memory_bytes(self):
        return None

    def synchronize(self):
        pass


def expected_tokens(last, n):
    out = []
    for _ in range(n):
        last = (last * 5 + 1) % 200
        out.append(last)
    return out


def test_stand_in_implements_the_protocol():
    assert isinstance(CountingModel(), LoadedModel)


def test_loop_feeds_the_plan_and_drops_what_the_plan_no_longer_reads():
    model = CountingModel()
    prompt = [10, 20, 30, 40]
    result = generate(model, None, prompt, 8, "A:0-6,R:6-", kv_policy="drop", state_policy="keep",
                      prefill_step_size=3)
    assert result.tokens == expected_tokens(40, 8) and result.text == "" and result.finish_reason == "length"
    modes = ModePlan.parse("A:0-6,R:6-").resolve(12, prompt_length=4)
    fed = [(start, m) for name, start, m in (c for c in model.calls if c[0] == "modes")]
    assert [start for start, _ in fed] == [0, 3, 4, 5, 6, 7, 8, 9, 10]  # prefill in pieces of 3, then steps
    assert np.concatenate([m for _, m in fed]).tolist() == modes[:11].tolist()
    # the KV cache goes once the last attention token (position 5) has been fed
    assert ("drop_kv", 6) in model.calls and not any(c[0] == "drop_recurrent" for c in model.calls)
    assert result.stats.cache_bytes == 10


def test_state_policy_auto_drops_only_from_the_calls_own_cache():
    model = CountingModel()
    own = generate(model, None, [1, 2, 3], 6, "R:0-4,A:4-")  # state_policy auto
    assert ("drop_recurrent", 4) in model.calls and own.stats.cache_bytes == 1000
    model.calls.clear()
    cache = model.make_cache(1, 64)
    generate(model, None, [1, 2, 3], 6, "R:0-4,A:4-", prompt_cache=cache)
    assert not any(c[0] == "drop_recurrent" for c in model.calls)
    # a plan with no attention at all under kv drop: the call's cache never gets a KV cache
    model.calls.clear()
    generate(model, None, [1, 2, 3], 4, "recurrent", kv_policy="drop")
    assert model.calls[0] == ("make_cache", 7, False)


def test_stop_token_ids_end_the_output_without_the_stop_token():
    model = CountingModel()
    free = expected_tokens(40, 8)
    stopped = list(stream_generate(model, None, [40], 8, "attention", stop_token_ids={free[3]}))
    assert [t for r in stopped for t in r.tokens] == free[:3]
    assert stopped[-1].finish_reason == "stop_token" and stopped[-1].tokens == []
    assert [r.stats.generation_tokens for r in stopped] == [1, 2, 3, 4]
    assert all(isinstance(r, GenerationResponse) for r in stopped)


def test_prefill_only_with_zero_tokens():
    model = CountingModel()
    cache = model.make_cache(1, 64)
    (only,) = stream_generate(model, None, [1, 2], 0, "attention", prompt_cache=cache)
    assert only.tokens == [] and only.finish_reason == "length" and model.cache_length(cache) == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), r"temperature \(--temperature\) must be a finite number >= 0"),
    (dict(temperature=-1.0), r"temperature \(--temperature\)"),
    (dict(top_p=2.0), r"top_p \(--top-p\) must be in \(0, 1\]"),
    (dict(top_p=float("nan")), r"top_p \(--top-p\)"),
    (dict(top_k=-1), r"top_k \(--top-k\)"),
    (dict(repetition_penalty=float("inf")), r"repetition_penalty \(--repetition-penalty\)"),
    (dict(seed=-1), r"seed \(--seed\) must be an integer in \[0, 2\^63 - 1\]"),
    (dict(seed=2**64), r"seed \(--seed\)"),
    (dict(max_tokens=-5), r"max_tokens \(--max-tokens\) must be an integer >= 0"),
    (dict(max_tokens=1e12), r"max_tokens \(--max-tokens\) must be an integer"),
    (dict(max_tokens=61), r"max_tokens \(--max-tokens\): 4 prompt tokens \+ 61 new exceed the model's context of "
                          r"64 tokens; ask for at most 60"),
    (dict(prompt=list(range(65))), r"prompt \(--prompt\): 65 tokens exceed the model's context of 64"),
    (dict(prompt=[]), r"prompt \(--prompt\): needs at least one token"),
    (dict(prompt=[300]), r"prompt \(--prompt\): token id 300 is outside the model's vocabulary \[0, 260\)"),
    (dict(prefill_step_size=0), r"prefill_step_size \(--prefill-step-size\)"),
    (dict(kv_policy="forget"), r"kv_policy \(--kv-policy\) must be one of keep, drop"),
    (dict(state_policy="never"), r"state_policy \(--state-policy\) must be one of auto, keep, drop"),
    (dict(plan="A:0-2"), r"plan A:0-2: covers tokens 0-2 but the sequence has 12"),
    (dict(plan="every:1:99999999999999999999"), r"plan 'every:1:99999999999999999999': expected every:K:CHUNK"),
])
def test_bad_arguments_are_refused_naming_the_flag(kwargs, message):
    model = CountingModel()
    arguments = {**dict(prompt=[1, 2, 3, 4], max_tokens=8, plan="attention"), **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, None, arguments.pop("prompt"), arguments.pop("max_tokens"), arguments.pop("plan"),
                 **arguments)
    assert not any(c[0] == "modes" for c in model.calls)  # refused before any work


def test_sampling_params_and_context_check_directly():
    assert SamplingParams(0.7, 40, 0.9, 1.1, 3).top_k == 40
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=1.5)
    check_generation(CountingModel(8).config, 2, 2, 4, "keep", "auto", 1)  # exactly fills the context
    with pytest.raises(ValueError, match=r"4 prompt tokens after 2 cached \+ 3 new exceed the model's context of 8"):
        check_generation(CountingModel(8).config, 2, 4, 3, "keep", "auto", 1)


def test_speed_line_names_every_figure():
    stats = generate(CountingModel(), None, [1, 2], 3, "attention").stats
    line = speed_line(stats)
    assert line.startswith("[prompt 2 tokens, ") and "generation 3 tokens, " in line and "finish length" in line


# ----- `oryx generate` refuses bad flags with one line and status 2 -----
@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "argument --temperature: must be a finite number"),
    (["--top-p", "2"], "argument --top-p: must be <= 1.0"),
    (["--top-p", "0"], "argument --top-p: must be > 0.0"),
    (["--seed", "-1"], "argument --seed: must be >= 0"),
    (["--max-tokens", "1e12"], "argument --max-tokens: expected an integer, got '1e12'"),
    (["--max-tokens", "-5"], "argument --max-tokens: must be >= 1"),
    (["--top-k", "-3"], "argument --top-k: must be >= 0"),
    (["--repetition-penalty", "0"], "argument --repetition-penalty: must be > 0"),
    (["--prefill-step-size", "0"], "argument --prefill-step-size: must be >= 1"),
    (["--kv-policy", "forget"], "argument --kv-policy: invalid choice"),
])
def test_cli_refuses_bad_flags(tmp_path, capsys, flags, message):
    assert oryx(["generate", str(tmp_path), "--prompt", "Hi", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_names_the_missing_extra(tmp_path, capsys, monkeypatch):
    assert oryx(["init", str(tmp_path / "ck"), "--preset", "tiny"]) == 0
    monkeypatch.setitem(backend_registry.BACKENDS, "torch", BackendEntry("oryx_absent_backend.backend", "cuda", None))
    capsys.readouterr()
    assert oryx(["generate", str(tmp_path / "ck"), "--prompt", "Hi", "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert "--backend torch: not available" in err and "pip install 'oryx[cuda]'" in err and err.count("\n") == 1


def test_help_lists_every_command_without_the_extras(tmp_path):
    """With torch and mlx unimportable, `oryx --help` still lists every command, and a backend command says
    which extra to install (one process, several calls of main)."""
    import json
    import subprocess
    import sys

    assert oryx(["init", str(tmp_path / "ck"), "--preset", "tiny"]) == 0
    calls = [["generate", str(tmp_path / "ck"), "--prompt", "x", "--backend", "torch"],
             ["quantize", str(tmp_path / "ck"), str(tmp_path / "q")]]
    code = ("import contextlib, io, json, sys\n"
            "sys.modules.update({m: None for m in ('torch', 'mlx', 'mlx.core', 'triton')})\n"
            "from oryx_core.cli import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try:\n"
            "        main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "results = []\n"
            f"for argv in {calls!r}:\n"
            "    err = io.StringIO()\n"
            "    with contextlib.redirect_stderr(err):\n"
            "        results.append((main(argv), err.getvalue()))\n"
            "print(json.dumps({'help': out.getvalue(), 'results': results}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    report = json.loads(done.stdout)
    for command in ("info", "init", "eval", "generate", "chat", "train", "quantize", "export-mlx-lm", "convert"):
        assert f"    {command} " in report["help"] or f"    {command}\n" in report["help"], command
    for (status, err), extra in zip(report["results"], ("cuda", "mlx")):
        assert status == 2 and f"pip install 'oryx[{extra}]'" in err and err.count("\n") == 1, err
