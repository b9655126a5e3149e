"""bench/bench_cpu.py: the --tiny smoke run times transformers and every Oryx generation plan in each round and
reports rates and per-round ratios; bad flags (and --default-model with --tiny) end with exit status 2."""
import json

import pytest
from bench_scripts import load_bench_script

pytest.importorskip("transformers")


def bench_module():
    return load_bench_script("bench_cpu")


def test_tiny_run_reports_every_plan(tmp_path, capsys):
    bench = bench_module()
    out = tmp_path / "cpu.json"
    assert bench.main(["--tiny", "--rounds", "2", "--prompt-length", "12", "--decode-tokens", "3",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["attention_logits_error_vs_llama"] < 1e-5 and len(report["load_averages"]) == 2
    rows = {r["plan"]: r for r in report["rows"]}
    assert set(rows) == {"-", "attention", "recurrent", "prefill-attention"}
    assert rows["-"]["model"] == "transformers" and rows["-"]["prompt_ratio"] == rows["-"]["decode_ratio"] == 1
    for row in rows.values():
        assert len(row["prompt_rates"]) == len(row["decode_rates"]) == 2
        assert row["prompt_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0 and row["decode_ratio"] > 0
    assert "| oryx | prefill-attention |" in capsys.readouterr().out
    assert report["oryx_model"] == "Llama import" and report["sharing"] == "kv"
    copies = report["oryx_weight_copies_mib"]
    # fp32 on the CPU: the products run on reordered weights cut from the mixers' concatenations
    assert set(copies) == {"parameters", "concatenations", "reordered"} and min(copies.values()) > 0


@pytest.mark.parametrize("flag", ["--rounds", "--prompt-length", "--decode-tokens"])
def test_non_positive_counts_are_refused(flag):
    with pytest.raises(SystemExit) as exit_info:
        bench_module().main(["--tiny", flag, "0"])
    assert exit_info.value.code == 2


def test_conflicting_flags_are_refused():
    for argv in (["--clock", "cpu"], ["--clock", "cpu", "--threads", "2"], ["--threads", "0"], ["--default-model"]):
        with pytest.raises(SystemExit) as exit_info:
            bench_module().main(["--tiny"] + argv)
        assert exit_info.value.code == 2


def test_tiny_run_on_the_cpu_clock(tmp_path):
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "cpu.json"
    try:
        assert bench_module().main(["--tiny", "--rounds", "1", "--prompt-length", "8", "--decode-tokens", "2",
                                    "--threads", "1", "--clock", "cpu", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert report["clock"] == "cpu" and report["threads"] == 1
    assert all(r["prompt_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in report["rows"])
