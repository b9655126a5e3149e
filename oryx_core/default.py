"""The embedded default model: what `oryx generate` and `oryx eval` use when no model is named.

A small Oryx model (31M parameters) trained with experiments/configs/default_model.json by
experiments/gpu_long.sh (docs/results.md, section 4: how, on what and how well), shipped as
package data in bfloat16 safetensors shards with its tokenizer.
"""
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"
