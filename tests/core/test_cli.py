import json
import re
import subprocess
import sys

import pytest

from oryx_core.cli import main
from oryx_core.config import PRESETS


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_info_on_every_preset_prints_tied_fraction(name, mixer, capsys):
    assert main(["info", name, "--mixer", mixer]) == 0
    fraction = float(re.search(r"tied fraction: ([0-9.]+)", capsys.readouterr().out).group(1))
    assert fraction >= 0.90


def test_init_info_eval_round(tmp_path, capsys):
    ckpt = tmp_path / "tiny"
    assert main(["init", str(ckpt), "--preset", "tiny", "--mixer", "mamba2", "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["tied_fraction"] >= 0.9 and (ckpt / "tokenizer.json").exists()
    assert main(["info", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["mixer"] == "mamba2"
    assert info["size_on_disk_bytes"] == sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    text = tmp_path / "t.txt"
    text.write_text("Oryx keeps a KV cache and a recurrent state and updates both at every token. " * 3)
    results = {}
    for plan in ["attention", "recurrent", "A:0-40,R:40-120,A:120-"]:
        assert main(["eval", str(ckpt), "--text", str(text), "--plan", plan, "--json"]) == 0
        results[plan] = json.loads(capsys.readouterr().out)
    for r in results.values():
        assert r["tokens"] == len(text.read_bytes()) - 1
        assert 5.0 < r["nll"] < 6.2  # near log(vocab) for an untrained model
    assert len({round(r["nll"], 9) for r in results.values()}) == 3


@pytest.mark.parametrize("args, message", [
    (["eval", "{ckpt}", "--text", "{text}", "--plan", "A:0-10,R:5-"], "overlap"),
    (["eval", "{ckpt}", "--text", "{tmp}/missing.txt"], "--text .*missing.txt: cannot read"),
    (["eval", "{tmp}/nothing", "--text", "{text}"], "no such checkpoint directory"),
    (["info", "{tmp}/nothing"], "no such checkpoint directory"),
])
def test_user_errors_are_one_line(tmp_path, capsys, args, message):
    ckpt = tmp_path / "tiny"
    main(["init", str(ckpt), "--preset", "tiny"])
    (tmp_path / "t.txt").write_text("hello there, general")
    capsys.readouterr()
    filled = [a.format(ckpt=ckpt, text=tmp_path / "t.txt", tmp=tmp_path) for a in args]
    assert main(filled) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_console_script_help_reads_well():
    out = subprocess.run([sys.executable, "-m", "oryx_core.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("info", "init", "eval"):
        assert command in out


STARTUP_PROBE = """import contextlib, io, sys
from oryx_core.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(['--help'])
    except SystemExit:
        pass
    after_help = 'ml_dtypes' in sys.modules
    code = main(['info', sys.argv[1]])
print(after_help, 'ml_dtypes' in sys.modules, code)
"""


def test_help_and_info_on_a_float32_checkpoint_do_not_import_ml_dtypes(tmp_path):
    """ml_dtypes takes seconds to import; only a bfloat16 tensor needs it."""
    assert main(["init", str(tmp_path / "f32"), "--preset", "tiny", "--dtype", "float32"]) == 0
    assert main(["init", str(tmp_path / "bf16"), "--preset", "tiny", "--dtype", "bfloat16"]) == 0
    for name, imported in [("f32", "False False 0"), ("bf16", "False True 0")]:
        out = subprocess.run([sys.executable, "-c", STARTUP_PROBE, str(tmp_path / name)], capture_output=True,
                             text=True, timeout=120)
        assert out.stdout.split() == imported.split(), (name, out.stdout, out.stderr)


def test_safetensors_dtypes_round_trip_and_refuse_byte_swapped_arrays():
    import ml_dtypes
    import numpy as np

    from oryx_core.safetensors_io import DTYPES, FormatError, dtype_name

    assert len(DTYPES) == 12 and DTYPES["BF16"] == np.dtype(ml_dtypes.bfloat16)
    assert all(dtype_name(DTYPES[name]) == name for name in DTYPES)
    with pytest.raises(FormatError, match="cannot be stored"):
        dtype_name(np.dtype(">f4"))
    with pytest.raises(FormatError, match="cannot be stored"):
        dtype_name(np.dtype(np.complex64))
