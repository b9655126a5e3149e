"""The README's Python API block runs as written, and its examples print what their comments say."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end >= 0 else len(README)]


def test_python_api_block_runs_as_written(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("mlx.core")
    blocks = re.findall(r"```python\n(.*?)```", section("Python API"), flags=re.S)
    assert len(blocks) == 1
    # the block writes runs/... relative to where it runs
    done = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "runs" / "tiny" / "config.json").is_file()
    quantized = (tmp_path / "runs" / "tiny-4bit" / "config.json").read_text()
    assert '"bits": 4' in quantized


def test_info_example_prints_the_tied_fraction_its_comment_gives():
    line = next(line for block in code_blocks("bash") for line in block.splitlines()
                if line.startswith("oryx info "))
    command, comment = line.split("#", 1)
    expected = re.search(r"tied fraction (\d\.\d+)", comment).group(1)
    done = subprocess.run([sys.executable, "-m", "oryx_core", *command.split()[1:]], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(rf"tied fraction: {re.escape(expected)}\b", done.stdout), done.stdout
