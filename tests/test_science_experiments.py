"""The runners of the paper's open questions at toy scale on the CPU: retrieval without an oracle
(experiments/mqar_no_oracle.py) and single-pass budgets (experiments/lm_single_pass.py), in-process (workers 0)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from oryx_core import cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def toy_config(tmp_path: Path, name: str, **changes) -> Path:
    """experiments/configs/NAME with the toy scale's workers set to 0 (in-process) and `changes` applied (to the toy
    scale too where it sets the key)."""
    config = json.loads((ROOT / "experiments" / "configs" / name).read_text())
    config["scales"]["toy"]["workers"] = 0
    config.update(changes)
    config["scales"]["toy"].update({k: v for k, v in changes.items() if k in config["scales"]["toy"]})
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


def test_mqar_training_modes_never_depend_on_where_the_queries_are():
    """With query_plan_share 0 the modes come from the sampler alone: other targets, same modes."""
    import mqar

    exp = json.loads((ROOT / "experiments" / "configs" / "mqar_no_oracle.json").read_text())
    entry = {"name": "oryx-gdn", "mixer": "gdn", "modes": "mixed"}
    rng = np.random.default_rng(0)
    lengths = np.array([256, 128, 256, 128])
    first = np.full((4, 256), -100)
    first[:, 40:60:2] = 7
    second = np.full((4, 256), -100)
    second[:, 100:200:4] = 9
    modes = [mqar.training_modes(entry, exp, targets, lengths, np.random.default_rng(1)) for targets in (first, second)]
    np.testing.assert_array_equal(modes[0], modes[1])
    assert 0 < modes[0].mean() < 1
    del rng


def test_blind_plans_give_the_shares_they_name():
    from mqar_no_oracle import plan_modes

    rng = np.random.default_rng(0)
    assert plan_modes("last:25%", 128, 2, 256, rng).sum(axis=1).tolist() == [32, 32]
    modes = plan_modes("last:16", 128, 1, 256, rng)[0]
    assert modes[112:128].all() and not modes[:112].any() and not modes[128:].any()  # padding stays recurrent
    assert np.flatnonzero(plan_modes("every:10:4", 128, 1, 256, rng)[0]).tolist() == [0, 1, 2, 3, 40, 41, 42, 43,
                                                                                      80, 81, 82, 83, 120, 121, 122, 123]
    drawn = plan_modes("chunks:25%:16", 256, 400, 256, rng)
    assert abs(drawn.mean() - 0.25) < 0.02 and (drawn.reshape(400, 16, 16).std(axis=2) == 0).all()  # whole chunks


def test_mqar_no_oracle_end_to_end(tmp_path):
    # Mamba-2 and five plans: the GDN torch path on the CPU makes each evaluation several times slower
    config = toy_config(tmp_path, "mqar_no_oracle.json", lr_sweep={"model": "mamba2-only", "lrs": [0.01]},
                        eval_plans=["recurrent", "last:25%", "last:16", "every:2:16", "chunks:25%:16", "attention"],
                        eval_lengths=[32, 64], eval_pairs=[8])
    out = tmp_path / "out"
    done = run("mqar_no_oracle.py", "--config", str(config), "--scale", "toy", "--models", "oryx-mamba2",
               "mamba2-only", "--seed", "1", "--steps", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "mqar_no_oracle.json").read_text())
    assert results["steps"] == 3 and "--steps 3" in results["command"] and "--seed 1" in results["command"]
    assert results["settings"]["query_plan_share"] == 0
    # the two models at the config's lr, then the swept baseline at the toy sweep's other lr
    runs = sorted((m["name"], m["seed"], m["lr"]) for m in results["models"])
    assert runs == [("mamba2-only", 1, 0.003), ("mamba2-only", 1, 0.01), ("oryx-mamba2", 1, 0.003)]
    exp = results["settings"]
    oryx = next(m for m in results["models"] if m["name"] == "oryx-mamba2")
    settings = {(r["length"], r["pairs"]) for r in oryx["eval"]}
    assert settings == {(32, 8), (64, 8)}
    assert len(oryx["eval"]) == len(settings) * len(exp["eval_plans"])
    for row in oryx["eval"]:
        assert row["total"] == exp["eval_batches"] * exp["batch_size"] * row["pairs"]
        assert row["accuracy"] == row["correct"] / row["total"]
        expected = {"recurrent": 0.0, "attention": 1.0, "last:25%": round(0.25 * row["length"]) / row["length"],
                    "last:16": 16 / row["length"], "every:2:16": 0.5}
        if row["plan"] in expected:
            assert row["share"] == pytest.approx(expected[row["plan"]])
    baseline = [m for m in results["models"] if m["name"] == "mamba2-only"]
    assert all({r["plan"] for r in m["eval"]} == {"recurrent"} for m in baseline)
    assert all(m["parameters"]["used"] < oryx["parameters"]["used"] for m in baseline)


def test_mqar_no_oracle_refuses_an_oracle_config(tmp_path):
    config = toy_config(tmp_path, "mqar_no_oracle.json", query_plan_share=0.5)
    done = run("mqar_no_oracle.py", "--config", str(config), "--scale", "toy", "--steps", "1", "--out", str(tmp_path))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "query_plan_share" in done.stderr


@pytest.fixture(scope="module")
def docs_shards(tmp_path_factory) -> Path:
    shards = tmp_path_factory.mktemp("science") / "shards"
    assert cli.main(["data", "build", "--input", str(ROOT / "data" / "docs-corpus.txt.xz"), "--tokenizer",
                     str(ROOT / "data" / "tokenizer-8k.json"), "--out", str(shards), "--quiet"]) == 0
    return shards


@pytest.mark.slow  # ~20-30 s on a shared 2-core CPU; the cap test below runs the same path for fewer steps
def test_lm_single_pass_end_to_end(tmp_path, docs_shards):
    config = toy_config(tmp_path, "lm_single_pass.json", data=str(docs_shards))
    out = tmp_path / "out"
    done = run("lm_single_pass.py", "--config", str(config), "--scale", "toy", "--models", "transformer",
               "--steps", "6", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "lm_single_pass.json").read_text())
    tokens_per_step = 128 * 4
    assert results["steps"] == 6 and results["eval_every"] == 2 and results["tokens_per_model"] == 6 * tokens_per_step
    assert results["passes"] == pytest.approx(6 * tokens_per_step / results["train_split_tokens"])
    assert results["corpora_considered"] and results["validation"]["windows"] == 2 * 4
    assert sorted(m["seed"] for m in results["models"]) == [0, 1]
    for model in results["models"]:
        assert [p["step"] for p in model["eval_curve"]] == [2, 4, 6]
        assert [p["tokens"] for p in model["eval_curve"]] == [2 * tokens_per_step, 4 * tokens_per_step, 6 * tokens_per_step]
        assert model["eval_curve"][-1]["loss"] == model["eval_loss"] and set(model["eval_loss"]) == {"attention"}
        assert model["eval_curve"][-1]["loss"]["attention"] < model["eval_curve"][0]["loss"]["attention"] < math.log(8192) + 1
        start = json.loads((out / f"transformer-seed{model['seed']}" / "log.jsonl").read_text().splitlines()[0])
        assert start["train"]["eval_seed"] == 0 and start["train"]["seed"] == model["seed"]
        assert not (out / f"transformer-seed{model['seed']}" / "checkpoints").exists()


def test_lm_single_pass_caps_the_steps_at_one_pass(tmp_path, docs_shards):
    config = toy_config(tmp_path, "lm_single_pass.json", data=str(docs_shards), max_passes=0.0004)
    out = tmp_path / "out"
    done = run("lm_single_pass.py", "--config", str(config), "--scale", "toy", "--models", "transformer", "--seed", "0",
               "--steps", "1000", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "lm_single_pass.json").read_text())
    expected = math.floor(0.0004 * results["train_split_tokens"] / (128 * 4))
    assert 1 <= results["steps"] == expected < 1000 and results["passes"] <= 0.0004
    assert results["models"][0]["steps"] == expected
    assert results["models"][0]["eval_curve"][-1]["tokens"] == expected * 128 * 4
    # the final checkpoint, loaded afresh, scores what the loop's last evaluation scored
    assert results["models"][0]["eval_loss_final_checkpoint"] == pytest.approx(results["models"][0]["eval_loss"], abs=1e-6)
    assert results["models"][0]["eval_loss_max_abs_difference"] < 1e-6


def test_plot_science_pools_seeds_into_mean_and_range(tmp_path):
    def run_of(name, modes, seed, lr, accuracy):
        plans = ["recurrent", "last:10%"] if modes == "mixed" else [modes]
        return {"name": name, "modes": modes, "seed": seed, "lr": lr,
                "eval": [{"length": 64, "pairs": 4, "plan": p, "share": 0.1 if p == "last:10%" else 0.0,
                          "accuracy": accuracy} for p in plans]}

    results = {"experiment": "mqar_no_oracle", "steps": 10, "environment": {}, "command": "c",
               "settings": {"lr": 0.003, "eval_plans": ["recurrent", "last:10%"],
                            "lr_sweep": {"model": "gdn-only", "lrs": [0.01]}},
               "models": [run_of("oryx-gdn", "mixed", 0, 0.003, 0.4), run_of("oryx-gdn", "mixed", 1, 0.003, 0.6),
                          run_of("gdn-only", "recurrent", 0, 0.003, 0.2), run_of("gdn-only", "recurrent", 0, 0.01, 0.1),
                          {"name": "gdn-only", "seed": 1, "lr": 0.01, "error": "Traceback ..."}]}
    path = tmp_path / "mqar_no_oracle.json"
    path.write_text(json.dumps(results))
    done = run("plot_science.py", "--retrieval", str(path), "--tables")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "| Oryx-GDN `last:10%` (10.0%) | 0.500 (0.400–0.600) |" in lines
    assert "| **GDN-only** | 0.200 |" in lines
    assert "| GDN-only lr 0.01 | 0.100 |" in lines and "| GDN-only lr 0.003 | 0.200 |" in lines
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**results, "steps": 20}))
    done = run("plot_science.py", "--retrieval", str(path), str(other), "--tables")
    assert done.returncode == 2 and "20 steps" in done.stderr and done.stderr.strip().count("\n") == 0


def test_a_job_out_of_device_memory_is_tried_once_more(monkeypatch):
    import parallel_jobs

    class OutOfMemoryError(RuntimeError):
        pass

    monkeypatch.setattr(parallel_jobs, "OOM_RETRY_WAIT_S", 0.0)
    calls = []

    def flaky(job):
        calls.append(job)
        if len(calls) == 1:
            raise OutOfMemoryError("CUDA out of memory")
        return {"value": job * 2}

    assert parallel_jobs._guarded(flaky, 21) == {"value": 42} and calls == [21, 21]

    def always(job):
        raise OutOfMemoryError("CUDA out of memory")

    assert "OutOfMemoryError" in parallel_jobs._guarded(always, 1)["error"]

    def broken(job):
        calls.append(job)
        raise ValueError("bad")

    calls.clear()
    assert "ValueError: bad" in parallel_jobs._guarded(broken, 3)["error"] and calls == [3]  # not retried


class FinishedAtOncePool:
    """A pool whose jobs have finished by the time submit returns; it counts the jobs submitted and not yet
    reported back to run_jobs's caller."""

    def __init__(self):
        self.outstanding = self.most_outstanding = 0

    def submit(self, function, *args):
        from concurrent.futures import Future

        self.outstanding += 1
        self.most_outstanding = max(self.most_outstanding, self.outstanding)
        future = Future()
        future.set_result(function(*args))
        return future


@pytest.mark.parametrize("max_running", [None, 1, 3])
def test_run_jobs_keeps_at_most_max_running_jobs_on_the_pool(max_running):
    import parallel_jobs

    pool, seen = FinishedAtOncePool(), []

    def on_result(job, result):
        pool.outstanding -= 1
        seen.append((job, result))

    parallel_jobs.run_jobs(pool, lambda job: {"value": job * 2}, list(range(7)), on_result, max_running=max_running)
    assert sorted(seen) == [(j, {"value": 2 * j}) for j in range(7)]
    assert pool.most_outstanding == (7 if max_running is None else max_running)


def test_side_by_side_keeps_as_many_jobs_as_ran_where_a_probe_ran_out_of_device_memory():
    import parallel_jobs

    ran = [{"tokens_per_s": 1.0}] * 3
    oom, other = {"error": "torch.OutOfMemoryError: CUDA out of memory"}, {"error": "ValueError: bad"}
    assert parallel_jobs.side_by_side(ran + [oom], 4) == (ran, [oom["error"]], 3)
    assert parallel_jobs.side_by_side(ran + [other], 4) == (ran, [other["error"]], 4)
    with pytest.raises(RuntimeError, match="every probe failed"):
        parallel_jobs.side_by_side([oom, oom], 2)


@pytest.mark.parametrize("errors, fitted", [([], 4), (["torch.OutOfMemoryError: CUDA out of memory"], 3),
                                            (["ValueError: probe_steps"], 4)])
def test_single_pass_runs_side_by_side_only_as_many_jobs_as_probes_fit_in_device_memory(errors, fitted, monkeypatch,
                                                                                      tmp_path):
    import lm_single_pass

    exp = json.loads((ROOT / "experiments/configs/lm_single_pass.json").read_text())
    exp["workers"] = 4
    measured = [{"mixer": "gdn", "tokens_per_s": 1e5}] * (4 - len(errors)) + [{"error": e} for e in errors]
    monkeypatch.setattr(lm_single_pass, "run_all", lambda pool, function, jobs: measured)
    results = {}
    import time

    steps, running = lm_single_pass.choose_steps(exp, None, tmp_path, 15, 400.0, time.perf_counter(), results)
    assert running == fitted and results["probe"]["workers"] == fitted
    assert results["probe"]["rounds"] == math.ceil(15 / fitted) and steps >= exp["min_steps"]
