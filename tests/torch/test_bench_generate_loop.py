"""bench/bench_generate_loop.py: the --tiny smoke run times both generation loops in every plan, on torch and MLX
(and with the default model's sharing kv-proj), and reports that they gave the same tokens."""
import json

import pytest
from bench_scripts import load_bench_script

pytest.importorskip("transformers")


@pytest.mark.parametrize("backend, sharing", [("torch", "kv"), ("mlx", "kv"), ("torch", "kv-proj")])
def test_tiny_run_times_both_loops(tmp_path, capsys, backend, sharing):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    bench = load_bench_script("bench_generate_loop")
    out = tmp_path / "loops.json"
    assert bench.main(["--tiny", "--backend", backend, "--prompt-length", "8", "--tokens", "6", "--rounds", "1",
                       "--sharing", sharing, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["backend"] == backend and report["model"] == "tiny" and report["date"].startswith("20")
    assert report["sharing"] == sharing
    assert set(report["rows"]) == {"attention", "recurrent", "prefill-attention"}
    for row in report["rows"].values():
        assert row["same_tokens"] and row["step by step"] > 0 and row["ahead"] > 0
    assert "| recurrent |" in capsys.readouterr().out
