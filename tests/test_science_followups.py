"""Splitting the paper's open-question experiments over several GPU calls: experiments/gpu_science.sh picks runners
and passes them arguments, mqar_no_oracle.py runs the lr sweep apart, --workers overrides the config, and the
report tools pool the files of several calls."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
SHARING_RESULTS = ROOT / "experiments" / "results" / "science" / "sharing.json"


def fake_python(tmp_path: Path) -> Path:
    """A PYTHON for gpu_science.sh that records each command line (one per line) and does nothing else."""
    calls = tmp_path / "calls.txt"
    script = tmp_path / "python"
    script.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    script.chmod(0o755)
    return script


def science(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "experiments" / "gpu_science.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "OUT": str(tmp_path / "out"), "ORYX_EXP_WORK": str(tmp_path / "work"),
                               "ORYX_SCIENCE_S": "100", "PYTHON": str(fake_python(tmp_path)), **env})


def test_gpu_science_starts_the_named_runners_with_their_arguments(tmp_path):
    """(Only the MQAR runner: it needs no corpus, which a clean clone lacks.)"""
    def started(tmp, args):
        done = science(tmp, ORYX_SCIENCE_RUNNERS="retrieval", ORYX_RETRIEVAL_ARGS=args)
        assert done.returncode == 0, done.stderr
        return [line.split() for line in (tmp / "calls.txt").read_text().splitlines() if "experiments/" in line]

    # --steps given: no --budget-s (the two are exclusive)
    assert started(tmp_path, "--steps 4000 --workers 15 --lr-sweep without") == [[
        "experiments/mqar_no_oracle.py", "--steps", "4000", "--workers", "15", "--lr-sweep", "without",
        "--out", str(tmp_path / "work" / "retrieval")]]
    (tmp_path / "again").mkdir()
    [runner] = started(tmp_path / "again", "--models gdn-only --lr-sweep only")
    assert runner[:6] == ["experiments/mqar_no_oracle.py", "--models", "gdn-only", "--lr-sweep", "only", "--out"]
    assert runner[-2] == "--budget-s" and 60 <= int(runner[-1]) <= 75  # the script's 100 s less the start and 25 s


def test_gpu_science_refuses_an_unknown_runner(tmp_path):
    done = science(tmp_path, ORYX_SCIENCE_RUNNERS="retrieval sharingg")
    assert done.returncode == 2 and "sharingg" in done.stderr and done.stderr.strip().count("\n") == 0
    assert not (tmp_path / "calls.txt").exists()


def test_mqar_lr_sweep_runs_with_without_or_alone():
    from mqar_no_oracle import jobs_of

    exp = {"lr": 0.003, "seeds": [0, 1], "lr_sweep": {"model": "gdn-only", "lrs": [0.0003, 0.003, 0.01]},
           "models": [{"name": "oryx-gdn"}, {"name": "gdn-only"}]}

    def runs(mode, **changes):
        return [(j["entry"]["name"], j["seed"], j["lr"]) for j in jobs_of({**exp, **changes}, mode)]

    main = [("oryx-gdn", 0, 0.003), ("gdn-only", 0, 0.003), ("oryx-gdn", 1, 0.003), ("gdn-only", 1, 0.003)]
    sweep = [("gdn-only", 0, 0.0003), ("gdn-only", 1, 0.0003), ("gdn-only", 0, 0.01), ("gdn-only", 1, 0.01)]
    assert runs("with") == main + sweep and runs("without") == main and runs("only") == sweep
    # the swept baseline not named: its sweep is left to the call that names it
    assert runs("with", models=[{"name": "oryx-gdn"}]) == [("oryx-gdn", 0, 0.003), ("oryx-gdn", 1, 0.003)]
    with pytest.raises(ValueError, match="--lr-sweep only"):
        runs("only", models=[{"name": "oryx-gdn"}])


def test_workers_flag_overrides_the_config_and_is_refused_where_unused():
    from common import experiment_from_args

    def args(config, workers):
        return argparse.Namespace(config=str(ROOT / "experiments" / "configs" / config), scale=None, models=None,
                                  seed=None, lr=None, workers=workers)

    assert experiment_from_args(args("lm_single_pass.json", 9))["workers"] == 9
    assert experiment_from_args(args("mqar_no_oracle.json", None))["workers"] == 6
    with pytest.raises(ValueError, match="--workers: this runner trains one model at a time"):
        experiment_from_args(args("lm_budget.json", 2))
    with pytest.raises(ValueError, match="--workers must be >= 0"):
        experiment_from_args(args("lm_single_pass.json", -1))


def report(*paths) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "sharing_report.py"), *map(str, paths)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "experiments")})


def test_sharing_report_pools_one_file_per_mixer_into_the_same_tables(tmp_path):
    whole = json.loads(SHARING_RESULTS.read_text())
    paths = []
    for mixer in ("mamba2", "gdn"):
        part = {**whole, "runs": [r for r in whole["runs"] if r["mixer"] == mixer], "command": f"call {mixer}"}
        paths.append(tmp_path / f"{mixer}.json")
        paths[-1].write_text(json.dumps(part))
    alone, pooled = report(SHARING_RESULTS), report(*paths)
    assert alone.returncode == pooled.returncode == 0, pooled.stderr

    def tables(text):
        return [line for line in text.splitlines() if not line.startswith("- rerun") and "runs finished" not in line]

    assert tables(pooled.stdout) == tables(alone.stdout)
    assert "| Oryx-GDN | kv (shared K, V: Oryx) | 17.94M |" in pooled.stdout
    assert "- rerun: `call mamba2`" in pooled.stdout and "- rerun: `call gdn`" in pooled.stdout
    assert "- gdn: 9 runs finished of 9 started; 132 steps" in pooled.stdout


def test_sharing_report_refuses_unequal_tokens_within_a_mixer(tmp_path):
    whole = json.loads(SHARING_RESULTS.read_text())
    longer = {**whole, "steps": 264, "runs": [{**r, "steps": 264} for r in whole["runs"] if r["mixer"] == "gdn"]}
    path = tmp_path / "longer.json"
    path.write_text(json.dumps(longer))
    done = report(SHARING_RESULTS, path)
    assert done.returncode == 2 and "different step counts [132, 264]" in done.stderr
    assert done.stderr.strip().count("\n") == 0
