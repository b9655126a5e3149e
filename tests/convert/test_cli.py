"""`oryx convert` on the command line: success output, and one-line errors with exit status 2."""
from __future__ import annotations

import json

import numpy as np

from oryx_core.cli import main
from oryx_core.config import preset
from oryx_core.init import init_params
from oryx_core.weights import load_checkpoint, save_checkpoint


def _checkpoint(path):
    cfg = preset("tiny", "gdn")
    return save_checkpoint(path, cfg, init_params(cfg, 0))


def test_convert_to_torch_and_back_with_json_output(tmp_path, capsys):
    src = _checkpoint(tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / "t"), "--to", "torch", "--dtype", "bfloat16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(tmp_path / "t") and report["dtype"] == "bfloat16" and report["size_on_disk_bytes"] > 0
    assert main(["convert", str(tmp_path / "t"), str(tmp_path / "back")]) == 0  # --from detected
    assert "wrote" in capsys.readouterr().out
    back = load_checkpoint(tmp_path / "back")
    assert back.dtype == "bfloat16"
    expected = load_checkpoint(src).params["embed.weight"].astype(back.params["embed.weight"].dtype)
    assert np.array_equal(back.params["embed.weight"], expected)


def test_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    src = _checkpoint(tmp_path / "src")
    cases = [
        ([str(tmp_path / "absent"), str(tmp_path / "dst")], "no such file or directory"),
        ([str(src), str(tmp_path / "dst"), "--from", "llama"], "not a Llama model"),
        ([str(src), str(tmp_path / "dst"), "--to", "torch", "--quantize", "4"], "cannot be stored for --to torch"),
    ]
    for argv, message in cases:
        assert main(["convert", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("oryx convert: error:") and message in err and "\n" not in err
    assert not (tmp_path / "dst").exists()
