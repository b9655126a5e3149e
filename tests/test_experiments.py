"""The small-scale experiment runners (docs/results.md) end to end at toy scale on the CPU: experiment 1 for one
model (`--models`), experiment 3 on it, and the export of the default model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from oryx_core import cli  # noqa: E402
from oryx_core.weights import load_checkpoint  # noqa: E402
from error_metrics import relative_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def pointed_at(work: Path, shards: Path, name: str) -> Path:
    """experiments/configs/NAME with its data pointed at `shards`, written into `work`."""
    config = json.loads((ROOT / "experiments" / "configs" / name).read_text())
    config["data"] = str(shards)
    path = work / name
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def toy_config(tmp_path_factory):
    """experiments/configs/lm_budget.json with its data pointed at shards of the bundled docs corpus."""
    work = tmp_path_factory.mktemp("experiments")
    shards = work / "shards"
    assert cli.main(["data", "build", "--input", str(ROOT / "data" / "docs-corpus.txt.xz"), "--tokenizer",
                     str(ROOT / "data" / "tokenizer-8k.json"), "--out", str(shards), "--quiet"]) == 0
    return work, pointed_at(work, shards, "lm_budget.json")


def test_one_model_then_switching_then_default_export(toy_config):
    work, config = toy_config
    out = work / "out"
    done = run("lm_budget.py", "--config", str(config), "--scale", "toy", "--models", "oryx-mamba2", "--steps", "3",
               "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "lm_budget.json").read_text())
    assert [m["name"] for m in results["models"]] == ["oryx-mamba2"] and results["steps"] == 3
    assert "--models oryx-mamba2" in results["command"]
    losses = results["models"][0]["eval_loss"]
    assert set(losses) >= {"attention", "recurrent", "mixed"} and all(0 < v < 20 for v in losses.values())

    done = run("switching.py", "--scale", "toy", "--lm-results", str(out / "lm_budget.json"), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    plans = json.loads((out / "switching.json").read_text())["models"][0]["plans"]
    pure = {p["plan"]: p for p in plans if p["switches"] == 0}
    assert pure["attention"]["switch_cost"] == 0 and pure["recurrent"]["switch_cost"] == 0

    done = run("export_default.py", "--lm-results", str(out / "lm_budget.json"), "--out", str(out / "default"))
    assert done.returncode == 0, done.stderr[-2000:]
    exported = load_checkpoint(out / "default")
    assert exported.config.max_context == results["settings"]["seq_len"]  # the context it was trained at
    assert (out / "default" / "tokenizer.json").exists()


def test_bad_arguments_end_with_one_line(toy_config):
    _, config = toy_config
    done = run("lm_budget.py", "--config", str(config), "--scale", "toy", "--models", "nope", "--steps", "1",
               "--out", "/tmp/never")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "--models nope" in done.stderr
    done = run("export_default.py", "--lm-results", "/nonexistent/lm_budget.json", "--out", "/tmp/never")
    assert done.returncode == 2 and "/nonexistent/lm_budget.json" in done.stderr
    assert done.stderr.strip().count("\n") == 0


def test_default_model_config_trains_and_exports_at_toy_scale(toy_config):
    work, config = toy_config
    default_config = pointed_at(work, Path(json.loads(config.read_text())["data"]), "default_model.json")
    out = work / "default-out"
    done = run("lm_budget.py", "--config", str(default_config), "--scale", "toy", "--steps", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "lm_budget.json").read_text())
    assert [m["modes"] for m in results["models"]] == ["mixed"]
    done = run("export_default.py", "--lm-results", str(out / "lm_budget.json"), "--out", str(out / "default"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_checkpoint(out / "default").config.max_context == results["settings"]["seq_len"]


def test_learning_rate_override_is_recorded(toy_config):
    work, config = toy_config
    out = work / "lr-out"
    done = run("lm_budget.py", "--config", str(config), "--scale", "toy", "--models", "gdn-only", "--steps", "2",
               "--lr", "0.01", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "lm_budget.json").read_text())
    written = json.loads(config.read_text())
    assert results["settings"]["lr"] == 0.01
    assert results["settings"]["min_lr"] == pytest.approx(written["min_lr"] * 0.01 / written["lr"])
    assert results["command"].endswith("--models gdn-only --lr 0.01")
    done = run("mqar.py", "--scale", "toy", "--steps", "1", "--lr", "-1", "--out", str(work / "never"))
    assert done.returncode == 2 and done.stderr.strip() == "mqar.py: error: --lr must be > 0, got -1.0"


def test_mqar_precision_runs_each_precision_at_toy_size(tmp_path):
    for precision, extra in (("fp32", []), ("bf16-gdn-kernel-fp32", ["--unpadded-keys"])):
        out = tmp_path / f"{precision}.json"
        done = run("mqar_precision.py", "--precision", precision, "--length", "16", "--pairs", "2", "--steps", "2",
                   "--batch-size", "4", "--log-every", "1", "--out", str(out), *extra)
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(out.read_text())
        assert [step for step, _ in result["loss_curve"]] == [1, 2]
        assert all(6 < loss < 9 for _, loss in result["loss_curve"])  # near ln(2048) before learning
        assert 0.0 <= result["accuracy"] <= 1.0 and result["args"]["precision"] == precision
        assert result["args"]["unpadded_keys"] == bool(extra)
    done = run("mqar_precision.py", "--length", "16", "--pairs", "8")
    assert done.returncode == 2
    assert done.stderr.strip().endswith("--pairs: 8 pairs need --length >= 32 (pairs, then queries and answers)")


def test_gdn_bf16_emulation_is_the_kernel_math_and_rounds_like_bf16(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import torch

    import gdn_bf16_emulation as emulation
    from oryx_torch.kernels.gdn import chunk_gated_delta_rule_torch
    from gdn_inputs import random_inputs

    inputs = random_inputs(2, 64, 3, 32, 64, torch.float64, seed=4, with_state=False)[:5]

    def output_and_grads(fn, dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
        o, _ = fn(*leaves)
        (o * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape).to(dtype)).sum().backward()
        return [o, *(x.grad for x in leaves)]

    reference = output_and_grads(chunk_gated_delta_rule_torch, torch.float64)
    for points, low, high in (("none", 0.0, 1e-5), ("all", 1e-3, 1e-2)):
        monkeypatch.setattr(emulation, "ROUND", emulation.parse_points(points))
        for got, want in zip(output_and_grads(emulation.emulated_gated_delta_rule, torch.float32), reference):
            frobenius = ((got.double() - want).norm() / want.norm()).item()
            assert low <= frobenius and relative_error(got, want) < high, points  # the latter bounds every element
    done = run("gdn_bf16_emulation.py", "--round", "X,nope")
    assert done.returncode == 2 and done.stderr.strip().endswith("error: --round: unknown rounding point 'nope'")


def test_plots_merges_mqar_reruns_over_earlier_models(tmp_path):
    def mqar_run(models):
        return {"settings": {"seq_len": 256, "batch_size": 64},
                "models": [{"name": name, "mixer": "gdn", "modes": "recurrent",
                            "eval": [{"length": 128, "pairs": 8, "placement": "own", "share": 0.0,
                                      "attention_share": 0.0, "accuracy": accuracy}]}
                           for name, accuracy in models]}
    first, rerun = tmp_path / "results.json", tmp_path / "rerun.json"
    first.write_text(json.dumps({"mqar": mqar_run([("gdn-only", 0.005), ("mamba2-only", 0.023)])}))
    rerun.write_text(json.dumps(mqar_run([("gdn-only", 0.802)])))
    done = run("plots.py", "--mqar-results", str(first), str(rerun), "--tables")
    assert done.returncode == 0, done.stderr[-2000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| T=128, 8 pairs")][0]
    assert table == "| T=128, 8 pairs | 0.802 | 0.023 |"      # the rerun's GDN-only, the first file's Mamba-2-only
    other = json.loads(rerun.read_text())
    other["settings"]["seq_len"] = 128
    rerun.write_text(json.dumps(other))
    done = run("plots.py", "--mqar-results", str(first), str(rerun), "--tables")
    assert done.returncode == 2 and "seq_len 128 differs" in done.stderr
    rerun.write_text(json.dumps({"lm_budget": {}}))
    done = run("plots.py", "--mqar-results", str(first), str(rerun), "--tables")
    assert done.returncode == 2
    assert done.stderr.strip().endswith(f"{rerun}: no mqar result in it (expected its 'settings' and 'models')")
    rerun.write_text("{")
    done = run("plots.py", "--mqar-results", str(rerun), "--tables")
    assert done.returncode == 2 and f"{rerun}: not JSON" in done.stderr.splitlines()[-1]


def test_plots_pools_mqar_seeds_and_refuses_mixed_lengths(tmp_path):
    def mqar_run(seed, accuracy, steps=4000):
        return {"settings": {"seq_len": 256, "batch_size": 64, "seed": seed},
                "models": [{"name": "gdn-only", "mixer": "gdn", "modes": "recurrent", "steps": steps,
                            "eval": [{"length": 128, "pairs": 8, "placement": "own", "share": 0.0,
                                      "attention_share": 0.0, "accuracy": accuracy}]}]}
    paths = [tmp_path / f"seed{seed}.json" for seed in range(3)]
    for seed, (path, accuracy) in enumerate(zip(paths, (0.5, 0.9, 0.7))):
        path.write_text(json.dumps(mqar_run(seed, accuracy)))
    rerun = tmp_path / "seed1-rerun.json"                   # same seed again: replaces seed 1's run
    rerun.write_text(json.dumps(mqar_run(1, 0.6)))
    done = run("plots.py", "--mqar-results", *map(str, paths), str(rerun), "--tables",
               "--figure", str(tmp_path / "pooled.png"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Seeds: GDN-only 0, 1, 2" in done.stdout
    table = [line for line in done.stdout.splitlines() if line.startswith("| T=128, 8 pairs")][0]
    assert table == "| T=128, 8 pairs | 0.600 (0.500–0.700) |"
    import matplotlib.image
    import numpy as np

    figure = matplotlib.image.imread(tmp_path / "pooled.png")  # a decodable PNG with something drawn on it
    assert figure.ndim == 3 and min(figure.shape[:2]) >= 100 and len(np.unique(figure.reshape(-1, figure.shape[2]), axis=0)) > 2
    paths[2].write_text(json.dumps(mqar_run(2, 0.7, steps=1320)))
    done = run("plots.py", "--mqar-results", *map(str, paths), "--tables")
    assert done.returncode == 2
    assert done.stderr.strip().endswith(f"{paths[2]}: gdn-only ran 1320 steps, {paths[0]}'s 4000: "
                                        "runs of different lengths cannot be pooled")
    rerun.write_text(json.dumps(mqar_run(2, 0.8)))           # seed 2 rerun at 4,000 steps replaces the 1,320
    done = run("plots.py", "--mqar-results", *map(str, paths), str(rerun), "--tables")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| T=128, 8 pairs | 0.733 (0.500–0.900) |" in done.stdout


def test_train_default_plans_steps_from_a_probe_and_exports(toy_config):
    work, config = toy_config
    train_config = pointed_at(work, Path(json.loads(config.read_text())["data"]), "default_model_train.json")
    out = work / "train-default"
    done = run("train_default.py", "--config", str(train_config), "--scale", "toy", "--out", str(out),
               "--budget-s", "40", "--probe-steps", "4", "--reserve-s", "5", "--nproc", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "train_default.json").read_text())
    assert results["probe"]["steps"] == 4 and results["probe"]["tokens_per_s"] > 0
    assert results["steps"] >= 4 and f"--steps {results['steps']}" in results["command"]
    assert results["loss_curve"][-1][0] == results["steps"]
    assert set(results["eval"][-1]["eval"]) >= {"attention", "recurrent", "mixed"}
    assert not (out / "probe").exists()
    exported = load_checkpoint(out / "default_model")
    assert exported.config.max_context == results["settings"]["seq_len"] == 128
    assert exported.config.mixer == "gdn" and (out / "default_model" / "tokenizer.json").exists()


def test_train_default_bad_arguments_end_with_one_line(toy_config, tmp_path):
    done = run("train_default.py", "--scale", "toy", "--out", str(tmp_path), "--steps", "1", "--config", "/nonexistent.json")
    assert done.returncode == 2 and "/nonexistent.json" in done.stderr and done.stderr.strip().count("\n") == 0
    done = run("train_default.py", "--scale", "toy", "--out", str(tmp_path), "--steps", "1", "--nproc", "0")
    assert done.returncode == 2 and "--nproc 0" in done.stderr and done.stderr.strip().count("\n") == 0
    done = run("export_default.py", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "--max-context" in done.stderr and done.stderr.strip().count("\n") == 0
