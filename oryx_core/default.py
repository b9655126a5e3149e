"""The embedded default model: what `oryx generate` and `oryx eval` use when no model is named.

A small Oryx model (31M parameters, Oryx-GDN) trained with experiments/configs/default_model_prose.json
by experiments/train_default.py (docs/results.md, section 4c: how, on what and how well), shipped as
package data in bfloat16 safetensors shards with its tokenizer.
"""
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"
