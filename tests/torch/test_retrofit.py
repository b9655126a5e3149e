"""`oryx retrofit` on CPU with a tiny Llama-like checkpoint: only recurrent tensors train, attention mode
stays bit-identical, both stages lower their losses, resume is exact, errors are one line."""
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from oryx_core import cli  # noqa: E402
from oryx_core.config import preset  # noqa: E402
from oryx_core.init import init_params  # noqa: E402
from oryx_core.spec import RECURRENT, parameter_specs  # noqa: E402
from oryx_core.weights import load_checkpoint, save_checkpoint  # noqa: E402
from oryx_data import build_shards  # noqa: E402
from oryx_torch.model import OryxModel  # noqa: E402
from oryx_torch.retrofit import RetrofitConfig, retrofit, student_modes  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        yield
    torch.set_num_threads(threads)


def llama_like_source(path: Path, seed: int = 3) -> Path:
    """A tiny checkpoint shaped like a converted Llama: identity convs, no output gate or norm, q_rec = q_attn,
    attention weights large enough that attention mode does real work."""
    cfg = preset("tiny", "gdn", output_gate=False, output_norm=False, conv_activation="none")
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed)
    for name, p in params.items():
        if p.ndim == 2 and "conv" not in name:
            params[name] = rng.normal(0.0, 1.0 / np.sqrt(p.shape[1]), p.shape).astype(np.float32)
        elif "conv" in name:
            params[name] = np.zeros_like(p)
            params[name][:, -1] = 1.0
    for i in range(cfg.n_layers):
        params[f"layers.{i}.mixer.q_rec.weight"] = params[f"layers.{i}.mixer.q_attn.weight"].copy()
    return save_checkpoint(path, cfg, params, dtype="bfloat16")


def retrofit_workspace(root: Path) -> dict:
    """{root, src: a Llama-like source checkpoint, data: token shards of a small word-salad corpus} under root."""
    rng = np.random.default_rng(0)
    words = ["oryx", "layer", "token", "reads", "state", "keys", "values", "attention", "recurrence", "the", "a"]
    docs = [" ".join(rng.choice(words, 60)) for _ in range(30)]
    (root / "corpus.txt").write_text("\n<|endoftext|>\n".join(docs))
    build_shards([root / "corpus.txt"], root / "shards", val_fraction=0.25, seed=0)
    return {"root": root, "src": llama_like_source(root / "src"), "data": root / "shards"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    return retrofit_workspace(tmp_path_factory.mktemp("retrofit"))


def config(ws, out: Path, **changes) -> RetrofitConfig:
    base = dict(src=str(ws["src"]), out=str(out), data=str(ws["data"]), layer_tokens=8 * 2 * 32,
                tokens=8 * 2 * 32, seq_len=32, batch_size=2, lr=1e-2, min_lr=1e-3, warmup=2, eval_every=4,
                eval_batches=1, save_every=4, log_every=1, seed=5, progress=False, device="cpu",
                eval_plans=["attention", "recurrent", "last:10%"])
    base.update(changes)
    return RetrofitConfig(**base)


def records(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in lines if "event" not in r]


@pytest.fixture(scope="module")
def full_run(workspace) -> Path:
    out = workspace["root"] / "full"
    summary = retrofit(config(workspace, out))
    assert summary["step"] == 16 and Path(summary["model"]) == out / "model"
    return out


def test_only_recurrent_tensors_change_and_attention_is_bit_identical(workspace, full_run):
    src, dst = load_checkpoint(workspace["src"]), load_checkpoint(full_run / "model")
    assert dst.config.recurrent_scale == 1.0 and dst.dtype == "bfloat16"
    recurrent = {s.name for s in parameter_specs(dst.config) if s.mode == RECURRENT}
    changed = {n for n in src.params if not np.array_equal(src.params[n].view(np.uint16), dst.params[n].view(np.uint16))}
    assert changed and changed <= recurrent
    assert "layers.0.mixer.q_rec.weight" in changed and "layers.1.mixer.a_proj.weight" in changed
    tokens = torch.from_numpy(np.random.default_rng(1).integers(0, 260, (2, 40)))
    with torch.no_grad():
        before = OryxModel.from_checkpoint(workspace["src"], dtype=torch.float32)(tokens, True)
        after = OryxModel.from_checkpoint(full_run / "model", dtype=torch.float32)(tokens, True)
        rec_before = OryxModel.from_checkpoint(workspace["src"], dtype=torch.float32)(tokens, False)
        rec_after = OryxModel.from_checkpoint(full_run / "model", dtype=torch.float32)(tokens, False)
    assert torch.equal(before, after)
    assert not torch.allclose(rec_before, rec_after)


def test_both_stages_lower_their_losses(full_run):
    log = records(full_run)
    layer = [r["loss"] for r in log if r.get("stage") == "layer" and "loss" in r]
    logits = [r["loss"] for r in log if r.get("stage") == "logits" and "loss" in r]
    assert len(layer) == 8 and len(logits) == 8
    assert layer[-1] < 0.7 * layer[0]
    evals = {r["step"]: r["eval"] for r in log if "eval" in r}  # fixed windows: steps 0, 4, 8 (end of a), 12, 16
    assert all(e["kl/attention"] == 0.0 for e in evals.values())
    for plan in ("recurrent", "last:10%"):
        assert evals[8][f"kl/{plan}"] < 0.9 * evals[0][f"kl/{plan}"]   # stage (a) brings the plans closer
        assert evals[16][f"kl/{plan}"] < 0.9 * evals[8][f"kl/{plan}"]  # and stage (b) closer still


def test_resume_is_exact(workspace, full_run):
    out = workspace["root"] / "resumed"
    retrofit(config(workspace, out), stop_after=10)  # two steps into stage (b)
    assert not (out / "model").exists()
    retrofit(config(workspace, out), resume=True)
    assert records(out) == records(full_run)
    a, b = load_checkpoint(out / "model").params, load_checkpoint(full_run / "model").params
    assert all(np.array_equal(a[n].view(np.uint16), b[n].view(np.uint16)) for n in a)


def test_student_modes_draw_each_plan():
    modes = student_modes(np.random.default_rng(0), ["recurrent", "prefill-attention", "last:10%", "every:4:64"],
                          64, 256)
    kinds = {("R" if not m.any() else "A" if m.all() else "mix") for m in modes}
    assert kinds == {"R", "mix"}
    assert any(m[:32].all() and not m[-1] for m in modes)  # a prefill prompt: attention first, recurrent after
    assert any(m[-25:].all() and not m[0] for m in modes)  # last:10%


def test_cli_retrofit_and_one_line_errors(workspace, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert cli.main(["retrofit", str(workspace["src"]), str(dst), "--data", str(workspace["data"]), "--tokens", "64",
                     "--seq-len", "32", "--batch-size", "2", "--device", "cpu", "--eval-batches", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 1
    assert load_checkpoint(dst).config.recurrent_scale == 1.0
    for argv, words in ((["--data", str(tmp_path / "nowhere"), "--tokens", "64"], "--data"),
                        (["--data", str(workspace["data"])], "--tokens"),
                        (["--data", str(workspace["data"]), "--tokens", "64", "--plans", "sideways"], "--student-plans")):
        with pytest.raises(SystemExit) as e:
            code = cli.main(["retrofit", str(workspace["src"]), str(tmp_path / "x"), *argv, "--device", "cpu"])
            raise SystemExit(code)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err, err


def test_cli_adapter_output_merges_to_the_retrofitted_model(workspace, tmp_path, capsys):
    """--adapter writes only the recurrent tensors on SRC; loading it gives the whole retrofitted model."""
    args = ["--data", str(workspace["data"]), "--tokens", "128", "--seq-len", "32", "--batch-size", "2",
            "--device", "cpu", "--eval-batches", "1", "--json"]
    assert cli.main(["retrofit", str(workspace["src"]), str(tmp_path / "whole"), *args]) == 0
    assert cli.main(["retrofit", str(workspace["src"]), str(tmp_path / "adapter"), "--adapter", *args]) == 0
    capsys.readouterr()
    assert not (tmp_path / "adapter" / "config.json").exists()
    whole, merged = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "adapter")
    assert merged.config == whole.config
    for name, value in whole.params.items():  # bf16 checkpoints: the adapter's bf16 matrices are exact
        assert np.array_equal(value.view(np.uint16), merged.params[name].view(np.uint16)), name


@pytest.mark.slow
def test_torchrun_two_cpu_processes_stop_and_resume(workspace, tmp_path):
    """Two gloo processes: each rank its own batches, trainable gradients averaged; stopped and resumed, the
    run ends with one model whose attention mode is still SRC's."""
    import os
    import subprocess
    import sys

    from oryx_core.cli import command_line

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    dst = tmp_path / "dst"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *command_line()[1:], "retrofit", str(workspace["src"]), str(dst), "--data", str(workspace["data"]),
               "--layer-tokens", "256", "--tokens", "256", "--seq-len", "32", "--batch-size", "2", "--device", "cpu",
               "--eval-batches", "1", "--eval-every", "2", "--save-every", "2", "--json"]
    for extra in (["--stop-after", "3"], ["--resume"]):
        done = subprocess.run([*command, *extra], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    log = records(tmp_path / "dst.run")
    assert [r["step"] for r in log if "loss" in r] == [2, 3, 4]  # 128 tokens per step over two ranks: 2 + 2 steps
    state = json.loads((tmp_path / "dst.run" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["world_size"] == 2
    src, out = load_checkpoint(workspace["src"]), load_checkpoint(dst)
    assert np.array_equal(src.params["embed.weight"].view(np.uint16), out.params["embed.weight"].view(np.uint16))
    assert not np.array_equal(src.params["layers.0.mixer.q_rec.weight"].view(np.uint16),
                              out.params["layers.0.mixer.q_rec.weight"].view(np.uint16))


def test_switching_the_mixer_starts_fresh_recurrent_tensors(workspace):
    from oryx_torch.retrofit import retrofit_start

    cfg, params, tokenizer_json, dtype = retrofit_start(workspace["src"], "mamba2", None)
    src = load_checkpoint(workspace["src"])
    assert cfg.mixer == "mamba2" and cfg.recurrent_scale is None and dtype == "bfloat16" and tokenizer_json is None
    assert set(params) == {s.name for s in parameter_specs(cfg)}
    for i in range(cfg.n_layers):
        m = f"layers.{i}.mixer."
        assert np.array_equal(params[m + "q_rec.weight"], params[m + "q_attn.weight"])
        assert (params[m + "conv_q.weight"][:, -1] == 1).all() and (params[m + "conv_q.weight"][:, :-1] == 0).all()
        assert m + "dt_proj.weight" in params and m + "a_proj.weight" not in params
        assert np.array_equal(params[m + "k_proj.weight"], np.asarray(src.params[m + "k_proj.weight"], np.float32))


def test_kv_fidelity_matches_the_kv_caches_and_reaches_the_recurrent_tensors(workspace):
    """The keys' and values' term of stage (b), from the mixers' hooked convolution outputs, equals the same
    relative errors computed from the KV caches the two forwards fill (keys there after RoPE, which keeps each
    key's norm and the norm of a difference at one position); it is zero when the plan is all attention, it adds
    to the KL exactly kv_weight times itself, and its gradient reaches the recurrent tensors of every layer but
    the last (whose keys and values nothing after it reads)."""
    from oryx_torch.retrofit import captured_keys_values, kv_fidelity, logit_loss

    model = OryxModel.from_checkpoint(workspace["src"], dtype="float32")
    tokens = torch.tensor(np.random.default_rng(4).integers(0, model.cfg.vocab_size, (2, 24)))
    modes = torch.zeros(2, 24, dtype=torch.bool)
    modes[1, 16:] = True
    with torch.no_grad():
        with captured_keys_values(model) as teacher:
            model(tokens, torch.ones_like(modes))
        with captured_keys_values(model) as student:
            model(tokens, modes)
        assert len(teacher) == 2 * model.cfg.n_layers
        caches = {}
        for name, m in (("teacher", torch.ones_like(modes)), ("student", modes)):
            caches[name] = model.make_cache(2, 24)
            model(tokens, m, cache=caches[name])
        want = []
        for t, s in zip(caches["teacher"].layers, caches["student"].layers):
            for a, b in ((t.keys, s.keys), (t.values, s.values)):
                want.append(float((b.double() - a.double()).pow(2).sum() / a.double().pow(2).sum()))
        assert float(kv_fidelity(student, teacher)) == pytest.approx(np.mean(want), rel=1e-4)
        assert float(kv_fidelity(teacher, teacher)) == 0
        assert want[0] == want[1] == 0 and min(want[2:]) > 0  # layer 0's keys and values read the embeddings only
        assert float(logit_loss(model, tokens, torch.ones_like(modes), kv_weight=3.0)) == pytest.approx(0, abs=1e-6)
        kl = float(logit_loss(model, tokens, modes))
        assert float(logit_loss(model, tokens, modes, kv_weight=0.5)) == pytest.approx(
            kl + 0.5 * float(kv_fidelity(student, teacher)), rel=1e-5)
    for p in model.parameters():
        p.requires_grad_(False)
    with captured_keys_values(model) as teacher, torch.no_grad():
        model(tokens, torch.ones_like(modes))
    recurrent = [model.layers[i].mixer.q_rec.weight for i in range(model.cfg.n_layers)]
    for w in recurrent:
        w.requires_grad_(True)
    with captured_keys_values(model) as student:
        model(tokens, modes)
    kv_fidelity(student, teacher).backward()
    assert all(float(w.grad.abs().sum()) > 0 for w in recurrent[:-1])
    assert recurrent[-1].grad is None or not recurrent[-1].grad.any()


def test_kv_weight_in_a_run_and_its_flag(workspace, tmp_path, capsys):
    out = tmp_path / "kv"
    summary = retrofit(config(workspace, out, layer_tokens=0, tokens=4 * 2 * 32, kv_weight=1.0, eval_every=0))
    assert summary["step"] == 4
    plain = tmp_path / "plain"
    retrofit(config(workspace, plain, layer_tokens=0, tokens=4 * 2 * 32, eval_every=0))
    # the first step whose batch drew a plan with recurrent tokens (every:4:64 is all attention in 32 tokens, and
    # such steps change nothing): the same batch and weights in both runs, plus the kv term in one
    with_kv, without = ({r["step"]: r["loss"] for r in records(run) if "loss" in r} for run in (out, plain))
    first = min(step for step, loss in without.items() if loss > 0)
    assert with_kv[first] > without[first] > 0
    with pytest.raises(ValueError, match="--kv-weight"):
        retrofit(config(workspace, tmp_path / "bad", kv_weight=-1.0))
    assert cli.main(["retrofit", str(workspace["src"]), str(tmp_path / "dst"), "--data", str(workspace["data"]),
                     "--tokens", "64", "--seq-len", "32", "--batch-size", "2", "--device", "cpu",
                     "--eval-batches", "1", "--kv-weight", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 1
    # refused in one line, writing nothing
    for extra in (["--shared-rank", "4", "--kv-weight", "1"], ["--kv-weight", "-1"]):
        with pytest.raises(SystemExit) as e:
            code = cli.main(["retrofit", str(workspace["src"]), str(tmp_path / "y"), "--data",
                             str(workspace["data"]), "--tokens", "64", *extra, "--device", "cpu"])
            raise SystemExit(code)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "--kv-weight" in err[0], err
        assert not (tmp_path / "y").exists()


def test_a_deadline_ends_with_a_checkpoint_that_resumes_exactly(workspace, full_run, tmp_path):
    out = tmp_path / "cut"
    summary = retrofit(config(workspace, out), deadline=0.0)  # past: the first step that finishes ends the run
    assert summary["step"] == 1 and summary["cut_short_by_deadline"] and "model" not in summary
    assert Path(summary["checkpoint"]).name == "step-00000001"
    finished = retrofit(config(workspace, out), resume=True)
    assert finished["step"] == 16 and "cut_short_by_deadline" not in finished
    assert records(out) == records(full_run)
    a, b = (load_checkpoint(run / "model").params for run in (out, full_run))
    assert all(np.array_equal(a[name], b[name]) for name in a)


def test_recurrent_kv_convs_start_as_src_and_train_alone(workspace, tmp_path, capsys):
    """--recurrent-kv-convs: the recurrence's own key and value convolutions start as SRC's (so every mode starts
    as SRC's), train with the recurrent tensors, and attention mode stays bit-identical."""
    from oryx_torch.retrofit import retrofit_start

    cfg, params, _, _ = retrofit_start(workspace["src"], None, None, recurrent_kv_convs=True)
    src = OryxModel.from_checkpoint(workspace["src"], dtype=torch.float32).eval()
    start = OryxModel(cfg, seed=None)
    start.load_params(params)
    tokens = torch.from_numpy(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 40)))
    with torch.no_grad():
        for attend in (True, False):
            assert torch.equal(start.eval()(tokens, attend), src(tokens, attend)), attend
    out = tmp_path / "convs"
    summary = retrofit(config(workspace, out, recurrent_kv_convs=True))
    trained = load_checkpoint(summary["model"])
    assert trained.config.sharing == "kv-proj"
    before = load_checkpoint(workspace["src"]).params
    recurrent = {s.name for s in parameter_specs(trained.config) if s.mode == RECURRENT}
    assert {n for n in recurrent if "conv_k_rec" in n or "conv_v_rec" in n}
    for name, value in trained.params.items():
        if name in recurrent:
            continue
        assert np.array_equal(np.asarray(value).view(np.uint16), np.asarray(before[name]).view(np.uint16)), name
    moved = [n for n in recurrent if "conv_k_rec" in n and not np.array_equal(
        np.asarray(trained.params[n], np.float32), np.asarray(before[n.replace("conv_k_rec", "conv_k")], np.float32))]
    assert moved  # the convolutions did train
    model = OryxModel.from_checkpoint(summary["model"], dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(model(tokens, True), src(tokens, True))
    # only from the default sharing, and not in the shared stage
    with pytest.raises(SystemExit) as e:
        code = cli.main(["retrofit", str(summary["model"]), str(tmp_path / "y"), "--data", str(workspace["data"]),
                         "--tokens", "64", "--shared-rank", "4", "--recurrent-kv-convs", "--device", "cpu"])
        raise SystemExit(code)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--recurrent-kv-convs" in err[0], err


def test_recurrent_kv_convs_refused_in_one_line_for_other_sharings(workspace, tmp_path, capsys):
    src = save_checkpoint(tmp_path / "qkv", preset("tiny", "gdn", sharing="qkv"),
                          init_params(preset("tiny", "gdn", sharing="qkv"), 0))
    with pytest.raises(SystemExit) as e:
        code = cli.main(["retrofit", str(src), str(tmp_path / "y"), "--data", str(workspace["data"]), "--tokens", "64",
                         "--seq-len", "32", "--batch-size", "2", "--recurrent-kv-convs", "--device", "cpu"])
        raise SystemExit(code)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--recurrent-kv-convs" in err[0] and "'qkv'" in err[0], err
    assert not (tmp_path / "y").exists() and not (tmp_path / "y.run").exists()
