"""bench/bench_model.py: the --tiny smoke run writes every row it promises, on two models that compute the
same function; the launch counter counts what it says."""
import json

import pytest
import torch
from bench_scripts import load_bench_script

pytest.importorskip("transformers")


def bench_module():
    return load_bench_script("bench_model")


def test_tiny_run_reports_every_measure(tmp_path, capsys):
    bench = bench_module()
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--json", str(out), "--train-length", "64", "--prompt-length", "32",
                       "--decode-tokens", "2", "--decode-batches", "1,2", "--warmup", "0", "--repeat", "1"]) == 0
    report = json.loads(out.read_text())
    assert report["command"].endswith("--repeat 1") and report["card"] and report["date"].startswith("20")
    assert report["attention_logits_error_vs_llama"] < 1e-5  # the Oryx twin is the Llama in attention mode
    rows = report["rows"]
    keys = {(r["kind"], r["model"], r["plan"], r["batch"]) for r in rows}
    for plan in ("-", "attention", "recurrent", "mixed"):
        model = "llama" if plan == "-" else "oryx"
        assert ("train", model, plan, 1) in keys and ("prefill", model, plan, 1) in keys
    for plan in ("-", "attention", "recurrent", "prefill-attention"):
        for batch in (1, 2):
            assert ("decode", "llama" if plan == "-" else "oryx", plan, batch) in keys
    for r in rows:
        if r["kind"] == "launches":
            assert r["per_step"] >= 20 * 2  # at least the projections of each of the 2 layers
        else:
            assert r["tokens_per_s"] > 0 and r["ms"] > 0
    launches = {r["plan"]: r["per_step"] for r in rows if r["kind"] == "launches"}
    assert launches["attention"] > launches["recurrent"]  # attention adds the query, scores and softmax
    assert "| decode | oryx | recurrent |" in capsys.readouterr().out


def test_count_launches_counts_outermost_operators():
    bench = bench_module()
    x = torch.randn(8, 8)
    assert bench.count_launches(lambda: torch.add(x, 1), torch.device("cpu")) == 1
    # linear calls t/addmm inside its own dispatch: one outermost operator each time
    assert bench.count_launches(lambda: [torch.nn.functional.linear(x, x) for _ in range(3)],
                                torch.device("cpu")) == 3


def test_bad_flags_exit_2(capsys):
    bench = bench_module()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--tiny", "--repeat", "0"])
    assert exit_info.value.code == 2
    assert "--repeat must be positive" in capsys.readouterr().err


def test_mixed_attention_rows_and_layers(tmp_path):
    """--mixed-attention trains the mixed plan once per method, each row labelled with it and reporting it;
    --layers builds that many layers; an unknown method is refused in one line with status 2."""
    bench = bench_module()
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--json", str(out), "--skip", "prefill", "--skip", "decode", "--skip", "launches",
                       "--compile", "off", "--train-length", "32", "--warmup", "0", "--repeat", "1",
                       "--mixed-attention", "packed,dense", "--layers", "1"]) == 0
    report = json.loads(out.read_text())
    rows = [(r["plan"], r["mixed_attention"]) for r in report["rows"]]
    assert rows == [("-", None), ("attention", None), ("recurrent", None), ("mixed-packed", "packed"),
                    ("mixed-dense", "dense")]
    assert report["shape"]["num_hidden_layers"] == 1
    for flag, value in (("--mixed-attention", "sparse"), ("--train-plans", "mixed,hybrid")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--tiny", flag, value])
        assert exit_info.value.code == 2
    assert bench.main(["--tiny", "--json", str(out), "--skip", "prefill", "--skip", "decode", "--skip", "launches",
                       "--compile", "off", "--train-length", "32", "--warmup", "0", "--repeat", "1",
                       "--train-plans", "mixed", "--layers", "1"]) == 0
    assert [r["plan"] for r in json.loads(out.read_text())["rows"]] == ["-", "mixed"]
