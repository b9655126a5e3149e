"""mamba-ssm MambaLMHeadModel (Mamba-2) -> Oryx (mamba2): recurrent mode equals mamba-ssm's step path."""
from __future__ import annotations

import json

import numpy as np
import pytest

from convert_helpers import backend_logits, build_mamba2, import_mamba_ssm, mamba2_logits, relative_error
from oryx_convert.api import convert
from oryx_convert.mamba2 import import_mamba2
from oryx_core.reference import OryxReference
from oryx_core.safetensors_io import FormatError

try:
    import_mamba_ssm()
except ImportError as e:
    pytest.skip(f"mamba-ssm is not installed ({e})", allow_module_level=True)


@pytest.fixture(scope="module", params=[(64, False), (0, True)], ids=["mlp-untied", "nomlp-tied"])
def mamba_dir(request, tmp_path_factory):
    d_intermediate, tie = request.param
    model = build_mamba2(seed=5, d_intermediate=d_intermediate, tie=tie)
    path = tmp_path_factory.mktemp("mamba2")
    model.save_pretrained(str(path))  # config.json + pytorch_model.bin
    return path, model


def test_mamba2_recurrent_mode_matches_mamba_ssm(mamba_dir):
    path, model = mamba_dir
    imported = import_mamba2(path)
    cfg = imported.config
    assert (cfg.mixer, cfg.conv_bias, cfg.conv_act, cfg.gate_before_norm, cfg.o_norm_grouping) == \
        ("mamba2", True, "silu", True, "all")
    assert (cfg.n_heads, cfg.head_dim, cfg.v_head_dim) == (4, 16, 16)
    tokens = np.random.default_rng(1).integers(0, 50, size=(2, 10))
    logits, _ = OryxReference(cfg, imported.params).forward(tokens, False)
    assert relative_error(logits, mamba2_logits(model, tokens)) < 1e-4


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_converted_mamba2_runs_on_backend(mamba_dir, tmp_path, backend):
    path, model = mamba_dir
    tokens = np.random.default_rng(2).integers(0, 50, size=(2, 10))
    logits = backend_logits(backend, convert(path, tmp_path / "oryx"), tokens, attention=False)
    assert relative_error(logits, mamba2_logits(model, tokens)) < 1e-4


def test_mamba2_converts_to_torch_container(mamba_dir, tmp_path):
    pytest.importorskip("torch")
    path, _ = mamba_dir
    out = convert(path, tmp_path / "t", to_kind="torch-state-dict")  # kind detected from ssm_cfg
    assert json.loads((out / "config.json").read_text())["mixer"] == "mamba2"


@pytest.mark.parametrize("ssm_change, message", [
    ({"ngroups": 2}, "ngroups != 1"),
    ({"layer": "Mamba1"}, "only Mamba2"),
    ({"D_has_hdim": True}, "D_has_hdim"),
    ({"dt_limit": [0.0, 0.1]}, "dt_limit"),
])
def test_unsupported_mamba_variants_fail_clearly(mamba_dir, tmp_path, ssm_change, message):
    path, _ = mamba_dir
    src = tmp_path / "src"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes((path / "pytorch_model.bin").read_bytes())
    config = json.loads((path / "config.json").read_text())
    config["ssm_cfg"] = {**config["ssm_cfg"], **ssm_change}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=message):
        convert(src, tmp_path / "dst", from_kind="mamba2")
    assert not (tmp_path / "dst").exists()


def test_other_directories_given_as_mamba2_fail_clearly(hf_llama_dir, tmp_path):
    path, _ = hf_llama_dir
    with pytest.raises(FormatError, match="not a mamba-ssm MambaLMHeadModel"):
        convert(path, tmp_path / "dst", from_kind="mamba2")
    with pytest.raises(FormatError, match="a directory; a GGUF model is one .gguf file"):
        convert(path, tmp_path / "dst", from_kind="gguf")
    assert not (tmp_path / "dst").exists()
