"""Every numeric or enumerated flag of init, convert, quantize, export-mlx-lm, data, train and retrofit refuses an
out-of-range, non-finite or malformed value with one line naming the flag and exit status 2, before it writes
anything; a missing extra names the pip install that provides it; --device cuda without CUDA is one line."""
import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oryx_core import argtypes
from cli_runs import run

BAD_INTS = ["-1", "1.5", "nan", "1e12", "abc", "", str(2**60)]


def digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flags")
    assert run(["init", str(root / "ckpt"), "--preset", "tiny"])[0] == 0
    (root / "corpus").mkdir()
    for i in range(6):
        (root / "corpus" / f"d{i}.txt").write_text(f"Document {i} with words. " * 6)
    assert run(["data", "build", "--input", str(root / "corpus"), "--out", str(root / "shards"),
                "--val-fraction", "0.4", "--quiet"])[0] == 0
    (root / "train.json").write_text(json.dumps({"model": {"preset": "tiny"}, "data": str(root / "shards"),
                                                 "out": str(root / "run"), "steps": 1, "device": "cpu"}))
    return root


def flag_cases():
    """(label, argv with {ws} for the workspace, the word the refusal must contain)."""
    init = ["init", "{ws}/new", "--preset", "tiny"]
    convert = ["convert", "{ws}/ckpt", "{ws}/new"]
    build = ["data", "build", "--input", "{ws}/corpus", "--out", "{ws}/new", "--quiet"]
    tokenizer = ["data", "train-tokenizer", "--input", "{ws}/corpus", "--out", "{ws}/new.json", "--quiet"]
    cases = []
    for value in BAD_INTS:
        cases += [(f"init --seed {value!r}", [*init, "--seed", value], "--seed"),
                  (f"convert --seed {value!r}", [*convert, "--from", "oryx", "--seed", value], "--seed"),
                  (f"data build --seed {value!r}", [*build, "--seed", value], "--seed"),
                  (f"data build --shard-tokens {value!r}", [*build, "--shard-tokens", value], "--shard-tokens"),
                  (f"data build --blank-lines {value!r}", [*build, "--blank-lines", value], "--blank-lines"),
                  (f"train-tokenizer --vocab-size {value!r}", [*tokenizer, "--vocab-size", value], "--vocab-size")]
    for value in ["0", "-64", "100", "nan", "64.0"]:
        cases += [(f"convert --group-size {value!r}", [*convert, "--group-size", value], "--group-size"),
                  (f"quantize --group-size {value!r}", ["quantize", "{ws}/ckpt", "{ws}/new", "--group-size", value],
                   "--group-size"),
                  (f"export-mlx-lm --group-size {value!r}", ["export-mlx-lm", "{ws}/ckpt", "{ws}/new", "--group-size",
                                                             value], "--group-size")]
    for value in ["0", "1", "7", "16", "-4", "nan", "4.5"]:
        cases += [(f"convert --quantize {value!r}", [*convert, "--quantize", value], "--quantize"),
                  (f"quantize --bits {value!r}", ["quantize", "{ws}/ckpt", "{ws}/new", "--bits", value], "--bits"),
                  (f"export-mlx-lm --bits {value!r}", ["export-mlx-lm", "{ws}/ckpt", "{ws}/new", "--bits", value],
                   "--bits")]
    for value in ["-0.1", "1.0", "1.5", "nan", "inf", "-inf", "x"]:
        cases.append((f"data build --val-fraction {value!r}", [*build, "--val-fraction", value], "--val-fraction"))
    for flag, value in [("--preset", "huge"), ("--mixer", "lstm"), ("--dtype", "int8")]:
        cases.append((f"init {flag} {value}", [*init, flag, value] if flag != "--preset" else
                      ["init", "{ws}/new", "--preset", value], flag))
    for flag, value in [("--to", "onnx"), ("--from", "pickle"), ("--dtype", "float64"), ("--mixer", "rnn")]:
        cases.append((f"convert {flag} {value}", [*convert, flag, value], flag))
    cases += [("data build --dtype int8", [*build, "--dtype", "int8"], "--dtype"),
              ("data decode --split test", ["data", "decode", "{ws}/shards", "--split", "test", "--out", "{ws}/x.txt"],
               "--split")]
    train = ["train", "{ws}/train.json"]
    for value in ["0", "-1", "nan", "2.5"]:
        cases.append((f"train --stop-after {value!r}", [*train, "--stop-after", value], "--stop-after"))
    for setting, word in [("lr=1e999", "lr must be a finite"), ("lr=NaN", "lr"), ("seq_len=-1", "seq_len"),
                          ("batch_size=0", "batch_size"), ("steps=-5", "steps"), ("warmup=-1", "warmup"),
                          ("seed=-1", "seed"), ("pure_share=2", "pure_share"), ("betas=[2,0.9]", "betas"),
                          ("grad_clip=-1", "grad_clip"), ("min_lr=1", "min_lr"), ("keep_checkpoints=0", "keep"),
                          ("device=tpu", "device"), ("parallel=zero", "parallel"), ("compile=maybe", "compile"),
                          ("seq_len=1.5", "seq_len"), ("bf16=\"no\"", "bf16"), ("no_such_key=1", "no_such_key")]:
        cases.append((f"train --set {setting}", [*train, "--set", setting], word))
    mqar = ["eval", "{ws}/ckpt", "--mqar", "4"]
    for flag, value in [("--mqar-length", "-1"), ("--mqar-length", "0"), ("--mqar-length", "100000000000"),
                        ("--mqar-examples", "0"), ("--mqar-examples", "10000000"), ("--seed", "-1")]:
        cases.append((f"eval --mqar {flag} {value}", [*mqar, flag, value], flag))
    cases.append(("eval --mqar -5", ["eval", "{ws}/ckpt", "--mqar", "-5"], "mqar"))
    retrofit = ["retrofit", "{ws}/ckpt", "{ws}/new", "--data", "{ws}/shards"]
    for flag, value in [("--lr", "nan"), ("--lr", "0"), ("--lr", "-1e-3"), ("--min-lr", "-1"), ("--seq-len", "0"),
                        ("--batch-size", "-2"), ("--grad-accum", "0"), ("--seed", "-1"), ("--tokens", "-1"),
                        ("--layer-tokens", "1e9"), ("--warmup", "-3"), ("--eval-batches", "0"),
                        ("--recurrent-scale", "inf"), ("--stop-after", "0"), ("--device", "tpu")]:
        cases.append((f"retrofit {flag} {value}", [*retrofit, flag, value], flag))
    return cases


CASES = flag_cases()


@pytest.mark.parametrize("label", [c[0] for c in CASES])
def test_bad_flag_is_one_line_and_exit_2(ws, label):
    _, argv, word = next(c for c in CASES if c[0] == label)
    if argv[0] in ("quantize", "export-mlx-lm"):
        pytest.importorskip("mlx.core")
    if argv[0] in ("train", "retrofit"):
        pytest.importorskip("torch")
    before = digest(ws)
    start = time.monotonic()
    code, err = run([a.replace("{ws}", str(ws)) for a in argv])
    assert time.monotonic() - start < 10
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert word in err, err
    assert digest(ws) == before


def test_argtypes_accept_what_they_name():
    assert argtypes.non_negative_int("0") == 0 and argtypes.positive_int("1_000") == 1000
    assert argtypes.int_choice(4, 8)("8") == 8
    assert argtypes.finite_float(0.0, 1.0, high_open=True)("0.25") == 0.25
    assert argtypes.positive_float("1e-3") == 1e-3
    for parse, text in [(argtypes.non_negative_int, "-1"), (argtypes.positive_int, "0"), (argtypes.positive_int, "2.0"),
                        (argtypes.int_choice(4, 8), "3"), (argtypes.positive_float, "0"),
                        (argtypes.finite_float(), "nan"), (argtypes.finite_float(high=1.0), "1.0001"),
                        (argtypes.non_negative_int, str(argtypes.MAX_INT + 1))]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_device_cuda_without_cuda_is_one_line(ws):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = run(["train", str(ws / "train.json"), "--set", "device=cuda", "--set", "seq_len=16",
                     "--set", f"out={ws / 'cuda-run'}"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cuda" in err, err
    assert not (ws / "cuda-run").exists()


BLOCK = "import sys; sys.modules[{module!r}] = None; from oryx_core.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("module, argv, extra", [
    ("torch", ["train", "{ws}/train.json"], "oryx[cuda]"),
    ("torch", ["retrofit", "{ws}/ckpt", "{ws}/new", "--data", "{ws}/shards"], "oryx[cuda]"),
    ("mlx", ["quantize", "{ws}/ckpt", "{ws}/q"], "oryx[mlx]"),
])
def test_missing_extra_names_the_install(ws, module, argv, extra):
    """A command whose extra is not installed (simulated: its import fails) says which pip install gives it."""
    done = subprocess.run([sys.executable, "-c", BLOCK.format(module=module),
                           *[a.replace("{ws}", str(ws)) for a in argv]], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and f"pip install '{extra}'" in done.stderr, done.stderr
