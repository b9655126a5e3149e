"""The mlx-lm export is code: mlx-lm refuses it without trust_remote_code, its model_file is a plain name inside
it, and oryx_mlx.export.load_export loads it through mlx-lm's loader without running anything from it."""
import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")

from oryx_core.cli import main  # noqa: E402
from oryx_mlx.export import MODEL_FILE, export_mlx_lm, load_export  # noqa: E402


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    assert main(["init", str(root / "ckpt"), "--preset", "tiny", "--seed", "4"]) == 0
    return export_mlx_lm(root / "ckpt", root / "mlx-lm", plan="every:2:4")


def test_model_file_is_a_plain_name_inside_the_export(export):
    model_file = json.loads((export / "config.json").read_text())["model_file"]
    assert model_file == MODEL_FILE and "/" not in model_file and "\\" not in model_file
    assert (export / model_file).is_file() and not (export / model_file).is_symlink()


def test_mlx_lm_refuses_it_without_trust_remote_code(export):
    with pytest.raises(ValueError, match="trust_remote_code"):
        mlx_lm.load(str(export))


def test_load_export_runs_nothing_from_the_directory_and_matches_mlx_lm(export, tmp_path):
    tokens = mx.array([[72, 101, 108, 108, 111, 32, 79, 114, 121, 120]])
    remote, remote_tokenizer = mlx_lm.load(str(export), trust_remote_code=True)
    expected = np.array(remote(tokens))
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for f in export.iterdir():
        (tampered / f.name).write_bytes(f.read_bytes())
    (tampered / MODEL_FILE).write_text("raise RuntimeError('the export's code ran')\n")
    model, tokenizer = load_export(tampered)
    assert type(model).__module__ == "oryx_mlx.mlx_lm_model"
    np.testing.assert_array_equal(np.array(model(tokens)), expected)
    assert tokenizer.encode("Hello", add_special_tokens=False) == [72, 101, 108, 108, 111]
    assert (mlx_lm.generate(model, tokenizer, "Hello", max_tokens=6)
            == mlx_lm.generate(remote, remote_tokenizer, "Hello", max_tokens=6))
