"""Batched generation (oryx_torch.batch): each sequence gets the tokens it gets alone."""
from __future__ import annotations

import pytest
import torch

from oryx_core.config import preset
from oryx_torch.batch import BatchGenerator, SequenceRequest, generate_batch
from oryx_core.generation import stream_generate
from oryx_core.tokenizer import byte_level_tokenizer
from oryx_torch.backend import TorchModel
from oryx_torch.model import OryxModel


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


@pytest.mark.gpu
def test_cuda_graph_buckets_give_the_eager_tokens():
    torch.manual_seed(0)
    model = OryxModel(preset("tiny"), seed=1).to("cuda").eval()
    reqs = requests()
    eager = generate_batch(model, reqs, max_batch=8, cuda_graphs=False)
    graphed = generate_batch(model, reqs, max_batch=8, cuda_graphs=True)  # buckets 8, 4, 2, 1 as rows leave
    assert graphed == eager
