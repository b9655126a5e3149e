"""Reading a source checkpoint's tensors, and taking them one by one so nothing is silently dropped.

An import maps every source tensor to an Oryx tensor. `SourceTensors.take` hands each out
once, checking its shape; `finish` then rejects tensors nobody took, since an unused tensor
means the source is a variant the mapping does not describe (a bias, a hybrid layer ...).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oryx_core.config import OryxConfig
from oryx_core.init import init_params
from oryx_core.files import check_file_name, check_regular, member, read_json_object
from oryx_core.safetensors_io import FormatError, load_file
from oryx_core.spec import parameter_specs

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_TORCH_BIN = "pytorch_model.bin"


class SourceTensors:
    """Named float arrays of a source checkpoint; `where` names it in every error."""

    def __init__(self, tensors: Mapping[str, np.ndarray], where: str, dtype=None):
        # a dict is copied; another mapping (one that reads each tensor on access) is kept as it is
        self.tensors = dict(tensors) if isinstance(tensors, dict) else tensors
        self.where = where
        self.dtype = dtype  # the numpy dtype `take` hands out (None: float32), so a conversion holds its output dtype
        self.taken: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in self.tensors:
            raise FormatError(f"{self.where}: missing tensor {name!r}")
        value = np.asarray(self.tensors[name], dtype=np.float32)
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise FormatError(f"{self.where}: tensor {name!r} has shape {list(value.shape)}, the config needs {list(shape)}")
        self.taken.add(name)
        return value if self.dtype is None else value.astype(self.dtype, copy=False)

    def finish(self, ignorable: tuple[str, ...] = ()) -> None:
        """Fails on tensors no mapping used, except names ending in one of `ignorable`."""
        left = sorted(n for n in set(self.tensors) - self.taken if not n.endswith(ignorable))
        if left:
            raise FormatError(f"{self.where}: tensors the import does not know (unsupported architecture variant?): "
                              f"{left[:5]}{' ...' if len(left) > 5 else ''} ({len(left)} in all)")


def read_json(path: Path) -> dict:
    if not path.exists() and not path.is_symlink():
        raise FormatError(f"{path.parent}: missing {path.name}")
    return read_json_object(path, constants=True)  # Python's json writes Infinity (mamba-ssm's dt_limit)


def index_shards(directory: Path, index: Path) -> list[Path]:
    """The shard files an index's weight_map names, each a plain name of a regular file inside directory."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise FormatError(f"{index}: corrupt index (weight_map must map tensor names to shard file names)")
    files = []
    for name in sorted(set(weight_map.values())):
        check_file_name(name, f"{index}: weight_map")
        if not (directory / name).exists() and not (directory / name).is_symlink():
            raise FormatError(f"{directory}: missing shard {name} named in {index.name}")
        files.append(member(directory, name, str(index)))
    return files


def layer_progress(n_layers: int, where: str):
    """range(n_layers), with a progress bar on stderr when stderr is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(range(n_layers), desc=f"converting {Path(where).name}", unit="layer", disable=None, leave=False)


def read_safetensors_dir(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a directory holding model.safetensors or an index with its shards."""
    index = path / HF_SAFETENSORS_INDEX
    if index.exists():
        files = index_shards(path, index)
    elif (path / HF_SAFETENSORS).exists():
        files = [member(path, HF_SAFETENSORS, str(path))]
    else:
        raise FileNotFoundError(f"{path}: no {HF_SAFETENSORS} or {HF_SAFETENSORS_INDEX}")
    from tqdm.auto import tqdm

    tensors = {}
    with tqdm(total=sum(f.stat().st_size for f in files), desc=f"reading {path.name}", unit="B", unit_scale=True,
              disable=None, leave=False) as progress:
        for file in files:
            tensors.update(load_file(file)[0])
            progress.update(file.stat().st_size)
    return tensors


def read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    """A pytorch_model.bin state dict, loaded by the torch backend with weights_only=True (no arbitrary pickle code)."""
    from oryx_core.backend import get_backend

    check_regular(path)
    try:
        return get_backend("torch").load_pickled_state_dict(path)
    except ValueError as e:
        raise FormatError(str(e)) from None


def read_hf_directory(path: str | Path) -> tuple[dict, SourceTensors]:
    """(config.json, tensors) of a Hugging Face style model directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: expected a model directory (config.json + safetensors)")
    config = read_json(path / HF_CONFIG)
    if (path / HF_SAFETENSORS).exists() or (path / HF_SAFETENSORS_INDEX).exists():
        tensors = read_safetensors_dir(path)
    elif (path / HF_TORCH_BIN).exists():
        tensors = read_torch_bin(path / HF_TORCH_BIN)
    else:
        raise FileNotFoundError(f"{path}: no {HF_SAFETENSORS}, {HF_SAFETENSORS_INDEX} or {HF_TORCH_BIN}")
    return config, SourceTensors(tensors, str(path))


JSON_KINDS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "positive int": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, (list, tuple)),
}


def check_config_types(config: dict, kinds: dict[str, str], where: str) -> None:
    """Each key of `kinds` that config holds (and is not null) has that JSON kind ("tie_word_embeddings":
    "false" is a string, not a boolean); else one FormatError naming the key."""
    for key, kind in kinds.items():
        value = config.get(key)
        if value is not None and not JSON_KINDS[kind](value):
            raise FormatError(f"{where}: config key {key!r} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, "
                              f"got {value!r:.40}")


def require(config: dict, key: str, where: str):
    if key not in config or config[key] is None:
        raise FormatError(f"{where}: config has no {key!r}")
    return config[key]


def fill_from_init(cfg: OryxConfig, mapped: dict[str, np.ndarray], initialised: tuple[str, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """The full parameter dict: mapped tensors, plus the design's init for names ending in `initialised`.

    Any other spec tensor left unmapped is a bug in the mapping, reported by name.
    """
    fresh = init_params(cfg, seed, names=lambda n: n.endswith(initialised) and n not in mapped) if initialised else {}
    params = {}
    for spec in parameter_specs(cfg):
        if spec.name in mapped:
            value = np.asarray(mapped[spec.name])
            if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
                value = value.astype(np.float32)
            if value.shape != spec.shape:
                raise FormatError(f"mapped tensor {spec.name!r} has shape {list(value.shape)}, the config needs {list(spec.shape)}")
            params[spec.name] = value
        elif spec.name.endswith(initialised):
            params[spec.name] = fresh[spec.name]
        else:
            raise AssertionError(f"import left {spec.name!r} unmapped")
    return params


def identity_conv(channels: int, width: int) -> np.ndarray:
    """Conv taps that pass the current token through unchanged ([0, ..., 0, 1] per channel)."""
    taps = np.zeros((channels, width), dtype=np.float32)
    taps[:, -1] = 1.0
    return taps


@dataclass
class ConvertedModel:
    """A model in transit between formats: Oryx config, spec-named tensors, tokenizer, MLX quantisation (or None)."""

    config: OryxConfig
    params: dict[str, np.ndarray]
    tokenizer_json: str | None = None
    quantization: dict | None = None


def tokenizer_json_of(path: Path) -> str | None:
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.json").is_symlink():
        return None
    try:
        return member(path, "tokenizer.json", str(path)).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{path / 'tokenizer.json'}: not UTF-8 text") from None
