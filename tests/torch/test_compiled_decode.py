"""The torch.compile'd decode step (oryx_torch.generate.DecodeRunner with compiled=True, the default on CUDA):
one graph without breaks, the greedy tokens of the eager step and of the float64 reference, tokens fed back
on the device equal to tokens fed from the host; the CUDA path (the Triton decode step as a custom op inside
the compiled graph) through Triton's interpreter, and on a GPU with CUDA graphs.

On the CPU the graph runs through `aot_eager` (what dynamo and AOTAutograd captured, run by eager kernels) to
stay fast; inductor's generated code is the slow test.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from oryx_core.config import preset
from oryx_core.plan import ModePlan
from oryx_core.reference import OryxReference
from oryx_torch.generate import DecodeRunner, decode_inputs, frozen_projections, layer_step, logits_and_pick
from oryx_torch.model import OryxModel
from model_params import lively_params
from triton_interpreter import INTERPRETED, needs_interpreter

B, PROMPT, STEPS = 2, 5, 8
# row 1 decodes in the opposite mode of row 0 (plan_modes), so these two cover every switch
PLANS = ("A:0-7,R:7-10,A:10-", "prefill-attention")
on_host = pytest.mark.skipif(INTERPRETED, reason="runs outside the interpreter subprocess")


def build(mixer, head_dim=None, device="cpu", dtype=torch.float32, seed=5):
    cfg = preset("tiny", mixer)
    if head_dim:  # the Triton kernels take heads of 16 to 256
        cfg = cfg.replace(head_dim=head_dim, value_head_dim=head_dim)
    params = lively_params(cfg, seed)
    model = OryxModel(cfg, seed=None)
    model.load_params(params)
    return model.to(device, dtype).eval(), OryxReference(cfg, params)


def plan_modes(plan: str) -> np.ndarray:
    """[B, PROMPT + STEPS] modes: row 0 under `plan`, row 1 its opposite from the prompt on (both modes decode)."""
    modes = ModePlan.parse(plan).resolve(PROMPT + STEPS, prompt_length=PROMPT)
    other = modes.copy()
    other[PROMPT:] = ~modes[PROMPT:]
    return np.stack([modes, other])


@torch.no_grad()
def greedy_tokens(model, modes: np.ndarray, feed_on_device=False, capacity=PROMPT + STEPS + 4,
                  **runner_args) -> tuple[np.ndarray, np.ndarray]:
    """([B, STEPS] greedy tokens, [B, PROMPT] prompt): a fixed prompt, then each step under its column of `modes`."""
    prompt = torch.tensor(np.random.default_rng(7).integers(0, model.cfg.vocab_size, (B, PROMPT)))
    cache = model.make_cache(B, capacity)
    token = model(prompt.to(model.device), torch.tensor(modes[:, :PROMPT]), cache=cache)[:, -1].argmax(-1).cpu()
    runner = DecodeRunner(model, cache, **runner_args)
    out = [token]
    for i in range(STEPS - 1):
        picked = runner.greedy_step(None if feed_on_device and i else token, modes[:, PROMPT + i])
        token = picked.cpu()
        out.append(token)
    return torch.stack(out, 1).numpy(), prompt.numpy()


def reference_greedy(ref: OryxReference, prompt: np.ndarray, tokens: np.ndarray, modes: np.ndarray) -> np.ndarray:
    """The float64 reference's argmax after the prompt and each generated token (teacher-forced)."""
    sequence = np.concatenate([prompt, tokens[:, :-1]], axis=1)
    logits = ref.forward(sequence, modes[:, :sequence.shape[1]])[0]
    return logits[:, PROMPT - 1:].argmax(-1)


@on_host
@pytest.mark.parametrize("attend", [True, False])
def test_compiled_parts_are_one_graph_each(attend):
    """The three compiled parts of a step (inputs, a layer's step, logits and pick) trace without breaks."""
    model, _ = build("gdn")
    cache = model.make_cache(B, 16)
    tokens = torch.tensor([3, 4])
    x = torch.randn(B, model.cfg.d_model)
    rope = model._rope(cache.position[:1])
    calls = [(decode_inputs, (model, tokens, cache)),
             (layer_step, (model.layers[0], x, torch.tensor([attend, False]), rope, cache.layers[0], cache.position,
                           attend)),
             (logits_and_pick, (model, x, tokens, cache, attend))]
    for fn, args in calls:
        torch._dynamo.reset()
        with torch.no_grad(), frozen_projections(model):
            report = torch._dynamo.explain(fn)(*args)
        assert report.graph_break_count == 0, (fn.__name__, [b.reason for b in report.break_reasons])
        assert report.graph_count == 1, fn.__name__


@on_host
@pytest.mark.parametrize("mixer", ["gdn", pytest.param("mamba2", marks=pytest.mark.slow)])
def test_compiled_greedy_equals_eager_and_reference(mixer):
    """Also: one compilation per part (inputs, layer step, logits; some row attends at every step: one variant)
    serves every layer and both cache capacities, rather than one per layer or capacity."""
    from torch._dynamo.utils import counters

    model, ref = build(mixer)
    assert model.cfg.n_layers > 1
    torch._dynamo.reset()
    counters.clear()
    for plan in PLANS:
        modes = plan_modes(plan)
        eager, prompt = greedy_tokens(model, modes, compiled=False)
        compiled, _ = greedy_tokens(model, modes, compiled=True, compile_backend="aot_eager",
                                    capacity=PROMPT + STEPS + 4 + len(plan))
        fed, _ = greedy_tokens(model, modes, feed_on_device=True, compiled=True, compile_backend="aot_eager")
        np.testing.assert_array_equal(compiled, eager, err_msg=plan)
        np.testing.assert_array_equal(fed, eager, err_msg=plan)
        np.testing.assert_array_equal(eager, reference_greedy(ref, prompt, eager, modes), err_msg=plan)
        assert len(set(eager.ravel().tolist())) > 3, plan  # the test can tell tokens apart
    assert counters["stats"]["unique_graphs"] == 3


@on_host
def test_compiled_step_reads_current_weights():
    """The projections' concatenation the compiled step reads is rebuilt when the weights change between runners."""
    model, _ = build("gdn")
    other, other_ref = build("gdn", seed=6)
    modes = plan_modes("A:0-7,R:7-10,A:10-")
    torch._dynamo.reset()
    before, _ = greedy_tokens(model, modes, compiled=True, compile_backend="aot_eager")
    model.load_params(other.params_numpy())
    after, prompt = greedy_tokens(model, modes, compiled=True, compile_backend="aot_eager")
    assert (after != before).any()
    np.testing.assert_array_equal(after, reference_greedy(other_ref, prompt, after, modes))


@on_host
def test_compiled_step_starts_afresh_for_another_dtype(monkeypatch):
    """The compiled parts are dropped (one dynamo reset) when the model they last ran for changes dtype, not
    before and not again while it stays; the step after the change gives the eager step's tokens in float64."""
    from oryx_torch import generate

    model, ref = build("gdn")
    modes = plan_modes("A:0-7,R:7-10,A:10-")
    torch._dynamo.reset()
    generate._COMPILED_FOR.clear()
    resets = []
    reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1) or reset())
    greedy_tokens(model, modes, compiled=True, compile_backend="aot_eager")
    greedy_tokens(model, modes, compiled=True, compile_backend="aot_eager")
    assert resets == []
    model = model.to(torch.float64)
    compiled, prompt = greedy_tokens(model, modes, compiled=True, compile_backend="aot_eager")
    assert resets == [1]
    eager, _ = greedy_tokens(model, modes, compiled=False)
    np.testing.assert_array_equal(compiled, eager)
    np.testing.assert_array_equal(eager, reference_greedy(ref, prompt, eager, modes))
    greedy_tokens(model, modes, compiled=True, compile_backend="aot_eager")
    assert resets == [1]


@on_host
@pytest.mark.slow
def test_inductor_greedy_equals_eager():
    model, _ = build("gdn")
    torch._dynamo.reset()
    modes = plan_modes("A:0-7,R:7-10,A:10-")
    np.testing.assert_array_equal(greedy_tokens(model, modes, compiled=True)[0],
                                  greedy_tokens(model, modes, compiled=False)[0])


@on_host
def test_in_interpreter_subprocess():
    """Runs the interpreter test below in a subprocess with TRITON_INTERPRET=1 (set before triton is imported)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                             "custom_op_step"], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"\b1 passed\b", result.stdout), result.stdout[-2000:]


@needs_interpreter
def test_custom_op_step_compiled_equals_eager():
    """Under the interpreter the model takes the CUDA path: the fused Triton decode step (a custom op that writes
    the state and the KV cache) inside the compiled graph."""
    model, ref = build("gdn", head_dim=16)
    torch._dynamo.reset()
    modes = plan_modes("A:0-7,R:7-10,A:10-")
    eager, prompt = greedy_tokens(model, modes, compiled=False)
    compiled, _ = greedy_tokens(model, modes, compiled=True, compile_backend="aot_eager")
    np.testing.assert_array_equal(compiled, eager)
    np.testing.assert_array_equal(eager, reference_greedy(ref, prompt, eager, modes))


@pytest.mark.gpu
@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_cuda_compiled_graphs_equal_eager(mixer):
    """On CUDA, inductor's step captured in a CUDA graph gives the eager step's greedy tokens in fp32, fed from
    the host or on the device; in bf16 the logits stay within bf16 rounding of the eager ones."""
    model, ref = build(mixer, head_dim=32, device="cuda")
    torch._dynamo.reset()
    for plan in PLANS:
        modes = plan_modes(plan)
        eager, prompt = greedy_tokens(model, modes, compiled=False, cuda_graphs=False)
        for feed in (False, True):
            got, _ = greedy_tokens(model, modes, feed_on_device=feed, compiled=True)
            np.testing.assert_array_equal(got, eager, err_msg=f"{plan} fed on device: {feed}")
        np.testing.assert_array_equal(eager, reference_greedy(ref, prompt, eager, modes), err_msg=plan)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        logits = {}
        for compiled in (False, True):
            cache = model.make_cache(B, 32)
            prompt = torch.arange(B * PROMPT, device="cuda").view(B, PROMPT) % model.cfg.vocab_size
            token = model(prompt, True, cache=cache)[:, -1].argmax(-1).cpu()
            runner = DecodeRunner(model, cache, compiled=compiled)
            logits[compiled] = torch.stack([runner.step(token, [True, False][i % 2]).float().clone()
                                            for i in range(6)])
        error = (logits[True] - logits[False]).norm() / logits[False].norm()
        assert error < 2e-2, float(error)


def batch_requests():
    from oryx_torch.batch import SequenceRequest

    plans = ["attention", "recurrent", "prefill-attention", "A:0-5,R:5-8,A:8-"]
    return [SequenceRequest(list(range(3 + i, 9 + 2 * i)), max_tokens=3 + 2 * i, plan=p, seed=i,
                            temperature=0.8 if i % 2 else 0.0, top_k=20 * (i == 3), top_p=0.9)
            for i, p in enumerate(plans)]  # rows 1 and 3 sampled inside the step


@on_host
def test_batch_generator_compiled_equals_eager():
    """Batched decoding (rows leaving as their sequences end: batches 4, 3, 2, 1) through the compiled step."""
    from oryx_torch.batch import BatchGenerator

    model, _ = build("gdn")
    torch._dynamo.reset()
    eager = BatchGenerator(model, max_batch=4, capacity=40, compiled=False).generate(batch_requests())
    compiled = BatchGenerator(model, max_batch=4, capacity=40, compiled=True,
                              compile_backend="aot_eager").generate(batch_requests())
    assert compiled == eager
    assert len({t for tokens in eager for t in tokens}) > 3


@pytest.mark.gpu
def test_cuda_batch_generator_compiled_graphs_equal_eager():
    from oryx_torch.batch import BatchGenerator

    model, _ = build("gdn", head_dim=32, device="cuda")
    torch._dynamo.reset()
    eager = BatchGenerator(model, max_batch=4, capacity=40, cuda_graphs=False, compiled=False)
    graphed = BatchGenerator(model, max_batch=4, capacity=40, cuda_graphs=True, compiled=True)
    want = eager.generate(batch_requests())
    assert graphed.generate(batch_requests()) == want
    assert graphed.graphs and graphed.generate(batch_requests()) == want  # replayed
