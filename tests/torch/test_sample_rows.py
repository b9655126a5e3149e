"""Sampling on the device, each row under its own settings (oryx_torch.generate.sample_rows): the draws follow
the filtered distribution exactly (stratified uniforms), rows do not affect each other, greedy rows take the
argmax, and it compiles into one graph."""
import numpy as np
import torch

from oryx_torch.generate import sample, sample_rows


def filtered_probs(logits, temperature, top_k, top_p):
    """The distribution sample_rows draws from, in float64 NumPy: temperature, top-k (ties kept), nucleus."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    if 0 < top_k < x.size:
        x = np.where(x < np.sort(x)[::-1][top_k - 1], -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        above = np.cumsum(p[order]) - p[order]
        p[order[above >= top_p]] = 0.0
        p /= p.sum()
    return p


def draws(logits, temperature, top_k, top_p, n=20000):
    """Counts / n of sample_rows over n stratified uniforms (i + 0.5) / n: the quantiles of the distribution."""
    B = n
    rows = torch.tensor(logits, dtype=torch.float32).expand(B, -1)
    tokens = sample_rows(rows, torch.full((B,), temperature), torch.full((B,), top_k), torch.full((B,), top_p),
                         (torch.arange(B, dtype=torch.float64) + 0.5) / B)
    return np.bincount(tokens.numpy(), minlength=len(logits)) / n


def test_draws_follow_the_filtered_distribution():
    logits = [0.3, -1.0, 2.0, 1.5, 0.0, 2.0, -3.0, 1.0]
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8), (0.9, 5, 0.6), (2.0, 1, 1.0)]:
        want = filtered_probs(logits, temperature, top_k, top_p)
        got = draws(logits, temperature, top_k, top_p)
        np.testing.assert_allclose(got, want, atol=2e-4, err_msg=str((temperature, top_k, top_p)))


def test_rows_are_independent_and_greedy_rows_take_the_argmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=gen)
    temperature = torch.tensor([0.0, 1.0, 0.5, 0.0, 2.0])
    top_k = torch.tensor([0, 10, 0, 3, 1])
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.2, 1.0])
    uniform = torch.rand(5, generator=gen, dtype=torch.float64)
    together = sample_rows(logits, temperature, top_k, top_p, uniform)
    alone = torch.cat([sample_rows(logits[i:i + 1], temperature[i:i + 1], top_k[i:i + 1], top_p[i:i + 1],
                                   uniform[i:i + 1]) for i in range(5)])
    assert together.tolist() == alone.tolist()
    assert together[0] == logits[0].argmax() and together[3] == logits[3].argmax()
    assert together[4] == logits[4].argmax()  # top_k 1 leaves only the most likely token


def test_sample_draws_one_uniform_per_row_from_its_generator():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    got = sample(logits, 0.8, 5, 0.9, torch.Generator().manual_seed(7))
    uniform = torch.rand(3, generator=torch.Generator().manual_seed(7))
    want = sample_rows(logits, torch.full((3,), 0.8), torch.full((3,), 5), torch.full((3,), 0.9), uniform)
    assert got.tolist() == want.tolist()


def test_compiles_into_one_graph():
    torch._dynamo.reset()
    args = (torch.randn(4, 30), torch.tensor([0.0, 1.0, 0.7, 1.2]), torch.tensor([0, 5, 0, 2]),
            torch.tensor([1.0, 0.9, 0.5, 1.0]), torch.rand(4))
    report = torch._dynamo.explain(sample_rows)(*args)
    assert report.graph_break_count == 0 and report.graph_count == 1
    compiled = torch.compile(sample_rows, fullgraph=True, backend="aot_eager")
    assert compiled(*args).tolist() == sample_rows(*args).tolist()
