"""Crafted bad checkpoint directories: index, shard names, shard file types, config.json and quantisation.

Each is refused by load_checkpoint with one FormatError naming the file, tensor or field; a subset runs
through `oryx info` in a subprocess, which must end with exit status 2 and one stderr line, in bounded
time and memory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from oryx_core.config import preset
from oryx_core.init import init_params
from oryx_core.safetensors_io import FormatError
from oryx_core.spec import parameter_specs
from oryx_core.weights import CONFIG_FILE, INDEX_FILE, is_quantizable, load_checkpoint, save_checkpoint

SHARD_BYTES = 40_000  # the tiny preset in several shards


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cfg = preset("tiny")
    return save_checkpoint(tmp_path_factory.mktemp("base") / "ckpt", cfg, init_params(cfg, 0), shard_bytes=SHARD_BYTES)


@pytest.fixture
def ckpt(base, tmp_path):
    return shutil.copytree(base, tmp_path / "ckpt", symlinks=True)


def edit_json(path, change):
    """Rewrites a JSON file after change(data) edited it in place."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def first_shard(ckpt) -> str:
    return sorted(json.loads((ckpt / INDEX_FILE).read_text())["weight_map"].values())[0]


def redirect_first_shard(ckpt, target: str) -> None:
    """Points every weight_map entry of the first shard at `target` (and drops the checksums)."""
    shard = first_shard(ckpt)

    def change(index):
        index["weight_map"] = {k: (target if v == shard else v) for k, v in index["weight_map"].items()}
        index["metadata"].pop("shard_sha256")
    edit_json(ckpt / INDEX_FILE, change)


def set_config(**fields):
    return lambda ckpt, tmp: edit_json(ckpt / CONFIG_FILE, lambda c: c.update(fields))


def raw_file(name: str, data: bytes):
    return lambda ckpt, tmp: (ckpt / name).write_bytes(data)


def outside_shard(ckpt, tmp):
    (tmp / "outside").mkdir()
    shutil.copy(ckpt / first_shard(ckpt), tmp / "outside" / "x.safetensors")
    redirect_first_shard(ckpt, "../outside/x.safetensors")


def absolute_shard(ckpt, tmp):
    redirect_first_shard(ckpt, str((ckpt / first_shard(ckpt)).resolve()))


def subdir_shard(ckpt, tmp):
    (ckpt / "sub").mkdir()
    shutil.copy(ckpt / first_shard(ckpt), ckpt / "sub" / "x.safetensors")
    redirect_first_shard(ckpt, "sub/x.safetensors")


def replace_shard(make):
    def apply(ckpt, tmp):
        shard = ckpt / first_shard(ckpt)
        data = shard.read_bytes()
        shard.unlink()
        make(shard, data, tmp)
        edit_json(ckpt / INDEX_FILE, lambda index: index["metadata"].pop("shard_sha256"))
    return apply


def symlink_out(shard, data, tmp):
    (tmp / "elsewhere.safetensors").write_bytes(data)
    shard.symlink_to(tmp / "elsewhere.safetensors")


def index_map(change):
    return lambda ckpt, tmp: edit_json(ckpt / INDEX_FILE, change)


def set_weight_map(value):
    return index_map(lambda index: index.__setitem__("weight_map", value))


def first_entry(value):
    def change(index):
        name = sorted(index["weight_map"])[0]
        index["weight_map"][name] = value
    return index_map(change)


def sparse(name: str, size: int):
    def apply(ckpt, tmp):
        with open(ckpt / name, "wb") as f:
            f.truncate(size)
    return apply


def fifo(name: str):
    def apply(ckpt, tmp):
        (ckpt / name).unlink()
        os.mkfifo(ckpt / name)
    return apply


DEEP = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"

# (id, change(ckpt, tmp_path), regex of the FormatError)
CASES = [
    # shard names from the index
    ("shard ../outside", outside_shard, r"'../outside/x.safetensors' is not a plain file name"),
    ("shard by absolute path", absolute_shard, "is not a plain file name"),
    ("shard in a subdirectory", subdir_shard, "'sub/x.safetensors' is not a plain file name"),
    ("shard name empty", first_entry(""), "is not a plain file name"),
    ("shard name .", first_entry("."), "is not a plain file name"),
    ("shard name ..", first_entry(".."), "is not a plain file name"),
    ("shard name with NUL", first_entry("a\0b"), "is not a plain file name"),
    ("shard name with backslash", first_entry("..\\x.safetensors"), "is not a plain file name"),
    ("shard name a number", first_entry(5), "weight_map must map"),
    ("shard name null", first_entry(None), "weight_map must map"),
    ("shard name a list", first_entry(["x"]), "weight_map must map"),
    # shard file types
    ("shard symlinked outside", replace_shard(symlink_out), "resolves outside"),
    ("shard symlinked to /dev/zero", replace_shard(lambda s, d, t: s.symlink_to("/dev/zero")), "resolves outside"),
    ("shard a FIFO", replace_shard(lambda s, d, t: os.mkfifo(s)), "a FIFO"),
    ("shard a directory", replace_shard(lambda s, d, t: s.mkdir()), "a directory"),
    ("shard a dangling symlink", replace_shard(lambda s, d, t: s.symlink_to(t / "gone")), "resolves outside"),
    ("shard missing", replace_shard(lambda s, d, t: None), "missing shard"),
    ("shard with trailing bytes", replace_shard(lambda s, d, t: s.write_bytes(d + b"\0" * 8)), "bytes after the last tensor"),
    # the index
    ("weight_map a list", set_weight_map([["embed.weight", "x"]]), "weight_map must map"),
    ("weight_map a string", set_weight_map("model.safetensors"), "weight_map must map"),
    ("weight_map null", set_weight_map(None), "weight_map must map"),
    ("weight_map missing", index_map(lambda index: index.pop("weight_map")), "weight_map must map"),
    ("weight_map empty", set_weight_map({}), "missing tensors"),
    ("weight_map with an extra tensor", index_map(lambda i: i["weight_map"].__setitem__("x", first_shard_of(i))),
     "unexpected tensor"),
    ("index metadata a list", index_map(lambda i: i.__setitem__("metadata", [1])), "shard_sha256"),
    ("shard_sha256 a list", index_map(lambda i: i["metadata"].__setitem__("shard_sha256", ["x"])), "shard_sha256"),
    ("a sha256 a number", index_map(lambda i: i["metadata"]["shard_sha256"].update({first_shard_of(i): 5})), "shard_sha256"),
    ("index a list", raw_file(INDEX_FILE, b'[{"weight_map": {}}]'), "expected a JSON object"),
    ("index not JSON", raw_file(INDEX_FILE, b"{"), "not valid JSON"),
    ("index not UTF-8", raw_file(INDEX_FILE, b'{"\xff":1}'), "not UTF-8"),
    ("index 100k deep", raw_file(INDEX_FILE, DEEP), "nested deeper"),
    ("index with NaN", raw_file(INDEX_FILE, b'{"weight_map": {}, "metadata": NaN}'), "not valid JSON"),
    ("index with a duplicate key", raw_file(INDEX_FILE, b'{"weight_map": {}, "weight_map": {}}'), "duplicate key"),
    ("index of 65 MiB", sparse(INDEX_FILE, 65 << 20), "more than the"),
    ("index a FIFO", fifo(INDEX_FILE), "a FIFO"),
    # config.json
    ("config a FIFO", fifo(CONFIG_FILE), "a FIFO"),
    ("config 100k deep", raw_file(CONFIG_FILE, DEEP), "nested deeper"),
    ("config of 65 MiB", sparse(CONFIG_FILE, 65 << 20), "more than the"),
    ("config a list", raw_file(CONFIG_FILE, b"[]"), "expected a JSON object"),
    ("rope \"false\"", set_config(rope="false"), "rope must be true or false, got 'false'"),
    ("tie_embeddings 1", set_config(tie_embeddings=1), "tie_embeddings must be true or false"),
    ("conv_bias null", set_config(conv_bias=None), "conv_bias must be true or false"),
    ("n_layers 1e8", set_config(n_layers=1e8), "n_layers must be a positive integer"),
    ("n_layers 10**8", set_config(n_layers=10**8), r"n_layers must be a positive integer \(at most 1024\)"),
    ("n_layers 2.0", set_config(n_layers=2.0), "n_layers must be a positive integer"),
    ("n_layers true", set_config(n_layers=True), "n_layers must be a positive integer"),
    ("n_layers \"2\"", set_config(n_layers="2"), "n_layers must be a positive integer"),
    ("vocab_size 2**40", set_config(vocab_size=2**40), "vocab_size must be a positive integer"),
    ("d_model -64", set_config(d_model=-64), "d_model must be a positive integer"),
    ("max_context 2**31", set_config(max_context=2**31), "max_context must be a positive integer"),
    ("mlp_hidden -1", set_config(mlp_hidden=-1), "mlp_hidden must be an integer >= 0"),
    ("value_head_dim 0", set_config(value_head_dim=0), "value_head_dim must be a positive integer"),
    ("rope_theta 1e999 (infinite)", raw_file(CONFIG_FILE, None), "rope_theta must be a finite number"),
    ("norm_eps \"1e-5\"", set_config(norm_eps="1e-5"), "norm_eps must be in"),
    ("mixer a list", set_config(mixer=["gdn"]), "mixer must be one of"),
    ("extra a list", set_config(extra=[1]), "extra must be an object"),
    ("unknown key", set_config(layers=2), "unknown config keys"),
    ("dtype float64", set_config(dtype="float64"), "unknown dtype"),
    ("format_version \"1\"", set_config(format_version="1"), "unknown format_version"),
    ("n_layers 3 (the index has 2)", set_config(n_layers=3), r"model.safetensors.index.json: missing tensors \['layers.2"),
    ("vocab 2**24 x d_model 2**16", set_config(vocab_size=1 << 24, d_model=1 << 16),
     r"tensor 'embed.weight' has shape \[260, 64\], the config needs \[16777216, 65536\]"),
]


def first_shard_of(index):
    return sorted(index["weight_map"].values())[0]


def infinite_theta(ckpt, tmp):
    text = (ckpt / CONFIG_FILE).read_text()
    (ckpt / CONFIG_FILE).write_text(text.replace('"rope_theta": 10000.0', '"rope_theta": 1e999'))


CASES = [(i, infinite_theta if "1e999" in i else change, message) for i, change, message in CASES]


@pytest.mark.parametrize("change, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_checkpoint_is_refused(ckpt, tmp_path, change, message):
    change(ckpt, tmp_path)
    with pytest.raises(FormatError, match=message) as info:
        load_checkpoint(ckpt)
    assert "\n" not in str(info.value)


def test_config_and_index_are_checked_before_any_shard_is_read(ckpt):
    """With a config that does not match the index, every shard could be garbage: none is opened."""
    edit_json(ckpt / CONFIG_FILE, lambda c: c.update(n_layers=3))
    for shard in ckpt.glob("*.safetensors"):
        shard.unlink()
        os.mkfifo(shard)
    with pytest.raises(FormatError, match="missing tensors"):
        load_checkpoint(ckpt)


def test_symlinked_shard_inside_the_checkpoint_loads(ckpt, base):
    shard = ckpt / first_shard(ckpt)
    shard.rename(ckpt / "moved.safetensors")
    shard.symlink_to("moved.safetensors")
    loaded = load_checkpoint(ckpt)
    reference = load_checkpoint(base)
    assert sorted(loaded.params) == sorted(reference.params)
    for name, value in reference.params.items():
        np.testing.assert_array_equal(loaded.params[name], value)


# ----- quantised checkpoints, validated against the spec without MLX -----
BITS, GROUP = 4, 32


def quantised_params(cfg):
    """Spec tensors with every quantisable weight packed (zeros) and float scales and biases."""
    params = {}
    for spec in parameter_specs(cfg):
        if is_quantizable(spec.name, spec.shape, GROUP):
            rows, cols = spec.shape
            module = spec.name[:-len(".weight")]
            params[spec.name] = np.zeros((rows, cols * BITS // 32), np.uint32)
            params[module + ".scales"] = np.ones((rows, cols // GROUP), np.float32)
            params[module + ".biases"] = np.zeros((rows, cols // GROUP), np.float32)
        else:
            params[spec.name] = np.ones(spec.shape, np.float32)
    return params


@pytest.fixture
def quantised(tmp_path):
    cfg = preset("tiny")
    return cfg, quantised_params(cfg), tmp_path / "q"


def test_quantised_checkpoint_loads(quantised):
    cfg, params, path = quantised
    save_checkpoint(path, cfg, params, quantization={"bits": BITS, "group_size": GROUP})
    loaded = load_checkpoint(path)
    assert loaded.quantization == {"bits": BITS, "group_size": GROUP}
    assert loaded.params["layers.0.mixer.k_proj.weight"].dtype == np.uint32
    assert loaded.params["layers.0.mixer.k_proj.weight"].shape == (16, 64 * BITS // 32)
    assert loaded.params["layers.0.mixer.conv_k.weight"].dtype == np.float32


def _pop(name):
    return lambda p, q: p.pop(name)


def _put(name, value):
    return lambda p, q: p.__setitem__(name, value)


def _quant(value):
    return lambda p, q: (q.clear(), q.update(value)) if isinstance(value, dict) else "replace"


K = "layers.0.mixer.k_proj"
QUANT_CASES = [
    ("scales missing", _pop(K + ".scales"), r"unexpected tensors \['layers.0.mixer.k_proj.biases'\]"),
    ("biases missing", _pop(K + ".biases"), "missing tensor 'layers.0.mixer.k_proj.biases'"),
    ("packed weight as float", lambda p, q: p.__setitem__(K + ".weight", p[K + ".weight"].view(np.float32)),
     "packed weights are uint32"),
    ("packed weight too narrow", _put(K + ".weight", np.zeros((16, 4), np.uint32)), "has shape"),
    ("scales of ints", _put(K + ".scales", np.ones((16, 2), np.int32)), "a float dtype"),
    ("scales misshapen", _put(K + ".scales", np.ones((16, 3), np.float32)), "has shape"),
    ("conv quantised", lambda p, q: p.update({"layers.0.mixer.conv_k.scales": np.ones((16, 1), np.float32),
                                              "layers.0.mixer.conv_k.biases": np.ones((16, 1), np.float32)}),
     "conv_k must stay full precision"),
    ("gate quantised", lambda p, q: p.update({"layers.0.mixer.a_proj.scales": np.ones((2, 2), np.float32),
                                              "layers.0.mixer.a_proj.biases": np.ones((2, 2), np.float32)}),
     "a_proj must stay full precision"),
    ("norm missing", _pop("norm.weight"), "missing tensor 'norm.weight'"),
    ("bits 7", _quant({"bits": 7, "group_size": GROUP}), "bits must be one of"),
    ("bits \"4\"", _quant({"bits": "4", "group_size": GROUP}), "quantization must be"),
    ("group_size true", _quant({"bits": 4, "group_size": True}), "quantization must be"),
    ("group_size 48", _quant({"bits": 4, "group_size": 48}), "group_size must be one of"),
    ("an extra key", _quant({"bits": 4, "group_size": GROUP, "mode": "affine"}), "quantization must be"),
    ("quantization a list", None, "quantization must be"),
]


@pytest.mark.parametrize("change, message", [c[1:] for c in QUANT_CASES], ids=[c[0] for c in QUANT_CASES])
def test_bad_quantised_checkpoint_is_refused(quantised, change, message):
    cfg, params, path = quantised
    quantization = {"bits": BITS, "group_size": GROUP}
    if change is None:
        quantization = [BITS, GROUP]
    else:
        change(params, quantization)
    save_checkpoint(path, cfg, params, quantization=quantization)
    with pytest.raises(FormatError, match=message):
        load_checkpoint(path)


# ----- the command line: exit 2, one line, bounded time and memory -----
CLI_CASES = ["shard ../outside", "shard a FIFO", "vocab 2**24 x d_model 2**16"]


# `oryx ARGS` that prints its own peak resident memory (KiB) on stdout as it exits
REPORT_PEAK = ("import atexit, resource, sys\n"
               "atexit.register(lambda: print('peak_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n"
               "from oryx_core.cli import main\n"
               "sys.exit(main(sys.argv[1:]))")


def test_cli_refuses_with_one_line(base, tmp_path):
    """`oryx info` on each case (run side by side): exit 2, one stderr line, no traceback, under 60 s and
    under 1 GiB resident each (the last case's config claims a 16M x 65536 embedding)."""
    changes = {c[0]: c[1] for c in CASES}
    procs = []
    for n, case in enumerate(CLI_CASES):
        work = tmp_path / str(n)
        work.mkdir()
        ckpt = shutil.copytree(base, work / "ckpt", symlinks=True)
        changes[case](ckpt, work)
        procs.append((case, time.monotonic(), subprocess.Popen([sys.executable, "-c", REPORT_PEAK, "info", str(ckpt)],
                                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for case, start, proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        seconds = time.monotonic() - start
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2, (case, stderr)
        assert len(lines) == 1 and lines[0].startswith("oryx info: error: "), (case, stderr)
        assert "Traceback" not in stderr and seconds < 60, (case, seconds)
        peak_mib = int(stdout.split("peak_kib")[1].split()[0]) / 1024  # ru_maxrss is in KiB on Linux
        assert peak_mib < 1024, (case, peak_mib)


def test_padded_shard_is_refused_before_it_is_hashed(ckpt):
    """A shard padded (sparsely) to 64 GiB, its checksum still listed: refused from its header, without
    reading the 64 GiB through sha256 (which alone would take over 20 s at any current hashing speed)."""
    shard = ckpt / first_shard(ckpt)
    with open(shard, "r+b") as f:
        f.truncate(64 << 30)
    start = time.monotonic()
    with pytest.raises(FormatError, match="bytes after the last tensor"):
        load_checkpoint(ckpt)
    assert time.monotonic() - start < 20
