"""A checkpoint's tokenizer as mlx-lm's TokenizerWrapper, for mlx-lm's own tooling on an Oryx model.

    model, tokenizer = oryx_mlx.generate.load(path, mlx_lm_tokenizer=True)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=40): ...

The wrapper holds a transformers fast tokenizer built on the checkpoint's tokenizer.json, with
the chat template of its tokenizer_config.json (else Oryx's default template, as `oryx chat`
uses), its bos/eos tokens, and every id that ends a reply (oryx_core.chat.stop_token_ids) as
mlx-lm's eos ids. mlx-lm calls an Oryx MLX model without modes, which runs every token in
attention mode; Oryx's own generate takes this tokenizer too.
"""
from __future__ import annotations

from pathlib import Path

from oryx_core.chat import load_chat_format, read_tokenizer_config
from oryx_core.tokenizer import tokenizer_for


def mlx_lm_tokenizer(path):
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    tokenizer = tokenizer_for(Path(path))
    chat = load_chat_format(path, tokenizer)
    config = read_tokenizer_config(path) or {}
    special = {key: config[key] for key in ("bos_token", "unk_token", "pad_token")
               if isinstance(config.get(key), str) and tokenizer.token_to_id(config[key]) is not None}
    if chat.eos_token and tokenizer.token_to_id(chat.eos_token) is not None:
        special["eos_token"] = chat.eos_token
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=chat.template, **special)
    return TokenizerWrapper(fast, eos_token_ids=list(chat.stop_token_ids))


def plain_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` inside a TokenizerWrapper (or the tokenizer itself)."""
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    return getattr(inner, "backend_tokenizer", inner)
