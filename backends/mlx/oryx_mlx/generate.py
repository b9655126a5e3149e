"""MLX loading and sampling: `load`, `generate`, `stream_generate`.

    model, tokenizer = load("ckpt/")
    result = generate(model, tokenizer, "Once upon a time", max_tokens=100, plan="prefill-attention")
    for r in stream_generate(model, tokenizer, prompt, plan="recurrent", kv_policy="drop"):
        print(r.text, end="")

The loop, the plan, the KV and recurrent-state drop policies, stop strings and the response
type are oryx_core.generation's, shared with every backend; this module keeps what is MLX's
(loading weights into MLX arrays, sampling with MLX's random keys), and `generate` and
`stream_generate` run the shared loop through oryx_mlx.backend.MLXModel. A caller's
`prompt_cache` (from `model.make_cache()`) continues a conversation.
"""
from __future__ import annotations

import mlx.core as mx

from oryx_core import generation
from oryx_core.tokenizer import tokenizer_for
from oryx_core.weights import FLOAT_DTYPES, load_checkpoint

from .model import OryxModel
from .quantize import quantized_model

DTYPES = {name: getattr(mx, name) for name in FLOAT_DTYPES}


# ----- loading -----
def load_model(path, dtype: str | None = None) -> OryxModel:
    """An OryxModel from an Oryx checkpoint directory (full precision or quantised).

    dtype casts the floating-point weights (float32, float16, bfloat16); default: as stored.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    ckpt = load_checkpoint(path)
    weights = {name: mx.array(value) for name, value in ckpt.params.items()}
    if ckpt.quantization is not None:
        model = quantized_model(ckpt.config, ckpt.quantization, weights, str(ckpt.path))
    else:
        model = OryxModel(ckpt.config)
    if dtype is not None:
        weights = {n: w.astype(DTYPES[dtype]) if mx.issubdtype(w.dtype, mx.floating) else w for n, w in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model


def load(path, dtype: str | None = None, mlx_lm_tokenizer: bool = False):
    """(model, tokenizer) of a checkpoint directory; the tokenizer is a `tokenizers.Tokenizer`, or with
    mlx_lm_tokenizer mlx-lm's TokenizerWrapper (apply_chat_template, mlx_lm.stream_generate; mlx_lm_tokenizer.py)."""
    if mlx_lm_tokenizer:
        from .mlx_lm_tokenizer import mlx_lm_tokenizer as wrapper

        return load_model(path, dtype), wrapper(path)
    return load_model(path, dtype), tokenizer_for(path)


# ----- sampling -----
def apply_repetition_penalty(logits, seen, penalty: float):
    """CTRL's penalty: logits of the tokens marked in `seen` (bool [V]) are divided (if > 0) or
    multiplied by `penalty`."""
    if penalty == 1.0:
        return logits
    return mx.where(seen, mx.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample(logits, temperature: float, top_k: int, top_p: float, key) -> mx.array:
    """Next tokens [B] from float32 logits [B, V]: greedy at temperature 0, else top-k / nucleus sampling
    (the torch backend's `sample`, with an MLX random key)."""
    if temperature == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[:, -top_k, None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    if top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the top one always stays)
        outside = (mx.cumsum(probs, axis=-1) - probs) >= top_p
        logits = mx.put_along_axis(logits, order, mx.where(outside, -mx.inf, sorted_logits), axis=-1)
    return mx.random.categorical(logits, key=key)


# ----- text in, text out (oryx_core.generation's loop on this backend) -----
def stream_generate(model: OryxModel, tokenizer, prompt, max_tokens: int = 256, plan="prefill-attention", **kwargs):
    """oryx_core.generation.stream_generate on an MLX OryxModel; kwargs as there."""
    from .backend import MLXModel

    from .mlx_lm_tokenizer import plain_tokenizer

    return generation.stream_generate(MLXModel(model), plain_tokenizer(tokenizer), prompt, max_tokens, plan, **kwargs)


def generate(model: OryxModel, tokenizer, prompt, max_tokens: int = 256, plan="prefill-attention",
             **kwargs) -> generation.GenerationResponse:
    """oryx_core.generation.generate on an MLX OryxModel: text, output tokens and stats; kwargs as there."""
    from .backend import MLXModel

    from .mlx_lm_tokenizer import plain_tokenizer

    return generation.generate(MLXModel(model), plain_tokenizer(tokenizer), prompt, max_tokens, plan, **kwargs)
