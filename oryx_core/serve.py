"""`oryx serve`: an OpenAI-compatible HTTP server on the torch or MLX backend.

    oryx serve runs/smollm2 --backend torch --host 127.0.0.1 --port 8080

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as
server-sent events when "stream": true, ending with a usage chunk and `data: [DONE]`).
Request fields: model, prompt / messages, max_tokens (max_completion_tokens), temperature,
top_p, top_k, stop, seed, stream, stream_options; Oryx's own fields (the openai client's
extra_body): plan (a mode plan, or turn-attention for chat: the history recurrent, the new turn in
attention), kv_policy, state_policy, and ignore_eos (generate max_tokens whatever the end-of-turn
tokens say; for load tests).

Built on Starlette (routing, streaming responses, disconnect detection) under uvicorn
(HTTP/1.1, graceful shutdown on SIGTERM), with pydantic checking the request bodies.

Engines (one per server, each with its own worker thread so the event loop never waits on
the model):
- torch: oryx_torch.batch.BatchGenerator; requests join and leave one batch, one decode
  step for every live sequence.
- serial (MLX, or torch with --max-batch 1): one request at a time through
  oryx_core.generation.stream_generate.
Both keep a prompt cache: a chat's finished turn is saved, and a later request whose
prompt tokens extend it prefills only the new tokens.
"""
from __future__ import annotations

import asyncio
import json
import os
import queue
import secrets
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_CONTEXT = 2048  # tokens per sequence unless --context says otherwise (torch preallocates them per row)
FINISH = {"stop_token": "stop", "stop_string": "stop", "length": "length", "cancelled": "stop"}


# ----- requests -----
class RequestError(Exception):
    """A client mistake: answered with `status` and an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def _models():
    from pydantic import BaseModel, ConfigDict, Field

    class Common(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        top_k: int = Field(0, ge=0)
        stop: str | list[str] | None = None
        seed: int | None = Field(None, ge=0, le=2**63 - 1)
        stream: bool = False
        stream_options: dict | None = None
        n: Literal[1] = 1
        plan: str = "prefill-attention"
        kv_policy: Literal["keep", "drop"] = "keep"
        state_policy: Literal["auto", "keep", "drop"] = "auto"
        ignore_eos: bool = False

    class Completion(Common):
        prompt: str | list[int] | list[str]

    class Chat(Common):
        messages: list[dict[str, Any]] = Field(min_length=1)

    return Completion, Chat


def parse_request(raw: bytes, kind: str, limits: "Limits"):
    """The validated request model, or a RequestError naming the field."""
    from pydantic import ValidationError

    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    Completion, Chat = _models()
    try:
        req = (Chat if kind == "chat" else Completion).model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise RequestError(f"{param}: {err['msg']}", param=param) from None
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise RequestError("stop: at most 4 stop sequences", param="stop")
    req.stop = [s for s in stops if s]
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and asked > limits.max_tokens:
        raise RequestError(f"max_tokens: {asked} is above this server's limit of {limits.max_tokens}",
                           param="max_tokens")
    req.max_tokens = limits.default_max_tokens if asked is None else asked
    return req


@dataclass
class Limits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_prompt_tokens: int = 4096
    max_tokens: int = 2048
    default_max_tokens: int = 256
    max_queue: int = 64


# ----- engines -----
@dataclass(eq=False)  # compared and hashed by identity: the engine keeps a set of open jobs
class Job:
    """One generation: token ids in, events out (put on `events` from the worker thread)."""
    ids: list[int]
    max_tokens: int
    plan: str
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_strings: list[str]
    stop_token_ids: set[int]
    kv_policy: str = "keep"
    state_policy: str = "auto"
    keep_state: bool = False  # save the state for a next turn
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    answered: bool = False  # the engine has finished this job (set by the event loop)

    def emit(self, event: dict) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """A worker thread that takes Jobs and emits {"text", "tokens"} events, then one with "finish"."""

    def __init__(self, tokenizer, max_queue: int):
        self.tokenizer = tokenizer
        self.jobs: queue.Queue = queue.Queue()
        self.max_queue = max_queue
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run_guarded, name="oryx-engine", daemon=True)
        self.open: set[Job] = set()  # submitted and not yet released by their response
        self.lock = threading.Lock()
        self.failed = False

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Ends the jobs in progress at their next token and joins the worker."""
        self.stopping.set()
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.failed:
                raise RequestError("the generation engine has failed; restart the server", 500, kind="server_error")
            if len(self.open) >= self.max_queue:
                raise RequestError(f"server busy: {len(self.open)} requests in progress; retry later", status=503,
                                   kind="server_error")
            self.open.add(job)
        self.jobs.put(job)

    def done(self, job: Job) -> None:
        with self.lock:
            self.open.discard(job)

    def _run_guarded(self) -> None:
        try:
            self.run()
        except Exception:  # a bug in the engine: answer every open job with a 500 instead of leaving it hanging
            import traceback

            traceback.print_exc()  # for the operator, on the server's stderr; clients get one generic line
            with self.lock:
                self.failed = True
                jobs = list(self.open)
            for job in jobs:
                job.emit({"error": "internal error in the generation engine", "status": 500})

    def run(self) -> None:
        raise NotImplementedError


class BatchEngine(Engine):
    """The torch backend's batched engine (oryx_torch.batch)."""

    def __init__(self, model, tokenizer, max_batch: int, max_queue: int, capacity: int, warm_up: bool | None = None):
        super().__init__(tokenizer, max_queue)
        from oryx_torch.batch import BatchGenerator

        self.gen = BatchGenerator(model, max_batch=max_batch, capacity=capacity)
        # On CUDA (warm_up None) every one-time cost is paid before the server listens: the cache of max_batch rows
        # allocated once, every bucket's decode graphs captured, the prefill kernels compiled (BatchGenerator.warm_up)
        self.warmed_up = self.gen.warm_up() if (self.gen.use_graphs if warm_up is None else warm_up) else None
        self.live: dict[int, tuple[Job, Any]] = {}

    def run(self) -> None:
        from oryx_torch.batch import SequenceRequest

        from .generation import TextStream

        waiting: list[Job] = []
        while not self.stopping.is_set():
            block = not self.live and not waiting
            try:
                while True:
                    job = self.jobs.get(block=block, timeout=None if block else 0)
                    block = False
                    if job is None:
                        return
                    waiting.append(job)
            except queue.Empty:
                pass
            # every waiting request that finds a free row joins before the next decode step, prefilled together
            joining: list[tuple[Job, SequenceRequest]] = []
            while waiting and len(joining) < self.gen.free:
                job = waiting.pop(0)
                if job.cancelled.is_set():
                    continue
                request = SequenceRequest(job.ids, job.max_tokens, job.plan, job.temperature, job.top_k, job.top_p,
                                          job.seed, job.stop_token_ids, job.keep_state)
                try:
                    self.gen.check(request)
                except ValueError as e:
                    job.emit({"error": str(e), "status": 400})
                    continue
                joining.append((job, request))
            if joining:
                sids = self.gen.add_many([request for _, request in joining], reuse=True)
                for (job, _), sid in zip(joining, sids):
                    self.live[sid] = (job, TextStream(self.tokenizer, job.stop_strings))
                    job.emit({"text": "", "tokens": 0, "reused": self.gen.state_of(sid).reused_tokens})
            for sid, (job, _) in list(self.live.items()):
                if job.cancelled.is_set():
                    self.gen.cancel(sid)
                    del self.live[sid]
                    job.emit({"finish": "cancelled", "tokens": 0})
            if not self.gen.active:
                continue
            for event in self.gen.step():
                job, text = self.live[event.sequence]
                if event.finish_reason == "stop_token":
                    piece, finish = text.flush(), "stop_token"
                else:
                    piece, hit = text.add(event.token)
                    finish = "stop_string" if hit else event.finish_reason
                    if finish == "length":
                        piece += text.flush()
                    if hit and event.finish_reason is None:
                        self.gen.cancel(event.sequence)
                job.emit({"text": piece, "tokens": 1, **({"finish": finish} if finish else {})})
                if finish:
                    del self.live[event.sequence]


class SerialEngine(Engine):
    """One request at a time through oryx_core.generation (any backend with a cache), with a prompt cache."""

    def __init__(self, model, tokenizer, max_queue: int, saved: int = 4):
        super().__init__(tokenizer, max_queue)
        self.model = model
        self.saved: list[tuple[list[int], Any]] = []  # (tokens in the cache, cache), oldest first
        self.saved_max = saved

    def _take_cache(self, ids: list[int]):
        best = None
        for i, (fed, _) in enumerate(self.saved):
            if len(fed) < len(ids) and ids[:len(fed)] == fed and (best is None or len(fed) > len(self.saved[best][0])):
                best = i
        if best is None:
            return 0, None
        fed, cache = self.saved.pop(best)
        return len(fed), cache

    def run(self) -> None:
        from .generation import stream_generate

        while not self.stopping.is_set():
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            reusable = job.keep_state and job.kv_policy == "keep" and job.state_policy != "drop"
            start, cache = self._take_cache(job.ids) if reusable else (0, None)
            if reusable and cache is None:
                cache = self.model.make_cache(1)
            job.emit({"text": "", "tokens": 0, "reused": start})
            sampled, finish = [], None
            try:
                for r in stream_generate(self.model, self.tokenizer, job.ids[start:], job.max_tokens, job.plan,
                                         temperature=job.temperature, top_k=job.top_k, top_p=job.top_p,
                                         seed=job.seed, kv_policy=job.kv_policy, state_policy=job.state_policy,
                                         stop_strings=job.stop_strings, stop_token_ids=job.stop_token_ids,
                                         prompt_cache=cache):
                    sampled.append(r.token if r.tokens else -1)
                    finish = r.finish_reason
                    job.emit({"text": r.text, "tokens": 1, **({"finish": finish} if finish else {})})
                    if (job.cancelled.is_set() or self.stopping.is_set()) and not finish:
                        finish = "cancelled"
                        job.emit({"finish": "cancelled", "tokens": 0})
                        break
            except ValueError as e:
                job.emit({"error": str(e), "status": 400})
                continue
            if reusable and finish != "cancelled" and sampled:
                fed = job.ids + [t for t in sampled[:-1]]
                self.saved.append((fed, cache))
                del self.saved[:-self.saved_max]


# ----- the app -----
@dataclass
class ServerState:
    model_id: str
    backend: str
    engine: Engine
    tokenizer: Any
    chat: Any  # oryx_core.chat.ChatFormat
    limits: Limits
    context: int
    created: int = field(default_factory=lambda: int(time.time()))


def build_app(state: ServerState):
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    class JobStream(StreamingResponse):
        """A streamed answer that releases its job however the response ends: finished, failed, or cancelled
        because the client went away (even before the first chunk, when the body iterator never started)."""

        def __init__(self, job: Job, engine: Engine, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.job, self.engine = job, engine

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                if not self.job.answered:
                    self.job.cancelled.set()
                self.engine.done(self.job)

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def read_body(request: Request) -> bytes:
        limit = state.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(f"request body of {declared} bytes is above this server's limit of {limit}", 413,
                               code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"request body is above this server's limit of {limit} bytes", 413,
                                   code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "oryx",
             "backend": state.backend, "context_length": state.context}]})

    def make_job(req, kind: str) -> tuple[Job, int]:
        if req.model != state.model_id:
            raise RequestError(f"model: {req.model!r} is not served here (this server has {state.model_id!r})", 404,
                               param="model", code="model_not_found")
        from .chat import TURN_ATTENTION, ChatError, turn_attention_plan
        from .plan import ModePlan, PlanError

        if req.plan == TURN_ATTENTION and kind != "chat":
            raise RequestError(f"plan: {TURN_ATTENTION} applies to chat completions", param="plan")
        try:
            if req.plan != TURN_ATTENTION:
                ModePlan.parse(req.plan)
        except (PlanError, ValueError) as e:
            raise RequestError(f"plan: {e}", param="plan") from None
        tok = state.tokenizer
        if kind == "chat":
            try:
                text = state.chat.render(req.messages)
            except ChatError as e:
                raise RequestError(str(e), param="messages") from None
            ids = tok.encode(text, add_special_tokens=False).ids
            if req.plan == TURN_ATTENTION:
                req.plan = turn_attention_plan(state.chat, tok, req.messages, ids)
        elif isinstance(req.prompt, str) or (isinstance(req.prompt, list) and req.prompt
                                             and all(isinstance(p, str) for p in req.prompt)):
            if isinstance(req.prompt, list) and len(req.prompt) != 1:
                raise RequestError("prompt: one prompt per request (batch the requests instead)", param="prompt")
            ids = tok.encode(req.prompt if isinstance(req.prompt, str) else req.prompt[0]).ids
        else:
            ids = list(req.prompt)
            vocab = tok.get_vocab_size()
            if any(not 0 <= t < vocab for t in ids):
                raise RequestError(f"prompt: token ids must lie in [0, {vocab})", param="prompt")
        if not ids:
            raise RequestError("prompt: empty after tokenization", param="prompt")
        if len(ids) > state.limits.max_prompt_tokens:
            raise RequestError(f"prompt: {len(ids)} tokens, above this server's limit of "
                               f"{state.limits.max_prompt_tokens}", param="messages" if kind == "chat" else "prompt",
                               code="context_length_exceeded")
        if len(ids) + req.max_tokens > state.context:
            raise RequestError(f"max_tokens: {len(ids)} prompt tokens + {req.max_tokens} exceed this server's context "
                               f"of {state.context} tokens", param="max_tokens", code="context_length_exceeded")
        seed = req.seed if req.seed is not None else (0 if req.temperature == 0 else secrets.randbits(62))
        job = Job(ids, req.max_tokens, req.plan, req.temperature, req.top_k, req.top_p, seed, req.stop,
                  set() if req.ignore_eos else set(state.chat.stop_token_ids), req.kv_policy, req.state_policy,
                  keep_state=kind == "chat")
        return job, len(ids)

    async def handle(request: Request, kind: str):
        try:
            req = parse_request(await read_body(request), kind, state.limits)
            job, prompt_tokens = make_job(req, kind)
            job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
            state.engine.submit(job)
        except RequestError as e:
            return error(e)
        except ClientDisconnect:
            return JSONResponse({}, status_code=499)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"

        cached = 0  # prompt tokens the prompt cache already held (set by the engine's first event)

        def usage(completion: int) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if kind == "chat":
                delta = {} if text is None else {"content": text}
                if first:
                    delta = {"role": "assistant", **delta}
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        if not req.stream:
            pieces, completion, finish = [], 0, None
            try:
                while finish is None:
                    try:
                        event = await asyncio.wait_for(job.events.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            job.cancelled.set()
                            return JSONResponse({}, status_code=499)
                        continue
                    if "error" in event:
                        return error(RequestError(event["error"], event.get("status", 500),
                                                  kind="invalid_request_error" if event.get("status") == 400
                                                  else "server_error"))
                    pieces.append(event.get("text", ""))
                    cached = event.get("reused", cached)
                    completion += event.get("tokens", 0)
                    finish = event.get("finish")
            finally:
                if finish is None:
                    job.cancelled.set()
                state.engine.done(job)
            text = "".join(pieces)
            body = {"id": rid, "object": obj, "created": created, "model": state.model_id, "usage": usage(completion)}
            if kind == "chat":
                body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": FINISH[finish], "logprobs": None}]
            else:
                body["choices"] = [{"index": 0, "text": text, "finish_reason": FINISH[finish], "logprobs": None}]
            return JSONResponse(body)

        include_usage = (req.stream_options or {}).get("include_usage", True) is not False
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        async def events():
            nonlocal cached
            completion, finish, first = 0, None, True
            while finish is None:
                event = await job.events.get()
                if "error" in event:
                    job.answered = True  # the engine is done with it
                    yield sse({"error": {"message": event["error"], "type": "server_error", "param": None,
                                         "code": None}})
                    return
                completion += event.get("tokens", 0)
                cached = event.get("reused", cached)
                finish = event.get("finish")
                job.answered = finish is not None  # the engine is done with it; nothing left to cancel
                text = event.get("text", "")
                if text or first:
                    yield sse({"id": rid, "object": chunk_obj, "created": created, "model": state.model_id,
                               "choices": [choice(text, None, first)]})
                    first = False
            yield sse({"id": rid, "object": chunk_obj, "created": created, "model": state.model_id,
                       "choices": [choice(None, FINISH[finish])]})
            if include_usage:
                yield sse({"id": rid, "object": chunk_obj, "created": created, "model": state.model_id,
                           "choices": [], "usage": usage(completion)})
            yield "data: [DONE]\n\n"

        return JobStream(job, state.engine, events(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def completions(request: Request):
        return await handle(request, "completion")

    async def chat_completions(request: Request):
        return await handle(request, "chat")

    async def not_found(request: Request, exc):
        return error(RequestError(f"no route {request.method} {request.url.path}", 404, code="not_found"))

    async def method_not_allowed(request: Request, exc):
        return error(RequestError(f"{request.method} is not allowed on {request.url.path}", 405))

    async def server_error(request: Request, exc):
        return error(RequestError("internal server error", 500, kind="server_error"))

    app = Starlette(routes=[Route("/v1/models", models, methods=["GET"]),
                            Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"])],
                    exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error,
                                        Exception: server_error})
    return app


# ----- loading and running -----
def load_server_state(path, backend: str, max_batch: int, limits: Limits, dtype: str | None = None,
                      device: str | None = None, model_id: str | None = None,
                      context: int | None = None) -> ServerState:
    """context: tokens per sequence (prompt + reply) the server accepts, at most the model's max_context; the
    torch engine preallocates this many per batch row."""
    from .chat import load_chat_format
    from .tokenizer import byte_level_tokenizer, load_tokenizer
    from .weights import read_config

    path = Path(path)
    read_config(path)  # a one-line error for a path that is not a checkpoint, before any backend loads
    tokenizer = load_tokenizer(path) if (path / "tokenizer.json").exists() else byte_level_tokenizer()
    chat = load_chat_format(path, tokenizer)
    from .backend import get_backend

    model = get_backend(backend).load(path, dtype=dtype, device=device)
    if context is not None and context < 2:
        raise ValueError(f"--context must be >= 2, got {context}")
    context = min(context or DEFAULT_CONTEXT, model.config.max_context)
    limits.max_prompt_tokens = min(limits.max_prompt_tokens, context)
    limits.max_tokens = min(limits.max_tokens, context)
    limits.default_max_tokens = min(limits.default_max_tokens, limits.max_tokens)
    if backend == "torch" and max_batch > 1:
        engine: Engine = BatchEngine(model.model, tokenizer, max_batch, limits.max_queue, context)
    else:
        engine = SerialEngine(model, tokenizer, limits.max_queue)
    return ServerState(model_id or path.resolve().name, backend, engine, tokenizer, chat, limits, context)


def serve(state: ServerState, host: str, port: int, log_level: str = "warning", ready=None) -> None:
    """Runs until SIGINT / SIGTERM (uvicorn finishes open responses, then the engine stops)."""
    import uvicorn

    app = build_app(state)
    state.engine.start()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            lifespan="off", access_log=False)
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # SIGTERM is the service manager's "stop": finish open responses, stop the engine, exit 0
            # (uvicorn would re-raise it afterwards, ending the process before the engine stops)
            if sig == signal.SIGTERM:
                self.should_exit = True
                return
            super().handle_exit(sig, frame)

    server = Server(config)
    try:
        server.run()
    finally:
        state.engine.stop()


def check_address(host: str, port: int) -> None:
    """A one-line error now for an address the server could not listen on, before the model loads."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except (OSError, OverflowError) as e:
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({getattr(e, 'strerror', None) or e})") \
            from None


def cmd_serve(args) -> None:
    check_address(args.host, args.port)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens_limit, max_queue=args.max_queue)
    state = load_server_state(args.path, args.backend, args.max_batch, limits, dtype=args.dtype, device=args.device,
                              model_id=args.model_id, context=args.context)
    cache = ""
    if isinstance(state.engine, BatchEngine):
        gen = state.engine.gen
        cache = (f", up to {gen.max_batch} rows of {state.context} tokens, "
                 f"{gen.cache.nbytes() / gen.allocated / 2**20:.1f} MiB of cache per live row")
        warm = state.engine.warmed_up
        if warm is not None:
            cache += (f"; warmed up in {warm['seconds']:.1f} s: {gen.allocated} rows allocated, {warm['captures']} "
                      f"CUDA graphs captured for buckets {warm['buckets']}")
    print(f"oryx serve: {state.model_id} ({args.backend}{cache}) on http://{args.host}:{args.port}/v1", flush=True)
    status = 0
    try:
        serve(state, args.host, args.port, args.log_level)
    except KeyboardInterrupt:
        if args.backend != "mlx":
            raise
        print("oryx serve: interrupted", file=sys.stderr)
        status = 130
    if args.backend == "mlx":
        # Everything is answered and the engine has stopped. MLX aborts the interpreter's normal exit once a
        # thread other than the main one has run it ("terminate called without an active exception"), so
        # the process ends here instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def register(subparsers) -> None:
    from .argtypes import positive_int
    from .backend import GENERATION_BACKENDS
    from .default import DEFAULT_MODEL
    from .weights import FLOAT_DTYPES

    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and completions)",
                              description="Serve a checkpoint over the OpenAI API: /v1/models, /v1/completions, "
                                          "/v1/chat/completions (streaming or not). Oryx's own request fields "
                                          "(plan, kv_policy, state_policy) go in the body beside the OpenAI ones.")
    p.add_argument("path", nargs="?", default=str(DEFAULT_MODEL), help="checkpoint directory (default: the embedded "
                                                                         "model)")
    p.add_argument("--backend", choices=list(GENERATION_BACKENDS), default="torch", help="backend (default torch)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--model-id", help="the model name clients send (default: the checkpoint directory's name)")
    p.add_argument("--dtype", choices=list(FLOAT_DTYPES), help="compute dtype (default: the "
                                                                                 "backend's)")
    p.add_argument("--device", help="torch device (default cuda if present, else cpu)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="torch: sequences decoded together (default 16; "
                                                              "1 = one request at a time)")
    p.add_argument("--context", type=positive_int, help=f"tokens per sequence, prompt and reply (default {DEFAULT_CONTEXT}, at "
                                                f"most the model's max_context; torch preallocates this per batch row)")
    p.add_argument("--max-queue", type=positive_int, default=64, help="requests in progress before 503 (default 64)")
    p.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES, help="largest request body "
                                                                                      "(default 1 MiB; above: 413)")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=4096, help="longest prompt (default 4096, at most "
                                                                        "the model's context)")
    p.add_argument("--max-tokens-limit", type=positive_int, default=2048, help="largest max_tokens a request may ask for "
                                                                       "(default 2048)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
