"""`oryx serve` on each backend, driven over HTTP by the official openai client."""
from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
try:  # the openai client's HTTP library (httpx, or its successor httpx2 in newer openai releases)
    import httpx
except ImportError:
    httpx = pytest.importorskip("httpx2")

from oryx_core.backend import BackendUnavailable, get_backend  # noqa: E402
from oryx_core.chat import chat_format, load_chat_format  # noqa: E402
from oryx_core.cli import command_line  # noqa: E402
from oryx_core.config import preset  # noqa: E402
from oryx_core.generation import generate  # noqa: E402
from oryx_core.init import init_params  # noqa: E402
from oryx_core.tokenizer import byte_level_tokenizer  # noqa: E402
from oryx_core.weights import save_checkpoint  # noqa: E402

MODEL = "tiny-chat"
BODY_LIMIT = 65536


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tok = byte_level_tokenizer()
    cfg = preset("tiny")
    cfg = cfg.replace(vocab_size=max(cfg.vocab_size, tok.get_vocab_size()))
    return save_checkpoint(tmp_path_factory.mktemp("serve") / MODEL, cfg, init_params(cfg, 3), tokenizer_json=tok.to_str())


def start_server(path: Path, backend: str, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([*command_line(), "serve", str(path), "--backend", backend, "--port", str(port),
                             "--max-body-bytes", str(BODY_LIMIT), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module", params=["torch", "mlx"])
def server(request, checkpoint):
    try:
        get_backend(request.param)
    except BackendUnavailable:
        pytest.skip(f"{request.param} not installed")
    proc, url = start_server(checkpoint, request.param, "--max-queue", "12")
    yield request.param, url, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    proc.send_signal(signal.SIGTERM)  # a clean shutdown: open responses finish, the engine stops, status 0
    assert proc.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def direct(server, checkpoint):
    """Greedy generation in this process on the server's backend: what every answer must equal."""
    backend = server[0]
    model = get_backend(backend).load(checkpoint)
    tok = byte_level_tokenizer()
    chat = load_chat_format(checkpoint, tok)

    def run(prompt: str | None = None, messages=None, max_tokens=12, plan="prefill-attention", stop=()):
        ids = tok.encode(chat.render(messages), add_special_tokens=False).ids if messages else tok.encode(prompt).ids
        return generate(model, tok, ids, max_tokens, plan, stop_strings=stop, stop_token_ids=chat.stop_token_ids)
    return run


def test_models_lists_the_checkpoint(server):
    _, _, client = server
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_and_completion_equal_direct_generation_streamed_or_not(server, direct):
    _, _, client = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    want = direct(messages=messages)
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert got.usage.completion_tokens == want.stats.generation_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.stats.generation_tokens

    want = direct("The river", max_tokens=16)
    got = client.completions.create(model=MODEL, prompt="The river", max_tokens=16, temperature=0)
    assert got.choices[0].text == want.text
    streamed = client.completions.create(model=MODEL, prompt="The river", max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want.text


def test_stop_string_and_per_request_plan(server, direct):
    _, _, client = server
    full = direct("Once upon", max_tokens=24).text
    assert len(full) >= 6, full
    stop = full[4:6]
    got = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=24, temperature=0, stop=[stop])
    assert got.choices[0].text == full[:full.find(stop)] and got.choices[0].finish_reason == "stop"
    forced = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=24, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 24 and forced.choices[0].finish_reason == "length"
    assert forced.choices[0].text.startswith(full)
    for plan in ("recurrent", "attention", "A:0-3,R:3-"):
        got = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, temperature=0,
                                        extra_body={"plan": plan, "kv_policy": "keep"})
        assert got.choices[0].text == direct("Once upon", max_tokens=10, plan=plan).text, plan


def test_eight_concurrent_clients_each_get_their_own_answer(server, direct):
    _, _, client = server
    prompts = [f"Story {i}: the" + " x" * i for i in range(8)]
    results = [None] * 8

    def ask(i):
        stream = i % 2 == 1
        r = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8 + i, temperature=0, stream=stream)
        results[i] = "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [direct(p, max_tokens=8 + i).text for i, p in enumerate(prompts)]


def test_next_chat_turn_reuses_the_cached_history(server, direct):
    _, url, client = server
    turn = [{"role": "user", "content": "Hello there, tell me something."}]
    first = client.chat.completions.create(model=MODEL, messages=turn, max_tokens=6, temperature=0)
    reply = first.choices[0].message.content
    turn2 = turn + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    raw = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": turn2, "max_tokens": 6,
                                                         "temperature": 0}, timeout=60).json()
    assert raw["choices"][0]["message"]["content"] == direct(messages=turn2, max_tokens=6).text
    if "\ufffd" not in reply:  # a reply with invalid UTF-8 does not re-encode to the tokens the model made
        assert raw["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


@pytest.mark.parametrize("body, status, param", [
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x" * (BODY_LIMIT + 10)}]}, 413, None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "plan": "Z:0-"}, 400, "plan"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
])
def test_bad_requests_get_4xx_and_the_server_still_answers(server, body, status, param):
    _, url, client = server
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and "Traceback" not in r.text
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_openai_client_raises_its_typed_errors(server):
    _, _, client = server
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-3)
    r = httpx.post(server[1] + "/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_clients_leaving_mid_stream_free_their_slots(server):
    _, url, client = server
    for _ in range(14):  # more than --max-queue 12: a slot kept by a gone client would make this 503
        with httpx.stream("POST", url + "/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 400,
                                                                 "stream": True, "temperature": 0}, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())
    deadline = time.time() + 30
    while True:
        try:
            client.completions.create(model=MODEL, prompt="abc", max_tokens=2)
            break
        except openai.APIStatusError as e:  # the engine may still be finishing the cancelled ones
            assert e.status_code == 503 and time.time() < deadline



def test_command_line_mistakes_are_one_line_with_status_2(checkpoint, tmp_path, capsys):
    from oryx_core.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [([str(tmp_path / "missing"), "--port", str(free_port())], "missing"),
                 ([str(checkpoint), "--port", str(port)], f"--port {port}"),
                 ([str(checkpoint), "--port", "70000"], "--port 70000"),
                 ([str(checkpoint), "--max-batch", "0"], "--max-batch"),
                 ([str(checkpoint), "--max-queue", "-1"], "--max-queue"),
                 ([str(checkpoint), "--context", "0"], "--context"),
                 ([str(checkpoint), "--max-body-bytes", "-5"], "--max-body-bytes"),
                 ([str(checkpoint), "--dtype", "float64"], "--dtype"),
                 ([str(checkpoint), "--backend", "reference"], "--backend")]
        for argv, named in cases:
            try:
                status = main(["serve", *argv])
            except SystemExit as stop:  # argparse's own refusals (flag types, choices) exit from the parser
                status = stop.code
            assert status == 2
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and named in err, err


def test_turn_attention_plan_runs_the_history_recurrent(server, direct):
    _, _, client = server
    tok = byte_level_tokenizer()
    messages = [{"role": "user", "content": "First."}, {"role": "assistant", "content": "Yes."},
                {"role": "user", "content": "Second."}]
    chat = chat_format(tok, None)
    h = len(tok.encode(chat.render(messages[:-1], add_generation_prompt=False), add_special_tokens=False).ids)
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                         extra_body={"plan": "turn-attention"})
    assert got.choices[0].message.content == direct(messages=messages, max_tokens=8, plan=f"R:0-{h},A:{h}-").text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"plan": "turn-attention"})
