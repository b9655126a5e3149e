"""Chat: a checkpoint's chat template and end-of-turn tokens, and rendering a conversation to a prompt.

A checkpoint may carry an HF-style `tokenizer_config.json` beside `tokenizer.json`:

    {"chat_template": "...jinja...", "bos_token": "<s>", "eos_token": "<|im_end|>", "eos_token_id": [2]}

`eos_token_id` (an int or a list, as in HF's generation_config.json) names every token that
ends a reply; generation on both backends stops at any of them and at `<|endoftext|>`.
The converters fill this file from GGUF metadata (`tokenizer.chat_template`,
`tokenizer.ggml.{bos,eos,eot,eom}_token_id`) and from an HF directory's
`tokenizer_config.json`, `chat_template.jinja` and `generation_config.json`.

Templates render in Jinja2's immutable sandbox with the conventions HF's
`apply_chat_template` uses (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII), so a model's own template gives the same
prompt as transformers. A checkpoint without a template gets DEFAULT_CHAT_TEMPLATE:

    system:
    You are terse.<|endoftext|>
    user:
    Hello<|endoftext|>
    assistant:

Each turn is the role, a colon and a newline, then the content closed by the end-of-text
token and a newline; the reply ends at the model's next end-of-text token. The history as
rendered begins with the tokens the model saw and produced in earlier turns, so a prompt
cache can continue it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from .files import check_regular, read_json, read_json_object
from .tokenizer import END_OF_TEXT, end_of_text_id
from .weights import TOKENIZER_CONFIG_FILE

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ':\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatError(ValueError):
    """A conversation or template the chat layer cannot use (the message says which)."""


@lru_cache(maxsize=16)
def _compiled(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatError(f"chat template: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except Exception as e:  # jinja2's TemplateSyntaxError and friends
        raise ChatError(f"chat template does not parse: {e}") from None


def _token_text(value) -> str | None:
    """HF writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


@dataclass
class ChatFormat:
    """How one checkpoint turns messages into a prompt, and which token ids end a reply."""

    template: str = DEFAULT_CHAT_TEMPLATE
    bos_token: str = ""
    eos_token: str = ""
    stop_token_ids: list[int] = field(default_factory=list)
    is_default: bool = True

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (a list of {"role", "content"} with string content)."""
        messages = check_messages(messages)
        try:
            return _compiled(self.template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatError:
            raise
        except Exception as e:  # a template error (undefined, sandbox refusal, type error)
            raise ChatError(f"chat template failed to render: {type(e).__name__}: {e}") from None


TURN_ATTENTION = "turn-attention"


def turn_attention_plan(chat_format: ChatFormat, tokenizer, messages, ids: list[int]) -> str:
    """The plan TURN_ATTENTION names for a chat turn whose prompt `ids` renders `messages` (ending in the new
    message): recurrent over the history's tokens, attention from the new message on (all attention when
    there is no history, or when the history's tokens are not a prefix of the prompt's)."""
    history = []
    if len(messages) > 1:
        text = chat_format.render(messages[:-1], add_generation_prompt=False)
        history = tokenizer.encode(text, add_special_tokens=False).ids
    start = len(history) if 0 < len(history) < len(ids) and ids[:len(history)] == history else 0
    return f"R:0-{start},A:{start}-" if start else "attention"


def check_messages(messages) -> list[dict]:
    """Messages as plain {"role", "content"} dicts; OpenAI content parts of type text are joined."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages: needs a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"messages[{i}]: expected an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role: expected one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):  # OpenAI content parts
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ChatError(f"messages[{i}].content: only text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ChatError(f"messages[{i}].content: expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def chat_format(tokenizer, tokenizer_config: dict | None) -> ChatFormat:
    """The ChatFormat from a checkpoint's tokenizer_config (None: the default template, stopping at <|endoftext|>)."""
    config = tokenizer_config or {}
    end_of_text = end_of_text_id(tokenizer)
    template = config.get("chat_template")
    if isinstance(template, list):  # HF's named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    eos = _token_text(config.get("eos_token"))
    if not isinstance(template, str) or not template:
        template, eos, is_default = DEFAULT_CHAT_TEMPLATE, eos or (END_OF_TEXT if end_of_text is not None else ""), True
    else:
        is_default = False
    stops = _as_id_list(config.get("eos_token_id"))
    for text in (eos,):
        tid = tokenizer.token_to_id(text) if text else None
        if tid is not None:
            stops.append(tid)
    if end_of_text is not None:
        stops.append(end_of_text)
    return ChatFormat(template, _token_text(config.get("bos_token")) or "", eos or "", sorted(set(stops)), is_default)


def read_tokenizer_config(path: str | Path) -> dict | None:
    """The checkpoint's tokenizer_config.json as a dict (None if it has none); a broken file is a FormatError."""
    file = Path(path) / TOKENIZER_CONFIG_FILE
    if not file.exists():
        return None
    return read_json_object(file)


def load_chat_format(path: str | Path, tokenizer) -> ChatFormat:
    return chat_format(tokenizer, read_tokenizer_config(path))


def stop_token_ids(path: str | Path, tokenizer) -> list[int]:
    """Every id that ends generation for this checkpoint: its eos_token_id(s), its eos_token and <|endoftext|>."""
    return load_chat_format(path, tokenizer).stop_token_ids


# ----- what the converters store -----
def tokenizer_config_from_gguf(metadata: dict) -> dict | None:
    """tokenizer_config from GGUF metadata: the chat template, bos/eos tokens, every end-of-turn id."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []

    def token(key):
        i = metadata.get(key)
        return tokens[int(i)] if isinstance(i, int) and 0 <= i < len(tokens) else None

    ends = sorted({int(metadata[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                                "tokenizer.ggml.eom_token_id")
                   if isinstance(metadata.get(k), int) and 0 <= metadata[k] < len(tokens)})
    config = {"chat_template": metadata.get("tokenizer.chat_template"), "bos_token": token("tokenizer.ggml.bos_token_id"),
              "eos_token": token("tokenizer.ggml.eos_token_id"), "eos_token_id": ends}
    config = {k: v for k, v in config.items() if v not in (None, [], "")}
    return config or None


def tokenizer_config_from_hf(path: str | Path) -> dict | None:
    """tokenizer_config from an HF model directory: tokenizer_config.json, chat_template.jinja / .json,
    and generation_config.json's eos_token_id."""
    path = Path(path)

    def read(name):
        file = path / name
        if not file.exists():
            return {}
        value = read_json(file)
        return value if isinstance(value, dict) else {}

    source = read(TOKENIZER_CONFIG_FILE)
    template = source.get("chat_template")
    if (path / "chat_template.jinja").exists():
        check_regular(path / "chat_template.jinja")
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    elif read("chat_template.json").get("chat_template"):
        template = read("chat_template.json")["chat_template"]
    ends = _as_id_list(read("generation_config.json").get("eos_token_id"))
    config = {"chat_template": template, "bos_token": _token_text(source.get("bos_token")),
              "eos_token": _token_text(source.get("eos_token")), "eos_token_id": ends}
    config = {k: v for k, v in config.items() if v not in (None, [], "")}
    return config or None
