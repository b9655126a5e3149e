"""bench/bench_fused_decode.py: its defaults and refusals, and (slow) a --tiny run on the CPU end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench_scripts import BENCH, load_bench_script

REPO = BENCH.parent


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("bench_fused_decode")


def test_defaults(bench):
    gpu, tiny = bench.parse_args([]), bench.parse_args(["--tiny"])
    assert (gpu.batches, gpu.prompt_length, gpu.decode_tokens, gpu.long_context) == ([1, 8, 32], 512, 64, 32768)
    assert (tiny.batches, tiny.prompt_length, tiny.decode_tokens, tiny.long_context) == ([1, 2], 8, 3, 300)
    assert gpu.variants == ["eager", "fused", "fused+matvec", "fused+matvec+split", "fused+pdl",
                            "fused+matvec+split+pdl", "fused+compiled", "compiled"]


@pytest.mark.parametrize("argv", [["--plans", "attention,nope"], ["--variants", "fast"], ["--batches", "0,8"],
                                  ["--decode-tokens", "0"], ["--attention-split", "100"], ["--attention-split", "-64"],
                                  ["--attention-combine", "both"]])
def test_refusals_exit_2(bench, argv, capsys):
    """One line naming the flag, exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last and argv[0] in last, last


@pytest.mark.slow
def test_tiny_run(tmp_path):
    """Every variant and plan on a tiny model through the Triton interpreter: rows for each, the fused steps'
    greedy tokens equal the eager step's, and the fp32 parity rows agree on every token."""
    out = tmp_path / "fused.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(REPO / p) for p in (".", "backends/cuda", "convert")))
    result = subprocess.run([sys.executable, str(BENCH / "bench_fused_decode.py"), "--tiny", "--batches", "1",
                             "--plans", "recurrent,attention", "--long-context", "0", "--budget-s", "900",
                             "--out", str(out)], env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(Path(out).read_text())
    assert not report["errors"] and not report["skipped"]
    assert {(r["plan"], r["variant"]) for r in report["decode"]} == {
        (p, v) for p in ("recurrent", "attention")
        for v in ("eager", "fused", "fused+matvec", "fused+matvec+split", "fused+compiled", "compiled")}
    for row in report["decode"]:
        if row["variant"] != "eager":
            assert row["tokens_equal_to_eager"] == row["tokens_compared"], row
        if row["variant"].startswith("fused+matvec"):
            assert row["tokens_equal_to_fused"] == row["tokens_compared"], row
    assert all(r["equal_tokens"] == r["tokens"] and r["first_logits_error"] < 1e-5 for r in report["parity_fp32"])
    assert len(report["launches"]) == 12 and all(r["per_step"] > 0 for r in report["launches"])
