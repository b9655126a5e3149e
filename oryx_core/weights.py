"""The Oryx weight format: a directory, HF-like, written atomically and validated on load.

    config.json                    the OryxConfig plus format version, dtype, quantization
    model-00001-of-0000N.safetensors
    model.safetensors.index.json   weight_map, total_size, and a sha256 per shard
    tokenizer.json                 (optional) a `tokenizers` tokenizer

Saving writes a sibling temp directory and renames it into place, so an interrupted save
never leaves a half-written checkpoint. Loading checks the format version, the config,
every shard's checksum and header, and every tensor against the spec (missing, extra,
misshapen, wrong dtype), each failure a one-line `FormatError`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_directory
from .config import ConfigError, OryxConfig
from .files import check_file_name, member, open_regular, read_json_object
from .safetensors_io import (DTYPES, FormatError, dtype_name, load_file, numpy_dtype, read_header, read_tensors,
                              write_file)
from .spec import parameter_specs
from .tokenizer import TOKENIZER_FILE

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # HF-style: chat template and end-of-turn ids (oryx_core.chat)
DEFAULT_SHARD_BYTES = 5 * 10**9  # as transformers' save_pretrained (max_shard_size="5GB")
# The weights-only directories `oryx convert` also writes (oryx_convert.backends), by their config.json "format".
CONVERTER_CONTAINERS = {"torch-state-dict": "a PyTorch state dict written by oryx convert --to torch-state-dict",
                        "mlx": "MLX weights written by oryx convert --to mlx-weights"}
FORMAT_KEYS = ("format", "format_version", "dtype", "quantization", "architectures", "model_type")
# What a checkpoint exported for transformers adds to config.json (oryx_torch.hf): the HF spellings of
# config fields, auto_map and the default plan; Oryx reads its own keys and passes over these.
HF_CONFIG_KEYS = ("auto_map", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                  "oryx_plan", "transformers_version", "torch_dtype", "bos_token_id", "eos_token_id")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
QUANT_BITS = (2, 3, 4, 5, 6, 8)  # what MLX's affine quantisation packs
QUANT_GROUP_SIZES = (32, 64, 128)
FULL_PRECISION_MODULES = ("a_proj", "b_proj", "dt_proj")  # recurrent gates: never quantised


@dataclass
class Checkpoint:
    config: OryxConfig
    params: dict[str, np.ndarray]
    dtype: str = "float32"
    quantization: dict | None = None  # e.g. {"bits": 4, "group_size": 64} for MLX-quantised weights
    path: Path | None = None
    extra_files: dict[str, bytes] = field(default_factory=dict)

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir()) if self.path else 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----- saving -----
def shard_names(tensors: dict[str, np.ndarray], shard_bytes: int) -> list[list[str]]:
    """The names of `tensors`, in its order, grouped into consecutive shards of at most shard_bytes (a larger
    tensor gets a shard of its own); always at least one shard, if empty."""
    shards, current, size = [], [], 0
    for name, value in tensors.items():
        if current and size + value.nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += value.nbytes
    return shards + [current]


def shard_file_name(index: int, count: int, prefix: str = "model") -> str:
    """The file of shard `index` (from 0) of `count`, as transformers names them: model-00001-of-00003.safetensors."""
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.safetensors"


def save_checkpoint(path: str | Path, config: OryxConfig, params: dict[str, np.ndarray], dtype: str | None = None,
                    tokenizer_json: str | None = None, quantization: dict | None = None,
                    shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer_config: dict | None = None) -> Path:
    """Writes a checkpoint directory atomically. `dtype` casts float tensors (default: keep).
    `tokenizer_config` (chat template, end-of-turn ids; oryx_core.chat) goes to tokenizer_config.json."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise FormatError(f"--dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    if quantization is None:
        check_against_spec(config, params, "params")
    tensors = {}
    for name, value in params.items():
        arr = np.asarray(value)
        if dtype is not None and _is_float(arr):
            arr = arr.astype(numpy_dtype(dtype))
        tensors[name] = arr
    float_dtypes = sorted({a.dtype.name for a in tensors.values() if _is_float(a)})
    stored = dtype or (float_dtypes[0] if len(float_dtypes) == 1 else "mixed")
    shards = [{name: tensors[name] for name in names}
              for names in shard_names({name: tensors[name] for name in sorted(tensors)}, shard_bytes)]

    def fill(tmp: Path):
        from tqdm.auto import tqdm

        weight_map, sums = {}, {}
        with tqdm(total=sum(a.nbytes for a in tensors.values()), desc=f"writing {Path(path).name}", unit="B",
                  unit_scale=True, disable=None, leave=False) as progress:
            for i, shard in enumerate(shards):
                fname = shard_file_name(i, len(shards))
                sums[fname] = write_file(tmp / fname, shard, {"format": "pt"})
                weight_map.update({name: fname for name in shard})
                progress.update(sum(a.nbytes for a in shard.values()))
        index = {"metadata": {"format_version": FORMAT_VERSION, "total_size": sum(a.nbytes for a in tensors.values()),
                              "shard_sha256": sums}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        meta = {"format": "oryx", "format_version": FORMAT_VERSION, "dtype": stored, "quantization": quantization,
                "architectures": ["OryxForCausalLM"], "model_type": "oryx"}
        (tmp / CONFIG_FILE).write_text(json.dumps({**meta, **config.to_dict()}, indent=2))
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_text(tokenizer_json)
        if tokenizer_config is not None:
            (tmp / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))

    return atomic_directory(path, fill)


def _is_float(arr: np.ndarray) -> bool:
    return arr.dtype.kind == "f" or arr.dtype.name == "bfloat16"


# ----- loading -----
def read_config(path: str | Path) -> tuple[OryxConfig, dict]:
    """(config, format metadata) of a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise FormatError(f"{path}: a checkpoint is a directory (config.json + safetensors shards), not a file")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.exists() and (path / "adapter.json").exists():  # a recurrent adapter on a base
        from .adapter import adapter_config

        return adapter_config(path)[0], {"adapter": True}
    if not cfg_path.exists():
        raise FormatError(f"{path}: missing {CONFIG_FILE}")
    raw = read_json_object(cfg_path)
    if raw.get("format") in CONVERTER_CONTAINERS:
        raise FormatError(f"{cfg_path}: {CONVERTER_CONTAINERS[raw['format']]}, not an Oryx checkpoint; make one with "
                          f"oryx convert {path} DST --to oryx")
    if raw.get("format") != "oryx":
        raise FormatError(f"{cfg_path}: not an Oryx checkpoint (no \"format\": \"oryx\")")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(f"{cfg_path}: unknown format_version {version!r} (this Oryx reads {FORMAT_VERSION})")
    meta = {k: raw.pop(k) for k in FORMAT_KEYS if k in raw}
    for key in HF_CONFIG_KEYS:
        raw.pop(key, None)
    try:
        cfg = OryxConfig.from_dict(raw, str(cfg_path))
    except ConfigError as e:
        raise FormatError(str(e)) from None
    return cfg, meta


def load_checkpoint(path: str | Path, verify_checksums: bool = True) -> Checkpoint:
    path = Path(path)
    if path.is_dir() and not (path / CONFIG_FILE).exists() and (path / "adapter.json").exists():
        from .adapter import load_adapter  # base + recurrent adapter, merged (oryx_core/adapter.py)

        return load_adapter(path, verify_checksums=verify_checksums)
    cfg, meta = read_config(path)
    quantization = meta.get("quantization")
    if quantization is not None:
        check_quantization(quantization, f"{path / CONFIG_FILE}: quantization")
    dtype = meta.get("dtype")
    if dtype not in (*FLOAT_DTYPES, "mixed"):
        raise FormatError(f"{path / CONFIG_FILE}: unknown dtype {dtype!r}")
    weight_map, sums = read_index(path)
    # Names, shapes and dtypes are checked against the config from the index and the shard headers
    # alone, so a config or header that claims huge tensors fails before anything is allocated.
    layout = tensor_layout(cfg, quantization, set(weight_map), str(path))
    _check_names(set(weight_map), layout, f"{path / INDEX_FILE}")
    headers = {}
    for fname in sorted(set(weight_map.values())):
        if not (path / fname).exists() and not (path / fname).is_symlink():
            raise FormatError(f"{path}: missing shard {fname} named in {INDEX_FILE}")
        shard = member(path, fname, str(path / INDEX_FILE))
        header, _, data_start = read_header(shard)
        for name, entry in header.items():
            if weight_map.get(name) != fname:
                raise FormatError(f"{shard}: tensor {name!r} is not listed for this shard in {INDEX_FILE}")
            _check_entry_layout(shard, name, entry, layout[name], dtype)
        # hashed only once its header says it holds exactly the tensors the config needs, so a huge or
        # padded file is refused without being read through
        if verify_checksums and fname in sums and _sha256(shard) != sums[fname]:
            raise FormatError(f"{shard}: checksum mismatch: the file is corrupt or was changed after saving")
        headers[fname] = (shard, header, data_start)
    listed_missing = sorted(set(weight_map) - {n for _, h, _ in headers.values() for n in h})
    if listed_missing:
        raise FormatError(f"{path}: tensors listed in {INDEX_FILE} but absent from their shards: {listed_missing[:5]}")
    params = {}
    for shard, header, data_start in headers.values():
        params.update(read_tensors(shard, header, data_start))
    extra = {}
    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
        if (path / name).exists() or (path / name).is_symlink():
            with open_regular(member(path, name, str(path))) as f:
                extra[name] = f.read()
    return Checkpoint(cfg, params, meta.get("dtype", "float32"), quantization, path, extra)


def read_index(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(weight_map, shard sha256 sums) of a checkpoint directory's index, strictly typed: tensor names to
    plain shard file names, and shard file names to hex digests."""
    index_path = path / INDEX_FILE
    if not index_path.exists():
        raise FormatError(f"{path}: missing {INDEX_FILE}")
    index = read_json_object(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise FormatError(f"{index_path}: corrupt index (weight_map must map tensor names to shard file names)")
    for fname in set(weight_map.values()):
        check_file_name(fname, f"{index_path}: weight_map")
    metadata = index.get("metadata")
    metadata = {} if metadata is None else metadata
    sums = metadata.get("shard_sha256") if isinstance(metadata, dict) else None
    sums = {} if sums is None else sums
    if not isinstance(metadata, dict) or not isinstance(sums, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise FormatError(f"{index_path}: corrupt index (metadata.shard_sha256 must map shard names to hex digests)")
    return weight_map, sums


def check_quantization(quantization, where: str) -> None:
    """{"bits": one of QUANT_BITS, "group_size": one of QUANT_GROUP_SIZES}, else FormatError."""
    ok = (isinstance(quantization, dict) and set(quantization) == {"bits", "group_size"}
          and all(isinstance(v, int) and not isinstance(v, bool) for v in quantization.values()))
    if not ok:
        raise FormatError(f"{where} must be {{\"bits\": N, \"group_size\": G}}, got {quantization!r:.80}")
    if quantization["bits"] not in QUANT_BITS:
        raise FormatError(f"{where}: bits must be one of {QUANT_BITS}, got {quantization['bits']}")
    if quantization["group_size"] not in QUANT_GROUP_SIZES:
        raise FormatError(f"{where}: group_size must be one of {QUANT_GROUP_SIZES}, got {quantization['group_size']}")


def is_quantizable(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    """Whether a spec tensor may be stored packed: a projection or embedding weight (not a conv, not a
    recurrent gate) whose input width is a whole number of groups."""
    if not name.endswith(".weight") or len(shape) != 2:
        return False
    module = name[:-len(".weight")].rsplit(".", 1)[-1]
    return not module.startswith("conv") and module not in FULL_PRECISION_MODULES and shape[1] % group_size == 0


def tensor_layout(cfg: OryxConfig, quantization: dict | None, stored: set[str], where: str) -> dict[str, tuple]:
    """name -> (shape, "float" or "packed") of every tensor the checkpoint must hold. Unquantised: the spec.
    Quantised: the spec, except that a module whose `.scales` are stored holds a packed uint32 weight
    [rows, cols * bits / 32] with float scales and biases [rows, cols / group_size]."""
    layout = {}
    for spec in parameter_specs(cfg):
        module = spec.name[:-len(".weight")] if spec.name.endswith(".weight") else None
        if quantization is None or module is None or module + ".scales" not in stored:
            layout[spec.name] = (spec.shape, "float")
            continue
        bits, group_size = quantization["bits"], quantization["group_size"]
        if not is_quantizable(spec.name, spec.shape, group_size):
            raise FormatError(f"{where}: tensor {module + '.scales'!r}: {module} must stay full precision")
        rows, cols = spec.shape
        layout[spec.name] = ((rows, cols * bits // 32), "packed")
        layout[module + ".scales"] = layout[module + ".biases"] = ((rows, cols // group_size), "float")
    return layout


def _check_names(names: set[str], layout: dict, where: str) -> None:
    missing = sorted(set(layout) - names)
    if len(missing) == 1:
        raise FormatError(f"{where}: missing tensor {missing[0]!r}")
    if missing:
        raise FormatError(f"{where}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    extra = sorted(names - set(layout))
    if extra:
        raise FormatError(f"{where}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''} ({len(extra)} in all)")


def _check_entry_layout(shard: Path, name: str, entry: dict, expected: tuple, dtype: str) -> None:
    """A validated header entry against its expected (shape, kind) and the config's dtype."""
    shape, kind = expected
    if tuple(entry["shape"]) != tuple(shape):
        raise FormatError(f"{shard}: tensor {name!r} has shape {entry['shape']}, the config needs {list(shape)}")
    stored = DTYPES[entry["dtype"]].name
    if kind == "packed":
        if stored != "uint32":
            raise FormatError(f"{shard}: tensor {name!r} is {entry['dtype']}, packed weights are uint32 (U32)")
    elif stored not in FLOAT_DTYPES:
        raise FormatError(f"{shard}: tensor {name!r} is {entry['dtype']}, a float dtype ({', '.join(FLOAT_DTYPES)}) is needed")
    elif dtype != "mixed" and stored != dtype:
        raise FormatError(f"{shard}: tensor {name!r} is {entry['dtype']} but config.json says dtype {dtype}")


def check_against_spec(cfg: OryxConfig, params: dict, where: str) -> None:
    """Every tensor the spec names is present with its shape, and no other: else one FormatError."""
    specs = {s.name: s for s in parameter_specs(cfg)}
    missing = sorted(set(specs) - set(params))
    if missing:
        raise FormatError(f"{where}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    extra = sorted(set(params) - set(specs))
    if extra:
        raise FormatError(f"{where}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''} ({len(extra)} in all)")
    for name, spec in specs.items():
        shape = tuple(np.shape(params[name]))
        if shape != spec.shape:
            raise FormatError(f"{where}: tensor {name!r} has shape {list(shape)}, the config needs {list(spec.shape)}")

