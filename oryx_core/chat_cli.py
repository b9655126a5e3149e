"""`oryx chat`: an interactive chat in the terminal on the torch or MLX backend.

    oryx chat runs/smollm2 --system "You are terse." --plan turn-attention

Each turn renders the whole conversation with the checkpoint's chat template (oryx_core.chat)
and generates a reply that stops at the model's end-of-turn tokens. The cache is kept from
turn to turn: the tokens of earlier turns are not fed again, only the new ones. Commands:
/reset forgets the conversation, /exit (or Ctrl-D) quits; Ctrl-C stops a reply, not the
program (the reply so far stays in the history).

The plan applies per turn, over absolute positions (the history included). `turn-attention`
runs the new turn (the user's message and the reply) in attention mode and leaves the
history to the recurrent readout.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .backend import get_backend
from .chat import TURN_ATTENTION, turn_attention_plan



class Conversation:
    """A chat with one model: the messages, and the cache holding every token fed so far."""

    def __init__(self, model, tokenizer, chat_format, system: str | None = None, plan: str = "prefill-attention",
                 **options):
        self.model, self.tokenizer, self.format = model, tokenizer, chat_format
        self.system, self.plan, self.options = system, plan, options
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache, self.fed = None, []

    def _ids(self, messages, add_generation_prompt: bool = True) -> list[int]:
        text = self.format.render(messages, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def turn_plan(self, messages, ids: list[int]) -> str:
        """The plan for a turn: `messages` ending in the new user message, rendered to `ids`.
        TURN_ATTENTION becomes recurrent over the history, attention from the new message on."""
        if self.plan != TURN_ATTENTION:
            return self.plan
        return turn_attention_plan(self.format, self.tokenizer, messages, ids)

    def reply(self, text: str, max_tokens: int = 256):
        """Streams the reply to `text` (oryx_core.generation responses); the reply joins the history as it ends
        or when the caller stops iterating (Ctrl-C)."""
        from .generation import stream_generate

        self.messages.append({"role": "user", "content": text})
        ids = self._ids(self.messages)
        # a cache that dropped its KV or its state cannot serve every plan of a later turn: start afresh then
        reusable = self.options.get("kv_policy", "keep") == "keep" and self.options.get("state_policy") != "drop"
        if not reusable or self.cache is None or not (len(self.fed) < len(ids) and ids[:len(self.fed)] == self.fed):
            self.cache, self.fed = self.model.make_cache(1), []
        plan = self.turn_plan(self.messages, ids)
        pieces, sampled = [], []
        try:
            for r in stream_generate(self.model, self.tokenizer, ids[len(self.fed):], max_tokens, plan,
                                     prompt_cache=self.cache, stop_token_ids=self.format.stop_token_ids,
                                     **self.options):
                pieces.append(r.text)
                sampled.append(r.token if r.tokens else -1)
                yield r
        finally:
            self.fed = ids + sampled[:-1]  # every token fed to the cache; the last sampled one is not
            self.messages.append({"role": "assistant", "content": "".join(pieces)})


def load_conversation(args) -> Conversation:
    from .chat import load_chat_format
    from .generate_cli import default_backend
    from .tokenizer import byte_level_tokenizer, load_tokenizer
    from .weights import read_config

    path = Path(args.path)
    read_config(path)
    tokenizer = load_tokenizer(path) if (path / "tokenizer.json").exists() else byte_level_tokenizer()
    model = get_backend(args.backend or default_backend()).load(path, dtype=args.dtype, device=args.device)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed, kv_policy=args.kv_policy,
                   state_policy=args.state_policy, prefill_step_size=args.prefill_step_size)
    return Conversation(model, tokenizer, load_chat_format(path, tokenizer), args.system, args.plan, **options)


def cmd_chat(args) -> None:
    from .plan import ModePlan

    if args.plan != TURN_ATTENTION:
        ModePlan.parse(args.plan)  # a bad plan ends here, with its one-line error
    conversation = load_conversation(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print("oryx chat: /reset forgets the conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply.",
              file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            conversation.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        replies = conversation.reply(text, args.max_tokens)
        try:
            for r in replies:
                sys.stdout.write(r.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            replies.close()  # the reply so far stays in the history
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()


def register(subparsers) -> None:
    from .default import DEFAULT_MODEL
    from .generate_cli import add_generation_flags

    p = subparsers.add_parser("chat", help="an interactive chat with a checkpoint (its chat template)",
                              description="Chat in the terminal: each line is a user message; the reply streams "
                                          "and stops at the model's end-of-turn token. /reset forgets the "
                                          "conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply. Reads lines "
                                          "from a pipe too (one message per line).")
    p.add_argument("path", nargs="?", default=str(DEFAULT_MODEL), help="checkpoint directory (default: the "
                                                                         "embedded model)")
    p.add_argument("--system", help="system message opening the conversation")
    p.add_argument("--plan", default="prefill-attention",
                   help="mode plan per turn, over the whole conversation's positions (default prefill-attention); "
                        f"{TURN_ATTENTION}: the new turn in attention, the history recurrent")
    add_generation_flags(p)
    p.set_defaults(func=cmd_chat)
