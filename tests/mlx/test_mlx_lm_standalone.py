"""An mlx-lm export runs where Oryx is not installed: mlx_lm.load/stream_generate and mlx_lm.server.

The environment is a venv made without pip whose only extra path is this interpreter's
site-packages, added as a plain path (a .pth line), so the .pth files there, among them the
editable install of Oryx, are never processed; the child runs outside the repository, so
nothing of Oryx is importable (checked in the child).
"""
import json
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request

import pytest

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")

from test_mlx_lm import PROMPT, oryx_tokens, write_checkpoint  # noqa: E402

from oryx_mlx.export import export_mlx_lm  # noqa: E402

NEW_TOKENS = 8
CHILD = """
import importlib.util, json, sys
assert all(importlib.util.find_spec(m) is None for m in ("oryx_core", "oryx_mlx", "oryx_torch", "oryx_convert")), sys.path
import mlx_lm
model, tokenizer = mlx_lm.load(sys.argv[1], trust_remote_code=True)
tokens = [r.token for r in mlx_lm.stream_generate(model, tokenizer, sys.argv[2], max_tokens=int(sys.argv[3]))]
print(json.dumps(tokens))
"""


@pytest.fixture(scope="module")
def python_without_oryx(tmp_path_factory):
    venv = tmp_path_factory.mktemp("no-oryx") / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)],
                   check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    own = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (venv / purelib / "main-site-packages.pth").write_text("\n".join(sorted(own)) + "\n")
    return python


def child_env():
    import os

    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("standalone")
    src = write_checkpoint(folder / "ckpt", "gdn")
    plan = "A:0-6,R:6-"
    return export_mlx_lm(src, folder / "mlx-lm", plan=plan), oryx_tokens(src, plan, NEW_TOKENS)


def test_export_generates_our_greedy_tokens_without_oryx(python_without_oryx, export, tmp_path):
    out, expected = export
    run = subprocess.run([str(python_without_oryx), "-c", CHILD, str(out), PROMPT, str(NEW_TOKENS)], cwd=tmp_path,
                         env=child_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == expected
    assert len(set(expected)) > 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlx_lm_server_answers_a_completion_without_oryx(python_without_oryx, export, tmp_path):
    from oryx_core.tokenizer import load_tokenizer

    out, expected = export
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([str(python_without_oryx), "-m", "mlx_lm.server", "--model", str(out),
                               "--trust-remote-code", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0.0}).encode())
        deadline, reply = time.monotonic() + 120, None
        while reply is None:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    reply = json.loads(response.read())
            except (ConnectionError, urllib.error.URLError):
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    tokenizer = load_tokenizer(out / "tokenizer.json")
    assert reply["choices"][0]["text"] == tokenizer.decode(expected)
    assert reply["usage"]["completion_tokens"] == NEW_TOKENS


def test_oryx_mlx_load_gives_mlx_lm_tokenizer_with_chat_template(tmp_path):
    from oryx_mlx.generate import load, stream_generate

    src = write_checkpoint(tmp_path / "ckpt", "gdn")
    model, tokenizer = load(src, mlx_lm_tokenizer=True)
    assert type(tokenizer).__name__ == "TokenizerWrapper"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt == "user:\nHi<|endoftext|>\nassistant:\n"  # Oryx's default template
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    # mlx-lm drives the Oryx MLX model itself (every token in attention mode), and Oryx's generate takes the wrapper
    theirs = [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=6)]
    ours = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=6, plan="attention",
                                             stop_at_end_of_text=False)]
    assert theirs == ours == oryx_tokens(src, "attention", 6)
