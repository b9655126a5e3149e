"""GGUF: our dequantisers against the gguf package's, RoPE row order, tokenizer, and Llama GGUF -> Oryx."""
from __future__ import annotations

import numpy as np
import pytest

from convert_helpers import (GGUF_SPECIALS, as_stored_in_gguf, build_hf_llama, hf_logits, llama_cpp_permute,
                             relative_error, write_llama_gguf)
from oryx_convert.api import convert
from oryx_convert.gguf import DEQUANTIZERS, dequantize, read_gguf, tokenizer_json_from_gguf, unpermute_rope_rows
from oryx_convert.llama import import_gguf_llama
from oryx_core.reference import OryxReference
from oryx_core.safetensors_io import FormatError

gguf = pytest.importorskip("gguf")
TYPES = list(DEQUANTIZERS)


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("shape", [(3, 64), (5, 2, 96)])
def test_dequantizer_matches_gguf_package(type_name, shape):
    qtype = gguf.GGMLQuantizationType[type_name]
    values = np.random.default_rng(hash((type_name, shape)) % 2**32).normal(0, 2, shape).astype(np.float32)
    stored = gguf.quants.quantize(values, qtype)
    ours = dequantize(stored.tobytes(), type_name, shape, "w")
    theirs = gguf.quants.dequantize(stored, qtype)
    assert ours.shape == shape and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)
    assert relative_error(ours, values) < 0.2  # and it decodes to the values, not to something bit-equal but wrong


def test_dequantizer_rejects_unsupported_types_and_wrong_sizes():
    with pytest.raises(FormatError, match="type Q4_K, unsupported"):
        dequantize(b"\0" * 144, "Q4_K", (256,), "blk.0.ffn_up.weight")
    with pytest.raises(FormatError, match="'w': 35 bytes do not hold Q8_0"):
        dequantize(b"\0" * 35, "Q8_0", (32,), "w")


@pytest.mark.parametrize("n_heads", [1, 3])
def test_unpermute_inverts_llama_cpp_permutation(n_heads):
    weight = np.random.default_rng(0).normal(size=(n_heads * 8, 5))
    permuted = llama_cpp_permute(weight, n_heads)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, n_heads), weight)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def llama(request):
    return build_hf_llama(tie=request.param, seed=2)


@pytest.mark.parametrize("type_name", TYPES)
def test_gguf_llama_matches_transformers_on_the_stored_weights(llama, type_name, tmp_path):
    path = tmp_path / f"tiny-{type_name}.gguf"
    write_llama_gguf(path, llama, type_name)
    imported = import_gguf_llama(path)
    tokens = np.random.default_rng(5).integers(0, llama.config.vocab_size, size=(2, 9))
    logits, _ = OryxReference(imported.config, imported.params).forward(tokens, True)
    assert relative_error(logits, hf_logits(as_stored_in_gguf(llama, type_name), tokens)) < 1e-4
    assert imported.config.norm_eps == llama.config.rms_norm_eps  # float32 in GGUF, restored to the decimal
    assert imported.config.rope_theta == llama.config.rope_parameters["rope_theta"]


def test_gguf_tokenizer_round_trips_text_and_keeps_special_tokens(llama, tmp_path):
    from tokenizers import Tokenizer

    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, llama, "Q8_0")
    tok = Tokenizer.from_str(tokenizer_json_from_gguf(read_gguf(path)))
    text = "the 2024 theory: ünïcode, <|im_start|>the end<|endoftext|>"
    enc = tok.encode(text)
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert tok.token_to_id("<|im_start|>") in enc.ids and tok.token_to_id("<|endoftext|>") in enc.ids
    assert "Ġt" in enc.tokens and "he" in enc.tokens  # the merges apply
    assert [t for t in enc.tokens if t in "0123456789"] == list("2024")  # smollm splits digits one by one
    assert tok.get_vocab_size() == 256 + 2 + len(GGUF_SPECIALS)


def test_gguf_tokenizer_prepends_bos_when_the_gguf_says_so(llama, tmp_path):
    from tokenizers import Tokenizer

    for add_bos in (False, True):
        path = tmp_path / f"bos-{add_bos}.gguf"
        write_llama_gguf(path, llama, "F32", add_bos=add_bos)
        tok = Tokenizer.from_str(tokenizer_json_from_gguf(read_gguf(path)))
        ids = tok.encode("the").ids
        assert (ids[0] == tok.token_to_id(GGUF_SPECIALS[0])) == add_bos
        assert tok.decode(ids) == "the"


def test_gguf_convert_writes_checkpoint_with_tokenizer(llama, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, llama, "Q4_0")
    out = convert(path, tmp_path / "oryx")  # kind detected from the GGUF magic
    assert (out / "tokenizer.json").exists()


def test_gguf_errors_are_clear(llama, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 20)
    with pytest.raises(FormatError, match="not a readable GGUF file"):
        convert(bad, tmp_path / "dst", from_kind="gguf")
    path = tmp_path / "unknown-pre.gguf"
    write_llama_gguf(path, llama, "F16", pre="qwen2")
    with pytest.raises(FormatError, match="tokenizer.ggml.pre 'qwen2' is not supported"):
        convert(path, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    path = tmp_path / "q5.gguf"
    write_llama_gguf(path, llama, "Q5_0")
    with pytest.raises(FormatError, match="type Q5_0, unsupported; supported types: F32, F16, BF16, Q8_0, Q4_0, Q4_1"):
        convert(path, tmp_path / "dst")
    with pytest.raises(FileNotFoundError, match="no such"):
        convert(tmp_path / "absent.gguf", tmp_path / "dst", from_kind="gguf")
