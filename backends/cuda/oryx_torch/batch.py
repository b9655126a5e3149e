"""Batched generation on the PyTorch backend: many sequences, one decode step for all of them.

    gen = BatchGenerator(model, max_batch=16)
    a = gen.add(SequenceRequest(prompt_ids=[...], max_tokens=64, plan="prefill-attention"))
    b = gen.add(SequenceRequest(prompt_ids=[...], max_tokens=8, plan="recurrent", stop_token_ids={2}))
    while gen.active:
        for event in gen.step():          # one token per live sequence
            print(event.sequence, event.token, event.finish_reason)

Layout: one OryxCache of `capacity` tokens per row, marked ragged (each row at its own
position), with a power-of-two number of rows up to `max_batch`. Live sequences occupy rows
0..n-1; when one finishes, the last live row is copied into its place, so a decode step
always runs rows 0..bucket-1, where bucket is the smallest power of two >= n (padding rows
are decoded too, at position 0, and ignored). The cache grows (to the power of two that
holds the live rows) when sequences join and shrinks (to twice that) once at most a quarter
of its rows have been live for `shrink_patience` steps, copying the live rows over; so a finished sequence's KV cache, conv
windows and recurrent state are freed, not only skipped. On CUDA each (bucket, attention
on/off, any row sampled) step is captured once into a CUDA graph and replayed, torch.compile'd
first with `compiled=True` or ORYX_COMPILED_DECODE=1 (generate.compiled_parts); a resize
drops the graphs, which read the old cache. `warm_up()` (what `oryx serve` runs on CUDA before it
listens) instead allocates `max_batch` rows once, never resized, captures every bucket's graphs and
compiles the prefill kernels up front, so that no request pays for either. Every row's next token is picked inside the step:
greedy rows by argmax, sampled rows by generate.sample_rows, and all come back in one copy.

New sequences are prefilled together (`add_many`: right-padded in one forward, or one forward
per distinct prompt length; the parallel form through views of the batch cache), so prompts of
any length join at any step. A sequence's modes come from its
own plan, resolved over prompt + max_tokens as oryx_core.generation resolves it, and its
sampling (temperature, top-k, top-p, seed) draws one uniform number per token from its own
generator, as `generate.sample` does for a sequence alone, so it gets the tokens it would get alone. The KV cache is kept for every live row (`kv_policy` and
`state_policy` free nothing inside a row); the recurrent state advances only in steps where some live row will
read it again (every row in attention mode to its end, none to be saved: the steps skip the recurrence).

Run-ahead (`run_ahead`; by default on the CPU, and on CUDA where RUN_AHEAD_ON_CUDA): a step's picks come back to
the host asynchronously, and the next step is launched before they are read, fed the picks on the device (the step
leaves them in its token input), so the host's bookkeeping overlaps the device's work. It falls back to a step
fed from the host when the rows would not stay as they are (a row finishing by length, a join, a cancel, a
resize). A row that turns out to stop wasted one step, whose pick nothing reads; one to be saved (`keep_state`)
has then fed its stop token too, and its saved row holds it (a chat's next prompt, which repeats the stop token,
reuses one token more). Methods that change rows first read back a step in flight.

Prompt cache: `add(..., reuse=True)` looks for a saved row whose tokens are a prefix of
the new prompt (a chat's previous turn) and prefills only the rest; `finish` saves the
row of a finished sequence when asked (`keep_state=True`). Every token fed to the model
is in a saved row; the last sampled token is not.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from oryx_core.plan import ModePlan

from .cache import RECURRENT_WINDOWS, LayerCache, OryxCache
from oryx_core.generation import SamplingParams

from .generate import compiled_decode_default, run_decode_step, sample


@dataclass
class SequenceRequest:
    prompt_ids: list[int]
    max_tokens: int = 256
    plan: str | ModePlan = "prefill-attention"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: set[int] = field(default_factory=set)
    keep_state: bool = False  # save the row for a later prompt that extends this sequence


@dataclass
class TokenEvent:
    sequence: int
    token: int
    finish_reason: str | None  # "stop_token" (this token is a stop id), "length", "cancelled" or None


@dataclass
class _Sequence:
    sid: int
    request: SequenceRequest
    modes: torch.Tensor  # bool [prompt + max_tokens] on the host
    prompt_length: int
    generator: torch.Generator
    fed: list[int]  # every token in the row's cache
    pending: int = -1  # sampled, not yet handed out nor fed
    generated: int = 0
    reused_tokens: int = 0
    # the modes as Python bools, and the index of the last recurrent-mode token that will be fed (the last mode,
    # the last sampled token's, never is; -1: none): a decode step reads them for every row without a tensor op
    step_modes: list[bool] = field(init=False)
    last_recurrent: int = field(init=False)

    def __post_init__(self):
        self.step_modes = self.modes.tolist()
        fed_modes = self.step_modes[:-1]
        self.last_recurrent = max((i for i, attends in enumerate(fed_modes) if not attends), default=-1)


def _row_view(cache: OryxCache, rows: slice, with_state: bool = True) -> OryxCache:
    """An OryxCache whose tensors are views of `rows` of `cache` (writes land in the batch cache); without
    `with_state`, one that lacks the recurrent state and the conv windows only the recurrence reads (a step
    through it advances neither)."""
    view = OryxCache.__new__(OryxCache)
    view.cfg, view.capacity = cache.cfg, cache.capacity
    view.batch = len(range(*rows.indices(cache.batch)))
    view.layers = []
    for layer in cache.layers:
        lv = LayerCache.__new__(LayerCache)
        lv.keys = None if layer.keys is None else layer.keys[rows]
        lv.values = None if layer.values is None else layer.values[rows]
        lv.conv = {name: t[rows] for name, t in layer.conv.items() if with_state or name not in RECURRENT_WINDOWS}
        lv.recurrent = layer.recurrent[rows] if with_state else None
        view.layers.append(lv)
    view.position = cache.position[rows]
    view.length = 0
    view.ragged = True
    return view


# Whether a BatchGenerator on CUDA runs ahead unless told: off until the CUDA run-ahead tests
# (tests/torch/test_batch.py, test_batch_warm_up.py) and `bench_batch.py --compare-run-ahead` have run on a GPU;
# the ordering it rests on (the next step's input copies, the read-back copy and its event on one stream) is
# checked on the CPU only, where every copy is synchronous.
RUN_AHEAD_ON_CUDA = False


@dataclass
class _Step:
    """A decode step launched and not yet read back: its rows in row order at launch, and their picks on the host,
    there once `done` (None on the CPU, where the copy is synchronous) has fired."""
    seqs: list[_Sequence]
    picks: torch.Tensor
    done: torch.cuda.Event | None


@dataclass
class _Saved:
    ids: list[int]
    tensors: list[torch.Tensor]  # per layer: keys[:n], values[:n], conv k, v, q, recurrent state (one row)


class BatchGenerator:
    """Sequences of different lengths, plans and stop conditions decoded together (module docstring)."""

    def __init__(self, model, max_batch: int = 16, capacity: int | None = None, cuda_graphs: bool = True,
                 saved_rows: int = 8, shrink_patience: int = 32, prefill: str = "auto", compiled: bool | None = None,
                 compile_backend: str = "inductor", run_ahead: bool | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill not in ("auto", "padded", "segmented"):
            raise ValueError(f"prefill must be auto, padded or segmented, got {prefill!r}")
        self.prefill = prefill
        self.model = model
        self.capacity = capacity or model.cfg.max_context
        self.max_batch = max_batch
        self.allocated = 0  # rows of self.cache
        self.cache: OryxCache | None = None
        self.rows: list[_Sequence] = []  # row i holds self.rows[i]
        self.by_id: dict[int, _Sequence] = {}
        self.next_id = 0
        self.use_graphs = cuda_graphs and model.device.type == "cuda"
        # the decode step torch.compile'd (generate.DecodeRunner's; default on CUDA), the greedy pick inside it
        self.compiled = compiled_decode_default(model.device) if compiled is None else compiled
        self.compile_backend = compile_backend
        self.views: dict[tuple[int, bool], OryxCache] = {}  # (bucket, with the recurrent state)
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # (bucket, attend, sampled, with the recurrent state) -> its graph and outputs
        self.graphs: dict[tuple[int, bool, bool, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.warmed: set[tuple[int, bool, bool, bool]] = set()
        self.saved: OrderedDict[int, _Saved] = OrderedDict()
        self.saved_rows = saved_rows
        self.next_saved = 0
        self.shrink_patience = shrink_patience
        self.fixed_rows = False  # warm_up: max_batch rows from then on, never resized
        self.captures = self.resizes = 0  # graphs captured and caches (re)allocated so far
        self.run_ahead = run_ahead if run_ahead is not None else \
            (model.device.type != "cuda" or RUN_AHEAD_ON_CUDA)
        self.flight: _Step | None = None  # the step launched and not yet read back
        self.ran_ahead = 0  # steps launched before the previous step's picks were read
        self._resize(1)

    # -- public --
    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def free(self) -> int:
        return self.max_batch - len(self.rows)

    def check(self, request: SequenceRequest) -> tuple[list[int], torch.Tensor]:
        """The request's prompt ids and its modes over prompt + max_tokens; ValueError naming the bad field."""
        ids = [int(t) for t in request.prompt_ids]
        if not ids:
            raise ValueError("prompt: needs at least one token")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        SamplingParams(request.temperature, request.top_k, request.top_p, 1.0, request.seed)  # checks them
        if len(ids) + request.max_tokens > self.capacity:
            raise ValueError(f"prompt: {len(ids)} tokens + max_tokens {request.max_tokens} exceed the "
                             f"context of {self.capacity} tokens")
        plan = ModePlan.parse(request.plan)
        modes = plan.resolve(len(ids) + request.max_tokens, prompt_length=len(ids))
        return ids, torch.as_tensor(modes, dtype=torch.bool)

    def add(self, request: SequenceRequest, reuse: bool = False) -> int:
        """Prefills a new sequence into a free row and samples its first token; returns its id."""
        return self.add_many([request], reuse)[0]

    def add_many(self, requests: list[SequenceRequest], reuse: bool = False) -> list[int]:
        """Prefills new sequences into free rows together and samples each one's first token; returns their ids.

        With `reuse`, a request whose prompt extends a saved row continues from it (prefilled alone, from
        the saved length); the others are prefilled together, sorted by prompt length, longest first, into
        consecutive rows, each row under its own modes. `prefill` says how: "padded" runs one forward with
        the prompts right-padded to the longest (causal attention never lets a real token see the padding
        after it; the model keeps the padding out of the conv windows and recurrent states); "segmented" runs
        one forward per distinct length over the rows that still have prompt tokens (dense, no padding);
        "auto" pads when padding at most doubles the tokens. Prompts of one length run one plain forward.
        """
        checked = [self.check(r) for r in requests]  # every request is checked before any row changes
        self._resolve()
        if len(requests) > self.free:
            raise RuntimeError("batch: every row is taken; wait for a sequence to finish" if not self.free else
                               f"batch: {len(requests)} new sequences for {self.free} free rows")
        model = self.model
        self._fit(len(self.rows) + len(requests))
        self.sparse_steps = 0  # a join restarts the patience
        seqs = []
        for request, (ids, modes) in zip(requests, checked):
            generator = torch.Generator().manual_seed(request.seed)  # on the host, as TorchModel.sampler's
            seqs.append(_Sequence(self.next_id, request, modes, len(ids), generator, list(ids)))
            self.next_id += 1
        together, last_logits = [], {}
        with torch.inference_mode():
            for seq in seqs:
                row = len(self.rows)
                self._clear_row(row)
                view = _row_view(self.cache, slice(row, row + 1))
                start = self._restore(view, seq.fed) if reuse else 0
                if not start:
                    together.append(seq)
                    continue
                view.length = start
                view.position.fill_(start)
                last_logits[seq.sid] = model(torch.tensor([seq.fed[start:]]), seq.modes[None, start:seq.prompt_length],
                                             cache=view, last_only=True)[:, -1]
                seq.reused_tokens = start
                self._place(seq)
            together.sort(key=lambda seq: -seq.prompt_length)
            base = len(self.rows)
            for seq in together:
                self._clear_row(len(self.rows))
                self._place(seq)
            if together:
                lengths = [seq.prompt_length for seq in together]
                # prompts of one length need no padding: the segmented way is then one plain forward. On CUDA
                # "auto" always pads: a segment after the first runs at an offset, which takes FlexAttention,
                # compiled anew for each shape it meets
                padded = lengths[0] != lengths[-1] and (self.prefill == "padded" or (
                    self.prefill == "auto" and (self.model.device.type == "cuda"
                                                or len(lengths) * lengths[0] <= 2 * sum(lengths))))
                prefill = self._prefill_padded if padded else self._prefill_segmented
                last_logits.update(prefill(together, base))
            self._sample_first(seqs, last_logits)
        return [seq.sid for seq in seqs]

    def _prefill_padded(self, together: list[_Sequence], base: int) -> dict[int, torch.Tensor]:
        """One forward over rows base.. with every prompt right-padded to the longest (the model keeps each
        row's conv windows, recurrent state and position at its own last real token)."""
        longest = together[0].prompt_length
        tokens = torch.zeros(len(together), longest, dtype=torch.long)
        modes = torch.zeros(len(together), longest, dtype=torch.bool)
        for i, seq in enumerate(together):
            tokens[i, :seq.prompt_length] = torch.tensor(seq.fed)
            modes[i, :seq.prompt_length] = seq.modes[:seq.prompt_length]
            # padding takes its row's last prompt mode: its outputs are discarded and it writes no state, and so
            # prompts all in attention stay one causal attention over every row (no mixed-plan path)
            modes[i, seq.prompt_length:] = seq.modes[seq.prompt_length - 1]
        view = _row_view(self.cache, slice(base, base + len(together)))
        lengths = [seq.prompt_length for seq in together]
        logits = self.model(tokens, modes, cache=view, lengths=lengths, last_only=True)[:, 0]
        return {seq.sid: logits[i:i + 1] for i, seq in enumerate(together)}

    def _prefill_segmented(self, together: list[_Sequence], base: int) -> dict[int, torch.Tensor]:
        """One forward per distinct prompt length over the rows (longest first from row base) that still have
        prompt tokens, all at the same position: no padding."""
        last_logits = {}
        done, live = 0, len(together)
        while live:  # rows base..base+live-1 still have prompt tokens, all from position `done`
            end = together[live - 1].prompt_length
            view = _row_view(self.cache, slice(base, base + live))
            view.length = done
            tokens = torch.tensor([seq.fed[done:end] for seq in together[:live]])
            modes = torch.stack([seq.modes[done:end] for seq in together[:live]])
            logits = self.model(tokens, modes, cache=view, last_only=True)[:, -1]
            while live and together[live - 1].prompt_length == end:
                live -= 1
                last_logits[together[live].sid] = logits[live:live + 1]
            done = end
        return last_logits

    def _place(self, seq: _Sequence) -> None:
        self.rows.append(seq)
        self.by_id[seq.sid] = seq

    def _sample_first(self, seqs: list[_Sequence], last_logits: dict[int, torch.Tensor]) -> None:
        greedy = [seq for seq in seqs if seq.request.temperature == 0]
        if greedy:
            picks = torch.cat([last_logits[seq.sid] for seq in greedy]).float().argmax(-1).tolist()
            for seq, token in zip(greedy, picks):
                seq.pending = token
        for seq in seqs:
            r = seq.request
            if r.temperature != 0:
                seq.pending = int(sample(last_logits[seq.sid], r.temperature, r.top_k, r.top_p, seq.generator)[0])

    def step(self) -> list[TokenEvent]:
        """Hands out every live sequence's pending token; decodes one step for those that go on. With run_ahead
        that step is left in flight, and the next call launches the one after it before reading it back."""
        ahead = self._launch(1) if self._can_run_ahead() else None
        self._resolve()
        self.flight = ahead
        events, going = [], []
        for seq in list(self.rows):
            token = seq.pending
            seq.generated += 1
            if token in seq.request.stop_token_ids:
                events.append(TokenEvent(seq.sid, token, "stop_token"))
                self._finish(seq)
            elif seq.generated >= seq.request.max_tokens:
                events.append(TokenEvent(seq.sid, token, "length"))
                self._finish(seq)
            else:
                events.append(TokenEvent(seq.sid, token, None))
                going.append(seq)
        self._shrink()
        if going and ahead is None:
            self.flight = self._launch(0)
            if not self.run_ahead:
                self._resolve()
        return events

    def cancel(self, sid: int) -> None:
        """Ends a sequence now (e.g. its client went away); its row is freed, nothing is saved."""
        self._resolve()
        seq = self.by_id.get(sid)
        if seq is not None:
            seq.request.keep_state = False
            self._finish(seq)
            self._shrink()

    def state_of(self, sid: int) -> _Sequence | None:
        self._resolve()  # its fed tokens and pending one as of the last step launched
        return self.by_id.get(sid)

    def generate(self, requests: list[SequenceRequest]) -> list[list[int]]:
        """Every request's generated tokens (a final stop token included); requests join as rows free up.
        The generator (its cache and captured graphs) stays usable for the next call."""
        out: dict[int, list[int]] = {}
        order, waiting = [], list(requests)
        while waiting or self.active:
            if waiting and self.free:
                joining, waiting = waiting[:self.free], waiting[self.free:]
                for sid in self.add_many(joining):
                    order.append(sid)
                    out[sid] = []
            for event in self.step():
                out[event.sequence].append(event.token)
        return [out[sid] for sid in order]

    def warm_up(self, prompt_lengths: tuple[int, ...] = (1, 2, 16, 17, 64, 65)) -> dict:
        """Pays every one-time cost before traffic, so that no request waits for one: allocates `max_batch` rows
        once (never resized afterwards), runs and then captures the decode step of every bucket, attention on and
        off (and on without the recurrent state), greedy and sampled, and prefills prompts of `prompt_lengths`
        tokens (Triton specialises integer arguments on 1 and multiples of 16; the GDN kernels take another path
        when every sequence is whole chunks of 64) alone and together, padded, under all-attention, all-recurrent
        and mixed plans, and continuing a saved row, which compiles the kernels and attention those shapes take.
        Returns {"seconds", "captures", "buckets"}; every row is empty afterwards and nothing is saved."""
        if self.rows:
            raise RuntimeError("batch: warm_up needs an empty batch")
        self._resolve()
        start = time.perf_counter()
        if self.allocated != self.max_batch:
            self._resize(self.max_batch)
        self.fixed_rows = True
        captures = self.captures
        buckets = sorted({min(_power_of_two(n), self.max_batch) for n in range(1, self.max_batch + 1)})
        with torch.inference_mode():
            for bucket in buckets:
                for attend, with_state in ((False, True), (True, True), (True, False)):
                    for sampled in (False, True):
                        sampling = torch.tensor([[0.0], [0.0], [1.0], [0.0]]).expand(4, bucket) if sampled else None
                        for _ in range(2):  # the first run compiles, the second captures
                            self.cache.position.zero_()
                            self._run(bucket, torch.zeros(bucket, dtype=torch.long),
                                      torch.full((bucket,), attend), attend, sampling, with_state)
        vocab = self.model.cfg.vocab_size
        ids = lambda n: [i % vocab for i in range(n)]  # noqa: E731
        lengths = [max(1, min(n, self.capacity - 1)) for n in prompt_lengths]
        plans = (["attention"], ["recurrent"], ["attention", "recurrent"])
        for rows in sorted({1, min(2, self.max_batch), self.max_batch}):
            for plan in plans:
                for shape in [[n] * rows for n in lengths] + [[lengths[i % len(lengths)] for i in range(rows)]]:
                    sids = self.add_many([SequenceRequest(ids(n), 1, plan[i % len(plan)])
                                          for i, n in enumerate(shape)])
                    for sid in sids:
                        self.cancel(sid)
        for plan in ("attention", "recurrent") if self.capacity >= 4 else ():  # a saved row continued: at an offset
            for history, new in zip(lengths, reversed(lengths)):
                history = min(history, self.capacity - 3)
                new = max(1, min(new, self.capacity - history - 2))
                self.add(SequenceRequest(ids(history), 1, plan, keep_state=True))
                self.step()
                self.cancel(self.add(SequenceRequest(ids(history + new), 1, plan), reuse=True))
        self.saved.clear()
        return {"seconds": time.perf_counter() - start, "captures": self.captures - captures, "buckets": buckets}

    # -- decoding --
    def _can_run_ahead(self) -> bool:
        """Whether the next step may be launched before the step in flight is read back: its rows are the live
        rows as they were at its launch (so its picks lie in the token buffer in row order), none of them
        finishes by length on handing out that step's pick."""
        flight = self.flight
        return (self.run_ahead and flight is not None and len(flight.seqs) == len(self.rows)
                and all(a is b for a, b in zip(flight.seqs, self.rows))
                and all(seq.generated + 1 < seq.request.max_tokens for seq in self.rows))

    def _launch(self, ahead: int) -> _Step:
        """Queues one decode step over the live rows and the copy of its picks to the host. `ahead` 0: each row
        feeds its pending token; 1: the pick of the step in flight (not yet on the host), which that step left
        in the token buffer (decode_and_pick writes its picks there), under the mode after the pending token's."""
        n = len(self.rows)
        bucket = _power_of_two(n) if self.use_graphs else n
        bucket = min(bucket, self.allocated)
        cuda = self.model.device.type == "cuda"
        # The recurrent state advances only while a live row will read it: a token of its own still to be fed in
        # recurrent mode (this one included; the last of its modes, the last sampled token's, is never fed), or a
        # saved row (keep_state) that a later prompt may continue under any plan. A row that never reads it again
        # keeps a stale one, which nothing reads (a finished row's is not saved).
        with_state = any(seq.request.keep_state or seq.last_recurrent >= len(seq.fed) + ahead for seq in self.rows)
        padding = bucket - n
        tokens = None if ahead else torch.tensor([seq.pending for seq in self.rows] + [0] * padding,
                                                 dtype=torch.long, pin_memory=cuda)
        # padding rows: recurrent, or attention where no state is
        step_modes = [seq.step_modes[len(seq.fed) + ahead] for seq in self.rows] + [not with_state] * padding
        if not with_state and not all(step_modes):
            raise AssertionError("batch: a recurrent-mode token in a step without the recurrent state")
        modes = torch.tensor(step_modes, dtype=torch.bool, pin_memory=cuda)
        attend = any(step_modes)
        # Sampled rows: their settings and one uniform number each from their own generator (what `sample` draws
        # for a sequence alone); the step picks every row's token on the device, greedy rows by argmax. A step run
        # ahead draws for a row that may turn out to stop: its generator is then dropped with it.
        sampling = None
        if any(seq.request.temperature != 0 for seq in self.rows):
            sampling = torch.zeros(4, bucket, pin_memory=cuda)  # temperature, top_k, top_p, uniform
            sampling[2] = 1.0
            for i, seq in enumerate(self.rows):
                r = seq.request
                if r.temperature != 0:
                    uniform = float(torch.rand(1, generator=seq.generator))
                    sampling[:, i] = torch.tensor([r.temperature, r.top_k, r.top_p, uniform])
        with torch.inference_mode():
            if bucket > n:
                self.cache.position[n:bucket].zero_()  # padding rows stay inside the cache
            _, picks = self._run(bucket, tokens, modes, attend, sampling, with_state)
            # queued before any later step rewrites the picks (a graph's outputs are rewritten by its next replay)
            host = torch.empty(n, dtype=torch.long, pin_memory=cuda)
            host.copy_(picks[:n], non_blocking=cuda)
            done = None
            if cuda:
                done = torch.cuda.Event()
                done.record()
        self.ran_ahead += ahead
        return _Step(list(self.rows), host, done)

    def _resolve(self) -> None:
        """Reads the step in flight back, waiting for it: each of its rows still live has fed its pending token and
        takes the pick as its next one. A row that finished meanwhile (it stopped while the step ran ahead) is
        skipped; its slot was cleared or overwritten by the last row, moved after the step on the stream."""
        flight, self.flight = self.flight, None
        if flight is None:
            return
        if flight.done is not None:
            flight.done.synchronize()
        for seq, token in zip(flight.seqs, flight.picks.tolist()):
            if self.by_id.get(seq.sid) is seq:
                seq.fed.append(seq.pending)
                seq.pending = token

    def _run(self, bucket: int, tokens, modes, attend: bool, sampling=None,
             with_state: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [bucket, V], picked tokens [bucket]) of one step over rows 0..bucket-1; `tokens` None: the
        bucket's token buffer as the previous step left it (its picks); `sampling` (host float [4, bucket],
        generate.decode_and_pick's) or None: every row greedy; without `with_state` (every row in attention mode)
        the recurrent state stays as it was. Inputs in pinned memory are copied without waiting for the device."""
        model = self.model
        if (bucket, with_state) not in self.views:
            self.views[bucket, with_state] = _row_view(self.cache, slice(0, bucket), with_state)
        if bucket not in self.inputs:
            self.inputs[bucket] = (torch.zeros(bucket, dtype=torch.long, device=model.device),
                                   torch.zeros(bucket, dtype=torch.bool, device=model.device),
                                   torch.zeros(4, bucket, device=model.device))
        view = self.views[bucket, with_state]
        token_buf, mode_buf, sampling_buf = self.inputs[bucket]
        if tokens is not None:
            _to_device(token_buf, tokens)
        _to_device(mode_buf, modes)
        if sampling is not None:
            _to_device(sampling_buf, sampling)
        sampled = sampling is not None
        key = (bucket, attend, sampled, with_state)

        def step():
            return run_decode_step(model, token_buf, mode_buf, view, attend, True, self.compiled, self.compile_backend,
                                   sampling_buf if sampled else None)

        if not self.use_graphs:
            return step()
        if key in self.graphs:
            graph, *out = self.graphs[key]
            graph.replay()
            return tuple(out)
        if key in self.warmed:
            graph, out = self._capture(step)
            self.captures += 1
            self.graphs[key] = (graph, *out)
            graph.replay()
            return out
        self.warmed.add(key)
        return step()

    def _capture(self, step):
        """(a CUDA graph of `step`, its outputs, which every replay rewrites)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        return graph, out

    # -- rows --
    def _fit(self, rows: int) -> None:
        """Grows the cache to hold `rows` live rows (a power of two, at most max_batch)."""
        if rows > self.allocated and not self.fixed_rows:
            self._resize(min(self.max_batch, _power_of_two(rows)))

    def _shrink(self) -> None:
        """Once at most a quarter of the rows have been live for more than `shrink_patience` steps in a row,
        keeps twice the power of two that holds the live ones (a sequence or two joining right after does not
        grow it again). The patience spares a batch that empties and refills at once (a benchmark's repeats,
        a burst of requests) the re-capture of its graphs."""
        n = len(self.rows)
        if self.fixed_rows or self.allocated == 1 or n > self.allocated // 4:
            self.sparse_steps = 0
            return
        self.sparse_steps += 1
        if self.sparse_steps > self.shrink_patience:
            self._resize(min(self.max_batch, 2 * _power_of_two(n)) if n else 1)

    def _resize(self, rows: int) -> None:
        """A cache of `rows` rows holding the live rows 0..n-1 of the current one."""
        self._resolve()  # the step in flight reads the graphs and buffers dropped below
        cache = self.model.make_cache(rows, self.capacity)
        cache.ragged = True
        n = len(self.rows)
        if n:
            with torch.inference_mode():
                for new, old in zip(cache.layers, self.cache.layers):
                    for dst, src in zip(new.tensors(), old.tensors()):
                        dst[:n].copy_(src[:n])
                cache.position[:n].copy_(self.cache.position[:n])
        self.cache, self.allocated, self.sparse_steps = cache, rows, 0
        self.resizes += 1
        self.views.clear()
        self.inputs.clear()
        self.graphs.clear()  # captured on the old cache's addresses
        self.warmed.clear()

    def _row_tensors(self, row: int) -> list[torch.Tensor]:
        out = []
        for layer in self.cache.layers:
            out += [layer.keys[row], layer.values[row], *(t[row] for t in layer.conv.values()), layer.recurrent[row]]
        return out

    def _clear_row(self, row: int) -> None:
        for layer in self.cache.layers:
            for t in layer.conv.values():
                t[row].zero_()
            layer.recurrent[row].zero_()
        self.cache.position[row] = 0

    def _finish(self, seq: _Sequence) -> None:
        row = self.rows.index(seq)
        if seq.request.keep_state:
            # a row that stops while the next step runs ahead has fed its stop token there too (the copies below
            # and in _save run after that step): its saved row holds it, as a chat's next prompt does
            ahead = self.flight is not None and any(s is seq for s in self.flight.seqs)
            self._save(row, seq.fed + [seq.pending] if ahead else seq.fed)
        last = len(self.rows) - 1
        if row != last:
            with torch.inference_mode():
                for dst, src in zip(self._row_tensors(row), self._row_tensors(last)):
                    dst.copy_(src)
                self.cache.position[row] = self.cache.position[last]
            self.rows[row] = self.rows[last]
        self.rows.pop()
        del self.by_id[seq.sid]

    def _save(self, row: int, ids: list[int]) -> None:
        n = len(ids)
        with torch.inference_mode():
            tensors = []
            for layer in self.cache.layers:
                tensors += [layer.keys[row, :, :n].clone(), layer.values[row, :, :n].clone(),
                            *(t[row].clone() for t in layer.conv.values()), layer.recurrent[row].clone()]
        self.saved[self.next_saved] = _Saved(list(ids), tensors)
        self.next_saved += 1
        while len(self.saved) > self.saved_rows:
            self.saved.popitem(last=False)

    def _restore(self, view: OryxCache, ids: list[int]) -> int:
        """Loads the longest saved row whose tokens are a proper prefix of ids into `view`; returns its length."""
        best, best_key = None, None
        for key, saved in self.saved.items():
            n = len(saved.ids)
            if n < len(ids) and ids[:n] == saved.ids and (best is None or n > len(best.ids)):
                best, best_key = saved, key
        if best is None:
            return 0
        del self.saved[best_key]  # the row now continues elsewhere; a finished turn saves it again
        n, it = len(best.ids), iter(best.tensors)
        for layer in view.layers:
            layer.keys[0, :, :n].copy_(next(it))
            layer.values[0, :, :n].copy_(next(it))
            for t in layer.conv.values():
                t[0].copy_(next(it))
            layer.recurrent[0].copy_(next(it))
        return n


def _to_device(buf: torch.Tensor, host: torch.Tensor) -> None:
    """Copies host inputs into a device buffer; from pinned memory without waiting: the stream runs the copy
    before the step that reads it, and the caching host allocator keeps the pinned block until the copy ran."""
    buf.copy_(host, non_blocking=buf.is_cuda and host.is_pinned())


def _power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def generate_batch(model, requests: list[SequenceRequest], max_batch: int | None = None,
                   capacity: int | None = None, cuda_graphs: bool = True) -> list[list[int]]:
    """Every request's generated tokens (a final stop token included), decoding them together;
    requests beyond max_batch join as rows free up."""
    if capacity is None:
        capacity = max(len(r.prompt_ids) + r.max_tokens for r in requests) if requests else 1
    return BatchGenerator(model, max_batch or max(1, len(requests)), capacity, cuda_graphs).generate(requests)
