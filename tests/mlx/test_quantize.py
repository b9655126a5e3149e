"""4/8-bit quantisation: accuracy against full precision, what stays full precision, disk round trip, validation."""
import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from mlx.utils import tree_flatten  # noqa: E402

from oryx_core import cli  # noqa: E402
from oryx_core.config import preset  # noqa: E402
from oryx_core.init import init_params  # noqa: E402
from oryx_core.safetensors_io import FormatError  # noqa: E402
from oryx_core.weights import load_checkpoint, save_checkpoint  # noqa: E402
from oryx_mlx.generate import load_model  # noqa: E402
from oryx_mlx.model import OryxModel  # noqa: E402
from oryx_mlx.quantize import quantize_model, save_quantized, to_numpy  # noqa: E402
from error_metrics import relative_error as worst_relative_error  # noqa: E402

MODES = np.arange(40) % 3 == 0


def relative_error(out, ref):
    return worst_relative_error(out, ref)


def model_from(cfg, params):
    model = OryxModel(cfg)
    model.load_weights([(k, mx.array(v)) for k, v in params.items()], strict=True)
    return model


@pytest.fixture(params=["gdn", "mamba2"])
def setup(request):
    cfg = preset("tiny", request.param)
    params = init_params(cfg, seed=3)
    tokens = mx.array(np.random.default_rng(0).integers(0, 256, (2, 40)))
    return cfg, params, tokens


# Measured on exactly these cases, gdn / mamba2: 4-bit groups of 32: 0.129 / 0.123,
# groups of 64: 0.144 / 0.139; 8-bit groups of 64: 0.0088 / 0.0081 (relative error of the logits).
@pytest.mark.parametrize("bits, group_size, tolerance", [(4, 32, 0.2), (4, 64, 0.2), (8, 64, 0.015)])
def test_quantised_logits_close_to_full_precision(setup, bits, group_size, tolerance):
    cfg, params, tokens = setup
    full = model_from(cfg, params)(tokens, MODES)
    quantised = quantize_model(model_from(cfg, params), bits, group_size)
    assert relative_error(quantised(tokens, MODES), full) < tolerance


def test_quantised_model_computes_its_dequantised_weights(setup):
    """The quantised layers compute exactly the full-precision model with the dequantised weights."""
    cfg, params, tokens = setup
    quantised = quantize_model(model_from(cfg, params), 4, 32)
    dequantised = dict(params)
    for path, module in quantised.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
            dequantised[path + ".weight"] = np.array(w)
    expected = model_from(cfg, dequantised)(tokens, MODES)
    assert relative_error(quantised(tokens, MODES), expected) < 1e-5


def test_gates_convs_and_norms_stay_full_precision(setup):
    cfg, params, _ = setup
    model = quantize_model(model_from(cfg, params), 4, 64)
    modules = dict(model.named_modules())
    gates = ("a_proj", "b_proj") if cfg.mixer == "gdn" else ("dt_proj",)
    for gate in gates:
        assert type(modules[f"layers.0.mixer.{gate}"]) is nn.Linear
    for name in ("q_attn", "q_rec", "k_proj", "v_proj", "g_proj", "o_proj"):
        assert isinstance(modules[f"layers.1.mixer.{name}"], nn.QuantizedLinear)
    assert isinstance(modules["embed"], nn.QuantizedEmbedding)
    flat = dict(tree_flatten(model.parameters()))
    for name in ("layers.0.mixer.conv_k.weight", "layers.0.mixer.A_log", "layers.0.attn_norm.weight", "norm.weight"):
        assert flat[name].dtype == mx.float32
    with pytest.raises(ValueError, match="already quantised"):
        quantize_model(model, 4, 64)


def test_round_trip_through_disk_is_bit_exact(setup, tmp_path):
    cfg, params, tokens = setup
    quantised = quantize_model(model_from(cfg, params), 4, 64)
    save_quantized(quantised, tmp_path / "q4", 4, 64)
    loaded = load_model(tmp_path / "q4")
    before, after = dict(tree_flatten(quantised.parameters())), dict(tree_flatten(loaded.parameters()))
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype, name
        np.testing.assert_array_equal(to_numpy(before[name]), to_numpy(after[name]), err_msg=name)
    np.testing.assert_array_equal(np.array(quantised(tokens, MODES)), np.array(loaded(tokens, MODES)))
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization"] == {"bits": 4, "group_size": 64}


def test_bfloat16_quantised_round_trip(setup, tmp_path):
    cfg, params, tokens = setup
    model = model_from(cfg, params)
    model.set_dtype(mx.bfloat16)
    quantised = quantize_model(model, 8, 64)
    save_quantized(quantised, tmp_path / "q8", 8, 64)
    loaded = load_model(tmp_path / "q8")
    np.testing.assert_array_equal(to_numpy(quantised(tokens, MODES)), to_numpy(loaded(tokens, MODES)))


def corrupt(tmp_path, cfg, params, change):
    """A 4-bit checkpoint with one change applied to its tensors (or its quantization dict)."""
    quantised = quantize_model(model_from(cfg, params), 4, 64)
    tensors = {name: to_numpy(value) for name, value in tree_flatten(quantised.parameters())}
    quantization = {"bits": 4, "group_size": 64}
    change(tensors, quantization)
    return save_checkpoint(tmp_path / "bad", cfg, tensors, quantization=quantization)


@pytest.mark.parametrize("change, message", [
    (lambda t, q: t.pop("layers.0.mixer.k_proj.biases"), "missing tensor 'layers.0.mixer.k_proj.biases'"),
    (lambda t, q: t.__setitem__("layers.0.mixer.o_proj.scales", t["layers.0.mixer.o_proj.scales"][:1]),
     "layers.0.mixer.o_proj.scales' has shape"),
    (lambda t, q: t.__setitem__("layers.0.mixer.q_rec.weight", t["layers.0.mixer.q_rec.weight"].view(np.float32)),
     "packed weights are uint32"),
    (lambda t, q: t.__setitem__("layers.0.mixer.a_proj.scales", np.ones((2, 1), np.float32)), "full precision"),
    (lambda t, q: t.__setitem__("layers.0.mixer.extra", np.ones(2, np.float32)), "unexpected tensors"),
    (lambda t, q: t.pop("norm.weight"), "missing tensor 'norm.weight'"),
    (lambda t, q: q.__setitem__("bits", 7), "bits must be one of"),
])
def test_bad_quantised_checkpoints_give_clear_errors(tmp_path, change, message):
    cfg = preset("tiny", "gdn")
    path = corrupt(tmp_path, cfg, init_params(cfg, 0), change)
    with pytest.raises(FormatError, match=message):
        load_model(path)


def test_quantize_cli(tmp_path, capsys):
    src, dst = tmp_path / "full", tmp_path / "q8"
    assert cli.main(["init", str(src), "--preset", "tiny"]) == 0
    assert cli.main(["quantize", str(src), str(dst), "--bits", "8", "--group-size", "32", "--json"]) == 0
    capsys.readouterr()
    ckpt = load_checkpoint(dst)
    assert ckpt.quantization == {"bits": 8, "group_size": 32} and "tokenizer.json" in ckpt.extra_files
    assert cli.main(["quantize", str(dst), str(tmp_path / "again")]) == 2
    assert "already quantised" in capsys.readouterr().err
