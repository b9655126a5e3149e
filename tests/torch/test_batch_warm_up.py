"""BatchGenerator.warm_up: after it, traffic captures no graph, resizes no cache and compiles nothing."""
from __future__ import annotations

import pytest
import torch

from oryx_core.config import preset
from oryx_torch.batch import BatchGenerator, SequenceRequest, generate_batch
from oryx_torch.model import OryxModel


@pytest.fixture(scope="module", params=["gdn", "mamba2"])
def model(request):
    torch.manual_seed(0)
    return OryxModel(preset("tiny", mixer=request.param), seed=1).eval()


class ReplayedStep:
    """Stands in for a CUDA graph on the CPU: a replay reruns the step into the captured outputs. The capture
    itself ran the step once, which the first replay (the one right after capture) stands for."""

    def __init__(self, step, out):
        self.step, self.out, self.replays = step, out, 0

    def replay(self):
        self.replays += 1
        if self.replays > 1:
            for held, new in zip(self.out, self.step()):
                if held is not None:
                    held.copy_(new)


def graphed_on_cpu(gen: BatchGenerator) -> BatchGenerator:
    """`gen` taking its CUDA-graph path on the CPU, each capture a ReplayedStep."""
    def capture(step):
        out = step()
        return ReplayedStep(step, out), out
    gen.use_graphs = True
    gen._capture = capture
    return gen


def traffic(seed: int = 3) -> list[SequenceRequest]:
    """Requests of 1 to 33 tokens under every kind of plan, greedy and sampled, long and short."""
    g = torch.Generator().manual_seed(seed)
    plans = ["attention", "recurrent", "prefill-attention", "A:0-3,R:3-9,A:9-", "last:50%", "every:2:4"]
    lengths = [1, 5, 12, 3, 20, 7, 33, 2]
    return [SequenceRequest(torch.randint(0, 256, (n,), generator=g).tolist(), max_tokens=2 + 2 * (i % 3),
                            plan=plans[i % len(plans)], temperature=0.0 if i % 3 else 0.9, top_p=0.9, seed=i)
            for i, n in enumerate(lengths)]


def counts(gen: BatchGenerator) -> tuple[int, int]:
    return gen.captures, gen.resizes


def test_after_warm_up_traffic_captures_and_resizes_nothing_and_gets_the_eager_tokens(model):
    if model.cfg.mixer != "gdn":
        pytest.skip("the rows, buckets and graphs do not depend on the mixer; the gpu test runs both")
    reqs = traffic()
    eager = generate_batch(model, reqs, max_batch=4, capacity=64, cuda_graphs=False)
    gen = graphed_on_cpu(BatchGenerator(model, max_batch=4, capacity=64, cuda_graphs=False))
    info = gen.warm_up(prompt_lengths=(1, 17))  # the CPU compiles no prefill kernels; two lengths keep it short
    assert info["buckets"] == [1, 2, 4]
    # every bucket, greedy and sampled: attention off, on, and on with the recurrent state left alone
    assert info["captures"] == 3 * 3 * 2
    assert gen.allocated == 4 and not gen.rows and not gen.saved
    before = counts(gen)
    assert gen.generate(reqs) == eager  # 8 sequences through 4 rows: buckets 4, 2, 1 and back up
    assert gen.ran_ahead > 0  # steps run ahead replay the graphs the warm-up captured
    # a chat's next turn continues a saved row; a cancelled sequence leaves
    first = gen.add(SequenceRequest([5, 6, 7], 2, "attention", keep_state=True))
    while gen.active:
        gen.step()
    history = next(iter(gen.saved.values())).ids  # the prompt and the first token
    nxt = gen.add(SequenceRequest(history + [9, 10, 11], 4, "R:0-4,A:4-"), reuse=True)
    assert gen.state_of(nxt).reused_tokens == 4 and first != nxt
    gen.cancel(nxt)
    assert counts(gen) == before, "a request paid a graph capture or a cache resize after warm_up"


def test_without_warm_up_the_same_traffic_captures_and_resizes(model):
    """What the warm-up spares: the counters see the captures and resizes of a generator that grows as it goes."""
    gen = graphed_on_cpu(BatchGenerator(model, max_batch=4, capacity=64, cuda_graphs=False, shrink_patience=2))
    before = counts(gen)
    gen.generate(traffic())
    captures, resizes = counts(gen)
    assert captures > before[0] and resizes > before[1]


def test_padded_prompts_all_in_attention_run_one_all_attention_forward(model):
    """Padding takes its row's last prompt mode, so prompts read in attention stay an all-attention forward
    (dense causal attention on CUDA, not the mixed-plan path) and their tokens are unchanged."""
    reqs = [SequenceRequest(list(range(3, 3 + n)), 4, "prefill-attention") for n in (9, 4, 6)]
    seen = []
    original = model.forward

    def spy(tokens, modes, *args, **kwargs):
        seen.append(torch.as_tensor(modes).clone())
        return original(tokens, modes, *args, **kwargs)

    gen = BatchGenerator(model, max_batch=3, capacity=32, cuda_graphs=False, prefill="padded")
    model.forward = spy
    try:
        gen.add_many(reqs)
    finally:
        del model.forward
    assert len(seen) == 1 and seen[0].shape == (3, 9) and bool(seen[0].all())
    while gen.active:
        gen.step()
    alone = [generate_batch(model, [r], cuda_graphs=False)[0] for r in reqs]
    assert generate_batch(model, reqs, cuda_graphs=False) == alone


def test_warm_up_needs_an_empty_batch(model):
    gen = BatchGenerator(model, max_batch=2, capacity=16, cuda_graphs=False)
    gen.add(SequenceRequest([1, 2], 2))
    with pytest.raises(RuntimeError, match="empty batch"):
        gen.warm_up()


# ----- CUDA: the real graphs, Triton's kernel compiles and torch.compile's -----
class Compiles:
    """Counts Triton kernel specialisations compiled (or loaded from disk) and torch.compile graphs while open."""

    def __enter__(self):
        from torch._dynamo.utils import counters
        from triton import knobs

        self.triton, self.counters = 0, counters
        self.dynamo_before = counters["stats"]["unique_graphs"]
        self.knobs, self.previous = knobs.runtime, knobs.runtime.jit_cache_hook

        def hook(*args, **kwargs):
            self.triton += 1
            return self.previous(*args, **kwargs) if self.previous else False
        self.knobs.jit_cache_hook = hook
        return self

    def __exit__(self, *exc):
        self.knobs.jit_cache_hook = self.previous
        self.dynamo = self.counters["stats"]["unique_graphs"] - self.dynamo_before


@pytest.mark.gpu
@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_after_warm_up_cuda_traffic_compiles_and_captures_nothing(mixer):
    if not torch.cuda.is_available():
        pytest.skip("gpu: no CUDA device")
    torch.manual_seed(0)
    # fp32: the eager generator decodes n rows where the graphs decode a power of two, and bf16 rounding of the
    # two could pick different tokens at a near-tie
    cuda = OryxModel(preset("tiny", mixer=mixer, head_dim=32), seed=1).to("cuda").eval()
    g = torch.Generator().manual_seed(7)
    reqs = traffic() + [SequenceRequest(torch.randint(0, 256, (n,), generator=g).tolist(), max_tokens=5, plan=p)
                        for n, p in zip([70, 130, 64, 31, 100], ["attention", "prefill-attention", "A:0-40,R:40-",
                                                                 "recurrent", "last:50%"])]
    gen = BatchGenerator(cuda, max_batch=8, capacity=160, run_ahead=True)
    info = gen.warm_up()  # first: anything run before it would compile kernels the traffic below needs
    assert info["captures"] == 4 * 3 * 2  # buckets; attention off, on, on without the state; greedy, sampled
    before = counts(gen)
    with Compiles() as compiled:
        got = gen.generate(reqs)
        gen.cancel(gen.add(SequenceRequest(list(range(128)), 2, "prefill-attention")))  # whole chunks of 64
        gen.add(SequenceRequest(list(range(40)), 2, "attention", keep_state=True))
        while gen.active:
            gen.step()
        history = next(iter(gen.saved.values())).ids  # a chat's next turn: attention at an offset
        continued = gen.add(SequenceRequest(history + list(range(16)), 3, "R:0-41,A:41-"), reuse=True)
        assert gen.state_of(continued).reused_tokens == 41
        gen.cancel(continued)
    assert (compiled.triton, compiled.dynamo) == (0, 0), "a request paid a kernel or torch.compile compilation"
    assert counts(gen) == before and gen.ran_ahead > 0  # steps run ahead replay the graphs the warm-up captured
    assert got == generate_batch(cuda, reqs, max_batch=8, capacity=160, cuda_graphs=False)
