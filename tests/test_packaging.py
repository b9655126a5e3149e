"""The wheel carries the data files the code loads at run time, and they load from the installed wheel."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]


def _package_data() -> dict[str, list[str]]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]["package-data"]


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel built from a copy of the packaging inputs. Files over 2 MB other than Python are replaced by empty
    files of the same names (the check is which files ship; copying model weights would only slow the test)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("oryx_core", "oryx_data"):
        shutil.copytree(REPO / package, src / package, ignore=skip)
    for folder in ("backends/cuda", "backends/mlx", "convert"):  # the other packages are not under test here
        (src / folder).mkdir(parents=True)
    for f in src.rglob("*"):
        if f.is_file() and f.suffix != ".py" and f.stat().st_size > 2 << 20:
            f.write_bytes(b"")
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_wheel({str(out)!r})"],
                   cwd=src, check=True, capture_output=True)
    (wheel,) = out.glob("*.whl")
    return wheel


def test_wheel_ships_the_gpt2_tokenizer_and_every_package_data_file(tmp_path):
    package_data = _package_data()
    assert "gpt2-tokenizer.json" in package_data["oryx_data"]
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert z.read("oryx_data/gpt2-tokenizer.json") == (REPO / "oryx_data" / "gpt2-tokenizer.json").read_bytes()
    for package, patterns in package_data.items():
        if package not in ("oryx_core", "oryx_data"):
            continue
        for pattern in patterns:
            for f in (REPO / package).glob(pattern):
                if f.is_file():
                    assert f.relative_to(REPO).as_posix() in names

    # From the unpacked wheel (outside the source tree), `oryx data build --gpt2` finds its tokenizer.
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    text = tmp_path / "text.txt"
    text.write_text("Hello world.\n<|endoftext|>\nA second document.\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys, oryx_data; from oryx_core.cli import main; print(oryx_data.__file__); "
         f"sys.argv = ['oryx', 'data', 'build', '--gpt2', '--quiet', '--input', {str(text)!r}, "
         f"'--out', {str(tmp_path / 'shards')!r}, '--val-fraction', '0']; main()"],
        cwd=tmp_path, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines()[0].startswith(str(site))
    from oryx_data import TokenShards
    shards = TokenShards(tmp_path / "shards", "train")
    # GPT-2 ids: "Hello" 15496, " world" 995, "." 13; <|endoftext|> 50256 ends each document.
    assert shards.vocab_size == 50257 and shards.eot_id == 50256
    assert list(shards.tokens[:4]) == [15496, 995, 13, 50256]
