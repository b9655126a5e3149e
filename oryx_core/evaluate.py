"""Perplexity of a text under a mode plan, on any backend.

A backend is a module with `load_for_eval(path) -> logits_fn`, where
`logits_fn(tokens int64 [B, T], modes bool [T]) -> logits [B, T, V]` (any float dtype).
The reference backend lives here; `torch` and `mlx` are added by their packages.
"""
from __future__ import annotations

import importlib

import numpy as np

from .plan import ModePlan
from .reference import OryxReference
from .tokenizer import tokenizer_for
from .weights import load_checkpoint, read_config

BACKEND_MODULES = {"reference": "oryx_core.evaluate", "torch": "oryx_torch.evaluate", "mlx": "oryx_mlx.evaluate"}


def load_for_eval(path):
    ckpt = load_checkpoint(path)
    model = OryxReference(ckpt.config, ckpt.params)
    return lambda tokens, modes: model.forward(tokens, modes)[0]


def backend_loader(name: str):
    if name not in BACKEND_MODULES:
        raise ValueError(f"--backend must be one of {sorted(BACKEND_MODULES)}, got {name!r}")
    try:
        module = importlib.import_module(BACKEND_MODULES[name])
    except ImportError as e:
        extra = {"torch": "cuda", "mlx": "mlx"}.get(name, "")
        raise ValueError(f"--backend {name}: not available ({e}); install it with pip install 'oryx[{extra}]'") from None
    return module.load_for_eval


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def sequence_nll(logits_fn, tokens: np.ndarray, plan: ModePlan, window: int) -> tuple[float, int]:
    """Summed negative log-likelihood of tokens[1:], in non-overlapping windows of `window` tokens."""
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = tokens[start:start + window + 1]
        if len(chunk) < 2:
            break
        inputs, targets = chunk[:-1], chunk[1:]
        modes = plan.resolve(len(inputs))
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


def evaluate_mqar(path, pairs: int, seq_len: int, examples: int = 64, plan: str = "attention",
                  backend: str = "reference", seed: int = 0, batch: int = 16) -> dict:
    """MQAR accuracy of a checkpoint under a plan (keys/values drawn from the model's vocabulary)."""
    from .mqar import make_mqar, mqar_accuracy

    cfg, _ = read_config(path)
    plan_obj = ModePlan.parse(plan)
    logits_fn = backend_loader(backend)(path)
    data = make_mqar(np.random.default_rng(seed), examples, seq_len, pairs, cfg.vocab_size)
    modes = plan_obj.resolve(seq_len)
    correct = []
    for start in range(0, examples, batch):
        rows = slice(start, start + batch)
        logits = np.asarray(logits_fn(data.inputs[rows], modes))
        part = type(data)(data.inputs[rows], data.targets[rows], data.query_start)
        correct.append(mqar_accuracy(logits, part) * (part.targets != -100).sum())
    return {"backend": backend, "plan": str(plan_obj), "pairs": pairs, "seq_len": seq_len, "examples": examples,
            "attention_share": float(modes.mean()), "accuracy": float(sum(correct) / (data.targets != -100).sum())}
