"""bench/bench_mixed_attention.py: the CPU smoke run times every method on both plans and finds each method's
attention rows equal to dense SDPA's before it times them."""
import json

from bench_scripts import load_bench_script


def test_tiny_run_checks_and_times_every_method(tmp_path):
    from oryx_torch import attention

    settings = attention.MIXED_ATTENTION, attention.FLEX_ON_CPU
    bench = load_bench_script("bench_mixed_attention")
    out = tmp_path / "attention.json"
    assert bench.main(["--tiny", "--warmup", "0", "--repeat", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"bench_mixed", "training_sampler"}
    for plan, row in report["results"].items():
        for method in bench.METHODS:
            assert row[f"{method}_ms"] > 0, (plan, method)
        for method in bench.METHODS[1:]:
            assert row[f"{method}_error_out"] < 1e-5, (plan, method)  # fp32 on the CPU
        assert 0 < row["packed_area"] <= 1 and 0 < row["flex_area"] <= 1
    assert (attention.MIXED_ATTENTION, attention.FLEX_ON_CPU) == settings  # the run leaves them as it found them
