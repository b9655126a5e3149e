"""Chat templates and end-of-turn ids: rendering in the sandbox, the default template, storage in the checkpoint."""
from __future__ import annotations

import json

import pytest

from oryx_core.chat import (DEFAULT_CHAT_TEMPLATE, ChatError, chat_format, check_messages, load_chat_format,
                            tokenizer_config_from_gguf, tokenizer_config_from_hf)
from oryx_core.config import preset
from oryx_core.init import init_params
from oryx_core.tokenizer import byte_level_tokenizer
from oryx_core.weights import TOKENIZER_CONFIG_FILE, load_checkpoint, save_checkpoint

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
          "+ '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chatml_tokenizer():
    tok = byte_level_tokenizer()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return tok


def test_default_template_renders_turns_closed_by_end_of_text():
    fmt = chat_format(byte_level_tokenizer(), None)
    assert fmt.is_default and fmt.template == DEFAULT_CHAT_TEMPLATE
    text = fmt.render([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}])
    assert text == "system:\nBe terse.<|endoftext|>\nuser:\nHi<|endoftext|>\nassistant:\n"
    assert fmt.stop_token_ids == [256]
    assert fmt.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == "user:\nHi<|endoftext|>\n"


def test_model_template_and_every_end_id_stop():
    tok = chatml_tokenizer()
    fmt = chat_format(tok, {"chat_template": CHATML, "eos_token": "<|im_end|>", "eos_token_id": [7]})
    assert not fmt.is_default
    assert fmt.render([{"role": "user", "content": "2+2?"}]) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert fmt.stop_token_ids == sorted({7, tok.token_to_id("<|im_end|>"), 256})


def test_sandbox_refuses_attribute_escapes_and_template_errors_are_one_line():
    tok = byte_level_tokenizer()
    evil = chat_format(tok, {"chat_template": "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(ChatError, match="failed to render"):
        evil.render([{"role": "user", "content": "x"}])
    raising = chat_format(tok, {"chat_template": "{{ raise_exception('only user turns') }}"})
    with pytest.raises(ChatError, match="only user turns"):
        raising.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatError, match="does not parse"):
        chat_format(tok, {"chat_template": "{% for %}"}).render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("messages, match", [([], "non-empty"), ([{"role": "wizard", "content": "x"}], "role"),
                                             ([{"role": "user", "content": 3}], "content"), ("hi", "non-empty")])
def test_bad_messages_name_the_field(messages, match):
    with pytest.raises(ChatError, match=match):
        check_messages(messages)


def test_openai_text_parts_are_joined():
    assert check_messages([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) \
        == [{"role": "user", "content": "ab"}]


def test_tokenizer_config_round_trips_through_the_checkpoint(tmp_path):
    cfg = preset("tiny")
    tok = chatml_tokenizer()
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>", "eos_token_id": [258]}
    path = save_checkpoint(tmp_path / "c", cfg.replace(vocab_size=max(cfg.vocab_size, tok.get_vocab_size())),
                           init_params(cfg.replace(vocab_size=max(cfg.vocab_size, tok.get_vocab_size())), 0),
                           tokenizer_json=tok.to_str(), tokenizer_config=config)
    assert json.loads((path / TOKENIZER_CONFIG_FILE).read_text()) == config
    assert TOKENIZER_CONFIG_FILE in load_checkpoint(path).extra_files
    fmt = load_chat_format(path, tok)
    assert fmt.template == CHATML and fmt.stop_token_ids == [256, 258]


def test_gguf_metadata_gives_template_and_end_ids():
    meta = {"tokenizer.ggml.tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a"],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.eot_token_id": 0,
            "tokenizer.chat_template": CHATML}
    assert tokenizer_config_from_gguf(meta) == {"chat_template": CHATML, "bos_token": "<|im_start|>",
                                                "eos_token": "<|im_end|>", "eos_token_id": [0, 2]}
    assert tokenizer_config_from_gguf({"tokenizer.ggml.tokens": ["a"]}) is None


def test_hf_directory_gives_template_and_generation_config_ids(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": {"content": "<|im_end|>"}, "bos_token": "<|im_start|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert tokenizer_config_from_hf(tmp_path) == {"chat_template": CHATML, "bos_token": "<|im_start|>",
                                                  "eos_token": "<|im_end|>", "eos_token_id": [2, 0]}
    (tmp_path / "chat_template.jinja").write_text("{{ 'x' }}")
    assert tokenizer_config_from_hf(tmp_path)["chat_template"] == "{{ 'x' }}"
