"""`oryx generate`: stream a completion from a checkpoint on any backend with a cache.

The backend is reached through oryx_core.backend (torch and mlx are imported only when the
command runs), and the loop, checks, speed line and `--json` object are oryx_core.generation's,
so every backend prints the same.
"""
from __future__ import annotations

import json
import sys

from .argtypes import finite_float, int_range, non_negative_float, non_negative_int, positive_float, positive_int
from .backend import GENERATION_BACKENDS, BackendUnavailable, get_backend
from .default import DEFAULT_MODEL
from .generation import KV_POLICIES, MAX_SEED, STATE_POLICIES, json_result, speed_line, stream_generate
from .weights import FLOAT_DTYPES


def default_backend() -> str:
    """The first generation backend whose extra is installed."""
    for name in GENERATION_BACKENDS:
        try:
            get_backend(name)
            return name
        except BackendUnavailable:
            continue
    raise BackendUnavailable("no backend installed; pip install 'oryx[cuda]' (PyTorch) or 'oryx[mlx]' (MLX)")


def add_generation_flags(p) -> None:
    """The flags every command that generates takes (`oryx generate`, `oryx chat`): sampling, the cache policies,
    backend, device and dtype; each refuses a bad value in one line naming it (oryx_core.argtypes)."""
    p.add_argument("--max-tokens", type=positive_int, default=256,
                   help="tokens to generate at most, per reply (default 256)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=finite_float(0.0, 1.0, low_open=True), default=1.0,
                   help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0,
                   help="divide the logits of tokens already in the text (prompt included) by this, "
                        "multiply the negative ones (1 = off, the default; 1.1-1.3 curbs loops)")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=0, help="random seed (default 0)")
    p.add_argument("--kv-policy", choices=list(KV_POLICIES), default="keep",
                   help="keep the KV cache, or drop it once the plan has no attention token left (constant memory; "
                        "oryx chat then reads the whole conversation again at the next turn)")
    p.add_argument("--state-policy", choices=list(STATE_POLICIES), default="auto",
                   help="keep the recurrent state, or drop it once the plan has no recurrent token left (later "
                        "tokens skip the recurrent work); auto = drop where the command owns its cache (oryx "
                        "generate), keep where the next turn reads it (oryx chat)")
    p.add_argument("--backend", choices=list(GENERATION_BACKENDS), default=None,
                   help="backend (default: torch if installed, else mlx)")
    p.add_argument("--device", default=None,
                   help="torch: cpu, cuda, cuda:N (default cuda if present); mlx: cpu or gpu (default: MLX's)")
    p.add_argument("--dtype", choices=list(FLOAT_DTYPES), default=None,
                   help="compute dtype (default: torch bfloat16 on CUDA and float32 on the CPU; mlx as stored)")
    p.add_argument("--prefill-step-size", type=positive_int, default=2048,
                   help="prompt tokens per prefill piece (bounds the attention scores' memory; default 2048)")


def cmd_generate(args) -> None:
    from .chat import load_chat_format
    from .tokenizer import tokenizer_for

    backend = args.backend or default_backend()
    model = get_backend(backend).load(args.path, dtype=args.dtype, device=args.device)
    tokenizer = tokenizer_for(args.path)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed, kv_policy=args.kv_policy,
                   state_policy=args.state_policy, stop_strings=args.stop, prefill_step_size=args.prefill_step_size)
    # the checkpoint's end-of-turn ids (tokenizer_config.json) and <|endoftext|> end the text
    chat = load_chat_format(args.path, tokenizer)
    options["stop_token_ids"] = chat.stop_token_ids
    prompt = args.prompt
    if args.chat:  # one chat turn: the prompt is the user's message, rendered with the chat template
        messages = [{"role": "system", "content": args.system}] if args.system else []
        text = chat.render(messages + [{"role": "user", "content": args.prompt}])
        prompt = tokenizer.encode(text, add_special_tokens=False).ids
    elif args.system:
        raise ValueError("--system applies only with --chat")
    pieces, tokens, last = [], [], None
    for last in stream_generate(model, tokenizer, prompt, args.max_tokens, args.plan, **options):
        pieces.append(last.text)
        tokens.extend(last.tokens)
        if not args.json:
            sys.stdout.write(last.text)
            sys.stdout.flush()
    if args.json:
        last.text, last.tokens = "".join(pieces), tokens
        print(json.dumps(json_result(last, model, args.plan, args.kv_policy, args.state_policy), indent=2))
        return
    sys.stdout.write("\n")
    print(speed_line(last.stats), file=sys.stderr)


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint under a mode plan",
                              description="Stream a completion of --prompt to stdout, then one speed line to stderr. "
                                          "The plan says which tokens run in attention mode: prefill-attention "
                                          "(default), attention, recurrent, last:10%%, every:4:64, A:0-512,R:512- ... "
                                          "The prompt and the new tokens together fit the model's max_context.")
    p.add_argument("path", nargs="?", default=str(DEFAULT_MODEL),
                   help="checkpoint directory (with tokenizer.json, else the byte-level tokenizer); default: the "
                        "embedded model")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--plan", default="prefill-attention", help="mode plan (default prefill-attention)")
    add_generation_flags(p)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    p.add_argument("--chat", action="store_true",
                   help="one chat turn: --prompt is the user's message, rendered with the checkpoint's chat template "
                        "(or the default one, see oryx chat)")
    p.add_argument("--system", help="with --chat: a system message before the user's")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, speed) instead of streaming")
    p.set_defaults(func=cmd_generate)
