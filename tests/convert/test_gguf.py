"""GGUF: dequantisation through the gguf package (K-quants included), RoPE row order, BPE and SentencePiece
tokenizers, and Llama GGUF -> Oryx against transformers' own GGUF loading."""
from __future__ import annotations

import numpy as np
import pytest

from convert_helpers import (GGUF_SPECIALS, LLAMA_SHAPE, as_stored_in_gguf, build_hf_llama, hf_logits,
                             llama_cpp_permute, random_k_quant, relative_error, sentencepiece_vocab_writer,
                             write_llama_gguf)
from oryx_convert.api import convert
from oryx_convert.gguf import dequantize, read_gguf, supported_types, tokenizer_json_from_gguf, unpermute_rope_rows
from oryx_convert.llama import import_gguf_llama
from oryx_core.reference import OryxReference
from oryx_core.safetensors_io import FormatError

gguf = pytest.importorskip("gguf")
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # the ones the gguf package can also write


def test_every_k_quant_and_iq_type_is_supported():
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ3_S", "TQ1_0"} <= set(supported_types())


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_blocks_decode_to_their_shape_with_small_values(type_name):
    stored = random_k_quant((3, 512), type_name, seed=1)
    values = dequantize(stored, type_name, (3, 512), "w")
    assert values.shape == (3, 512) and values.dtype == np.float32
    np.testing.assert_array_equal(values.reshape(-1), gguf.quants.dequantize(stored, gguf.GGMLQuantizationType[type_name]).reshape(-1))
    assert 1e-4 < np.abs(values).max() < 1.0 and np.unique(values).size > 100


def test_dequantize_rejects_unsupported_types_and_wrong_sizes():
    with pytest.raises(FormatError, match="type Q8_1, unsupported"):
        dequantize(np.zeros(36, np.uint8), "Q8_1", (32,), "blk.0.ffn_up.weight")
    with pytest.raises(FormatError, match="'w': 35 bytes do not hold Q8_0"):
        dequantize(np.zeros(35, np.uint8), "Q8_0", (32,), "w")


def k_quant_types(name: str, value: np.ndarray) -> str:
    """Q4_K attention, Q5_K gate and up, Q6_K down projection, embedding and head (as a Q4_K_M file mixes them)."""
    if "attn" in name:
        return "Q4_K"
    if "ffn_gate" in name or "ffn_up" in name:
        return "Q5_K"
    return "Q6_K"


def test_k_quant_gguf_matches_transformers_gguf_loading(tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    llama = build_hf_llama(tie=False, seed=3, hidden_size=256, intermediate_size=512, head_dim=64)
    write_llama_gguf(tmp_path / "k.gguf", llama, k_quant_types)
    stored = read_gguf(tmp_path / "k.gguf").tensor_types
    assert {stored["blk.0.attn_q.weight"], stored["blk.1.ffn_up.weight"], stored["output.weight"]} == {"Q4_K", "Q5_K", "Q6_K"}
    imported = import_gguf_llama(tmp_path / "k.gguf")
    theirs = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="k.gguf", dtype=torch.float32).eval()
    tokens = np.random.default_rng(5).integers(0, LLAMA_SHAPE["vocab_size"], size=(2, 9))
    logits, _ = OryxReference(imported.config, imported.params).forward(tokens, True)
    assert relative_error(logits, hf_logits(theirs, tokens)) < 1e-4
    # and the file really decodes to something other than the source model's weights
    assert relative_error(hf_logits(llama, tokens), hf_logits(theirs, tokens)) > 0.1


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    import sentencepiece

    folder = tmp_path_factory.mktemp("spm")
    lines = ["The quick brown fox jumps over the lazy dog.", "Gated recurrences and softmax attention share weights.",
             "Numbers like 2024 and 3.14159 appear too.", "ünïcödé text, tabs\tand   spaces."] * 50
    # normalisation off, as in Llama's model, since a GGUF does not carry the normaliser
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "sp"),
                                             vocab_size=400, model_type="bpe", byte_fallback=True, minloglevel=2,
                                             character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                             normalization_rule_name="identity", remove_extra_whitespaces=False)
    return str(folder / "sp.model")


def test_sentencepiece_gguf_converts_with_transformers_token_ids(sentencepiece_model, tmp_path):
    import sentencepiece
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model)
    llama = build_hf_llama(tie=True, seed=4, vocab_size=sp.get_piece_size())
    write_llama_gguf(tmp_path / "sp.gguf", llama, "Q8_0", vocab=sentencepiece_vocab_writer(sentencepiece_model))
    out = convert(tmp_path / "sp.gguf", tmp_path / "oryx")
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    texts = ["The quick brown fox", " leading space", "Gated attention, 2024!", "ünïcödé ☃ emoji 🦊 unseen",
             "tabs\tand   spaces\nnew line", "lazy dog.The quick"]
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        if not text.startswith(" "):  # (a leading space is where transformers' Llama tokenizer and SentencePiece differ)
            assert ids == [sp.bos_id()] + sp.encode(text), text  # and SentencePiece itself
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids) == text or text.startswith(" ")
    assert any(sp.is_byte(i) for i in ours.encode("☃").ids)  # characters outside the pieces go to byte tokens


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
    with pytest.raises(FileNotFoundError, match="no such"):
        convert(tmp_path / "absent.gguf", tmp_path / "dst", from_kind="gguf")


def test_gguf_cast_while_reading_equals_casting_afterwards(llama, tmp_path):
    import ml_dtypes

    from oryx_core.weights import load_checkpoint

    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, llama, "Q8_0")
    streamed = load_checkpoint(convert(path, tmp_path / "bf16", dtype="bfloat16"))
    full = load_checkpoint(convert(path, tmp_path / "fp32"))
    assert streamed.params.keys() == full.params.keys()
    for name, value in full.params.items():
        assert streamed.params[name].dtype == np.dtype(ml_dtypes.bfloat16), name
        np.testing.assert_array_equal(streamed.params[name].view(np.uint16),
                                      value.astype(ml_dtypes.bfloat16).view(np.uint16), err_msg=name)
