"""`oryx train` on CPU with the tiny preset: loss falls, resume is exact, checkpoints are safe, errors are clear."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from oryx_core import cli  # noqa: E402
from oryx_data import build_shards  # noqa: E402
from oryx_core.weights import load_checkpoint, save_checkpoint  # noqa: E402
from oryx_torch import train as train_module  # noqa: E402
from oryx_torch.train import config_from_dict, load_train_config, lr_at, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """One thread: tiny matrices run fastest so, and a shared 2-core machine stays responsive."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)  # the torch kernels, not the Triton interpreter
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Byte-level shards of 24 short documents that repeat one sentence (easy to learn)."""
    root = tmp_path_factory.mktemp("corpus")
    sentence = "Every layer of Oryx reads each token with attention or with a recurrence. "
    text = "\n<|endoftext|>\n".join(f"Document {i}. " + sentence * 12 for i in range(24))
    (root / "corpus.txt").write_text(text)
    build_shards([root / "corpus.txt"], root / "shards", val_fraction=0.25, seed=0)
    return root / "shards"


def tiny_config(shards: Path, out: Path, **changes):
    raw = {"model": {"preset": "tiny", "mixer": "gdn"}, "data": str(shards), "out": str(out), "seq_len": 32,
           "batch_size": 2, "grad_accum": 2, "steps": 6, "lr": 3e-3, "min_lr": 3e-4, "warmup": 2, "eval_every": 3,
           "eval_batches": 1, "save_every": 3, "log_every": 1, "seed": 7, "progress": False, "device": "cpu"}
    raw.update(changes)
    return config_from_dict(raw)


def records(out: Path) -> list[dict]:
    """The log's training and eval records (without start/resume events and timings)."""
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in lines if "event" not in r]


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory) -> Path:
    """6 steps in one go: the run every interrupted-and-resumed run must equal."""
    out = tmp_path_factory.mktemp("full") / "run"
    train(tiny_config(shards, out))
    return out


def assert_same_weights(a: Path, b: Path):
    pa, pb = load_checkpoint(a).params, load_checkpoint(b).params
    assert pa.keys() == pb.keys()
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


def test_loss_falls_on_repeated_text(shards, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_config(shards, out, steps=30, grad_accum=1, batch_size=4, lr=1e-2, min_lr=1e-3,
                                warmup=3, eval_every=30, save_every=0, modes="mixed"))
    log = records(out)
    first = log[0]["loss"]
    assert math.isclose(first, math.log(260), rel_tol=0.1)  # near uniform over the vocabulary at init
    for plan in ("attention", "recurrent", "mixed"):
        assert summary["eval"][plan] < 0.5 * first, (plan, summary["eval"])
    assert all(np.isfinite(r["grad_norm"]) for r in log if "loss" in r)
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 31))


def test_resume_continues_exactly(shards, full_run, tmp_path):
    out = tmp_path / "run"
    half = train(tiny_config(shards, out), stop_after=3)
    assert half["step"] == 3 and Path(half["checkpoint"]).name == "step-00000003"
    train(tiny_config(shards, out), resume=True)
    assert records(out) == records(full_run)  # loss for loss, eval for eval, bit for bit
    assert_same_weights(out / "checkpoints" / "step-00000006" / "model",
                        full_run / "checkpoints" / "step-00000006" / "model")


def test_checkpoint_is_safetensors_and_json_only(full_run):
    ckpt = full_run / "checkpoints" / "step-00000006"
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    assert {"optimizer.safetensors", "optimizer.json", "state.json", "model/config.json",
            "model/model.safetensors.index.json", "model/tokenizer.json"} <= set(files)
    assert all(f.endswith((".safetensors", ".json")) for f in files), files
    from safetensors.numpy import load_file

    moments = load_file(ckpt / "optimizer.safetensors")
    params = load_checkpoint(ckpt / "model").params
    for name, value in params.items():
        assert moments[f"state/{name}/exp_avg"].shape == value.shape
        assert moments[f"state/{name}/exp_avg_sq"].shape == value.shape
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 6 and state["sampler"] == {"seed": 7, "next_step": 6}
    assert {"python", "numpy", "torch_cpu"} <= set(state["rng"][0])
    pointer = json.loads((full_run / "checkpoints" / "latest.json").read_text())
    assert pointer == {"checkpoint": "step-00000006", "step": 6}
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == ["latest.json", "step-00000003",
                                                                              "step-00000006"]


def test_interrupted_save_keeps_previous_checkpoint(shards, full_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_config(shards, out), stop_after=3)

    def fail_mid_write(tensors, metadata=None):
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as m:
        m.setattr(train_module, "encode", fail_mid_write)  # the model is written, the optimizer write fails
        with pytest.raises(OSError, match="simulated"):
            train(tiny_config(shards, out), resume=True)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-00000003"]  # no half-written step 6
    assert json.loads((root / "latest.json").read_text())["checkpoint"] == "step-00000003"
    load_checkpoint(root / "step-00000003" / "model")
    train(tiny_config(shards, out), resume=True)  # the intact checkpoint still resumes exactly
    assert records(out) == records(full_run)


def test_nonfinite_steps_are_skipped_and_a_diverged_run_stops(shards, tmp_path, monkeypatch):
    real_loss, calls = train_module.batch_loss, []

    def poisoned(*args, **kwargs):  # NaN on the calls listed in `bad` (training calls come first: no eval until the end)
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if bad(len(calls)) else loss

    monkeypatch.setattr(train_module, "batch_loss", poisoned)
    bad = {2}.__contains__
    out = tmp_path / "run"
    train(tiny_config(shards, out, steps=4, grad_accum=1, eval_every=0, save_every=1, keep_checkpoints=4))
    log = records(out)
    assert {"step": 2, "skipped": "non-finite gradients"} in log
    assert [r["skipped_steps"] for r in log if "loss" in r] == [0, 1, 1, 1]
    weights = {step: load_checkpoint(out / "checkpoints" / f"step-{step:08d}" / "model").params for step in (1, 2, 3)}
    for name in weights[1]:  # the skipped step left every weight as it was; the next step moved them again
        np.testing.assert_array_equal(weights[2][name], weights[1][name], err_msg=name)
    assert any(not np.array_equal(weights[3][name], weights[2][name]) for name in weights[2])

    bad = (lambda n: n >= 3)
    calls.clear()
    with pytest.raises(train_module.TrainingDiverged, match=r"non-finite for 10 steps in a row \(steps 3-12\)"):
        train(tiny_config(shards, tmp_path / "diverged", steps=20, grad_accum=1, eval_every=0, save_every=0))


def test_fixed_plans_train_and_keep_checkpoints_bounded(shards, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_config(shards, out, modes="recurrent", eval_plans=["recurrent", "every:2:8"], steps=4,
                                save_every=1, keep_checkpoints=2, grad_accum=1))
    assert set(summary["eval"]) == {"recurrent", "every:2:8"}
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000003", "step-00000004"]


def test_model_from_checkpoint_or_config_file(shards, full_run, tmp_path):
    start = full_run / "checkpoints" / "step-00000006" / "model"
    bf16 = load_checkpoint(start)
    save_checkpoint(tmp_path / "bf16", bf16.config, bf16.params, dtype="bfloat16")
    out = tmp_path / "from-checkpoint"
    train(tiny_config(shards, out, model={"checkpoint": str(tmp_path / "bf16")}, steps=1, grad_accum=1))
    trained = load_checkpoint(out / "checkpoints" / "step-00000001" / "model")
    assert trained.dtype == "float32"  # fp32 master weights, whatever the starting dtype
    delta = [np.abs(trained.params[n] - bf16.params[n].astype(np.float32)).max() for n in trained.params]
    assert 0 < max(delta) < 0.05  # one small step away from the starting weights
    config = tmp_path / "config.json"
    config.write_text(bf16.config.replace(n_layers=1).to_json())
    out = tmp_path / "from-config"
    train(tiny_config(shards, out, model={"config": str(config)}, steps=1, grad_accum=1))
    assert load_checkpoint(out / "checkpoints" / "step-00000001" / "model").config.n_layers == 1


def test_schedule_warms_up_then_decays_to_min_lr(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path, lr=1.0, min_lr=0.1, warmup=4)
    assert [lr_at(cfg, s, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(cfg, 4, 100) == 1.0 and math.isclose(lr_at(cfg, 100, 100), 0.1)
    decay = [lr_at(cfg, s, 100) for s in range(4, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert cfg.total_steps(1) == 6
    assert config_from_dict({**cfg.__dict__, "steps": 0, "tokens": 1000}).total_steps(2) == math.ceil(1000 / 256)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"model": {"preset": "tiny"}, "data": "d", "out": "o", "steps": 5}))
    cfg = load_train_config(path, ["steps=9", "model.mixer=mamba2", "modes=attention", "betas=[0.8, 0.9]",
                                   "model.overrides={\"max_context\": 128}"])
    assert (cfg.steps, cfg.modes, cfg.betas) == (9, "attention", [0.8, 0.9])
    assert cfg.model == {"preset": "tiny", "mixer": "mamba2", "overrides": {"max_context": 128}}
    toml = tmp_path / "train.toml"
    toml.write_text('data = "d"\nout = "o"\nsteps = 3\n[model]\npreset = "tiny"\n')
    assert load_train_config(toml).steps == 3
    for configs in ("configs/train/tiny.json", "configs/train/20m.json"):
        load_train_config(ROOT / configs)  # the shipped examples are valid


@pytest.mark.parametrize("changes, message", [
    ({"bogus": 1}, r"unknown keys \['bogus'\]"),
    ({"steps": "10"}, r"steps must be int"),
    ({"lr": True}, r"lr must be float"),
    ({"steps": 0, "tokens": 0}, r"steps or tokens must be > 0"),
    ({"min_lr": 1.0}, r"min_lr must be in \[0, lr\]"),
    ({"modes": "sometimes"}, r"modes: plan 'sometimes'"),
    ({"eval_plans": []}, r"eval_plans must name at least one plan"),
    ({"parallel": "zero3"}, r"parallel must be"),
    ({"mixed_attention": "sparse"}, r"mixed_attention must be one of \"dense\", \"packed\""),
    ({"model": {"preset": "tiny", "config": "x.json"}}, r"exactly one of preset, config, checkpoint"),
    ({"model": {"presett": "tiny"}}, r"unknown keys \['presett'\]"),
])
def test_bad_config_values_are_named(changes, message):
    raw = {"model": {"preset": "tiny"}, "data": "d", "out": "o", "steps": 5, **changes}
    with pytest.raises(ValueError, match=message):
        config_from_dict(raw)


def run_cli(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err.strip()


def test_cli_errors_are_one_line(shards, tmp_path, capsys):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"model": {"preset": "tiny"}, "data": str(tmp_path / "missing"), "out": str(tmp_path / "o"),
                                  "steps": 2, "seq_len": 16, "batch_size": 1, "progress": False}))
    code, err = run_cli(["train", str(config)], capsys)
    assert code == 2 and err.count("\n") == 0 and "missing: no such directory" in err, err
    code, err = run_cli(["train", str(config), "--set", f"data={shards}", "--resume"], capsys)
    assert code == 2 and "--resume: no checkpoint" in err, err
    code, err = run_cli(["train", str(config), "--set", "nonsense"], capsys)
    assert code == 2 and "expected KEY=VALUE" in err, err
    code, err = run_cli(["train", str(tmp_path / "nope.json")], capsys)
    assert code == 2 and "cannot read the training config" in err, err
    code, err = run_cli(["train", str(config), "--set", f"data={shards}", "--set", "model.overrides={\"vocab_size\": 100}"],
                        capsys)
    assert code == 2 and "exceeds the model's vocab_size 100" in err, err


def test_cli_trains_and_refuses_to_overwrite(shards, tmp_path, capsys):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"model": {"preset": "tiny"}, "data": str(shards), "out": str(tmp_path / "o"),
                                  "steps": 2, "seq_len": 16, "batch_size": 1, "eval_batches": 1, "progress": False,
                                  "device": "cpu"}))
    code, err = run_cli(["train", str(config), "--json"], capsys)
    assert code == 0, err
    code, err = run_cli(["train", str(config)], capsys)
    assert code == 2 and "already holds checkpoints; pass --resume" in err, err


def test_cli_prints_the_model_path_that_loads(shards, tmp_path, capsys):
    out = tmp_path / "o"
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"model": {"preset": "tiny"}, "data": str(shards), "out": str(out), "steps": 2,
                                  "seq_len": 16, "batch_size": 1, "eval_batches": 1, "progress": False,
                                  "device": "cpu"}))
    assert cli.main(["train", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    model_line = next(line for line in lines if line.startswith("model "))
    printed = Path(model_line.split()[1])
    assert printed == out / "checkpoints" / "step-00000002" / "model"
    ckpt = load_checkpoint(printed)
    assert ckpt.config.vocab_size == 260 and ckpt.config.n_layers == 2
    assert cli.main(["info", str(printed), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["total"] == sum(int(np.prod(v.shape)) for v in ckpt.params.values())


def test_eval_windows_do_not_depend_on_the_rank(shards, full_run):
    """Every rank scores the same windows, so evaluations at different GPU counts compare."""
    from contextlib import nullcontext

    from oryx_torch.model import OryxModel

    model = OryxModel.from_checkpoint(full_run / "checkpoints" / "step-00000006" / "model")
    cfg = tiny_config(shards, full_run, eval_batches=2)
    val = train_module.open_split(shards, "val")

    def on(rank):
        return train_module.evaluate(model, val, cfg, train_module.Runtime(rank, 1, torch.device("cpu")), nullcontext())

    assert on(0) == on(1)


def test_eval_seed_fixes_the_windows_across_run_seeds(shards, full_run):
    """With eval_seed set, runs of different seeds score the same windows; without it, each seed its own."""
    from contextlib import nullcontext

    from oryx_torch.model import OryxModel

    model = OryxModel.from_checkpoint(full_run / "checkpoints" / "step-00000006" / "model")
    val = train_module.open_split(shards, "val")
    rt = train_module.Runtime(0, 1, torch.device("cpu"))

    def loss(**changes):
        cfg = tiny_config(shards, full_run, eval_batches=1, eval_plans=["attention"], **changes)
        return train_module.evaluate(model, val, cfg, rt, nullcontext())["attention"]

    assert loss(seed=1, eval_seed=5) == loss(seed=2, eval_seed=5) == loss(seed=5)
    assert loss(seed=1) != loss(seed=2)


def test_evaluations_between_fused_optimizer_steps_score_the_current_weights(shards, tmp_path, monkeypatch):
    """With the fused AdamW that CUDA runs use (which writes the weights without bumping their versions), an
    evaluation after an earlier one scores the weights of that moment: the final evaluation inside train() equals
    the same evaluation of the final checkpoint loaded afresh."""
    from contextlib import nullcontext

    from oryx_torch.model import OryxModel

    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *args, **kwargs: adamw(*args, **{**kwargs, "fused": True}))
    out = tmp_path / "run"
    cfg = tiny_config(shards, out, steps=4, grad_accum=1, lr=1e-2,
                      eval_every=2, eval_batches=2, save_every=0, eval_plans=["attention", "recurrent"])
    summary = train(cfg)
    fresh = OryxModel.from_checkpoint(summary["model"], dtype=torch.float32)
    expected = train_module.evaluate(fresh, train_module.open_split(shards, "val"), cfg,
                                     train_module.Runtime(0, 1, torch.device("cpu")), nullcontext())
    for plan in cfg.eval_plans:
        assert summary["eval"][plan] == pytest.approx(expected[plan], abs=1e-5), plan


@pytest.mark.slow
def test_torchrun_two_cpu_processes_ddp_and_fsdp(shards, tmp_path):
    """Two gloo processes, DDP and FSDP2, each stopped and resumed: rank 0 alone writes, the two agree."""
    from oryx_core.cli import command_line

    oryx = command_line()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    losses = {}
    for parallel in ("ddp", "fsdp"):
        out = tmp_path / parallel
        config = tmp_path / f"{parallel}.json"
        # seq_len 32 < mode_chunk: each sequence is one mode, so all-one-mode micro-batches occur (FSDP's hard case)
        config.write_text(json.dumps({"model": {"preset": "tiny"}, "data": str(shards), "out": str(out), "steps": 4,
                                      "seq_len": 32, "batch_size": 2, "eval_batches": 1, "eval_every": 2,
                                      "save_every": 2, "log_every": 1, "warmup": 1, "progress": False,
                                      "device": "cpu", "parallel": parallel}))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *oryx[1:],
                   "train", str(config)]
        for extra in (["--stop-after", "2"], ["--resume"]):
            done = subprocess.run([*command, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
        log = records(out)
        assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
        losses[parallel] = [r["loss"] for r in log if "loss" in r]
        state = json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())
        assert state["world_size"] == 2 and len(state["rng"]) == 2
        load_checkpoint(out / "checkpoints" / "step-00000004" / "model")
    np.testing.assert_allclose(losses["fsdp"], losses["ddp"], rtol=1e-5)


@pytest.mark.slow
def test_compiled_training_matches_eager(shards, full_run, tmp_path):
    """torch.compile of the model (inductor on CPU) trains the same run as eager, to float rounding."""
    out = tmp_path / "compiled"
    train(tiny_config(shards, out, compile=True))
    compiled = [r for r in records(out) if "loss" in r]
    eager = [r for r in records(full_run) if "loss" in r]
    np.testing.assert_allclose([r["loss"] for r in compiled], [r["loss"] for r in eager], rtol=1e-5)


def test_read_log_reads_records_and_tolerates_a_missing_log_only_when_asked(tmp_path):
    with pytest.raises(FileNotFoundError):
        train_module.read_log(tmp_path)
    assert train_module.read_log(tmp_path, missing_ok=True) == []
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 2.5}\n\n{"step": 2, "eval": {"attention": 2.4}}\n')
    assert train_module.read_log(tmp_path) == [{"step": 1, "loss": 2.5}, {"step": 2, "eval": {"attention": 2.4}}]


def test_mixed_attention_is_set_for_the_run_only(shards, tmp_path, monkeypatch):
    """`mixed_attention` is what oryx_torch.attention.MIXED_ATTENTION reads while the run trains, and the module's
    value is back afterwards (even when the run fails)."""
    from oryx_torch import attention

    seen = []
    real = train_module._train
    monkeypatch.setattr(train_module, "_train", lambda *a: seen.append(attention.MIXED_ATTENTION) or real(*a))
    cfg = config_from_dict({"model": {"preset": "tiny"}, "data": str(shards), "out": str(tmp_path / "o"), "steps": 1,
                            "seq_len": 16, "batch_size": 1, "progress": False, "device": "cpu", "compile": False,
                            "mixed_attention": "dense"})  # not the default
    before = attention.MIXED_ATTENTION
    train_module.train(cfg)
    assert seen == ["dense"] and attention.MIXED_ATTENTION == before
    with pytest.raises(ValueError):
        train_module.train(cfg)  # out already holds checkpoints
    assert seen == ["dense", "dense"] and attention.MIXED_ATTENTION == before
