"""bench/bench_mlx_generate.py --default-model on a stand-in: a tiny Llama-like base and an adapter on it with sharing
kv-proj (the default model's form). Oryx's attention mode must give the llama's logits, and every plan is timed."""
import re

import numpy as np
import pytest
from bench_scripts import load_bench_script

pytest.importorskip("mlx_lm")


def bench_module():
    return load_bench_script("bench_mlx_generate")


def stand_in_default_model(tmp_path, bench):
    """An adapter directory (sharing kv-proj, the recurrent tensors moved off the base's) on a tiny Llama-like
    base: no output gate or norm, identity key/value/query convs without activation."""
    from oryx_core.adapter import save_adapter
    from oryx_core.spec import RECURRENT, parameter_specs
    from oryx_core.weights import save_checkpoint

    cfg = bench.LLAMA_LIKE.replace(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                   mlp_hidden=48, max_context=256)
    params = bench.identity_conv_params(cfg, 0)
    base = save_checkpoint(tmp_path / "base", cfg, params)
    adapted = cfg.replace(sharing="kv-proj")
    rng = np.random.default_rng(1)
    for spec in parameter_specs(adapted):
        if spec.mode == RECURRENT:
            params[spec.name] = (params.get(spec.name, np.zeros(spec.shape, np.float32))
                                 + rng.normal(0, 0.3, spec.shape).astype(np.float32))
    return save_adapter(tmp_path / "adapter", base, adapted, params)


def test_default_model_comparison_times_every_plan(tmp_path, capsys):
    bench = bench_module()
    adapter = stand_in_default_model(tmp_path, bench)
    best = bench.default_model_comparison(16, 2, 1, np.random.default_rng(0), model_dir=adapter)
    assert set(best) == {"mlx-lm llama", "Oryx attention", "Oryx recurrent", "Oryx prefill-attention"}
    assert all(prompt_tps > 0 and decode_tps > 0 for prompt_tps, decode_tps in best.values())
    out = capsys.readouterr().out
    assert "sharing kv-proj" in out and "| Oryx prefill-attention |" in out and "÷ mlx-lm llama" in out
    error = float(re.search(r"logits relative difference (\S+)", out).group(1))
    assert error < 1e-5


def test_default_model_excludes_smollm2():
    with pytest.raises(SystemExit) as exit_info:
        bench_module().main(["--default-model", "--smollm2"])
    assert exit_info.value.code == 2
