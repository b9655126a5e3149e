"""The MLX backend and the mlx-lm export run only the default sharing ("kv"); any other is refused in one line."""
import pytest

pytest.importorskip("mlx.core")

from oryx_core import cli  # noqa: E402
from oryx_core.config import preset  # noqa: E402
from oryx_core.init import init_params  # noqa: E402
from oryx_core.weights import save_checkpoint  # noqa: E402


@pytest.mark.parametrize("sharing", ["none", "qkv", "kv-proj"])
def test_other_sharing_refused_in_one_line(tmp_path, capsys, sharing):
    cfg = preset("tiny", sharing=sharing)
    ckpt, text = tmp_path / "ckpt", tmp_path / "text.txt"
    save_checkpoint(ckpt, cfg, init_params(cfg, 0))
    text.write_text("Oryx reads each token by attention or by a recurrence. " * 2)
    assert cli.main(["eval", str(ckpt), "--text", str(text), "--backend", "reference", "--window", "32"]) == 0
    capsys.readouterr()
    for argv in (["eval", str(ckpt), "--text", str(text), "--backend", "mlx", "--window", "32"],
                 ["export-mlx-lm", str(ckpt), str(tmp_path / "export")]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"sharing '{sharing}'" in err, err
    assert not (tmp_path / "export").exists()
