"""Batched generation (oryx_torch.batch): each sequence gets the tokens it gets alone."""
from __future__ import annotations

import copy

import pytest
import torch

from oryx_core.config import preset
from oryx_torch.batch import BatchGenerator, SequenceRequest, generate_batch
from oryx_core.generation import stream_generate
from oryx_core.tokenizer import byte_level_tokenizer
from oryx_torch.backend import TorchModel
from oryx_torch.model import OryxModel
from test_batch_warm_up import graphed_on_cpu


@pytest.fixture(scope="module", params=["gdn", "mamba2"])
def model(request):
    torch.manual_seed(0)
    return OryxModel(preset("tiny", mixer=request.param), seed=1).eval()


def alone(model, r: SequenceRequest) -> list[int]:
    """The sampled tokens (a final stop token included) of oryx_core.generation's one-sequence loop."""
    out = []
    for response in stream_generate(TorchModel(model, cuda_graphs=False), byte_level_tokenizer(), r.prompt_ids, r.max_tokens,
                                    r.plan, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, seed=r.seed,
                                    stop_token_ids=r.stop_token_ids, state_policy="keep"):
        out += response.tokens
        if response.finish_reason == "stop_token":
            out.append(next(iter(r.stop_token_ids)))
    return out


def requests():
    g = torch.Generator().manual_seed(3)
    plans = ["attention", "recurrent", "prefill-attention", "A:0-3,R:3-9,A:9-", "last:50%", "every:2:4"]
    out = []
    for i in range(9):
        length = [1, 5, 12, 3, 20, 7, 9, 2, 16][i]
        out.append(SequenceRequest(torch.randint(0, 256, (length,), generator=g).tolist(), max_tokens=4 + 3 * (i % 4),
                                   plan=plans[i % len(plans)], temperature=0.0 if i % 3 else 0.9, top_p=0.9, seed=i))
    return out


def test_batched_tokens_equal_one_at_a_time(model):
    reqs = requests()
    batched = generate_batch(model, reqs, max_batch=4, cuda_graphs=False)  # 9 sequences through 4 rows: joins and leaves
    for r, got in zip(reqs, batched):
        assert got == alone(model, r), r.plan


@pytest.mark.parametrize("other, advances", [
    (SequenceRequest([7, 8], 5, "attention"), False),
    (SequenceRequest([7, 8], 5, "A:0-5,R:5-6,A:6-"), True),  # the last token fed is recurrent
    (SequenceRequest([7, 8], 5, "A:0-6,R:6-"), False),  # only the last sampled token, which is never fed
    (SequenceRequest([7, 8], 5, "attention", keep_state=True), True),  # saved for a next turn under any plan
], ids=["all_attention", "recurrent_ahead", "recurrent_never_fed", "saved_row"])
def test_the_recurrent_state_advances_only_while_a_row_will_read_it(model, other, advances):
    reqs = [SequenceRequest([3, 4, 5, 6], 5, "attention"), other]
    gen = BatchGenerator(model, max_batch=2, capacity=32, cuda_graphs=False)
    sids = gen.add_many(reqs)
    after_prompt = [layer.recurrent.clone() for layer in gen.cache.layers]
    got = {sid: [] for sid in sids}
    while gen.active:
        for event in gen.step():
            got[event.sequence].append(event.token)
        if gen.active:  # both rows still in place (they finish together)
            moved = any(not torch.equal(a, layer.recurrent) for a, layer in zip(after_prompt, gen.cache.layers))
            assert moved == advances
    assert [got[sid] for sid in sids] == [alone(model, r) for r in reqs]


def prefill_alone_and_together(model, reqs, capacity: int = 64, prefill: str = "auto"):
    """(first-token logits, cache rows) per request: each prefilled alone in its own generator, and all
    prefilled together by one add_many."""
    def capture(gen):
        got = {}
        original = gen._sample_first

        def keep(seqs, last_logits):
            got.update({seq.sid: last_logits[seq.sid].clone() for seq in seqs})
            original(seqs, last_logits)
        gen._sample_first = keep
        return got

    def row_state(gen, sid):
        seq = gen.state_of(sid)
        row, P = gen.rows.index(seq), seq.prompt_length
        out = []
        for layer in gen.cache.layers:
            out += [layer.keys[row, :, :P], layer.values[row, :, :P], *(t[row] for t in layer.conv.values()),
                    layer.recurrent[row]]
        return [t.clone() for t in out]

    alone = []
    for r in reqs:
        gen = BatchGenerator(model, max_batch=1, capacity=capacity, cuda_graphs=False, prefill="segmented")
        logits = capture(gen)
        sid = gen.add(r)
        alone.append((logits[sid], row_state(gen, sid), gen.state_of(sid).pending))
    gen = BatchGenerator(model, max_batch=len(reqs), capacity=capacity, cuda_graphs=False, prefill=prefill)
    logits = capture(gen)
    sids = gen.add_many(reqs)
    together = [(logits[sid], row_state(gen, sid), gen.state_of(sid).pending) for sid in sids]
    return alone, together, gen, sids


@pytest.mark.parametrize("prefill", ["padded", "segmented"])
def test_prompts_prefilled_together_give_each_prompt_alone_logits_and_state(model, prefill):
    g = torch.Generator().manual_seed(5)
    lengths = [7, 3, 12, 7, 1, 12, 5]  # repeated lengths share a forward; the shortest leave first
    plans = ["attention", "recurrent", "prefill-attention", "A:0-2,R:2-", "last:50%", "every:2:3", "attention"]
    reqs = [SequenceRequest(torch.randint(0, 256, (n,), generator=g).tolist(), max_tokens=4, plan=p)
            for n, p in zip(lengths, plans)]
    alone, together, gen, sids = prefill_alone_and_together(model, reqs, prefill=prefill)
    assert [gen.state_of(sid).prompt_length for sid in sids] == lengths  # ids come back in request order
    assert [gen.rows.index(gen.state_of(sid)) for sid in sids] == [2, 5, 0, 3, 6, 1, 4]  # rows: longest first
    for (logits_a, state_a, token_a), (logits_t, state_t, token_t) in zip(alone, together):
        torch.testing.assert_close(logits_t, logits_a, rtol=1e-4, atol=1e-4)
        for a, t in zip(state_a, state_t):
            torch.testing.assert_close(t, a, rtol=1e-4, atol=1e-4)
        assert token_t == token_a
    # and a wrong result is caught: another prompt's logits differ by far more than the tolerance
    assert (together[0][0] - alone[1][0]).abs().max() > 1e-2


def test_padded_prefill_with_identity_convs_keeps_each_prompts_windows():
    # a Llama import's convs pass their input through (last tap 1, no bias, no activation): the CPU forward
    # then skips the conv, and the windows must still end at each row's own last real token
    torch.manual_seed(0)
    model = OryxModel(preset("tiny", conv_activation="none", conv_bias=False), seed=1).eval()
    with torch.no_grad():
        for layer in model.layers:
            for conv in (layer.mixer.conv_k, layer.mixer.conv_v, layer.mixer.conv_q):
                conv.weight.zero_()
                conv.weight[:, -1] = 1
    with torch.inference_mode():
        assert model.layers[0].mixer.conv_k.passes_through(torch.zeros(1, 1, 1))
    reqs = [SequenceRequest(list(range(3, 3 + n)), max_tokens=2, plan=p)
            for n, p in zip([9, 2, 6, 1], ["attention", "recurrent", "last:50%", "attention"])]
    alone_, together, _, _ = prefill_alone_and_together(model, reqs, prefill="padded")
    for (logits_a, state_a, token_a), (logits_t, state_t, token_t) in zip(alone_, together):
        torch.testing.assert_close(logits_t, logits_a, rtol=1e-4, atol=1e-4)
        for a, t in zip(state_a, state_t):
            torch.testing.assert_close(t, a, rtol=1e-4, atol=1e-4)
        assert token_t == token_a


def test_add_many_refuses_before_touching_any_row(model):
    gen = BatchGenerator(model, max_batch=3, capacity=16, cuda_graphs=False)
    with pytest.raises(ValueError, match="max_tokens"):
        gen.add_many([SequenceRequest([1, 2], max_tokens=2), SequenceRequest([3], max_tokens=0)])
    with pytest.raises(RuntimeError, match="4 new sequences for 3 free rows"):
        gen.add_many([SequenceRequest([1], max_tokens=2)] * 4)
    assert gen.active == 0 and gen.free == 3


def test_finished_sequences_free_their_rows_and_the_others_go_on_exactly(model):
    g = torch.Generator().manual_seed(7)
    reqs = [SequenceRequest(torch.randint(0, 256, (3 + i,), generator=g).tolist(), max_tokens=12 if i == 5 else 2,
                            plan=["attention", "recurrent", "prefill-attention"][i % 3]) for i in range(8)]
    gen = BatchGenerator(model, max_batch=8, capacity=32, cuda_graphs=False, shrink_patience=0)
    row_bytes = model.make_cache(1, 32).nbytes()
    assert gen.allocated == 1 and gen.cache.nbytes() == row_bytes  # nothing is held before a sequence joins
    sids = gen.add_many(reqs)
    assert gen.allocated == 8 and gen.cache.nbytes() == 8 * row_bytes
    out = {sid: [] for sid in sids}
    for event in gen.step() + gen.step():  # seven sequences end after 2 tokens, one goes on
        out[event.sequence].append(event.token)
    assert gen.active == 1 and gen.allocated == 2 and gen.cache.nbytes() == 2 * row_bytes
    late = [SequenceRequest([5, 6, 7], max_tokens=3, plan="recurrent"), SequenceRequest([9] * 6, max_tokens=3)]
    sids += gen.add_many(late)  # 3 live rows: grows to 4
    out.update({sid: [] for sid in sids[8:]})
    assert gen.allocated == 4
    while gen.active:
        for event in gen.step():
            out[event.sequence].append(event.token)
    assert gen.allocated == 1
    for i in (0, 5, 8, 9):  # one that left early, the one moved across both resizes, the two that joined late
        assert out[sids[i]] == alone(model, (reqs + late)[i]), (reqs + late)[i].plan


def test_a_batch_that_empties_and_refills_at_once_keeps_its_rows(model):
    gen = BatchGenerator(model, max_batch=4, capacity=16, cuda_graphs=False, shrink_patience=2)
    reqs = [SequenceRequest([i + 1, i + 2], max_tokens=2) for i in range(4)]
    first = gen.generate(reqs)
    assert gen.allocated == 4  # one sparse step (the last) is within the patience
    assert gen.generate(reqs) == first
    gen.add(SequenceRequest([1, 2], max_tokens=6))
    for _ in range(3):
        gen.step()
        assert gen.allocated == 4 or _ == 2  # the third step with 1 of 4 rows live exceeds the patience
    assert gen.allocated == 2


def test_a_sequence_stops_at_its_own_stop_token(model):
    reqs = requests()[:3]
    reference = alone(model, reqs[1])
    stop = reference[2]
    reqs[1].stop_token_ids = {stop}
    reqs[1].max_tokens = 20
    got = generate_batch(model, reqs, cuda_graphs=False)
    assert got[1] == reference[:reference.index(stop) + 1]
    assert got[0] == alone(model, reqs[0]) and got[2] == alone(model, reqs[2])


def test_saved_row_continues_a_longer_prompt_exactly(model):
    first = SequenceRequest(list(range(10, 30)), max_tokens=6, plan="attention", keep_state=True)
    gen = BatchGenerator(model, max_batch=2, capacity=128, cuda_graphs=False)
    sid = gen.add(first)
    tokens = []
    while gen.active:
        tokens += [e.token for e in gen.step()]
    follow = first.prompt_ids + tokens[:-1] + [tokens[-1], 40, 41, 42]  # the next turn extends everything fed
    second = SequenceRequest(follow, max_tokens=5, plan="last:4")
    sid = gen.add(second, reuse=True)
    assert gen.state_of(sid).reused_tokens == len(first.prompt_ids) + len(tokens) - 1
    again = []
    while gen.active:
        again += [e.token for e in gen.step()]
    assert again == alone(model, second)


def test_bad_requests_are_refused_with_the_argument_named(model):
    gen = BatchGenerator(model, max_batch=1, capacity=16, cuda_graphs=False)
    with pytest.raises(ValueError, match="prompt"):
        gen.add(SequenceRequest([], max_tokens=2))
    with pytest.raises(ValueError, match="context"):
        gen.add(SequenceRequest(list(range(10)), max_tokens=10))
    with pytest.raises(ValueError, match="max_tokens"):
        gen.add(SequenceRequest([1], max_tokens=0))
    gen.add(SequenceRequest([1], max_tokens=2))
    with pytest.raises(RuntimeError, match="every row"):
        gen.add(SequenceRequest([1], max_tokens=2))


# ----- run-ahead: the next step launched before the previous step's picks are read back -----
def stop_at(tokens: list[int], index: int) -> set[int]:
    """A stop id that ends `tokens` at `index`, or at the first token after it not seen before (the tiny greedy
    model repeats a token throughout, and so stops at its first)."""
    return {next((t for i, t in enumerate(tokens) if i >= index and t not in tokens[:i]), tokens[index])}


def stopping_traffic(model) -> list[SequenceRequest]:
    """requests() run longer, three of them (greedy and sampled) with a stop token taken from their own tokens, so
    that it fires mid-sequence, while steps run ahead."""
    reqs = requests()
    for r in reqs:
        r.max_tokens += 6
    reference = generate_batch(model, reqs, max_batch=4, cuda_graphs=False)
    for i in (1, 3, 6):
        reqs[i].stop_token_ids = stop_at(reference[i], 4)
    return reqs


def run_ahead_pair(model, graphs: bool = False, **kwargs) -> tuple[BatchGenerator, BatchGenerator]:
    """(synchronous, run-ahead) generators alike in all else; `graphs`: their CUDA-graph path on the CPU
    (power-of-two buckets with padding rows, a graph's outputs rewritten by each replay)."""
    pair = tuple(BatchGenerator(model, cuda_graphs=False, run_ahead=ahead, **kwargs) for ahead in (False, True))
    return tuple(graphed_on_cpu(gen) for gen in pair) if graphs else pair


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphed"])
def test_run_ahead_gives_the_synchronous_tokens(model, graphs):
    reqs = stopping_traffic(model)
    sync, ahead = run_ahead_pair(model, graphs, max_batch=4, capacity=64)
    wasted = []  # sequences that stopped while a step ran ahead for them
    finish = ahead._finish

    def spy(seq):
        if ahead.flight is not None and any(s is seq for s in ahead.flight.seqs):
            wasted.append(seq.sid)
        finish(seq)
    ahead._finish = spy
    expected = sync.generate(reqs)  # 9 sequences through 4 rows: joins and leaves
    assert ahead.generate(reqs) == expected
    assert sync.ran_ahead == 0 and ahead.ran_ahead > 0 and wasted
    assert any(got[-1] in r.stop_token_ids and len(got) < r.max_tokens for r, got in zip(reqs, expected))
    if not graphs:
        for r, got in zip(reqs, expected):
            assert got == alone(model, r), r.plan


@pytest.mark.parametrize("stops", [False, True], ids=["cannot_stop", "may_stop"])
def test_run_ahead_saves_and_continues_the_synchronous_rows(model, stops):
    """Steps run ahead while a row to be saved is live. One that cannot stop is saved as the synchronous
    generator saves it; one that stops while the next step runs ahead has fed its stop token there, and its
    saved row holds it too: the next turn, whose prompt repeats it, reuses one token more and gets the same
    tokens."""
    chat = SequenceRequest(list(range(10, 30)), max_tokens=9, plan="A:0-24,R:24-", temperature=0.9, seed=4,
                           keep_state=True)
    others = [SequenceRequest([5, 6, 7], 14, "recurrent", temperature=0.9, top_p=0.9, seed=2),
              SequenceRequest([9] * 4, 12, "every:2:4")]
    if stops:
        chat.stop_token_ids = stop_at(alone(model, chat), 5)
    runs, ahead_at_save = [], []
    for gen in run_ahead_pair(model, max_batch=4, capacity=128):
        save = gen._save
        gen._save = lambda row, ids, gen=gen, save=save: ahead_at_save.append(gen.ran_ahead) or save(row, ids)
        first = gen.generate([chat] + others)
        saved = [(s.ids, [t.clone() for t in s.tensors]) for s in gen.saved.values()]
        follow = SequenceRequest(chat.prompt_ids + first[0] + [40, 41, 42], max_tokens=7, plan="last:4",
                                 keep_state=True)
        sids = [gen.add(follow, reuse=True)] + gen.add_many(others)
        reused = gen.state_of(sids[0]).reused_tokens
        second = {sid: [] for sid in sids}
        while gen.active:
            for event in gen.step():
                second[event.sequence].append(event.token)
        runs.append((first, saved, reused, list(second.values()), list(gen.saved.values()), gen.ran_ahead))
    (first_s, saved_s, reused_s, second_s, again_s, _), (first_a, saved_a, reused_a, second_a, again_a, ran) = runs
    assert first_a == first_s and second_a == second_s and reused_s > len(chat.prompt_ids)
    assert (len(first_s[0]) < chat.max_tokens) == stops  # the stop fired before the length did
    # saves: the synchronous generator's two turns, then the run-ahead one's; steps ran ahead in its first turn
    assert ran > 0 and ahead_at_save[2] > 0
    assert len(again_a) == len(again_s) == 1  # the continued row was taken out, then saved again
    pairs = list(zip(saved_s + [(s.ids, s.tensors) for s in again_s], saved_a + [(s.ids, s.tensors) for s in again_a]))
    if stops:  # the stop token fed ahead: saved, and reused by the next turn
        (ids_s, _), (ids_a, _) = pairs[0]
        assert ids_a == ids_s + [first_s[0][-1]] and first_s[0][-1] in chat.stop_token_ids
        assert reused_a == reused_s + 1
        pairs = pairs[1:]  # the second turn's rows: the same tokens, reached through one reused token more
        for (ids_s, tensors_s), (ids_a, tensors_a) in pairs:
            assert ids_a == ids_s
            assert all(torch.allclose(a, s, atol=1e-4, rtol=1e-4) for a, s in zip(tensors_a, tensors_s))
        return
    assert reused_a == reused_s
    for (ids_s, tensors_s), (ids_a, tensors_a) in pairs:
        assert ids_a == ids_s
        assert all(torch.equal(a, s) for a, s in zip(tensors_a, tensors_s))


def drive(gen: BatchGenerator) -> list:
    """What a server sees: every step()'s events, with requests joining and sequences cancelled between steps
    (one right after its event came, as a stop string ends it), and now and then the live sequences' state."""
    waiting, log, live = stopping_traffic(gen.model), [], set()
    t = 0
    while waiting or gen.active:
        if t % 3 == 0 and gen.free and waiting:  # one by add, the rest by add_many
            live.add(gen.add(waiting.pop(0)))
            joining, waiting = waiting[:min(2, gen.free)], waiting[min(2, gen.free):]
            live.update(gen.add_many(joining))
        if t in (4, 9) and live:
            gen.cancel(min(live))
            live.discard(min(live))
        if t % 5 == 2:
            log.append([(sid, list(gen.state_of(sid).fed), gen.state_of(sid).pending) for sid in sorted(live)])
        events = gen.step()
        log.append([(e.sequence, e.token, e.finish_reason) for e in events])
        for e in events:
            if e.finish_reason:
                live.discard(e.sequence)
            elif t == 7 and e.sequence == max(live):
                gen.cancel(e.sequence)
                live.discard(e.sequence)
        t += 1
    return log


def test_run_ahead_with_joins_and_cancels_between_steps_gives_the_synchronous_events(model):
    sync, ahead = run_ahead_pair(model, max_batch=4, capacity=64)
    assert drive(ahead) == drive(sync)
    assert ahead.ran_ahead > 0 and not ahead.flight


@pytest.fixture(scope="module", params=["gdn", "mamba2"])
def cuda_model(request):
    if not torch.cuda.is_available():
        pytest.skip("gpu: no CUDA device")
    torch.manual_seed(0)
    cfg = preset("tiny", mixer=request.param, head_dim=32)  # the Triton kernels take heads of 16 to 256
    return OryxModel(cfg, seed=1).to("cuda").eval()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_buckets_give_the_eager_tokens(cuda_model, dtype):
    model = copy.deepcopy(cuda_model).to(dtype)
    reqs = requests()
    eager = generate_batch(model, reqs, max_batch=8, cuda_graphs=False)
    gen = BatchGenerator(model, max_batch=8, capacity=64, cuda_graphs=True)
    graphed = gen.generate(reqs)  # buckets 8, 4, 2, 1 as rows leave, then grow again as later requests join
    assert graphed == eager
    assert gen.graphs, "no CUDA graph was captured"
    assert gen.generate(reqs) == eager  # the captured graphs replayed for a second batch


@pytest.mark.gpu
def test_cuda_graph_batch_gives_one_at_a_time_tokens(cuda_model):
    reqs = [r for r in requests() if r.temperature == 0]  # greedy: kernels that differ in rounding pick alike
    graphed = generate_batch(cuda_model, reqs, max_batch=4, cuda_graphs=True)
    for r, got in zip(reqs, graphed):
        assert got == alone(cuda_model, r), r.plan


@pytest.mark.gpu
@pytest.mark.parametrize("prefill", ["padded", "segmented"])
def test_prompts_prefilled_together_on_cuda_give_each_prompt_alone(cuda_model, prefill):
    g = torch.Generator().manual_seed(5)
    lengths = [70, 3, 130, 70, 1, 33]  # longer than one kernel chunk (64), so the chunked kernels run
    reqs = [SequenceRequest(torch.randint(0, 256, (n,), generator=g).tolist(), max_tokens=4, plan=p)
            for n, p in zip(lengths, ["attention", "recurrent", "prefill-attention", "A:0-40,R:40-", "last:50%",
                                      "every:2:3"])]
    alone_, together, _, _ = prefill_alone_and_together(cuda_model, reqs, capacity=160, prefill=prefill)
    # the chunked kernels may multiply in TF32, and the prompts split into different chunks alone and together;
    # padding that leaked into a state or window would move it by far more than this
    for (logits_a, state_a, token_a), (logits_t, state_t, token_t) in zip(alone_, together):
        torch.testing.assert_close(logits_t, logits_a, rtol=1e-2, atol=1e-2)
        for a, t in zip(state_a, state_t):
            torch.testing.assert_close(t, a, rtol=1e-2, atol=1e-2)
        assert token_t == token_a


@pytest.mark.gpu
def test_cuda_run_ahead_gives_the_synchronous_tokens(cuda_model):
    """The pinned copies, events and graph replays of steps run ahead on the device give the synchronous tokens."""
    reqs = stopping_traffic(cuda_model)
    sync, ahead = (BatchGenerator(cuda_model, max_batch=4, capacity=64, run_ahead=flag) for flag in (False, True))
    expected = sync.generate(reqs)
    assert ahead.generate(reqs) == expected and ahead.generate(reqs) == expected  # the second replays the graphs
    assert ahead.ran_ahead > 0 and ahead.graphs
    assert drive(ahead) == drive(sync)
