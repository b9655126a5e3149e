"""Tokens/s of both retrofit stages at SmolLM2-135M's shape (random weights, random tokens).

    python bench/retrofit_throughput.py --out DIR [--steps 10] [--seq-len 1024] [--batch-size 16]

Prints one JSON line per stage (tokens/s from the run's log, peak memory) and a sanity check that the
layer-stage loss fell.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from oryx_core.config import OryxConfig
from oryx_core.init import init_params
from oryx_core.tokenizer import byte_level_tokenizer
from oryx_core.weights import save_checkpoint
from oryx_data.pipeline import FORMAT, FORMAT_VERSION, META_FILE
from oryx_torch.retrofit import RetrofitConfig, retrofit

SMOLLM2_135M = dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, mlp_hidden=1536,
                    rope_theta=100000.0, max_context=8192, conv_activation="none", output_norm=False,
                    output_gate=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    out = Path(args.out)
    cfg = OryxConfig(**SMOLLM2_135M)
    params = init_params(cfg, 0)
    for name in params:
        if "conv" in name:
            params[name] = np.zeros_like(params[name])
            params[name][:, -1] = 1.0
    src = save_checkpoint(out / "src", cfg, params, tokenizer_json=byte_level_tokenizer().to_str())
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 4_000_000), ("val", 200_000)):
        rng.integers(0, cfg.vocab_size, n, dtype=np.uint16).tofile(data / f"{split}-00000.bin")
    (data / META_FILE).write_text(json.dumps({
        "format": FORMAT, "version": FORMAT_VERSION, "dtype": "uint16", "vocab_size": cfg.vocab_size, "eot_id": 0,
        "splits": {"train": ["train-00000.bin"], "val": ["val-00000.bin"]},
        "tokens": {"train": 4_000_000, "val": 200_000}}))
    per_step = args.seq_len * args.batch_size
    run = RetrofitConfig(src=str(src), out=str(out / "run"), data=str(data), layer_tokens=args.steps * per_step,
                         tokens=args.steps * per_step, seq_len=args.seq_len, batch_size=args.batch_size,
                         eval_every=0, eval_batches=1, save_every=0, log_every=args.steps // 2, progress=False,
                         eval_plans=["attention"])
    retrofit(run, stop_after=2 * args.steps - 1)
    for line in (out / "run" / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "tokens_per_s" in r:
            print(json.dumps({k: r[k] for k in ("step", "stage", "loss", "tokens_per_s", "max_memory_gib") if k in r}))


if __name__ == "__main__":
    main()
