"""Oryx <-> torch state-dict directory <-> MLX directory: bit-exact round trips, loadability, quantisation."""
from __future__ import annotations

import json

import numpy as np
import pytest

from convert_helpers import relative_error
from oryx_convert.api import convert
from oryx_convert.backends import read_mlx_dir, read_torch_dir
from oryx_core.config import preset
from oryx_core.init import init_params
from oryx_core.reference import OryxReference
from oryx_core.safetensors_io import FormatError
from oryx_core.tokenizer import byte_level_tokenizer
from oryx_core.weights import load_checkpoint, save_checkpoint

SMALL_SHARDS = 40_000  # bytes: forces several shards and an index for the tiny preset
TOKENS = np.random.default_rng(3).integers(0, 260, size=(2, 7))


def _random_checkpoint(path, mixer: str, dtype: str):
    cfg = preset("tiny", mixer)
    rng = np.random.default_rng(11)
    # random everywhere (no ones/zeros), so a swapped or unwritten tensor cannot match by accident
    params = {n: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for n, v in init_params(cfg, 1).items()}
    return save_checkpoint(path, cfg, params, dtype=dtype, tokenizer_json=byte_level_tokenizer().to_str())


def _assert_same_checkpoint(a, b):
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.config == cb.config and ca.dtype == cb.dtype
    assert set(ca.params) == set(cb.params)
    for name in ca.params:
        assert ca.params[name].dtype == cb.params[name].dtype, name
        assert ca.params[name].tobytes() == cb.params[name].tobytes(), name
    assert ca.extra_files == cb.extra_files


@pytest.mark.parametrize("backend, kind", [("torch", "torch-state-dict"), ("mlx", "mlx-weights")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_round_trip_is_bit_exact(tmp_path, backend, kind, dtype, mixer):
    pytest.importorskip(backend)
    src = _random_checkpoint(tmp_path / "src", mixer, dtype)
    middle = convert(src, tmp_path / backend, to_kind=kind, shard_bytes=SMALL_SHARDS)
    index = json.loads((middle / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = convert(middle, tmp_path / "back", from_kind=kind)
    _assert_same_checkpoint(src, back)


def test_dtype_cast_rounds_like_torch(tmp_path):
    torch = pytest.importorskip("torch")
    src = _random_checkpoint(tmp_path / "src", "gdn", "float32")
    out = read_torch_dir(convert(src, tmp_path / "t", to_kind="torch-state-dict", dtype="bfloat16"))
    fp32 = load_checkpoint(src).params
    for name, value in out.params.items():
        expected = torch.from_numpy(np.array(fp32[name])).to(torch.bfloat16).view(torch.int16).numpy()
        assert np.array_equal(value.view(np.int16), expected), name


def test_torch_directory_loads_into_oryx_torch_model(tmp_path):
    torch = pytest.importorskip("torch")
    model_module = pytest.importorskip("oryx_torch.model")
    from safetensors.torch import load_file

    src = _random_checkpoint(tmp_path / "src", "gdn", "float32")
    out = convert(src, tmp_path / "t", to_kind="torch-state-dict")
    ckpt = load_checkpoint(src)
    model = model_module.OryxModel(ckpt.config, seed=None)
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    with torch.no_grad():
        logits = model(torch.from_numpy(TOKENS), True).double().numpy()
    ref, _ = OryxReference(ckpt.config, ckpt.params).forward(TOKENS, True)
    assert relative_error(logits, ref) < 1e-4


def test_mlx_directory_loads_into_oryx_mlx_model(tmp_path):
    mx = pytest.importorskip("mlx.core")
    model_module = pytest.importorskip("oryx_mlx.model")

    src = _random_checkpoint(tmp_path / "src", "mamba2", "float32")
    out = convert(src, tmp_path / "m", to_kind="mlx-weights")
    ckpt = load_checkpoint(src)
    model = model_module.OryxModel(ckpt.config)
    model.load_weights(str(out / "model.safetensors"), strict=True)
    logits = np.array(model(mx.array(TOKENS), False).astype(mx.float32))
    ref, _ = OryxReference(ckpt.config, ckpt.params).forward(TOKENS, False)
    assert relative_error(logits, ref) < 1e-4


@pytest.fixture
def quantized_mlx(tmp_path):
    pytest.importorskip("mlx.core")
    src = _random_checkpoint(tmp_path / "src", "gdn", "float32")
    return src, convert(src, tmp_path / "q", to_kind="mlx-weights", quantize=4, group_size=32)


def test_quantized_mlx_matches_oryx_mlx_quantisation(tmp_path, quantized_mlx):
    import mlx.core as mx
    from oryx_mlx.generate import load_model
    from oryx_mlx.quantize import quantize_model

    src, q = quantized_mlx
    stored = read_mlx_dir(q)
    assert stored.quantization == {"bits": 4, "group_size": 32}
    assert stored.params["layers.0.mixer.k_proj.weight"].dtype == np.uint32
    expected = np.array(quantize_model(load_model(src), 4, 32)(mx.array(TOKENS), True).astype(mx.float32))
    back = convert(q, tmp_path / "oryx_q")  # MLX -> Oryx keeps the quantisation
    assert load_checkpoint(back).quantization == {"bits": 4, "group_size": 32}
    logits = np.array(load_model(back)(mx.array(TOKENS), True).astype(mx.float32))
    np.testing.assert_array_equal(logits, expected)
    float_logits, _ = OryxReference(load_checkpoint(src).config, load_checkpoint(src).params).forward(TOKENS, True)
    assert relative_error(logits, float_logits) > 1e-3  # the quantisation did happen


def test_dequantize_gives_the_quantised_model_in_floats(tmp_path, quantized_mlx):
    import mlx.core as mx
    from oryx_mlx.generate import load_model

    _, q = quantized_mlx
    quantized_logits = np.array(load_model(convert(q, tmp_path / "oq"))(mx.array(TOKENS), True).astype(mx.float32))
    with pytest.raises(ValueError, match="--to torch-state-dict: the model is MLX-quantised"):
        convert(q, tmp_path / "t", to_kind="torch-state-dict")
    floats = load_checkpoint(convert(q, tmp_path / "deq", dequantize=True))
    assert floats.quantization is None and floats.dtype == "float32"
    ref, _ = OryxReference(floats.config, floats.params).forward(TOKENS, True)
    assert relative_error(quantized_logits, ref) < 1e-4


def test_mlx_lm_target_uses_the_mlx_exporter(tmp_path):
    pytest.importorskip("mlx.core")
    src = _random_checkpoint(tmp_path / "src", "gdn", "bfloat16")
    out = convert(src, tmp_path / "lm", to_kind="mlx-lm", quantize=8, plan="recurrent")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "oryx" and config["quantization"] == {"bits": 8, "group_size": 64}
    assert config["oryx_plan"] == "recurrent" and (out / config["model_file"]).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm", "src"]  # the staging checkpoint is gone


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(to_kind="onnx"), ValueError, "--to must be one of"),
    (dict(dtype="float64"), ValueError, "--dtype must be one of"),
    (dict(quantize=7), ValueError, "--quantize must be one of"),
    (dict(quantize=4, group_size=48), ValueError, "--group-size must be one of"),
    (dict(to_kind="torch-state-dict", quantize=4), ValueError, "cannot be stored for --to torch-state-dict"),
    (dict(mixer="mamba2"), ValueError, "--mixer/--seed apply only to"),
    (dict(from_kind="torch-state-dict"), FormatError, "not a torch-state-dict directory"),
])
def test_bad_options_fail_clearly_and_write_nothing(tmp_path, kwargs, error, message):
    src = _random_checkpoint(tmp_path / "src", "gdn", "float32")
    with pytest.raises(error, match=message):
        convert(src, tmp_path / "dst", **kwargs)
    assert not (tmp_path / "dst").exists()


def test_same_source_and_destination_is_refused(tmp_path):
    src = _random_checkpoint(tmp_path / "src", "gdn", "float32")
    with pytest.raises(ValueError, match="the same path as SRC"):
        convert(src, src, to_kind="oryx")


def test_container_with_missing_tensor_fails_clearly(tmp_path):
    pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    src = _random_checkpoint(tmp_path / "src", "gdn", "float32")
    t = convert(src, tmp_path / "t", to_kind="torch-state-dict")
    tensors = load_file(str(t / "model.safetensors"))
    del tensors["layers.1.mixer.b_proj.weight"]
    save_file(tensors, str(t / "model.safetensors"))
    with pytest.raises(FormatError, match="missing tensors \\['layers.1.mixer.b_proj.weight'\\]"):
        convert(t, tmp_path / "back")
    assert not (tmp_path / "back").exists()
