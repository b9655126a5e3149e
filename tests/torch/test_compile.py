"""torch.compile of the PyTorch model: no graph breaks in any plan, compiled output and gradients equal eager.

On CPU the pure-torch twins of the kernels run; plans come either as mode tensors (a "traced" plan: one
graph for every plan) or from `OryxModel.prepare` (checked once outside, specialised to the plan's flags).
"""
import numpy as np
import pytest
import torch
import torch._dynamo

from oryx_core.config import preset
from oryx_core.reference import OryxReference
from oryx_torch.model import OryxModel
from model_params import lively_params
from error_metrics import relative_error

B, T = 2, 140  # three 64-token chunks, the last one partial


def build(mixer, seed=3):
    cfg = preset("tiny", mixer)
    params = lively_params(cfg, seed)
    model = OryxModel(cfg, seed=None)
    model.load_params(params)
    return model.eval(), OryxReference(cfg, params)


def plans(rng):
    chunks = -(-T // 64)
    mixed = np.repeat(rng.random((B, chunks)) < 0.5, 64, axis=1)[:, :T]
    mixed[0, :64], mixed[1, 64:128] = True, False  # both modes in every sequence, switches at chunk edges
    mixed[0, 100:103] = True                        # and inside a chunk
    return {"attention": np.ones((B, T), bool), "recurrent": np.zeros((B, T), bool), "mixed": mixed}


def test_no_graph_breaks():
    """Mode tensors trace one plan-independent graph (shown on the mixed plan); prepared plans one per plan."""
    model, _ = build("gdn")
    rng = np.random.default_rng(0)
    tokens = torch.tensor(rng.integers(0, model.cfg.vocab_size, (B, T)))
    cases = [(f"{name} prepared", model.prepare(tokens, torch.tensor(modes))) for name, modes in plans(rng).items()]
    cases.append(("mixed as a tensor", (tokens, torch.tensor(plans(rng)["mixed"]))))
    for name, args in cases:
        torch._dynamo.reset()
        report = torch._dynamo.explain(model)(*args)
        assert report.graph_break_count == 0, (name, [b.reason for b in report.break_reasons])
        assert report.graph_count == 1, name


@pytest.mark.parametrize("mixer", ["gdn", pytest.param("mamba2", marks=pytest.mark.slow)])
def test_compiled_matches_eager_and_reference(mixer):
    """aot_eager runs the graph dynamo captured (with its traced plans) through AOTAutograd, forward and
    backward; output against eager and the float64 reference, gradients against eager."""
    model, ref = build(mixer)
    rng = np.random.default_rng(1)
    tokens = torch.tensor(rng.integers(0, model.cfg.vocab_size, (B, T)))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    # every plan through the one traced graph; the mixed one also prepared (each prepared plan is a graph)
    for name, modes in plans(rng).items() if mixer == "gdn" else [("mixed", plans(rng)["mixed"])]:
        eager = model(tokens, torch.tensor(modes))
        eager_grads = torch.autograd.grad(eager.square().mean(), list(model.parameters()), allow_unused=True)
        forms = [(tokens, torch.tensor(modes))]
        if name == "mixed":
            forms.append(model.prepare(tokens, torch.tensor(modes)))
        for args in forms:
            got = compiled(*args)
            assert relative_error(got, eager) < 1e-5, name
            assert relative_error(got, ref.forward(tokens.numpy(), modes)[0]) < 1e-4, name
            grads = torch.autograd.grad(got.square().mean(), list(model.parameters()), allow_unused=True)
            for (pname, _), g, want in zip(model.named_parameters(), grads, eager_grads):
                if want is None or not want.abs().max():
                    assert g is None or not g.abs().max(), (name, pname)  # unused by this plan in eager
                else:
                    assert relative_error(g, want) < 1e-4, (name, pname)


@pytest.mark.slow
def test_inductor_matches_eager():
    """Inductor's generated CPU code for the mixed plan equals eager (worst element and norm)."""
    model, _ = build("gdn")
    rng = np.random.default_rng(2)
    tokens = torch.tensor(rng.integers(0, model.cfg.vocab_size, (B, T)))
    modes = torch.tensor(plans(rng)["mixed"])
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert relative_error(compiled(*model.prepare(tokens, modes)), model(tokens, modes)) < 1e-5
        assert relative_error(compiled(tokens, modes), model(tokens, modes)) < 1e-5


def test_prepared_plans_are_checked():
    model, _ = build("gdn")
    tokens = torch.zeros(2, 8, dtype=torch.long)
    _, layer_plans = model.prepare(tokens, torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="modes: a plan for shape"):
        model(torch.zeros(2, 9, dtype=torch.long), layer_plans)
    with pytest.raises(ValueError, match="plans for"):
        model(tokens, layer_plans[:1])
    with pytest.raises(ValueError, match="tokens: id 999999"):
        model.prepare(torch.full((2, 8), 999999), torch.ones(2, 8, dtype=torch.bool))


@pytest.mark.parametrize("mixer", ["gdn", pytest.param("mamba2", marks=pytest.mark.slow)])
def test_fused_projections_match_separate_ones(mixer):
    """One matmul over the concatenated input projections == one per projection: outputs against the float64
    reference in every plan, gradients against the separate form; the inference copy follows new weights."""
    from oryx_torch.model import OryxMixer

    model, ref = build(mixer)
    rng = np.random.default_rng(3)
    tokens = torch.tensor(rng.integers(0, model.cfg.vocab_size, (B, T)))
    for name, modes in plans(rng).items():
        results = {}
        for fused in (True, False):
            OryxMixer.fuse_projections = fused
            try:
                logits = model(tokens, torch.tensor(modes))
                grads = torch.autograd.grad(logits.square().mean(), list(model.parameters()), allow_unused=True)
                with torch.no_grad():
                    inference = model(tokens, torch.tensor(modes))
            finally:
                OryxMixer.fuse_projections = True
            results[fused] = (logits, grads, inference)
        want = ref.forward(tokens.numpy(), modes)[0]
        assert relative_error(results[True][0], want) < 1e-4, name
        assert relative_error(results[True][2], want) < 1e-4, name
        for pname, got, sep in zip(dict(model.named_parameters()), results[True][1], results[False][1]):
            if sep is None:
                assert got is None, (name, pname)
            else:
                assert relative_error(got, sep) < 1e-4, (name, pname)  # fp32 sums in another order
    # new weights in place: the cached concatenation must follow them
    other, other_ref = build(mixer, seed=4)
    model.load_params(other.params_numpy())
    modes = plans(rng)["mixed"]
    with torch.no_grad():
        assert relative_error(model(tokens, torch.tensor(modes)), ref.forward(tokens.numpy(), modes)[0]) > 1e-2
        assert relative_error(model(tokens, torch.tensor(modes)), other_ref.forward(tokens.numpy(), modes)[0]) < 1e-4
