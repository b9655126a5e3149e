"""fla GatedDeltaNetForCausalLM -> Oryx (gdn): recurrent mode equals fla's reference computation."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from convert_helpers import backend_logits, build_fla_gdn, fla_gdn_logits, relative_error
from oryx_convert.api import convert
from oryx_convert.fla_gdn import import_fla_gdn
from oryx_core.reference import OryxReference
from oryx_core.safetensors_io import FormatError

pytest.importorskip("fla")
warnings.filterwarnings("ignore", message=".*Triton is not supported.*")


@pytest.fixture(scope="module")
def fla_dir(tmp_path_factory):
    model = build_fla_gdn(seed=4)
    path = tmp_path_factory.mktemp("fla_gdn")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def test_fla_gdn_recurrent_mode_matches_fla(fla_dir):
    path, model = fla_dir
    imported = import_fla_gdn(path)
    cfg = imported.config
    assert (cfg.mixer, cfg.v_head_dim, cfg.conv_act, cfg.o_norm_grouping) == ("gdn", 32, "silu", "head")
    tokens = np.random.default_rng(0).integers(0, 100, size=(2, 13))
    logits, _ = OryxReference(cfg, imported.params).forward(tokens, False)
    assert relative_error(logits, fla_gdn_logits(model, tokens)) < 1e-4
    p = imported.params
    assert np.array_equal(p["layers.1.mixer.q_attn.weight"], p["layers.1.mixer.q_rec.weight"])


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_converted_fla_gdn_runs_on_backend(fla_dir, tmp_path, backend):
    path, model = fla_dir
    tokens = np.random.default_rng(2).integers(0, 100, size=(2, 13))
    logits = backend_logits(backend, convert(path, tmp_path / "oryx"), tokens, attention=False)
    assert relative_error(logits, fla_gdn_logits(model, tokens)) < 1e-4


def test_fla_gdn_auto_detected_and_attention_mode_runs(fla_dir, tmp_path):
    from oryx_core.weights import load_checkpoint

    path, _ = fla_dir
    out = convert(path, tmp_path / "oryx")
    ckpt = load_checkpoint(out)
    tokens = np.arange(6)[None]
    logits, _ = OryxReference(ckpt.config, ckpt.params).forward(tokens, True)
    # attention mode (which fla's model lacks) as the PyTorch backend computes it from the same checkpoint
    assert relative_error(backend_logits("torch", out, tokens, attention=True), logits) < 1e-4
    assert relative_error(logits, OryxReference(ckpt.config, ckpt.params).forward(tokens, False)[0]) > 1e-3


@pytest.mark.parametrize("change, message", [
    ({"attn": {"layers": [1], "num_heads": 2}}, "hybrid softmax-attention"),
    ({"allow_neg_eigval": True}, "allow_neg_eigval"),
    ({"num_v_heads": 4}, "grouped value heads"),
    ({"output_gate_activation": "sigmoid"}, "output_gate_activation"),
])
def test_unsupported_fla_variants_fail_clearly(fla_dir, tmp_path, change, message):
    path, _ = fla_dir
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    config = json.loads((path / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(FormatError, match=message):
        convert(src, tmp_path / "dst", from_kind="fla-gdn")
    assert not (tmp_path / "dst").exists()


def test_llama_directory_given_as_fla_fails_clearly(hf_llama_dir, tmp_path):
    path, _ = hf_llama_dir
    with pytest.raises(FormatError, match="not an fla Gated DeltaNet model"):
        convert(path, tmp_path / "dst", from_kind="fla-gdn")
