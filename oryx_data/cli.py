"""The `oryx data` command: build token shards, decode a split back to text, train a tokenizer."""
from __future__ import annotations

import json

from oryx_core.argtypes import finite_float, non_negative_int, positive_int
from oryx_core.atomic import atomic_write_bytes
from oryx_core.cli import FORCE_FLAG
from oryx_core.output import check_output, replacing_allowed
from oryx_core.tokenizer import END_OF_TEXT, end_of_text_id, load_tokenizer

from .pipeline import (DEFAULT_SHARD_TOKENS, DEFAULT_VOCAB_SIZE, SPLITS, TOKEN_DTYPES, build_shards, gpt2_tokenizer,
                       iter_documents, split_text, train_tokenizer)


def cmd_build(args) -> None:
    if args.vocab_size is not None and not args.train_tokenizer:
        raise ValueError("--vocab-size is for --train-tokenizer")
    check_output(args.out, "shards", [*(("--input", i) for i in args.input), ("--tokenizer", args.tokenizer)],
                 args.force, "--out")
    tokenizer = None
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    elif args.gpt2:
        tokenizer = gpt2_tokenizer()
    with replacing_allowed(args.out if args.force else None):
        meta = build_shards(args.input, args.out, tokenizer=tokenizer,
                            train_vocab_size=(args.vocab_size or DEFAULT_VOCAB_SIZE) if args.train_tokenizer else None,
                            val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, seed=args.seed,
                            blank_lines=args.blank_lines, strict_utf8=args.strict_utf8, dtype=args.dtype,
                            show_progress=not args.quiet)
    if args.json:
        print(json.dumps(meta, indent=2))
    else:
        print(f"wrote {args.out}: vocab {meta['vocab_size']} ({meta['dtype']}), eot {meta['eot_id']}; "
              + "; ".join(f"{s} {meta['tokens'][s]:,} tokens in {meta['documents'][s]:,} documents, "
                          f"{len(meta['splits'][s])} shards" for s in SPLITS))


def cmd_train_tokenizer(args) -> None:
    check_output(args.out, "tokenizer", [("--input", i) for i in args.input], args.force, "--out")
    texts = (d.text for d in iter_documents(args.input, args.blank_lines, args.strict_utf8))
    tok = train_tokenizer(texts, args.vocab_size, show_progress=not args.quiet)
    atomic_write_bytes(args.out, tok.to_str().encode("utf-8"))
    print(f"wrote {args.out}: byte-level BPE, {tok.get_vocab_size()} tokens, "
          f"{END_OF_TEXT} = {end_of_text_id(tok)}")


def cmd_decode(args) -> None:
    check_output(args.out, "text", [("DIR", args.dir)], args.force, "--out")
    text = split_text(args.dir, args.split, separators=not args.plain)
    atomic_write_bytes(args.out, text.encode("utf-8"))
    print(f"wrote {args.out}: the {args.split} split of {args.dir}, {len(text):,} characters")


def _add_reading_flags(p) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text files, directories, .xz files or .tar.xz archives")
    p.add_argument("--blank-lines", type=non_negative_int, default=0, metavar="N",
                   help="also end a document at a run of N blank lines (default 0: only at files and <|endoftext|>)")
    p.add_argument("--strict-utf8", action="store_true", help="fail on non-UTF-8 text instead of skipping it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--force", **FORCE_FLAG)


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="build token shards for training; train tokenizers",
                                 description="Turn text into memory-mapped token shards, and train tokenizers.")
    sub = data.add_subparsers(dest="subcommand", metavar="DATA_COMMAND")  # oryx_core.cli.command_prog names it in errors
    sub.required = True

    p = sub.add_parser("build", help="tokenise text into train/val token shards",
                       description="Tokenise text files into DIR/{meta.json, tokenizer.json, train-*.bin, val-*.bin}. "
                                   "One file is one document unless <|endoftext|> (or --blank-lines) separates "
                                   "documents inside it; whole documents go to val by a seeded hash.")
    _add_reading_flags(p)
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tokenizer", help="a tokenizer.json (or a checkpoint directory holding one)")
    which.add_argument("--train-tokenizer", action="store_true", help="train a byte-level BPE on the train split")
    which.add_argument("--gpt2", action="store_true", help="the GPT-2 tokenizer shipped with oryx_data")
    p.add_argument("--vocab-size", type=positive_int, help=f"for --train-tokenizer (default {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--val-fraction", type=finite_float(0.0, 1.0, high_open=True), default=0.01,
                   help="share of documents for val (default 0.01)")
    p.add_argument("--shard-tokens", type=positive_int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS})")
    p.add_argument("--seed", type=non_negative_int, default=0, help="keys the train/val hash (default 0)")
    p.add_argument("--dtype", default="auto", choices=["auto", *TOKEN_DTYPES], help="token id type (default auto)")
    p.add_argument("--json", action="store_true", help="print meta.json")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("decode", help="write one split of a shard directory back as text",
                       description="Decode one split of a token shard directory to a UTF-8 text file: documents "
                                   "separated by an <|endoftext|> line, or run together with --plain.")
    p.add_argument("dir", help="token shard directory (from oryx data build)")
    p.add_argument("--split", default="val", choices=list(SPLITS), help="which split (default val)")
    p.add_argument("--out", required=True, help="text file to write (atomically)")
    p.add_argument("--plain", action="store_true",
                   help="no separators: the documents run together, as the held-out texts of docs/results.md")
    p.add_argument("--force", **FORCE_FLAG)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on text",
                       description="Train a byte-level BPE tokenizer (with <|endoftext|>) and write its tokenizer.json.")
    _add_reading_flags(p)
    p.add_argument("--out", required=True, help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=positive_int, default=DEFAULT_VOCAB_SIZE,
                   help=f"tokens in all (default {DEFAULT_VOCAB_SIZE})")
    p.set_defaults(func=cmd_train_tokenizer)
