"""experiments/sharing.py (the sharing ablation) end to end at toy scale on the CPU: the values in its JSON."""
import json
import lzma
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from oryx_core import cli  # noqa: E402
from oryx_core.config import preset  # noqa: E402
from oryx_core.spec import parameter_counts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    # one thread: these tiny models are many small operators, which threads on a shared CPU only slow down
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "sharing.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def toy_config(tmp_path_factory):
    """experiments/configs/sharing.json pointed at shards of the first 600 kB of the bundled docs corpus."""
    work = tmp_path_factory.mktemp("sharing")
    with lzma.open(ROOT / "data" / "docs-corpus.txt.xz", "rt") as f:
        (work / "text.txt").write_text(f.read(600_000))
    assert cli.main(["data", "build", "--input", str(work / "text.txt"), "--tokenizer", str(ROOT / "data" / "tokenizer-8k.json"),
                     "--out", str(work / "shards"), "--val-fraction", "0.2", "--quiet"]) == 0
    config = json.loads((ROOT / "experiments" / "configs" / "sharing.json").read_text())
    config["data"] = str(work / "shards")
    (work / "sharing.json").write_text(json.dumps(config))
    return work, work / "sharing.json"


def check_results(results: dict, seeds: list, mixers: list, sharings: list, steps: int) -> None:
    settings = results["settings"]
    runs = results["runs"]
    assert sorted((r["seed"], r["mixer"], r["sharing"]) for r in runs) == \
        sorted((s, m, sh) for s in seeds for m in mixers for sh in sharings)
    assert results["steps"] == steps and f"--steps {steps}" in results["command"]
    tokens = steps * settings["seq_len"] * settings["batch_size"]
    assert all(r["steps"] == steps and r["tokens"] == tokens for r in runs)  # equal tokens
    assert len({r["validation_sha256"] for r in runs}) == 1 == len({results["validation"]["sha256"]})
    assert results["validation"]["sha256"] == runs[0]["validation_sha256"]
    for seed in seeds:  # the same batches for every run of a seed, other batches for another seed
        assert len({r["first_batch_sha256"] for r in runs if r["seed"] == seed}) == 1
    assert len({r["first_batch_sha256"] for r in runs}) == len(seeds)
    for r in runs:
        cfg = preset("tiny", r["mixer"], vocab_size=8192, sharing=r["sharing"])
        assert r["parameters"] == parameter_counts(cfg)
        assert set(r["eval_loss"]) == {"attention", "recurrent", "mixed"}
        for plan, loss in r["eval_loss"].items():
            # below ln(8192) = 9.01 after the fitted steps of a random tiny model, nowhere near trained
            assert 7.0 < loss < 9.3
            assert r["eval_ppl"][plan] == pytest.approx(math.exp(loss), rel=1e-12)
        assert r["tokens_per_s"] > 0 and len(r["loss_curve"]) == steps
    for row in results["summary"]:
        losses = [r["eval_loss"]["recurrent"] for r in runs if (r["mixer"], r["sharing"]) == (row["mixer"], row["sharing"])]
        assert row["recurrent"]["loss_mean"] == pytest.approx(sum(losses) / len(losses), rel=1e-12)
    # the variants are different models: the same seed gives other losses
    by = {(r["seed"], r["mixer"], r["sharing"]): r["eval_loss"]["recurrent"] for r in runs}
    assert by[(seeds[0], mixers[0], sharings[0])] != by[(seeds[0], mixers[0], sharings[1])]
    assert results["environment"]["device"] and results["environment"]["date"].startswith("20")


def test_toy_run_values(toy_config):
    work, config = toy_config
    out = work / "out"
    done = run("--config", str(config), "--scale", "toy", "--steps", "2", "--seeds", "0", "1", "--mixers", "mamba2",
               "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "sharing.json").read_text())
    check_results(results, [0, 1], ["mamba2"], ["kv", "none", "qkv"], 2)
    assert not list((out / "runs").glob("*/checkpoints"))  # checkpoints removed

    import sharing_report  # the report's same-seed differences against kv, and its tables

    by = {(r["sharing"], r["seed"]): r["eval_loss"]["mixed"] for r in results["runs"]}
    diffs = sharing_report.paired_differences(results)
    assert diffs[("mamba2", "qkv", "mixed")] == [by[("qkv", s)] - by[("kv", s)] for s in (0, 1)]
    assert set(diffs) == {("mamba2", s, p) for s in ("none", "qkv") for p in ("attention", "recurrent", "mixed")}
    table = sharing_report.main_table(results)
    assert table.count("\n") == 4 and "Oryx-Mamba-2" in table


@pytest.mark.slow
def test_toy_budget_with_worker_processes(toy_config):
    """The GPU run's path: the step count from a probe run by every worker at once, runs in worker processes."""
    work, config = toy_config
    out = work / "out-budget"
    done = run("--config", str(config), "--scale", "toy", "--budget-s", "20", "--workers", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "sharing.json").read_text())
    assert results["probe"]["workers"] == 2 and len(results["probe"]["runs"]) == 2
    check_results(results, [0, 1], ["gdn", "mamba2"], ["kv", "none", "qkv"], results["steps"])


def test_bad_arguments_end_with_one_line(toy_config, tmp_path):
    _, config = toy_config
    for args, named in ((["--sharings", "kv", "kv"], "--sharings"), (["--budget-s", "-1"], "--budget-s"),
                        (["--config", str(tmp_path / "missing.json")], "missing.json")):
        done = run("--config", str(config), "--scale", "toy", "--out", str(tmp_path / "o"), *args)
        assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and named in done.stderr, done.stderr
    bad = json.loads(config.read_text())
    bad["data"] = str(tmp_path / "no-shards")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    done = run("--config", str(tmp_path / "bad.json"), "--scale", "toy", "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "no-shards" in done.stderr and done.stderr.strip().count("\n") == 0
