"""`oryx chat` and its Conversation: each turn equals generating the rendered history afresh."""
from __future__ import annotations

import subprocess

import pytest

from oryx_core.chat import load_chat_format
from oryx_core.chat_cli import Conversation
from oryx_core.cli import command_line
from oryx_core.config import preset
from oryx_core.generation import generate
from oryx_core.init import init_params
from oryx_core.tokenizer import byte_level_tokenizer
from oryx_core.weights import save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = byte_level_tokenizer()
    cfg = preset("tiny")
    cfg = cfg.replace(vocab_size=max(cfg.vocab_size, tok.get_vocab_size()))
    return save_checkpoint(tmp_path_factory.mktemp("chat") / "tiny", cfg, init_params(cfg, 5),
                           tokenizer_json=tok.to_str())


@pytest.fixture(scope="module")
def torch_model(checkpoint):
    from oryx_core.backend import get_backend

    return get_backend("torch").load(checkpoint)


def fresh(model, checkpoint, messages, max_tokens, plan="prefill-attention"):
    tok = byte_level_tokenizer()
    fmt = load_chat_format(checkpoint, tok)
    ids = tok.encode(fmt.render(messages), add_special_tokens=False).ids
    return generate(model, tok, ids, max_tokens, plan, stop_token_ids=fmt.stop_token_ids).text


def test_turns_with_the_cache_equal_fresh_generation_and_a_stopped_reply_stays(torch_model, checkpoint):
    tok = byte_level_tokenizer()
    conv = Conversation(torch_model, tok, load_chat_format(checkpoint, tok), system="Be brief.")
    first = "".join(r.text for r in conv.reply("Hello", 8))
    assert first == fresh(torch_model, checkpoint, conv.messages[:-1], 8)
    cut = conv.reply("Go on", 20)
    partial = "".join(next(cut).text for _ in range(3))
    cut.close()  # what Ctrl-C does
    assert conv.messages[-1] == {"role": "assistant", "content": partial}
    history = list(conv.messages)
    third = "".join(r.text for r in conv.reply("Thanks", 8))
    assert third == fresh(torch_model, checkpoint, history + [{"role": "user", "content": "Thanks"}], 8)


def test_turn_attention_plan_is_recurrent_over_the_history(torch_model, checkpoint):
    tok = byte_level_tokenizer()
    fmt = load_chat_format(checkpoint, tok)
    conv = Conversation(torch_model, tok, fmt, plan="turn-attention")
    "".join(r.text for r in conv.reply("Hi", 6))
    history = list(conv.messages)
    second = "".join(r.text for r in conv.reply("More", 6))
    start = len(tok.encode(fmt.render(history, add_generation_prompt=False), add_special_tokens=False).ids)
    turn = history + [{"role": "user", "content": "More"}]
    ids = tok.encode(fmt.render(turn), add_special_tokens=False).ids
    assert 0 < start < len(ids) and conv.turn_plan(turn, ids) == f"R:0-{start},A:{start}-"
    assert second == fresh(torch_model, checkpoint, history + [{"role": "user", "content": "More"}], 6,
                           plan=f"R:0-{start},A:{start}-")


@pytest.mark.parametrize("backend", ["torch", pytest.param("mlx", marks=pytest.mark.slow)])
def test_oryx_chat_reads_messages_from_a_pipe(backend, checkpoint, torch_model):
    pytest.importorskip({"torch": "torch", "mlx": "mlx.core"}[backend])
    out = subprocess.run([*command_line(), "chat", str(checkpoint), "--backend", backend, "--max-tokens", "6",
                          "--system", "Be brief."], input="Hello\n/reset\nHello\n", capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    want = fresh(torch_model, checkpoint, [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hello"}], 6)
    assert out.stdout == f"{want}\n{want}\n"
    bad = subprocess.run([*command_line(), "chat", str(checkpoint), "--plan", "Q:0-"], input="", capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "plan" in bad.stderr


def test_oryx_generate_chat_is_one_turn(checkpoint, torch_model):
    import json

    out = subprocess.run([*command_line(), "generate", str(checkpoint), "--chat", "--prompt", "Hello", "--system",
                          "Be brief.", "--max-tokens", "6", "--backend", "torch", "--json"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    want = fresh(torch_model, checkpoint, [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hello"}], 6)
    assert json.loads(out.stdout)["text"] == want


def _options(command: str) -> dict:
    """`oryx COMMAND`'s optional flags: the option string -> its argparse action."""
    import argparse

    from oryx_core.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {s: a for a in sub.choices[command]._actions for s in a.option_strings}


SHARED_FLAGS = ["--max-tokens", "--temperature", "--top-k", "--top-p", "--repetition-penalty", "--seed",
                "--kv-policy", "--state-policy", "--backend", "--device", "--dtype", "--prefill-step-size"]


def test_generate_and_chat_share_their_generation_flags():
    generate, chat = _options("generate"), _options("chat")
    for flag in SHARED_FLAGS:
        g, c = generate[flag], chat[flag]
        assert (g.help, g.default, g.choices) == (c.help, c.default, c.choices), flag
        assert getattr(g.type, "__qualname__", None) == getattr(c.type, "__qualname__", None), flag


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "argument --temperature: must be a finite number"),
    (["--top-p", "0"], "argument --top-p: must be > 0.0"),
    (["--repetition-penalty", "0"], "argument --repetition-penalty: must be > 0"),
    (["--prefill-step-size", "0"], "argument --prefill-step-size: must be >= 1"),
    (["--seed", "-1"], "argument --seed: must be >= 0"),
    (["--state-policy", "forget"], "argument --state-policy: invalid choice"),
])
def test_oryx_chat_refuses_bad_flags_as_generate_does(checkpoint, capsys, flags, message):
    from oryx_core.cli import main

    with pytest.raises(SystemExit) as done:
        main(["chat", str(checkpoint), *flags])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("oryx chat: error: ") and message in err and err.count("\n") == 1


def test_oryx_chat_passes_the_repetition_penalty_to_every_turn(checkpoint, torch_model, monkeypatch):
    import argparse

    from oryx_core import chat_cli
    from oryx_core.cli import build_parser

    monkeypatch.setattr(chat_cli, "get_backend", lambda name: argparse.Namespace(load=lambda *a, **k: torch_model))
    args = build_parser().parse_args(["chat", str(checkpoint), "--repetition-penalty", "1.3", "--prefill-step-size",
                                      "3", "--max-tokens", "8"])
    conv = chat_cli.load_conversation(args)
    reply = "".join(r.text for r in conv.reply("Hello", args.max_tokens))
    tok = byte_level_tokenizer()
    fmt = load_chat_format(checkpoint, tok)
    ids = tok.encode(fmt.render([{"role": "user", "content": "Hello"}]), add_special_tokens=False).ids
    assert reply == generate(torch_model, tok, ids, 8, "prefill-attention", stop_token_ids=fmt.stop_token_ids,
                             repetition_penalty=1.3).text
