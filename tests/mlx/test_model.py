"""The MLX model against the float64 reference: both mixers, config flags, mode plans, dtypes, cache paths."""
import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from oryx_core import cli  # noqa: E402
from oryx_core.config import preset  # noqa: E402
from oryx_core.init import init_params  # noqa: E402
from oryx_core.reference import OryxReference  # noqa: E402
from oryx_mlx.model import OryxModel  # noqa: E402
from error_metrics import relative_error as worst_relative_error  # noqa: E402

T = 21


def relative_error(out, ref):
    return worst_relative_error(out, ref)


def random_params(cfg, seed):
    """Init weights plus noise, so norms, gates and conv taps are all far from their init values."""
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed)
    return {k: (v + rng.normal(0.0, 0.3, v.shape) * (np.abs(v).mean() + 0.05)).astype(np.float32)
            for k, v in params.items()}


def build(cfg, seed=0, dtype=mx.float32):
    params = random_params(cfg, seed)
    model = OryxModel(cfg)
    model.load_weights([(k, mx.array(v).astype(dtype)) for k, v in params.items()], strict=True)
    return model, OryxReference(cfg, params)


def tokens_for(cfg, batch=2, length=T, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length))


def a_r_a(length=T):
    modes = np.zeros(length, dtype=bool)
    modes[:5] = True
    modes[14:] = True
    return modes


VARIANTS = {
    "default": {},
    "mha_rope_off": dict(n_kv_heads=4, rope=False),
    "conv_bias_gate_before_norm": dict(conv_bias=True, gate_before_norm=True),
    "norm_all_untied": dict(o_norm_grouping="all", tie_embeddings=False),
    "llama_like": dict(output_gate=False, output_norm=False, conv_activation="none"),
    "retrofitted_llama": dict(output_gate=False, output_norm=False, conv_activation="none", recurrent_scale=1.0),
    "no_mlp_conv_silu": dict(mlp_hidden=0, conv_activation="silu", value_head_dim=8),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_matches_reference_under_mixed_plans(mixer, variant):
    cfg = preset("tiny", mixer, **VARIANTS[variant])
    model, ref = build(cfg)
    tokens = tokens_for(cfg)
    per_sequence = np.stack([a_r_a(), ~a_r_a()])  # [B, T]
    per_layer = np.stack([a_r_a(), np.arange(T) % 3 == 0])[:, None, :]  # [L, 1, T]
    for modes in (True, False, a_r_a(), per_sequence, per_layer):
        expected, _ = ref.forward(tokens, modes)
        assert relative_error(model(mx.array(tokens), modes), expected) < 1e-4


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_steps_and_chunks_match_parallel(mixer):
    """Prefill of 8, a chunk of 5, then single tokens through the cache == one parallel pass."""
    cfg = preset("tiny", mixer)
    model, ref = build(cfg, seed=3)
    tokens, modes = tokens_for(cfg), a_r_a()
    expected, _ = ref.forward(tokens, modes)
    cache = model.make_cache()
    cuts = [0, 8, 13, *range(14, T + 1)]
    pieces = [np.array(model(mx.array(tokens[:, a:b]), modes[a:b], cache)) for a, b in zip(cuts, cuts[1:])]
    assert relative_error(np.concatenate(pieces, axis=1), expected) < 1e-4
    assert cache[0].offset == T


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_final_recurrent_state_matches_reference(mixer):
    cfg = preset("tiny", mixer)
    model, ref = build(cfg, seed=4)
    tokens = tokens_for(cfg)
    _, finals = ref.forward(tokens, a_r_a())
    cache = model.make_cache()
    model(mx.array(tokens), a_r_a(), cache)
    for layer, final in zip(cache, finals):
        per_query_head = np.repeat(final, cfg.group_size, axis=1)  # the cache keeps one copy per query head
        assert relative_error(np.array(layer.recurrent), per_query_head) < 1e-4


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
@pytest.mark.parametrize("dtype, tolerance", [(mx.float16, 5e-3), (mx.bfloat16, 3e-2)])
def test_half_precision_close_to_reference(mixer, dtype, tolerance):
    """Measured on this test: fp16 1.1e-3 / 0.9e-3, bf16 8.3e-3 / 7.2e-3 relative for gdn / mamba2
    (state and gate arithmetic stay fp32)."""
    cfg = preset("tiny", mixer)
    model, ref = build(cfg, seed=5, dtype=dtype)
    tokens = tokens_for(cfg)
    expected, _ = ref.forward(tokens, a_r_a())
    logits = model(mx.array(tokens), a_r_a())
    assert logits.dtype == dtype
    assert relative_error(logits.astype(mx.float32), expected) < tolerance
    cache = model.make_cache()
    model(mx.array(tokens[:, :6]), a_r_a()[:6], cache)
    assert cache[0].recurrent.dtype == mx.float32


def test_kv_drop_same_logits_and_constant_memory():
    cfg = preset("tiny", "gdn")
    model, _ = build(cfg, seed=6)
    tokens = tokens_for(cfg, batch=1, length=40)
    modes = np.arange(40) < 8  # attention prompt, then recurrent only
    keep, drop = model.make_cache(), model.make_cache()
    for cache in (keep, drop):
        model(mx.array(tokens[:, :8]), modes[:8], cache)
    for layer in drop:
        layer.drop_kv()
    sizes = []
    for t in range(8, 40):
        step = [np.array(model(mx.array(tokens[:, t:t + 1]), False, cache)) for cache in (keep, drop)]
        np.testing.assert_array_equal(step[0], step[1])
        sizes.append(sum(layer.nbytes for layer in drop))
    assert len(set(sizes)) == 1
    assert sum(layer.nbytes for layer in keep) > sizes[0]


@pytest.mark.parametrize("mixer, variant", [("gdn", "default"), ("mamba2", "llama_like")])
def test_recurrent_state_drop_same_logits_and_less_memory(mixer, variant):
    """Mixed prefill, then the state is dropped and an all-attention remainder (a chunk, then single
    tokens, through the compiled path) gives the keep path's logits while doing no recurrent work
    (bit-identical when measured: relative difference 0.0)."""
    cfg = preset("tiny", mixer, **VARIANTS[variant])
    model, ref = build(cfg, seed=9)
    tokens = tokens_for(cfg, batch=2, length=T)
    modes = np.arange(T) >= 6  # recurrent prompt start, then attention only
    keep, drop = model.make_cache(), model.make_cache()
    for cache in (keep, drop):
        model(mx.array(tokens[:, :4]), modes[:4], cache)
        model(mx.array(tokens[:, 4:8]), modes[4:8], cache)
    for layer in drop:
        layer.drop_recurrent()
    assert all(layer.recurrent is None and layer.recurrent_dropped for layer in drop)
    window_channels = cfg.n_kv_heads * (cfg.head_dim + cfg.v_head_dim)  # k and v only: q_rec's channels are gone
    assert all(layer.conv.shape[-1] == window_channels for layer in drop)
    cuts = [8, 11, *range(12, T + 1)]
    pieces = {}
    for name, cache in (("keep", keep), ("drop", drop)):
        pieces[name] = np.concatenate([np.array(model(mx.array(tokens[:, a:b]), modes[a:b], cache))
                                       for a, b in zip(cuts, cuts[1:])], axis=1)
    assert relative_error(pieces["drop"], pieces["keep"]) <= 1e-6
    expected, _ = ref.forward(tokens, modes)
    assert relative_error(pieces["drop"], expected[:, 8:]) < 1e-4
    assert all(layer.recurrent is None and layer.conv.shape[-1] == window_channels for layer in drop)
    assert sum(layer.nbytes for layer in drop) < sum(layer.nbytes for layer in keep)
    assert drop[0].offset == keep[0].offset == T


def test_bad_inputs_give_clear_errors():
    cfg = preset("tiny", "gdn")
    model, _ = build(cfg)
    with pytest.raises(ValueError, match="tokens"):
        model(mx.array([1, 2, 3]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(mx.array([[1, cfg.vocab_size]]))
    with pytest.raises(ValueError, match="modes"):
        model(mx.array([[1, 2, 3]]), np.ones(4, dtype=bool))
    with pytest.raises(ValueError, match="cache"):
        model(mx.array([[1, 2, 3]]), True, model.make_cache()[:1])
    with pytest.raises(ValueError, match="tokens"):
        model(np.zeros((1, 0), dtype=np.int64))
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), False, cache)
    with pytest.raises(ValueError, match="cache: holds 1 sequences, tokens have batch 2"):
        model(mx.array([[4], [5]]), False, cache)
    for layer in cache:
        layer.drop_kv()
    with pytest.raises(ValueError, match="KV cache was dropped"):
        model(mx.array([[4]]), True, cache)
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), True, cache)
    cache[-1].drop_recurrent()  # a per-layer plan could drop one layer's state only
    per_layer = np.ones((cfg.n_layers, 1, 2), dtype=bool)
    per_layer[-1, 0, 1] = False
    with pytest.raises(ValueError, match="recurrent-mode token at position >= 3 after the recurrent state was dropped"):
        model(mx.array([[4, 5]]), per_layer, cache)
    assert all(layer.offset == 3 for layer in cache)  # refused before any layer changed its cache
    per_layer[-1, 0, 1] = True
    model(mx.array([[4, 5]]), per_layer, cache)


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_eval_cli_mlx_matches_reference(tmp_path, capsys, mixer):
    ckpt, text = tmp_path / "ckpt", tmp_path / "text.txt"
    assert cli.main(["init", str(ckpt), "--preset", "tiny", "--mixer", mixer, "--seed", "2"]) == 0
    text.write_text("Oryx reads each token by attention or by a recurrence. " * 3)
    capsys.readouterr()
    nll = {}
    for backend in ("reference", "mlx"):
        assert cli.main(["eval", str(ckpt), "--text", str(text), "--plan", "every:2:16", "--backend", backend,
                         "--window", "64", "--json"]) == 0
        nll[backend] = json.loads(capsys.readouterr().out)["nll"]
    assert abs(nll["mlx"] - nll["reference"]) / nll["reference"] < 1e-5


def test_matches_torch_model():
    torch = pytest.importorskip("torch")
    torch_model = pytest.importorskip("oryx_torch.model")
    cfg = preset("tiny", "gdn")
    params = random_params(cfg, 7)
    model = OryxModel(cfg)
    model.load_weights([(k, mx.array(v)) for k, v in params.items()], strict=True)
    reference_torch = torch_model.OryxModel(cfg, seed=None)
    reference_torch.load_params(params)
    tokens = tokens_for(cfg)
    with torch.no_grad():
        expected = reference_torch(torch.from_numpy(tokens), torch.from_numpy(a_r_a())).numpy()
    assert relative_error(model(mx.array(tokens), a_r_a()), expected) < 1e-4


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_token_by_token_switching_matches_reference(mixer):
    """The compiled one-token path, with the mode flipping at every other token, == the reference."""
    cfg = preset("tiny", mixer, conv_bias=True)
    model, ref = build(cfg, seed=6)
    tokens = tokens_for(cfg, batch=1)
    modes = np.arange(T) % 2 == 0
    expected, _ = ref.forward(tokens, modes)
    cache = model.make_cache()
    steps = [np.array(model(mx.array(tokens[:, t:t + 1]), modes[t:t + 1], cache)) for t in range(T)]
    assert relative_error(np.concatenate(steps, axis=1), expected) < 1e-4


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_partly_quantised_fused_projections_equal_dequantised_floats(mixer):
    """Quantising some projections of a fused group must still compute the dequantised model, in both paths."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    cfg = preset("tiny", mixer, n_kv_heads=2)
    model, _ = build(cfg, seed=7)
    tokens = tokens_for(cfg)
    modes = np.arange(T) % 4 < 2
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda path, m: path.endswith(("k_proj", "q_attn", "up_proj")))
    params = {k: v for k, v in tree_flatten(model.parameters()) if not k.endswith((".scales", ".biases"))}
    for name, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            params[name + ".weight"] = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
    floats = OryxModel(cfg)
    floats.load_weights(list(params.items()), strict=True)
    out = np.array(model(mx.array(tokens), modes))
    assert relative_error(out, np.array(floats(mx.array(tokens), modes))) < 1e-5
    cache = model.make_cache()
    pieces = [model(mx.array(tokens[:, :5]), modes[:5], cache)]
    pieces += [model(mx.array(tokens[:, t:t + 1]), modes[t:t + 1], cache) for t in range(5, T)]
    assert relative_error(np.concatenate([np.array(p) for p in pieces], axis=1), out) < 1e-4


def test_weights_replaced_after_use_are_seen():
    """The fused projection copies are rebuilt when weights are loaded again."""
    cfg = preset("tiny", "gdn")
    params = random_params(cfg, 8)
    changed = {k: (v * 1.5 if "q_rec" in k or "gate_proj" in k else v) for k, v in params.items()}
    tokens, modes = tokens_for(cfg), a_r_a()
    model = OryxModel(cfg)
    model.load_weights([(k, mx.array(v)) for k, v in params.items()], strict=True)
    model(mx.array(tokens), modes)  # builds the fused weights
    model.load_weights([(k, mx.array(v)) for k, v in changed.items()], strict=True)
    expected, _ = OryxReference(cfg, changed).forward(tokens, modes)
    assert relative_error(np.array(model(mx.array(tokens), modes)), expected) < 1e-4


@pytest.mark.parametrize("T", [1, 2, 3, 9])
def test_identity_conv_shortcut_matches_the_conv(T):
    """The pass-through for identity taps (imported Llamas) gives the conv's output and next window."""
    from oryx_mlx.model import causal_conv, is_identity_conv

    W, C = 4, 6
    rng = np.random.default_rng(T)
    x = mx.array(rng.standard_normal((2, T, C)).astype(np.float32))
    window = mx.array(rng.standard_normal((2, W - 1, C)).astype(np.float32))
    taps = mx.array(np.eye(W, dtype=np.float32)[-1][:, None].repeat(C, 1))  # [W, C]: last tap 1
    assert is_identity_conv(taps, None, "none")
    assert not is_identity_conv(taps, None, "silu") and not is_identity_conv(taps * 0.5, None, "none")
    for start in (None, window):
        want = causal_conv(x, taps, None, start)
        got = causal_conv(x, taps, None, start, identity=True)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.array(a), np.array(b))
