import json
import os
import stat

import ml_dtypes
import numpy as np
import pytest

from oryx_core.config import preset
from oryx_core.init import init_params
from oryx_core.safetensors_io import FormatError
from oryx_core.atomic import atomic_write_bytes
from oryx_core.weights import INDEX_FILE, load_checkpoint, save_checkpoint


@pytest.fixture
def tiny(tmp_path):
    cfg = preset("tiny")
    params = init_params(cfg, 0)
    path = save_checkpoint(tmp_path / "ckpt", cfg, params, shard_bytes=64 * 1024)
    return cfg, params, path


def shards(path):
    return sorted(path.glob("model-*.safetensors"))


@pytest.mark.parametrize("dtype", [None, "bfloat16", "float16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    cfg = preset("tiny", "mamba2")
    params = init_params(cfg, 1)
    if dtype:
        params = {k: v.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16) for k, v in params.items()}
    first = save_checkpoint(tmp_path / "a", cfg, params, shard_bytes=32 * 1024)
    loaded = load_checkpoint(first)
    assert loaded.config == cfg and loaded.dtype == (dtype or "float32")
    assert set(loaded.params) == set(params)
    for name, value in params.items():
        assert loaded.params[name].dtype == value.dtype
        assert loaded.params[name].tobytes() == value.tobytes(), name
    # and saving what was loaded reproduces the same files byte for byte
    second = save_checkpoint(tmp_path / "b", loaded.config, loaded.params, shard_bytes=32 * 1024)
    for f in first.iterdir():
        assert (second / f.name).read_bytes() == f.read_bytes(), f.name


def test_sharded_layout_and_library_compatibility(tiny):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    cfg, params, path = tiny
    files = shards(path)
    assert len(files) > 1
    index = json.loads((path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(params)
    assert set(index["metadata"]["shard_sha256"]) == {f.name for f in files}
    seen = {}
    for f in files:  # the official safetensors library reads our files
        seen.update(safetensors_numpy.load_file(str(f)))
    for name, value in params.items():
        np.testing.assert_array_equal(seen[name], value)


def test_save_casts_dtype(tmp_path):
    cfg = preset("tiny")
    path = save_checkpoint(tmp_path / "c", cfg, init_params(cfg, 0), dtype="bfloat16")
    ckpt = load_checkpoint(path)
    assert ckpt.dtype == "bfloat16" and all(v.dtype == ml_dtypes.bfloat16 for v in ckpt.params.values())


# ----- each bad input gives a one-line error naming the problem -----
def one_line(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_missing_extra_and_misshapen_tensors(tmp_path):
    cfg = preset("tiny")
    params = init_params(cfg, 0)
    with pytest.raises(FormatError, match=r"missing tensors \['layers.0.mixer.q_rec.weight'\]"):
        save_checkpoint(tmp_path / "x", cfg, {k: v for k, v in params.items() if k != "layers.0.mixer.q_rec.weight"})
    with pytest.raises(FormatError, match=r"unexpected tensors \['layers.9.extra'\]"):
        save_checkpoint(tmp_path / "x", cfg, {**params, "layers.9.extra": np.zeros(3, np.float32)})
    bad = {**params, "norm.weight": np.ones(65, np.float32)}
    with pytest.raises(FormatError, match=r"tensor 'norm.weight' has shape \[65\], the config needs \[64\]") as e:
        save_checkpoint(tmp_path / "x", cfg, bad)
    one_line(e)
    assert not (tmp_path / "x").exists()


def rewrite_config(path, **changes):
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))


def test_config_on_disk_that_mismatches_the_tensors(tiny):
    _, _, path = tiny
    rewrite_config(path, d_model=96)
    with pytest.raises(FormatError, match="has shape .* the config needs") as e:
        load_checkpoint(path)
    one_line(e)


def test_wrong_dtype(tiny):
    _, _, path = tiny
    rewrite_config(path, dtype="bfloat16")
    with pytest.raises(FormatError, match="is F32 but config.json says dtype bfloat16"):
        load_checkpoint(path)


def test_truncated_shard(tiny):
    _, _, path = tiny
    f = shards(path)[0]
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(FormatError, match="truncated"):  # the header check comes before the checksum
        load_checkpoint(path)
    with pytest.raises(FormatError, match="truncated"):
        load_checkpoint(path, verify_checksums=False)


def test_corrupt_shard(tiny):
    _, _, path = tiny
    f = shards(path)[-1]
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the tensor data
    f.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=f"{f.name}: checksum mismatch") as e:
        load_checkpoint(path)
    one_line(e)


def test_corrupt_header(tiny):
    _, _, path = tiny
    f = shards(path)[0]
    data = bytearray(f.read_bytes())
    data[8:12] = b"@@@@"
    f.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="corrupt safetensors header"):
        load_checkpoint(path, verify_checksums=False)


def test_unknown_format_version_and_foreign_directories(tiny, tmp_path):
    _, _, path = tiny
    rewrite_config(path, format_version=7)
    with pytest.raises(FormatError, match="unknown format_version 7"):
        load_checkpoint(path)
    rewrite_config(path, format="gguf", format_version=1)
    with pytest.raises(FormatError, match="not an Oryx checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FormatError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FormatError, match="is a directory"):
        load_checkpoint(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="missing config.json"):
        load_checkpoint(tmp_path / "empty")


def test_invalid_config_values_and_missing_shard(tiny):
    _, _, path = tiny
    rewrite_config(path, n_kv_heads=3)
    with pytest.raises(FormatError, match="n_heads .4. must be a multiple of n_kv_heads .3."):
        load_checkpoint(path)
    rewrite_config(path, n_kv_heads=2)
    shards(path)[0].unlink()
    with pytest.raises(FormatError, match="missing shard model-00001"):
        load_checkpoint(path)


def test_interrupted_save_keeps_the_old_checkpoint(tiny, monkeypatch):
    cfg, params, path = tiny
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    import oryx_core.weights as weights

    def explode(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway through writing shards

    monkeypatch.setattr(weights, "write_file", explode)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, cfg, init_params(cfg, 5))
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp left behind


def test_no_pickle_anywhere(tiny):
    _, _, path = tiny
    for f in path.iterdir():
        assert f.suffix in (".json", ".safetensors")


def test_atomic_write_gives_the_permissions_a_plain_write_would(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "f.bin", b"abc")
        (tmp_path / "plain.bin").write_bytes(b"abc")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").read_bytes() == b"abc"
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_shard_names_group_in_order_within_the_budget():
    from oryx_core.weights import shard_file_name, shard_names

    sizes = {"c": 40, "a": 30, "big": 500, "b": 60, "d": 1}
    tensors = {name: np.zeros(n, np.uint8) for name, n in sizes.items()}
    assert shard_names(tensors, 100) == [["c", "a"], ["big"], ["b", "d"]]
    assert shard_names(dict(sorted(tensors.items())), 100) == [["a", "b"], ["big"], ["c", "d"]]
    assert shard_names({}, 100) == [[]]
    assert shard_file_name(1, 3) == "model-00002-of-00003.safetensors"
    assert shard_file_name(0, 1, "adapter") == "adapter-00001-of-00001.safetensors"


def test_checkpoints_and_converter_containers_shard_with_the_core_grouping(tmp_path):
    """save_checkpoint's shards are shard_names' groups in name order; the converter's containers use the same
    function (one definition)."""
    from oryx_core.weights import shard_file_name, shard_names

    cfg = preset("tiny")
    params = init_params(cfg, seed=2)
    path = save_checkpoint(tmp_path / "ckpt", cfg, params, shard_bytes=48 * 1024)
    groups = shard_names(dict(sorted(params.items())), 48 * 1024)
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    assert len(groups) > 2
    assert weight_map == {n: shard_file_name(i, len(groups)) for i, group in enumerate(groups) for n in group}
    backends = pytest.importorskip("oryx_convert.backends")
    assert backends.shard_names is shard_names and not hasattr(backends, "_shard_names")
