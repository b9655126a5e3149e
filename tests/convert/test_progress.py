"""Progress bars of `oryx convert` (reading an HF directory, mapping its layers, writing the shards) appear only
when stderr is a terminal: a pipe or a file gets nothing from them."""
from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pty
import struct
import termios
import threading

import pytest

from oryx_core.cli import main

pytest.importorskip("transformers")

from convert_helpers import build_hf_llama  # noqa: E402

BAR_TITLES = ("reading hf", "converting hf", "writing out")


@pytest.fixture
def hf_llama(tmp_path):
    pytest.importorskip("torch")
    build_hf_llama(tie=False).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_no_progress_output_when_stderr_is_not_a_terminal(hf_llama, capsys):
    assert main(["convert", str(hf_llama), str(hf_llama.parent / "out")]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith("wrote ")


def test_progress_bars_on_a_terminal(hf_llama):
    controller, terminal = pty.openpty()
    # a new pseudo-terminal is 0 columns wide, where tqdm draws nothing
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(controller, 4096)
            except OSError:  # the terminal side closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with os.fdopen(terminal, "w", buffering=1) as stderr:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            assert main(["convert", str(hf_llama), str(hf_llama.parent / "out")]) == 0
    reader.join(timeout=10)
    os.close(controller)
    shown = b"".join(chunks).decode(errors="replace")
    for title in BAR_TITLES:
        assert title in shown, shown
