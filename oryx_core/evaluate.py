"""Perplexity of a text under a mode plan, on any backend (oryx_core.backend).

`backend_loader(name)(path)` gives `logits_fn(tokens int64 [B, T], modes bool [T] or [B, T]) ->
logits [B, T, V]`, the backend's stateless forward in the dtype BACKENDS names for scoring.
"""
from __future__ import annotations

import numpy as np

from .backend import BACKENDS, get_backend
from .plan import ModePlan
from .tokenizer import tokenizer_for
from .weights import read_config


def backend_loader(name: str):
    """path -> logits_fn of the named backend (one-line errors for an unknown or uninstalled one)."""
    backend = get_backend(name)

    def load(path):
        model = backend.load(path, dtype=BACKENDS[name].score_dtype)

        def logits_fn(tokens, modes):
            tokens = np.asarray(tokens, dtype=np.int64)
            return model.forward(tokens, np.broadcast_to(np.asarray(modes, dtype=bool), tokens.shape))

        return logits_fn

    return load


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def sequence_nll(logits_fn, tokens: np.ndarray, plan: ModePlan, window: int) -> tuple[float, int]:
    """Summed negative log-likelihood of tokens[1:], in non-overlapping windows of `window` predictions.

    Each window's context starts empty, but the plan spans the whole text: input token i (of the
    len(tokens) - 1 that predict) runs in mode plan.resolve(len(tokens) - 1)[i], whichever window holds it.
    """
    from tqdm.auto import tqdm

    total, count = 0.0, 0
    length = len(tokens) - 1
    for start in tqdm(range(0, length, window), desc="scoring", unit="window", disable=None, leave=False):
        chunk = tokens[start:start + window + 1]
        if len(chunk) < 2:
            break
        inputs, targets = chunk[:-1], chunk[1:]
        modes = plan.resolve_window(start, start + len(inputs), length)
        logp = log_softmax(np.asarray(logits_fn(inputs[None].astype(np.int64), modes))[0])
        total -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
    return total, count


def evaluate_text(path, text: str, plan: str = "attention", backend: str = "reference",
                  window: int | None = None, max_tokens: int | None = None) -> dict:
    plan_obj = ModePlan.parse(plan)
    logits_fn = backend_loader(backend)(path)
    ckpt_cfg, _ = read_config(path)
    tokens = np.array(tokenizer_for(path).encode(text).ids, dtype=np.int64)
    if max_tokens:
        tokens = tokens[:max_tokens]
    if len(tokens) < 2:
        raise ValueError("--text: needs at least 2 tokens to score")
    if tokens.max() >= ckpt_cfg.vocab_size:
        raise ValueError(f"--text: token id {tokens.max()} exceeds the model's vocab_size {ckpt_cfg.vocab_size}")
    nll, count = sequence_nll(logits_fn, tokens, plan_obj, window or ckpt_cfg.max_context)
    return {"backend": backend, "plan": str(plan_obj), "tokens": count, "nll": nll / count,
            "perplexity": float(np.exp(nll / count))}


MAX_MQAR_TOKENS = 1 << 26  # inputs and targets of that many int64 tokens take 1 GiB


def evaluate_mqar(path, pairs: int, seq_len: int, examples: int = 64, plan: str = "attention",
                  backend: str = "reference", seed: int = 0, batch: int = 16) -> dict:
    """MQAR accuracy of a checkpoint under a plan (keys/values drawn from the model's vocabulary)."""
    from .mqar import make_mqar, mqar_accuracy

    cfg, _ = read_config(path)
    if seq_len > cfg.max_context:
        raise ValueError(f"--mqar-length {seq_len} exceeds the model's max_context {cfg.max_context}")
    if examples * seq_len > MAX_MQAR_TOKENS:
        raise ValueError(f"--mqar-examples x --mqar-length must be at most {MAX_MQAR_TOKENS:,} tokens (the examples "
                         f"are built in memory), got {examples} x {seq_len}")
    plan_obj = ModePlan.parse(plan)
    logits_fn = backend_loader(backend)(path)
    data = make_mqar(np.random.default_rng(seed), examples, seq_len, pairs, cfg.vocab_size)
    modes = plan_obj.resolve(seq_len)
    from tqdm.auto import tqdm

    correct = []
    for start in tqdm(range(0, examples, batch), desc="MQAR", unit="batch", disable=None, leave=False):
        rows = slice(start, start + batch)
        logits = np.asarray(logits_fn(data.inputs[rows], modes))
        part = type(data)(data.inputs[rows], data.targets[rows], data.query_start)
        correct.append(mqar_accuracy(logits, part) * (part.targets != -100).sum())
    return {"backend": backend, "plan": str(plan_obj), "pairs": pairs, "seq_len": seq_len, "examples": examples,
            "attention_share": float(modes.mean()), "accuracy": float(sum(correct) / (data.targets != -100).sum())}
