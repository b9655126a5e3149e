"""The embedded default model: what `oryx generate` and `oryx eval` use when no model is named.

A small Oryx model trained by experiments/gpu_all.sh (see docs/results.md for how, on what
and how well), shipped as package data in bfloat16 safetensors shards with its tokenizer.
"""
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"
