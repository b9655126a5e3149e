"""`oryx generate`: stream a completion from a checkpoint (torch backend here; `--backend mlx` hands over
to oryx_mlx.generate.cli_generate). torch and mlx are imported only inside the command."""
from __future__ import annotations

import json
import sys

from oryx_core.default import DEFAULT_MODEL

BACKENDS = ("torch", "mlx")


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint under a mode plan",
                              description="Stream a completion of --prompt to stdout. The plan says which tokens run "
                                          "in attention mode: prefill-attention (default), attention, recurrent, "
                                          "last:10%, every:4:64, A:0-512,R:512- ...")
    p.add_argument("path", nargs="?", default=str(DEFAULT_MODEL),
                   help="checkpoint directory (with tokenizer.json, else the byte-level tokenizer); default: the embedded model")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--plan", default="prefill-attention", help="mode plan (default prefill-attention)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already in the text (prompt included) by this, "
                        "multiply the negative ones (1 = off, the default; 1.1-1.3 curbs loops)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    p.add_argument("--kv-policy", choices=["keep", "drop"], default="keep",
                   help="keep the KV cache, or drop it once the plan has no attention left (constant memory)")
    p.add_argument("--state-policy", choices=["auto", "keep", "drop"], default="auto",
                   help="recurrent state when no recurrent token is left: auto (drop it; the torch backend keeps "
                        "it), keep, drop (MLX only)")
    p.add_argument("--backend", choices=BACKENDS, default="torch", help="backend (default torch)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="torch compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object (text and speed) instead of streaming")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> None:
    if args.backend == "mlx":
        try:
            from oryx_mlx.generate import cli_generate
        except ImportError as e:
            raise ValueError(f"--backend mlx: not available ({e})") from None
        cli_generate(args)
        return
    if args.state_policy == "drop":
        raise ValueError("--state-policy drop: only --backend mlx drops the recurrent state; the torch backend keeps it")
    import torch

    from oryx_core.evaluate import tokenizer_for

    from .generate import generate, stream_generate
    from .model import OryxModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model = OryxModel.from_checkpoint(args.path, dtype=dtype, device=device).eval()
    tokenizer = tokenizer_for(args.path)
    options = dict(plan=args.plan, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   stop_strings=args.stop, kv_policy=args.kv_policy, repetition_penalty=args.repetition_penalty)
    if args.json:
        result = generate(model, tokenizer, args.prompt, args.max_tokens, **options)
        print(json.dumps({"text": result.text, "tokens": result.tokens, "backend": "torch", "device": device,
                          "dtype": dtype, "plan": args.plan, **result.stats.to_dict()}, indent=2))
        return
    stats = None
    for piece in stream_generate(model, tokenizer, args.prompt, args.max_tokens, **options):
        sys.stdout.write(piece.text)
        sys.stdout.flush()
        stats = piece.stats
    sys.stdout.write("\n")
    memory = f", peak memory {stats.peak_memory_bytes / 2**20:.1f} MiB" if stats.peak_memory_bytes else ""
    print(f"[prompt {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s; generated {stats.generated_tokens} "
          f"tokens, {stats.generation_tps:.1f} tok/s; stop: {stats.stop_reason}{memory}]", file=sys.stderr)
