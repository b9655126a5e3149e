"""Sharing on the MLX backend: "kv" (the design's block) and "kv-proj" (the recurrence reads the shared key and value
projections through convolutions of its own) run, against the float64 reference in every plan, through prefill
chunks, single steps, a state advanced alone and dropped cache parts; "none" and "qkv" are refused in one line, by
the backend and by the mlx-lm export (which tests/mlx/test_mlx_lm.py runs on "kv" and "kv-proj")."""
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from oryx_core import cli  # noqa: E402
from oryx_core.config import preset  # noqa: E402
from oryx_core.init import init_params  # noqa: E402
from oryx_core.weights import save_checkpoint  # noqa: E402
from error_metrics import relative_error  # noqa: E402
from test_model import build, tokens_for  # noqa: E402

T = 21
TOL = 1e-4


@pytest.mark.parametrize("variant", [{}, dict(conv_bias=True),
                                     dict(output_gate=False, output_norm=False, conv_activation="none",
                                          recurrent_scale=1.0)])
@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_kv_proj_matches_reference_in_every_plan(mixer, variant):
    cfg = preset("tiny", mixer, sharing="kv-proj", **variant)
    model, ref = build(cfg, seed=41)
    assert "conv_k_rec" in model.layers[0].mixer and "conv_v_rec" in model.layers[0].mixer
    rng = np.random.default_rng(42)  # fresh inputs
    tokens = tokens_for(cfg, seed=43)
    plans = {"A": True, "R": False, "mixed": rng.random((2, T)) < 0.5, "per_layer": rng.random((cfg.n_layers, 2, T)) < 0.5}
    out = {}
    for name, modes in plans.items():
        out[name] = np.array(model(mx.array(tokens), modes))
        assert relative_error(out[name], ref.forward(tokens, modes)[0]) < TOL, name
    assert relative_error(out["A"], out["R"]) > 1e-2


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_kv_proj_chunks_steps_and_state_alone_match_reference(mixer):
    """An all-attention prompt (GDN: the state advanced alone, no readout), then a mixed chunk, then single steps
    switching mode, through one cache == the reference over the whole sequence."""
    cfg = preset("tiny", mixer, sharing="kv-proj", conv_bias=True)
    model, ref = build(cfg, seed=44)
    tokens = tokens_for(cfg, seed=45)
    modes = np.ones(T, dtype=bool)
    modes[8:11] = False
    modes[12::2] = False
    expected, finals = ref.forward(tokens, modes)
    cache = model.make_cache()
    cuts = [0, 8, 12, *range(13, T + 1)]
    pieces = [np.array(model(mx.array(tokens[:, a:b]), modes[a:b], cache)) for a, b in zip(cuts, cuts[1:])]
    assert relative_error(np.concatenate(pieces, axis=1), expected) < TOL
    for layer, final in zip(cache, finals):
        assert relative_error(np.array(layer.recurrent), np.repeat(final, cfg.group_size, axis=1)) < TOL


def test_kv_proj_dropping_either_part_keeps_the_logits():
    cfg = preset("tiny", "gdn", sharing="kv-proj", conv_bias=True)
    model, ref = build(cfg, seed=46)
    tokens = tokens_for(cfg, batch=1, seed=47)
    recurrent_channels = cfg.n_heads * cfg.head_dim + cfg.n_kv_heads * (cfg.head_dim + cfg.v_head_dim)
    for first_attention, drop in ((True, "drop_kv"), (False, "drop_recurrent")):
        modes = np.arange(T) < 6 if first_attention else np.arange(T) >= 6
        expected, _ = ref.forward(tokens, modes)
        cache = model.make_cache()
        out = [np.array(model(mx.array(tokens[:, :6]), modes[:6], cache))]
        width = cache[0].conv.shape[-1]
        for layer in cache:
            getattr(layer, drop)()
        if drop == "drop_recurrent":  # q_rec's and the recurrence's own k, v windows go with the state
            assert cache[0].conv.shape[-1] == width - recurrent_channels
        out += [np.array(model(mx.array(tokens[:, t:t + 1]), modes[t:t + 1], cache)) for t in range(6, T)]
        assert relative_error(np.concatenate(out, axis=1), expected) < TOL, drop


def test_kv_proj_eval_cli_matches_reference(tmp_path, capsys):
    """`oryx eval --backend mlx` on a kv-proj checkpoint gives the reference backend's loss in a recurrent plan."""
    import json

    cfg = preset("tiny", sharing="kv-proj")
    ckpt, text = tmp_path / "ckpt", tmp_path / "text.txt"
    save_checkpoint(ckpt, cfg, init_params(cfg, 0))
    text.write_text("Oryx reads each token by attention or by a recurrence. " * 3)
    results = {}
    for backend in ("reference", "mlx"):
        assert cli.main(["eval", str(ckpt), "--text", str(text), "--backend", backend, "--window", "32",
                         "--plan", "every:2:4", "--json"]) == 0
        results[backend] = json.loads(capsys.readouterr().out)
    assert results["mlx"]["tokens"] == results["reference"]["tokens"] > 0
    assert abs(results["mlx"]["nll"] - results["reference"]["nll"]) < 1e-4 * results["reference"]["nll"], results


@pytest.mark.parametrize("sharing", ["none", "qkv"])
def test_other_sharing_refused_in_one_line(tmp_path, capsys, sharing):
    cfg = preset("tiny", sharing=sharing)
    ckpt, text = tmp_path / "ckpt", tmp_path / "text.txt"
    save_checkpoint(ckpt, cfg, init_params(cfg, 0))
    text.write_text("Oryx reads each token by attention or by a recurrence. " * 2)
    assert cli.main(["eval", str(ckpt), "--text", str(text), "--backend", "reference", "--window", "32"]) == 0
    capsys.readouterr()
    for argv in (["export-mlx-lm", str(ckpt), str(tmp_path / "export")],
                 ["eval", str(ckpt), "--text", str(text), "--backend", "mlx", "--window", "32"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"sharing '{sharing}'" in err, err
    assert not (tmp_path / "export").exists()
