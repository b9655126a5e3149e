"""A Hugging Face Llama checkpoint of SmolLM2-135M's shape with random weights and a real tokenizer.

    python bench/random_llama.py --tokenizer-from DIR --out DIR [--seed 0]

For speed benchmarks on machines that cannot receive the real weights (an offline GPU host
whose upload limit is below the GGUF's size): the shape, the tokenizer and the chat template
are SmolLM2-135M-Instruct's, so every kernel, cache and batch runs at the real sizes, while
the text generated is noise. `oryx convert OUT OUT-oryx` then gives the Oryx twin, so
transformers and Oryx hold the same weights. DIR is any directory with `tokenizer.json`
(and, optionally, `tokenizer_config.json`): an Oryx checkpoint converted from the GGUF, say.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import SMOLLM2_135M, hf_config_dict  # noqa: E402


def write_random_llama(tokenizer_from: Path, out: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (tokenizer_from / "tokenizer.json").is_file():
        raise ValueError(f"{tokenizer_from}/tokenizer.json: no such file")
    if out.exists():
        raise ValueError(f"{out} exists; pass a new directory")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**hf_config_dict(SMOLLM2_135M))).eval()
    staged = out.with_name(out.name + ".partial")
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, staged / name)
    staged.rename(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer-from", type=Path, required=True,
                    help="a directory holding tokenizer.json (and tokenizer_config.json)")
    ap.add_argument("--out", type=Path, required=True, help="the new HF checkpoint directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        print(write_random_llama(args.tokenizer_from, args.out, args.seed))
    except ValueError as error:
        print(f"random_llama.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
