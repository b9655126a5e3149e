"""`oryx convert` on the command line: success output, and one-line errors with exit status 2."""
from __future__ import annotations

import json

import numpy as np
import pytest

from oryx_core.cli import main
from oryx_core.config import preset
from oryx_core.init import init_params
from oryx_core.weights import load_checkpoint, save_checkpoint


def _checkpoint(path):
    cfg = preset("tiny", "gdn")
    return save_checkpoint(path, cfg, init_params(cfg, 0))


def test_convert_to_torch_and_back_with_json_output(tmp_path, capsys):
    src = _checkpoint(tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / "t"), "--to", "torch-state-dict", "--dtype", "bfloat16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    files = [f for f in (tmp_path / "t").rglob("*") if f.is_file()]
    assert report["path"] == str(tmp_path / "t") and report["dtype"] == "bfloat16"
    assert report["size_on_disk_bytes"] == sum(f.stat().st_size for f in files)
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
        ([str(src), str(tmp_path / "dst"), "--to", "torch-state-dict", "--quantize", "4"], "cannot be stored for --to torch-state-dict"),
    ]
    for argv, message in cases:
        assert main(["convert", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("oryx convert: error:") and message in err and "\n" not in err
    assert not (tmp_path / "dst").exists()


def test_weights_containers_are_named_for_what_they_are_and_oryx_commands_say_how_to_read_them(tmp_path, capsys):
    src = _checkpoint(tmp_path / "src")
    with pytest.raises(SystemExit) as exit_info:  # the old name: no such target
        main(["convert", str(src), str(tmp_path / "m"), "--to", "mlx"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'mlx'" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "t"), "--to", "torch-state-dict"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "t" / "config.json") in err
    assert "written by oryx convert --to torch-state-dict, not an Oryx checkpoint" in err
    assert f"oryx convert {tmp_path / 't'} DST --to oryx" in err
    assert main(["convert", str(tmp_path / "t"), str(tmp_path / "back")]) == 0  # the remedy the error names
    capsys.readouterr()
    assert main(["info", str(tmp_path / "back"), "--json"]) == 0
    cfg = preset("tiny", "gdn")
    assert json.loads(capsys.readouterr().out)["parameters"]["total"] == sum(
        int(np.prod(v.shape)) for v in init_params(cfg, 0).values())
