"""Writes a directory that `mlx_lm.load(path, trust_remote_code=True)` loads and `mlx_lm.generate` runs.

The export is code: loaded that way, mlx-lm executes the directory's `oryx_mlx_lm.py`, so load an export
that way only from a source you trust. Where Oryx is installed, `load_export(path)` loads it through
mlx-lm's own loader (`mlx_lm.utils.load_model` with `get_model_classes`) with the installed
oryx_mlx.mlx_lm_model instead, executing nothing from the directory.

Contents: the checkpoint's safetensors shards unchanged (an adapter's written merged with its base; the
spec's tensor names are the model's parameter names, quantised or not), config.json for mlx-lm (the Oryx config,
"model_type": "oryx", "model_file": "oryx_mlx_lm.py", "oryx_plan", "quantization" when
quantised, "eos_token_id"), the model module `oryx_mlx_lm.py` (a copy of
oryx_mlx/mlx_lm_model.py, which imports only mlx and numpy, so the directory runs where Oryx
is not installed), tokenizer.json, and a tokenizer_config.json so that transformers'
AutoTokenizer (which mlx-lm uses) reads it without knowing "oryx".
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from oryx_core.tokenizer import tokenizer_for
from oryx_core.tokenizer import END_OF_TEXT, end_of_text_id
from oryx_core.atomic import atomic_directory
from oryx_core.plan import ModePlan
from oryx_core.adapter import is_adapter
from oryx_core.weights import INDEX_FILE, TOKENIZER_FILE, load_checkpoint, read_index, save_checkpoint


MODEL_FILE = "oryx_mlx_lm.py"  # a plain file name inside the export


def _installed_classes(config: dict):
    """mlx-lm's get_model_classes for an Oryx export: the installed model module, not the directory's copy."""
    from . import mlx_lm_model

    if config.get("model_type") != "oryx":
        raise ValueError(f"not an Oryx mlx-lm export (model_type {config.get('model_type')!r})")
    return mlx_lm_model.Model, mlx_lm_model.ModelArgs


def load_export(path, lazy: bool = False):
    """(model, tokenizer) of an `oryx export-mlx-lm` directory, as mlx_lm.load gives them, built from the
    installed oryx_mlx instead of the directory's oryx_mlx_lm.py, so no trust_remote_code is needed."""
    from mlx_lm.utils import load_model, load_tokenizer

    path = Path(path)
    model, config = load_model(path, lazy, model_config={"model_file": None}, get_model_classes=_installed_classes)
    return model, load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
POSITIONAL_PLAN_KINDS = ("attention", "recurrent", "every", "spans")


def positional_plan(text) -> ModePlan:
    """The plan an export runs with: mlx-lm gives no prompt or final length, so only plans that
    decide a token's mode from its position (the kinds mlx_lm_model.parse_plan reads)."""
    plan = ModePlan.parse(text)
    if plan.kind not in POSITIONAL_PLAN_KINDS:
        raise ValueError(f"oryx_plan {str(plan)!r}: mlx-lm gives no prompt or final length, so the plan must decide "
                         "each token's mode from its position (attention, recurrent, every:K:C or spans)")
    return plan


def export_mlx_lm(src, dst, plan: str = "attention", bits: int | None = None, group_size: int = 64) -> Path:
    """Exports checkpoint src to dst for mlx-lm; `bits` quantises on the way (src must then be full precision)."""
    plan_text = str(positional_plan(plan))
    if bits is None:
        return _export(Path(src), Path(dst), plan_text)
    from .generate import load_model
    from .quantize import quantize_model, save_quantized

    model = load_model(src)
    quantize_model(model, bits, group_size)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Path(src) / TOKENIZER_FILE
        quantized = save_quantized(model, Path(tmp) / "quantized", bits, group_size,
                                   tokenizer.read_text() if tokenizer.exists() else None)
        return _export(quantized, Path(dst), plan_text)


EXPORT_SHARINGS = ("kv", "kv-proj")  # what mlx_lm_model.py implements


def _export(src: Path, dst: Path, plan_text: str) -> Path:
    ckpt = load_checkpoint(src)  # validates the checkpoint before anything is written
    if ckpt.config.sharing not in EXPORT_SHARINGS:
        raise ValueError(f"{src}: sharing {ckpt.config.sharing!r} cannot be exported to mlx-lm (only sharing "
                         f"{' and '.join(map(repr, EXPORT_SHARINGS))})")
    if is_adapter(src):  # an adapter on its base: the merged checkpoint's shards, written once
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = Path(src) / TOKENIZER_FILE
            merged = save_checkpoint(Path(tmp) / "merged", ckpt.config, ckpt.params, quantization=ckpt.quantization,
                                     tokenizer_json=tokenizer.read_text() if tokenizer.exists() else None)
            return _write_export(merged, ckpt, dst, plan_text)
    return _write_export(src, ckpt, dst, plan_text)


def _write_export(src: Path, ckpt, dst: Path, plan_text: str) -> Path:
    """The export directory of checkpoint directory src, whose loaded (validated) checkpoint is ckpt."""
    shards = sorted(set(read_index(src)[0].values()))
    tokenizer = tokenizer_for(src)  # the checkpoint's tokenizer.json, else the byte-level default
    eos = end_of_text_id(tokenizer)
    config = {**ckpt.config.to_dict(), "model_type": "oryx", "architectures": ["OryxForCausalLM"],
              "model_file": MODEL_FILE, "oryx_plan": plan_text}
    if ckpt.quantization is not None:
        config["quantization"] = ckpt.quantization
    if eos is not None:
        config["eos_token_id"] = eos
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if eos is not None:
        tokenizer_config["eos_token"] = END_OF_TEXT

    def fill(tmp: Path):
        for shard in shards:
            shutil.copyfile(src / shard, tmp / shard)
        shutil.copyfile(src / INDEX_FILE, tmp / INDEX_FILE)
        shutil.copyfile(Path(__file__).with_name("mlx_lm_model.py"), tmp / MODEL_FILE)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if (src / TOKENIZER_FILE).exists():
            shutil.copyfile(src / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        else:
            (tmp / TOKENIZER_FILE).write_text(tokenizer.to_str())
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))

    return atomic_directory(dst, fill)
