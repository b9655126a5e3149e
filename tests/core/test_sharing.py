"""The `sharing` config field: which input projections the two modes share ("kv" the design's block, "none"
separate keys and values per mode, "qkv" one query too, "kv-proj" the key and value projections but not their
convolutions), in the spec, the parameter counts, the weight format
and the float64 reference."""
import json

import numpy as np
import pytest

from oryx_core.config import ConfigError, OryxConfig, preset
from oryx_core.init import init_params
from oryx_core.plan import ModePlan
from oryx_core.reference import OryxReference, Stepper
from oryx_core.spec import parameter_counts, parameter_specs
from oryx_core.weights import load_checkpoint, save_checkpoint
from error_metrics import relative_error

SHARINGS = ["kv", "none", "qkv", "kv-proj"]


def random_params(cfg, seed):
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed)
    return {k: v + rng.normal(0, 0.2 if v.ndim > 1 else 0.3, v.shape) for k, v in params.items()}


def run_steps(model, tokens, modes):
    stepper = Stepper(model, tokens.shape[0])
    return np.stack([stepper.step(tokens[:, t], modes[..., t]) for t in range(tokens.shape[1])], axis=1)


def as_kv_model(cfg, params, mode):
    """The default-sharing model that computes what `params` (of cfg.sharing) computes in pure `mode` ("A"/"R"):
    the tensors that mode reads, under the default names."""
    kv_cfg = cfg.replace(sharing="kv")
    mapped = {name: params[name] for name in (s.name for s in parameter_specs(kv_cfg)) if name in params}
    for i in range(cfg.n_layers):
        m = f"layers.{i}.mixer."
        if cfg.sharing == "qkv":
            mapped[m + "q_rec.weight"] = params[m + "q_attn.weight"]
        if cfg.sharing in ("none", "kv-proj") and mode == "R":
            for kv_name, rec_name in (("k_proj", "k_rec"), ("v_proj", "v_rec"), ("conv_k", "conv_k_rec"),
                                      ("conv_v", "conv_v_rec")):
                for suffix in (".weight", ".bias"):
                    if m + rec_name + suffix in params:
                        mapped[m + kv_name + suffix] = params[m + rec_name + suffix]
    return OryxReference(kv_cfg, mapped)


def test_config_field_validated_defaulted_and_left_out_when_default():
    with pytest.raises(ConfigError, match="sharing must be one of"):
        preset("tiny", sharing="q")
    cfg = preset("tiny")
    assert cfg.sharing == "kv" and "sharing" not in cfg.to_dict()
    assert OryxConfig.from_dict(cfg.to_dict()) == cfg
    for sharing in ("none", "qkv", "kv-proj"):
        d = preset("tiny", sharing=sharing).to_dict()
        assert d["sharing"] == sharing and OryxConfig.from_dict(d).sharing == sharing


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_parameter_counts_per_mode(mixer):
    """Each mode computes the same function with the same number of weights whatever is shared; only the split
    between shared and per-mode weights changes, by exactly the tensors that move."""
    counts = {s: parameter_counts(preset("20m", mixer, sharing=s)) for s in SHARINGS}
    cfg = preset("20m", mixer)
    L, D, H, Hkv, d, dv, W = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim, 4
    kv_weights = L * ((Hkv * d + Hkv * dv) * D + (Hkv * d + Hkv * dv) * W)  # k_proj, v_proj and their convs
    query = L * H * d * D
    for s in SHARINGS:
        c = counts[s]
        assert c["attention_mode_total"] == counts["kv"]["attention_mode_total"]
        assert c["recurrent_mode_total"] == counts["kv"]["recurrent_mode_total"]
        assert c["total"] == c["shared"] + c["attention_only"] + c["recurrent_only"]
    assert counts["none"]["shared"] == counts["kv"]["shared"] - kv_weights
    assert counts["none"]["attention_only"] == counts["kv"]["attention_only"] + kv_weights
    assert counts["none"]["recurrent_only"] == counts["kv"]["recurrent_only"] + kv_weights
    assert counts["qkv"]["shared"] == counts["kv"]["shared"] + query
    assert counts["qkv"]["attention_only"] == 0
    assert counts["qkv"]["recurrent_only"] == counts["kv"]["recurrent_only"] - query
    assert counts["none"]["total"] - counts["kv"]["total"] == kv_weights
    kv_convs = L * (Hkv * d + Hkv * dv) * W  # "kv-proj": the recurrence's own copies of the two convolutions
    assert counts["kv-proj"]["shared"] == counts["kv"]["shared"] - kv_convs
    assert counts["kv-proj"]["attention_only"] == counts["kv"]["attention_only"] + kv_convs
    assert counts["kv-proj"]["recurrent_only"] == counts["kv"]["recurrent_only"] + kv_convs
    assert counts["kv-proj"]["total"] - counts["kv"]["total"] == kv_convs
    assert counts["kv"]["total"] - counts["qkv"]["total"] == query
    # the 20m shape: 17.94M (GDN) with the default sharing
    assert counts["kv"]["total"] == (17_941_936 if mixer == "gdn" else 17_932_744)


def test_default_sharing_spec_is_unchanged():
    """Checkpoints written before the field existed load as "kv": the same names, shapes, modes and order."""
    names = [s.name for s in parameter_specs(preset("tiny", conv_bias=True)) if s.name.startswith("layers.0.mixer.")]
    assert names[:9] == ["layers.0.mixer." + n for n in (
        "k_proj.weight", "v_proj.weight", "conv_k.weight", "conv_v.weight", "o_proj.weight", "q_attn.weight",
        "q_rec.weight", "conv_q.weight", "g_proj.weight")]
    specs = {s.name: s for s in parameter_specs(preset("tiny", sharing="none", conv_bias=True))}
    assert specs["layers.0.mixer.k_proj.weight"].mode == "attention"
    assert specs["layers.0.mixer.conv_v_rec.bias"].mode == "recurrent"
    qkv = {s.name: s for s in parameter_specs(preset("tiny", sharing="qkv"))}
    assert "layers.0.mixer.q_rec.weight" not in qkv and qkv["layers.0.mixer.q_attn.weight"].mode == "shared"


@pytest.mark.parametrize("sharing", ["none", "qkv", "kv-proj"])
def test_checkpoint_round_trip(tmp_path, sharing):
    cfg = preset("tiny", "mamba2", sharing=sharing, conv_bias=True)
    params = init_params(cfg, 3)
    save_checkpoint(tmp_path / "m", cfg, params)
    ckpt = load_checkpoint(tmp_path / "m")
    assert ckpt.config == cfg and json.loads((tmp_path / "m" / "config.json").read_text())["sharing"] == sharing
    assert set(ckpt.params) == set(params)
    for name, value in params.items():
        np.testing.assert_array_equal(ckpt.params[name], value)


def test_old_checkpoint_without_the_field_loads_as_kv(tmp_path):
    cfg = preset("tiny")
    save_checkpoint(tmp_path / "m", cfg, init_params(cfg, 0))
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "sharing" not in written
    assert load_checkpoint(tmp_path / "m").config.sharing == "kv"


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
@pytest.mark.parametrize("sharing", ["none", "qkv", "kv-proj"])
def test_pure_modes_read_their_own_weights(mixer, sharing):
    """In a pure plan each variant equals the default-sharing model given the weights that mode reads (checked
    itself against independent models in test_reference.py); and the modes' weights really are separate."""
    cfg = preset("tiny", mixer, sharing=sharing, conv_bias=True)
    params = random_params(cfg, 21)
    model = OryxReference(cfg, params)
    tokens = np.random.default_rng(22).integers(0, cfg.vocab_size, (2, 19))
    for mode in ("A", "R"):
        got, _ = model.forward(tokens, mode == "A")
        want, _ = as_kv_model(cfg, params, mode).forward(tokens, mode == "A")
        assert relative_error(got, want) <= 1e-12, mode
    if sharing == "none":  # the recurrence must not read the attention keys: change them, recurrent logits stay
        changed = {**params, "layers.0.mixer.k_proj.weight": params["layers.0.mixer.k_proj.weight"] + 1.0}
        a0, _ = model.forward(tokens, False)
        a1, _ = OryxReference(cfg, changed).forward(tokens, False)
        b1, _ = OryxReference(cfg, changed).forward(tokens, True)
        b0, _ = model.forward(tokens, True)
        assert relative_error(a1, a0) == 0.0 and relative_error(b1, b0) > 1e-2
    if sharing == "kv-proj":  # each mode reads its own convolutions of the shared keys: change one, the other stays
        for conv, changed_mode in (("conv_k", True), ("conv_k_rec", False)):
            name = f"layers.0.mixer.{conv}.weight"
            changed = OryxReference(cfg, {**params, name: params[name] + 0.5})
            for attend in (True, False):
                moved = relative_error(changed.forward(tokens, attend)[0], model.forward(tokens, attend)[0])
                assert (moved > 1e-2) if attend == changed_mode else (moved == 0.0), (conv, attend)


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
@pytest.mark.parametrize("sharing", SHARINGS)
def test_step_by_step_equals_parallel(mixer, sharing):
    cfg = preset("tiny", mixer, sharing=sharing, conv_bias=True)
    model = OryxReference(cfg, random_params(cfg, 23))
    rng = np.random.default_rng(24)
    tokens = rng.integers(0, cfg.vocab_size, (2, 23))
    for modes in (ModePlan.parse("A:0-7,R:7-15,A:15-").resolve(23), rng.uniform(size=(cfg.n_layers, 2, 23)) < 0.5):
        parallel, _ = model.forward(tokens, modes)
        assert relative_error(run_steps(model, tokens, modes), parallel) <= 1e-10


def test_sharing_changes_the_function():
    """Guards the comparisons above: the same seed under another sharing gives another model."""
    tokens = np.random.default_rng(25).integers(0, 260, (1, 12))
    logits = {}
    for sharing in SHARINGS:
        cfg = preset("tiny", sharing=sharing)
        logits[sharing] = OryxReference(cfg, random_params(cfg, 26)).forward(tokens, False)[0]
    assert relative_error(logits["none"], logits["kv"]) > 1e-3 and relative_error(logits["qkv"], logits["kv"]) > 1e-3


def test_info_names_a_non_default_sharing(tmp_path, capsys):
    from oryx_core import cli

    for sharing in SHARINGS:
        cfg = preset("tiny", sharing=sharing)
        save_checkpoint(tmp_path / sharing, cfg, init_params(cfg, 0))
        assert cli.main(["info", str(tmp_path / sharing), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["parameters"] == parameter_counts(cfg)
        assert cli.main(["info", str(tmp_path / sharing)]) == 0
        assert ("sharing" in capsys.readouterr().out) == (sharing != "kv")
