"""`convert(src, dst, ...)`: any supported source kind -> any target kind, with dtype casts and MLX quantisation.

Source kinds: oryx (an Oryx checkpoint), torch-state-dict / mlx-weights (the containers of oryx_convert.backends),
llama (a Hugging Face LlamaForCausalLM directory), gguf (a llama.cpp Llama GGUF file),
fla-gdn (fla's GatedDeltaNetForCausalLM directory), mamba2 (mamba-ssm's MambaLMHeadModel
directory with Mamba-2 layers). Target kinds: oryx, torch-state-dict, mlx-weights, mlx-lm, hf (an Oryx checkpoint
that transformers' AutoModelForCausalLM also loads, oryx_torch.hf). Every oryx command reads oryx and hf; the two
containers are weights for one's own PyTorch or MLX code, and mlx-lm is for mlx_lm.load.

Every target is written through an atomic directory, after the whole model was read and
validated, so a failed conversion leaves nothing at dst.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from oryx_core.chat import read_tokenizer_config, tokenizer_config_from_gguf, tokenizer_config_from_hf
from oryx_core.atomic import temp_prefix
from oryx_core.backend import get_backend
from oryx_core.config import MIXERS, ConfigError
from oryx_core.output import check_output
from oryx_core.safetensors_io import FormatError
from oryx_core.weights import (DEFAULT_SHARD_BYTES, FLOAT_DTYPES, QUANT_BITS, TOKENIZER_FILE, check_against_spec,
                               load_checkpoint, save_checkpoint)
from oryx_core.weights import QUANT_GROUP_SIZES as GROUP_SIZES

from . import backends
from .fla_gdn import import_fla_gdn
from .llama import import_gguf_llama, import_hf_llama
from .mamba2 import import_mamba2
from .sources import HF_CONFIG, ConvertedModel, read_json

FAMILY_KINDS = ("llama", "gguf")  # the imports that take --mixer and --seed (their recurrent gates are initialised)


def read_oryx(src, **_) -> ConvertedModel:
    ckpt = load_checkpoint(src)
    tokenizer = ckpt.extra_files.get(TOKENIZER_FILE)
    return ConvertedModel(ckpt.config, ckpt.params, tokenizer.decode() if tokenizer else None, ckpt.quantization)


SOURCE_KINDS = {
    "oryx": read_oryx,
    "torch-state-dict": lambda src, **_: backends.read_torch_dir(src),
    "mlx-weights": lambda src, **_: backends.read_mlx_dir(src),
    "llama": lambda src, mixer, seed: import_hf_llama(src, mixer, seed),
    "gguf": lambda src, mixer, seed: import_gguf_llama(src, mixer, seed),
    "fla-gdn": lambda src, **_: import_fla_gdn(src),
    "mamba2": lambda src, **_: import_mamba2(src),
}
TARGET_KINDS = ("oryx", "torch-state-dict", "mlx-weights", "mlx-lm", "hf")  # hf: an Oryx checkpoint transformers also loads
CONTAINER_FORMATS = {"oryx": "oryx", backends.TORCH_FORMAT: "torch-state-dict", backends.MLX_FORMAT: "mlx-weights"}
HF_MODEL_TYPES = {"llama": "llama", "gated_deltanet": "fla-gdn"}


def detect_kind(src) -> str:
    """The source kind from a file's magic or a directory's config.json."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    if src.is_file():
        with open(src, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise FormatError(f"{src}: a file, but not GGUF; other sources are model directories")
    config = read_json(src / HF_CONFIG)
    if config.get("format") in CONTAINER_FORMATS:
        return CONTAINER_FORMATS[config["format"]]
    if config.get("model_type") in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[config["model_type"]]
    if "ssm_cfg" in config:
        return "mamba2"
    raise FormatError(f"{src / HF_CONFIG}: cannot tell the model kind (model_type {config.get('model_type')!r}); "
                      f"pass --from ({', '.join(SOURCE_KINDS)})")


def cast_floats(model: ConvertedModel, dtype: str) -> ConvertedModel:
    """Float tensors cast to dtype (round to nearest even); packed quantised weights stay as they are."""
    import ml_dtypes

    target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    params = {n: a.astype(target, copy=False) if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a
              for n, a in model.params.items()}
    return ConvertedModel(model.config, params, model.tokenizer_json, model.quantization)


def _check_options(src: Path, dst: Path, from_kind: str, to_kind: str, dtype, quantize, group_size, mixer) -> None:
    if from_kind not in SOURCE_KINDS:
        raise ValueError(f"--from must be one of {', '.join(SOURCE_KINDS)} or auto, got {from_kind!r}")
    if to_kind not in TARGET_KINDS:
        raise ValueError(f"--to must be one of {', '.join(TARGET_KINDS)}, got {to_kind!r}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    if quantize is not None and quantize not in QUANT_BITS:
        raise ValueError(f"--quantize must be one of {QUANT_BITS} bits, got {quantize!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"--group-size must be one of {GROUP_SIZES}, got {group_size!r}")
    if quantize is not None and to_kind in ("torch-state-dict", "hf"):
        raise ValueError(f"--quantize: MLX quantisation cannot be stored for --to {to_kind}")
    if mixer not in MIXERS:
        raise ValueError(f"--mixer must be one of {', '.join(MIXERS)}, got {mixer!r}")
    if src.resolve() == dst.resolve():
        raise ValueError(f"DST {dst}: the same path as SRC; write the conversion elsewhere")
    check_output(dst, None, [("SRC", src)], force=True, flag="DST")  # nor inside or around it


def _validate(model: ConvertedModel, where: str) -> None:
    if model.quantization is None:
        check_against_spec(model.config, model.params, where)
    else:
        backends.mlx_model(model)  # checks every packed tensor against the spec (needs MLX)


def source_tokenizer_config(src: Path, from_kind: str) -> dict | None:
    """The chat template and end-of-turn ids a source carries (oryx_core.chat), or None."""
    if from_kind == "gguf":
        from .gguf import read_gguf

        return tokenizer_config_from_gguf(read_gguf(src).metadata)
    if from_kind in ("oryx", *CONTAINER_FORMATS.values()):
        return read_tokenizer_config(src)
    return tokenizer_config_from_hf(src)


def _write(model: ConvertedModel, dst: Path, to_kind: str, plan: str, shard_bytes: int,
           tokenizer_config: dict | None = None) -> Path:
    if to_kind == "oryx":
        return save_checkpoint(dst, model.config, model.params, tokenizer_json=model.tokenizer_json,
                               quantization=model.quantization, shard_bytes=shard_bytes,
                               tokenizer_config=tokenizer_config)
    if to_kind == "hf":
        return get_backend("torch").add_hf_files(_write(model, dst, "oryx", plan, shard_bytes, tokenizer_config), plan)
    if to_kind == "torch-state-dict":
        return backends.write_torch_dir(dst, model, shard_bytes)
    if to_kind == "mlx-weights":
        return backends.write_mlx_dir(dst, model, shard_bytes)
    export_mlx_lm = get_backend("mlx").export_mlx_lm
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=temp_prefix(dst)) as tmp:  # a killed run's is cleaned up
        staged = _write(model, Path(tmp) / "checkpoint", "oryx", plan, shard_bytes, tokenizer_config)
        return export_mlx_lm(staged, dst, plan=plan)


def convert(src, dst, from_kind: str = "auto", to_kind: str = "oryx", dtype: str | None = None,
            quantize: int | None = None, group_size: int = 64, mixer: str = "gdn", seed: int = 0,
            dequantize: bool = False, plan: str = "attention", shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Converts src (of from_kind, or detected) to dst (of to_kind); returns dst.

    dtype casts float tensors; quantize (bits) applies oryx_mlx's affine quantisation in
    groups of group_size; dequantize expands an MLX-quantised source to floats first.
    mixer and seed apply to Llama imports (the recurrent mixer, and the seed of its gates).
    plan is the mode plan an mlx-lm export runs with.
    """
    src, dst = Path(src), Path(dst)
    from_kind = detect_kind(src) if from_kind == "auto" else from_kind
    _check_options(src, dst, from_kind, to_kind, dtype, quantize, group_size, mixer)
    if from_kind not in FAMILY_KINDS and (mixer != "gdn" or seed != 0):
        raise ValueError(f"--mixer/--seed apply only to --from {'/'.join(FAMILY_KINDS)}; {from_kind} fixes its mixer")
    try:
        if from_kind == "gguf" and dtype is not None and quantize is None and not dequantize:
            import ml_dtypes  # the GGUF import casts tensor by tensor, so float32 copies never pile up

            model = import_gguf_llama(src, mixer, seed,
                                      np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype))
        else:
            model = SOURCE_KINDS[from_kind](src, mixer=mixer, seed=seed)
    except ConfigError as e:  # a source config that maps to no valid Oryx config: name the source
        raise FormatError(f"{src}: {e}") from None
    if dequantize:
        model = backends.dequantize(model)
    if dtype is not None:
        model = cast_floats(model, dtype)
    if quantize is not None:
        model = backends.quantize(model, quantize, group_size)
    _validate(model, str(src))
    return _write(model, dst, to_kind, plan, shard_bytes, source_tokenizer_config(src, from_kind))
