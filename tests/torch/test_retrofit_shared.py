"""The shared stage of `oryx retrofit` (--shared-rank) on CPU with a tiny Llama-like checkpoint: the loss falls,
attention mode's drift is measured and the saved state respects the budget, the adapter (factor pairs) merges
to the whole model on torch and MLX, a changed base is refused in one line, resume is exact."""
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from oryx_core import cli  # noqa: E402
from oryx_core.adapter import ADAPTER_FILE, load_adapter, merge_lowrank, save_adapter  # noqa: E402
from oryx_core.safetensors_io import FormatError  # noqa: E402
from oryx_core.weights import load_checkpoint, save_checkpoint  # noqa: E402
from oryx_torch.model import OryxModel  # noqa: E402
from oryx_torch.retrofit_shared import (SharedStageConfig, read_lowrank, retrofit_shared,  # noqa: E402
                                        target_names)
from test_retrofit import one_cpu_thread, retrofit_workspace  # noqa: E402,F401 (one_cpu_thread: autouse fixture)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    return retrofit_workspace(tmp_path_factory.mktemp("shared"))


def config(ws, out: Path, **changes) -> SharedStageConfig:
    base = dict(src=str(ws["src"]), out=str(out), data=str(ws["data"]), rank=4, tokens=12 * 4 * 32, seq_len=32,
                batch_size=4, lr=1e-2, min_lr=1e-3, warmup=2, eval_every=4, eval_batches=1, save_every=4,
                log_every=1, seed=5, progress=False, device="cpu", attention_budget=0.05,
                eval_plans=["attention", "recurrent", "last:10%"])
    base.update(changes)
    return SharedStageConfig(**base)


def records(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in lines
            if r.get("event") not in ("start", "resume")]


@pytest.fixture(scope="module")
def full_run(workspace) -> Path:
    out = workspace["root"] / "full"
    summary = retrofit_shared(config(workspace, out))
    assert summary["step"] == 12 and Path(summary["model"]) == out / "model"
    return out


def val_nll(path, ws, attention: bool) -> float:
    """Mean next-token NLL of the whole validation split in one mode (fp32, 32-token windows)."""
    from oryx_data import TokenShards

    shards = TokenShards(ws["data"], "val")
    val = np.asarray(shards.window(0, len(shards)))
    n = (len(val) - 1) // 33
    windows = torch.from_numpy(val[:n * 33].reshape(n, 33).astype(np.int64))
    model = OryxModel.from_checkpoint(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(windows[:, :-1], attention)
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()))


def test_the_loss_falls_and_the_plans_approach_attention(full_run):
    log = records(full_run)
    kl = [r["kl_plans"] for r in log if "kl_plans" in r]
    assert len(kl) == 12 and np.mean(kl[-3:]) < 0.8 * np.mean(kl[:3])
    evals = {r["step"]: r["eval"] for r in log if "eval" in r}
    assert sorted(evals) == [0, 4, 8, 12]
    assert evals[0]["attention_drift"] == 0.0  # the deltas start at zero: step 0 is SRC
    for plan in ("recurrent", "last:10%"):  # fixed validation windows
        assert max(evals[s][plan] for s in (4, 8, 12)) < evals[0][plan] - 0.05


def test_attention_drift_is_measured_and_the_saved_state_is_within_budget(workspace, full_run):
    log = records(full_run)
    best = next(r for r in log if r.get("event") == "best")
    evals = {r["step"]: r["eval"] for r in log if "eval" in r}
    assert best["attention_drift"] <= 0.05 and best["step"] in evals
    within = [s for s, e in evals.items() if e["attention_drift"] <= 0.05]
    assert best["score"] == min(evals[s]["score"] for s in within)
    assert any(e["attention_drift"] != 0.0 for e in evals.values())  # attention mode did move
    # measured again on the saved model, over the whole validation split: within the budget, and the delta and
    # recurrent tensors moved (the saved state is not simply SRC)
    src, dst = val_nll(workspace["src"], workspace, True), val_nll(full_run / "model", workspace, True)
    assert dst / src - 1 <= 0.05 + 0.01
    assert val_nll(full_run / "model", workspace, False) < val_nll(workspace["src"], workspace, False)


def test_the_start_is_kept_exactly_when_no_later_state_is_within_budget(workspace, monkeypatch):
    """Every evaluation after the start reports attention mode over budget: the run finishes with SRC itself."""
    import oryx_torch.retrofit_shared as stage

    measured = stage.evaluate
    calls = []

    def over_budget_after_start(*args, **kwargs):
        out = measured(*args, **kwargs)
        calls.append(out["attention_drift"])
        if len(calls) > 1:
            out["attention_drift"] = 0.02
        return out

    monkeypatch.setattr(stage, "evaluate", over_budget_after_start)
    out = workspace["root"] / "kept"
    summary = retrofit_shared(config(workspace, out, tokens=8 * 4 * 32, attention_budget=0.01))
    assert len(calls) == 3 and summary["best"]["step"] == 0
    log = records(out)
    assert [r["within_budget"] for r in log if "eval" in r] == [True, False, False]
    assert [r["attention_weight"] for r in log if "eval" in r] == [1.0, 2.0, 4.0]  # over budget: held harder
    src, dst = load_checkpoint(workspace["src"]).params, load_checkpoint(out / "model").params
    assert all(np.array_equal(src[n].view(np.uint16), dst[n].view(np.uint16)) for n in src)


def test_only_targets_and_recurrent_tensors_change(workspace, full_run):
    src, dst = load_checkpoint(workspace["src"]), load_checkpoint(full_run / "model")
    changed = {n for n in src.params
               if not np.array_equal(src.params[n].view(np.uint16), dst.params[n].view(np.uint16))}
    targets = set(target_names(src.config, ["q_attn", "k_proj", "v_proj", "o_proj"]))  # the default
    assert "layers.0.mixer.k_proj.weight" in changed and "layers.1.mixer.o_proj.weight" in changed
    assert not any(".mlp." in n or "embed" in n or "norm" in n for n in changed)
    assert changed - targets <= {n for n in src.params if "q_rec" in n or "a_proj" in n or "b_proj" in n
                                 or "conv_q" in n or "A_log" in n or "dt_bias" in n}
    factors = read_lowrank(full_run / "lowrank.safetensors")
    assert set(factors) == targets
    a, b = factors["layers.0.mixer.k_proj.weight"]
    assert a.shape == (4, src.config.d_model) and b.shape[1] == 4
    merged = merge_lowrank(src.params["layers.0.mixer.k_proj.weight"], a, b)
    assert np.array_equal(merged.view(np.uint16), dst.params["layers.0.mixer.k_proj.weight"].view(np.uint16))


def test_resume_is_exact(workspace, full_run):
    out = workspace["root"] / "resumed"
    retrofit_shared(config(workspace, out), stop_after=6)
    assert not (out / "model").exists()
    retrofit_shared(config(workspace, out), resume=True)
    assert records(out) == records(full_run)
    a, b = load_checkpoint(out / "model").params, load_checkpoint(full_run / "model").params
    assert all(np.array_equal(a[n].view(np.uint16), b[n].view(np.uint16)) for n in a)


def test_a_deadline_finishes_with_the_best_so_far(workspace):
    out = workspace["root"] / "deadline"
    summary = retrofit_shared(config(workspace, out), deadline=0.0)  # already past: one step, then finish
    assert summary["step"] == 1 and (out / "model").exists()
    best = next(r for r in records(out) if r.get("event") == "best")
    assert best["cut_short_by_deadline"] and best["step"] == 1


def test_cli_writes_the_whole_model_or_its_adapter_and_they_load_alike(workspace, tmp_path, capsys):
    args = ["--data", str(workspace["data"]), "--tokens", "256", "--seq-len", "32", "--batch-size", "4", "--warmup",
            "1", "--device", "cpu", "--eval-batches", "1", "--eval-every", "2", "--shared-rank", "4", "--json"]
    assert cli.main(["retrofit", str(workspace["src"]), str(tmp_path / "whole"), *args]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    assert cli.main(["retrofit", str(workspace["src"]), str(tmp_path / "adapter"), "--adapter", *args]) == 0
    capsys.readouterr()
    meta = json.loads((tmp_path / "adapter" / ADAPTER_FILE).read_text())
    assert meta["format_version"] == 2 and "layers.0.mixer.v_proj.weight" in meta["lowrank"]
    whole, merged = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "adapter")
    assert merged.config == whole.config
    for name, value in whole.params.items():
        assert np.array_equal(value.view(np.uint16), merged.params[name].view(np.uint16)), name


def test_adapter_merges_to_the_adapted_model_on_torch_and_mlx(workspace, full_run, tmp_path):
    from oryx_torch.retrofit_cli import publish

    adapter = publish(full_run / "model", tmp_path / "adapter", True, str(workspace["src"]),
                      read_lowrank(full_run / "lowrank.safetensors"))
    whole, merged, src = (load_checkpoint(p) for p in (full_run / "model", adapter, workspace["src"]))
    for name, value in whole.params.items():
        assert np.array_equal(value.view(np.uint16), merged.params[name].view(np.uint16)), name
    assert not np.array_equal(src.params["layers.0.mixer.v_proj.weight"].view(np.uint16),
                              merged.params["layers.0.mixer.v_proj.weight"].view(np.uint16))
    tokens = np.random.default_rng(2).integers(0, 260, (1, 24))
    modes = np.arange(24) < 12  # prefill-attention: both modes and the adapted keys and values matter
    with torch.no_grad():
        want = OryxModel.from_checkpoint(full_run / "model", dtype=torch.float32)(torch.from_numpy(tokens),
                                                                                  torch.from_numpy(modes)).numpy()
        before = OryxModel.from_checkpoint(workspace["src"], dtype=torch.float32)(torch.from_numpy(tokens),
                                                                                  torch.from_numpy(modes)).numpy()
    mlx = pytest.importorskip("mlx.core")
    from oryx_mlx.generate import load_model

    got = np.array(load_model(adapter)(mlx.array(tokens), mlx.array(modes)).astype(mlx.float32))
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error < 3e-2 and error < 0.2 * np.abs(before - want).max() / np.abs(want).max()  # MLX reads bfloat16


def test_adapter_with_deltas_refuses_a_changed_base_and_an_oversized_adapter(workspace, tmp_path):
    src = load_checkpoint(workspace["src"])
    name = "layers.0.mixer.k_proj.weight"
    rng = np.random.default_rng(0)
    out_f, in_f = src.params[name].shape
    factors = {name: (rng.normal(0, 0.1, (2, in_f)).astype(np.float32),
                      rng.normal(0, 0.1, (out_f, 2)).astype(np.float32))}
    from oryx_core.adapter import merge_lowrank_params, round_lowrank

    params = merge_lowrank_params(src.params, round_lowrank(factors))
    adapter = save_adapter(tmp_path / "adapter", workspace["src"], src.config, params, lowrank=factors)
    assert np.array_equal(load_checkpoint(adapter).params[name].view(np.uint16), params[name].view(np.uint16))
    with pytest.raises(FormatError, match="merged with its low-rank delta"):  # params that are not base + delta
        save_adapter(tmp_path / "bad", workspace["src"], src.config, dict(src.params), lowrank=factors)
    changed = dict(src.params)
    changed[name] = (changed[name].astype(np.float32) * 1.5).astype(changed[name].dtype)
    other = save_checkpoint(tmp_path / "other", src.config, changed, dtype="bfloat16")
    with pytest.raises(FormatError) as e:
        load_adapter(adapter, base=other)
    assert "does not match" in str(e.value) and name in str(e.value) and "\n" not in str(e.value)
    rank = 33 * 2**20 // (2 * (in_f + out_f)) + 1  # bfloat16 factors just over 32 MiB
    big = {name: (np.zeros((rank, in_f), np.float32), np.zeros((out_f, rank), np.float32))}
    with pytest.raises(FormatError, match="MiB"):
        save_adapter(tmp_path / "big", workspace["src"], src.config, dict(src.params), lowrank=big)


def test_cli_one_line_errors(workspace, tmp_path, capsys):
    base = ["retrofit", str(workspace["src"]), str(tmp_path / "x"), "--data", str(workspace["data"]), "--tokens",
            "256", "--seq-len", "32", "--batch-size", "4", "--device", "cpu"]
    for argv, words in ((["--shared-rank", "4", "--shared-targets", "k_proj,wings"], "--shared-targets"),
                        (["--shared-rank", "4", "--layer-tokens", "64"], "--layer-tokens"),
                        (["--shared-rank", "4", "--attention-share", "1.5"], "--attention-share")):
        with pytest.raises(SystemExit) as e:
            raise SystemExit(cli.main([*base, *argv]))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err, err


def test_adapter_metadata_that_does_not_fit_is_refused_in_one_line(workspace, tmp_path):
    src = load_checkpoint(workspace["src"])
    name = "layers.0.mixer.o_proj.weight"
    out_f, in_f = src.params[name].shape
    factors = {name: (np.full((2, in_f), 0.01, np.float32), np.full((out_f, 2), 0.01, np.float32))}
    from oryx_core.adapter import merge_lowrank_params, round_lowrank

    adapter = save_adapter(tmp_path / "adapter", workspace["src"], src.config,
                           merge_lowrank_params(src.params, round_lowrank(factors)), lowrank=factors)
    meta_path = adapter / ADAPTER_FILE
    meta = json.loads(meta_path.read_text())
    for change, words in (({"format_version": 1}, "needs format_version 2"),
                          ({"lowrank": [name, "layers.0.mixer.q_rec.weight"]}, "missing"),
                          ({"lowrank": "o_proj"}, "malformed 'lowrank'")):
        meta_path.write_text(json.dumps({**meta, **change}))
        with pytest.raises(FormatError) as e:
            load_checkpoint(adapter)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_stop_and_resume(workspace, tmp_path):
    """Two gloo processes: each rank its own batches, the deltas' and recurrent gradients averaged; stopped and resumed,
    the run ends with one model and one best record."""
    import os
    import subprocess
    import sys

    from oryx_core.cli import command_line

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    dst = tmp_path / "dst"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *command_line()[1:], "retrofit", str(workspace["src"]), str(dst), "--data", str(workspace["data"]),
               "--shared-rank", "2", "--tokens", "512", "--seq-len", "32", "--batch-size", "2", "--device", "cpu",
               "--eval-batches", "1", "--eval-every", "2", "--save-every", "2", "--warmup", "1", "--json"]
    for extra in (["--stop-after", "3"], ["--resume"]):
        done = subprocess.run([*command, *extra], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    log = records(tmp_path / "dst.run")
    assert [r["step"] for r in log if "loss" in r] == [3, 4]  # 128 tokens per step over two ranks: 4 steps
    assert [r["step"] for r in log if "eval" in r] == [0, 2, 4]
    best = [r for r in log if r.get("event") == "best"]
    assert len(best) == 1 and best[0]["step"] in (0, 2, 4)
    state = json.loads((tmp_path / "dst.run" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    src, out = load_checkpoint(workspace["src"]), load_checkpoint(dst)
    assert np.array_equal(src.params["embed.weight"].view(np.uint16), out.params["embed.weight"].view(np.uint16))


def test_resume_restores_the_adapted_attention_weight(workspace, monkeypatch):
    import oryx_torch.retrofit_shared as stage

    measured = stage.evaluate

    def over_budget_once_moved(*args, **kwargs):
        out = measured(*args, **kwargs)
        out["attention_drift"] = 0.02 if out["attention_drift"] != 0.0 else 0.0
        return out

    monkeypatch.setattr(stage, "evaluate", over_budget_once_moved)
    whole, cut = workspace["root"] / "weight-whole", workspace["root"] / "weight-cut"
    retrofit_shared(config(workspace, whole, tokens=12 * 4 * 32, attention_budget=0.01))
    retrofit_shared(config(workspace, cut, tokens=12 * 4 * 32, attention_budget=0.01), stop_after=6)
    retrofit_shared(config(workspace, cut, tokens=12 * 4 * 32, attention_budget=0.01), resume=True)
    assert [r["attention_weight"] for r in records(whole) if "eval" in r] == [1.0, 2.0, 4.0, 8.0]
    assert records(cut) == records(whole)


@pytest.mark.gpu
def test_on_cuda_with_bf16_autocast_and_fused_adamw(workspace, tmp_path):
    """The stage on the GPU path (bf16 autocast, fused AdamW, Triton kernels): the plans approach attention, and the
    finished model is what its adapter loads to."""
    from oryx_torch.retrofit_cli import publish

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = tmp_path / "cuda"
    summary = retrofit_shared(config(workspace, out, device="cuda", tokens=24 * 4 * 32))
    evals = {r["step"]: r["eval"] for r in records(out) if "eval" in r}
    assert evals[0]["attention_drift"] == 0.0 and min(e["recurrent"] for e in evals.values()) < evals[0]["recurrent"]
    adapter = publish(Path(summary["model"]), tmp_path / "adapter", True, str(workspace["src"]),
                      read_lowrank(summary["lowrank"]))
    whole, merged = load_checkpoint(summary["model"]), load_checkpoint(adapter)
    assert all(np.array_equal(v.view(np.uint16), merged.params[n].view(np.uint16)) for n, v in whole.params.items())


def test_an_adapter_as_src_gives_an_adapter_on_the_same_base(workspace, tmp_path, capsys):
    """SRC may be a recurrent adapter (as the shipped default is): the new adapter applies to that adapter's base."""
    from oryx_core.spec import RECURRENT, parameter_specs

    src = load_checkpoint(workspace["src"])
    params = dict(src.params)
    rng = np.random.default_rng(4)
    for s in parameter_specs(src.config):
        if s.mode == RECURRENT and ".conv_" not in s.name and len(s.shape) == 2:
            params[s.name] = (params[s.name].astype(np.float32) + rng.normal(0, 0.01, s.shape)).astype(
                params[s.name].dtype)
    first = save_adapter(tmp_path / "first", workspace["src"], src.config, params)
    args = ["--data", str(workspace["data"]), "--tokens", "256", "--seq-len", "32", "--batch-size", "4", "--warmup",
            "1", "--device", "cpu", "--eval-batches", "1", "--eval-every", "1", "--shared-rank", "2",
            "--attention-budget", "1", "--json"]
    assert cli.main(["retrofit", str(first), str(tmp_path / "second"), "--adapter", *args]) == 0
    capsys.readouterr()
    meta = json.loads((tmp_path / "second" / ADAPTER_FILE).read_text())
    assert Path(meta["base"]) == Path(workspace["src"]).resolve()
    merged, finished = load_checkpoint(tmp_path / "second"), load_checkpoint(tmp_path / "second.run" / "model")
    assert all(np.array_equal(v.view(np.uint16), merged.params[n].view(np.uint16)) for n, v in finished.params.items())
    assert np.array_equal(merged.params["embed.weight"].view(np.uint16), src.params["embed.weight"].view(np.uint16))
