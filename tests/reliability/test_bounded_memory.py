"""`oryx eval --text` reads and tokenises in pieces: the tokens equal whole-text tokenisation, the windows score
as sequence_nll scores them, --max-tokens stops the reading, and a 50 MB text scores in bounded memory."""
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from oryx_core.cli import main
from oryx_core.evaluate import sequence_nll
from oryx_core.plan import ModePlan
from oryx_core.text_tokens import encode_pieces, read_text_pieces, safe_cut, score_pieces
from oryx_core.tokenizer import byte_level_tokenizer

SAMPLE = ("The os module provides a portable way of using operating system dependent functionality.\n\n"
          "  Indented line, then punctuation!?\n\n\nx.\r\nfoo  \t bar's 12345 67 it'll\n"
          "ünïcödé 漢字テスト café  naïve\n<|endoftext|>\nA second document follows here.\n") * 12
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _trained(pre_tokenizer) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet() if "ByteLevel" in repr(pre_tokenizer) else []
    tok.train_from_iterator([SAMPLE], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|endoftext|>"],
                                                          initial_alphabet=alphabet, show_progress=False))
    return tok


def _with_bos_and_eos(tok: Tokenizer) -> Tokenizer:
    from tokenizers import processors

    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[
        ("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    return tok


TOKENIZERS = {
    "byte-level": byte_level_tokenizer,
    "gpt2-regex": lambda: _trained(pre_tokenizers.ByteLevel(add_prefix_space=False)),
    "llama3-regex": lambda: _trained(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                                              pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                       use_regex=False)])),
    "metaspace-first": lambda: _trained(pre_tokenizers.Metaspace(prepend_scheme="first")),
    "metaspace-always": lambda: _trained(pre_tokenizers.Metaspace(prepend_scheme="always")),
    "bos-and-eos": lambda: _with_bos_and_eos(_trained(pre_tokenizers.Metaspace(prepend_scheme="first"))),
}


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("piece_chars, per_call", [(16, 1), (101, 3), (4096, 1)])
def test_pieces_tokenise_as_the_whole_text(name, piece_chars, per_call):
    tok = TOKENIZERS[name]()
    whole = tok.encode(SAMPLE).ids
    chunks = [SAMPLE[i:i + 37] for i in range(0, len(SAMPLE), 37)]
    got = np.concatenate(list(encode_pieces(chunks, tok, piece_chars=piece_chars, pieces_per_call=per_call)))
    assert got.tolist() == whole
    assert np.concatenate(list(encode_pieces(chunks, tok, piece_chars=piece_chars, add_special_tokens=False,
                                             pieces_per_call=per_call))).tolist() == tok.encode(
        SAMPLE, add_special_tokens=False).ids
    for limit in (1, 5, 333, len(whole) + 10):
        got = np.concatenate(list(encode_pieces(chunks, tok, max_tokens=limit, piece_chars=piece_chars,
                                                pieces_per_call=per_call)))
        assert got.tolist() == whole[:limit]


def test_safe_cut_points():
    assert safe_cut("abc def") == 3
    assert safe_cut("abc.\ndef") == 0 and safe_cut("abc.\ndef", newline_ok=True) == 5
    assert safe_cut("abc. def") == 0  # punctuation then space: some tokenizers join them
    assert safe_cut("   \n\n  ") == 0


def test_streamed_windows_score_as_sequence_nll():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=203)
    table = rng.normal(size=(50, 50))

    def logits_fn(inputs, modes):
        assert inputs.shape[1] == len(modes)
        return table[inputs] + np.asarray(modes, dtype=float)[None, :, None]

    plan = ModePlan.parse("A:0-7,R:7-")
    expected = sequence_nll(logits_fn, tokens, plan, 16)
    pieces = [tokens[i:i + 9] for i in range(0, len(tokens), 9)]
    total, count = score_pieces(logits_fn, iter(pieces), plan, 16, 50)
    assert count == expected[1] == 202
    assert total == pytest.approx(expected[0], rel=1e-12)


def test_reading_stops_at_max_tokens(tmp_path):
    """Bytes that are not UTF-8 after the first 480 kB are never read when --max-tokens is reached before."""
    path = tmp_path / "text.txt"
    path.write_bytes(b"plain words " * 40_000 + b"\xff\xfe broken")
    tok = byte_level_tokenizer()
    got = np.concatenate(list(encode_pieces(read_text_pieces(path), tok, max_tokens=1000)))
    assert got.tolist() == list((b"plain words " * 100)[:1000])
    with pytest.raises(ValueError, match=r"--text .*text.txt: not UTF-8 text \(byte 480000\)"):
        list(encode_pieces(read_text_pieces(path), tok))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    assert main(["init", str(path), "--preset", "tiny"]) == 0
    return path


def run_main(argv) -> int:
    """cli.main in-process; an argparse refusal (SystemExit) gives its exit status."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "-5"], "--max-tokens"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--max-tokens", "1e12"], "--max-tokens"),
    (["--max-tokens", "1"], "--max-tokens must be at least 2"),
    (["--window", "-1"], "--window"),
    (["--window", "0"], "--window"),
])
def test_bad_counts_are_refused(tiny, tmp_path, capsys, args, message):
    text = tmp_path / "t.txt"
    text.write_text("some words to score " * 10)
    assert run_main(["eval", str(tiny), "--text", str(text), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_text_errors_are_one_line(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff")
    cases = {str(tmp_path / "absent.txt"): "cannot read", str(tmp_path): "is a directory", str(bad): "not UTF-8"}
    for path, message in cases.items():
        assert run_main(["eval", str(tiny), "--text", path]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


# The CLI's own peak resident memory: VmHWM of the process's address space, which starts empty at exec.
# getrusage's ru_maxrss would not do: Linux carries it across exec, so a child of a large test process (one that
# loaded a model) reports its parent's peak.
REPORT_PEAK = ("import sys; from oryx_core.cli import main; code = main(sys.argv[1:]); "
               "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]; "
               "print('peak_kib', hwm, file=sys.stderr); sys.exit(code)")


def test_fifty_megabytes_with_max_tokens_in_bounded_memory_and_time(tiny, tmp_path):
    """The issue's case: a 50 MB text with --max-tokens 1000 (whole-file reading took 9.2 GB resident)."""
    text = tmp_path / "big.txt"
    line = ("Every layer of Oryx reads each token with attention or with a recurrence, switching anywhere. " * 10
            + "\n").encode()
    text.write_bytes(line * (50 * 10**6 // len(line) + 1))
    assert text.stat().st_size >= 50 * 10**6
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", REPORT_PEAK, "eval", str(tiny), "--text", str(text),
                           "--max-tokens", "1000", "--json"], capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert '"tokens": 999' in done.stdout
    peak_mib = int(done.stderr.split("peak_kib")[1].split()[0]) / 1024  # VmHWM is in KiB
    assert peak_mib < 1536, f"{peak_mib:.0f} MiB resident"
    assert seconds < 60, f"{seconds:.1f} s"


def test_data_build_tokenises_long_documents_in_pieces_to_the_same_tokens(tmp_path, monkeypatch):
    from oryx_data import pipeline

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "long.txt").write_text(SAMPLE.replace("<|endoftext|>", "") * 4)
    (corpus / "short.txt").write_text("A short document.\n<|endoftext|>\nAnother one, " + SAMPLE[:300])
    tok = TOKENIZERS["gpt2-regex"]()
    whole = pipeline.build_shards([corpus], tmp_path / "whole", tokenizer=tok, val_fraction=0.0)
    monkeypatch.setattr(pipeline, "LONG_DOCUMENT_CHARS", 500)
    pieces = pipeline.build_shards([corpus], tmp_path / "pieces", tokenizer=tok, val_fraction=0.0)
    assert pieces == whole and whole["documents"]["train"] == 4
    assert (tmp_path / "pieces" / "train-00000.bin").read_bytes() == (tmp_path / "whole" / "train-00000.bin").read_bytes()


@pytest.mark.slow
def test_data_build_of_one_20_megabyte_document_in_bounded_memory(tmp_path):
    text = tmp_path / "one.txt"
    text.write_bytes(("Every layer reads each token with attention or a recurrence. " * 50 + "\n").encode() * 6600)
    done = subprocess.run([sys.executable, "-c", REPORT_PEAK, "data", "build", "--input", str(text), "--out",
                           str(tmp_path / "shards"), "--val-fraction", "0", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    peak_mib = int(done.stderr.split("peak_kib")[1].split()[0]) / 1024
    assert peak_mib < 768, f"{peak_mib:.0f} MiB resident"  # whole, the tokenizer took about 1.4 GB per 10 MB


SHIPPED_TOKENIZERS = ["oryx_core/default_adapter/tokenizer.json", "oryx_data/gpt2-tokenizer.json",
                      "data/tokenizer-8k.json"]


@pytest.mark.parametrize("path", SHIPPED_TOKENIZERS)
def test_shipped_tokenizers_tokenise_pieces_as_the_whole_text(path):
    file = Path(__file__).resolve().parents[2] / path
    if not file.is_file():
        pytest.skip(f"{path} is not in this tree")
    tok = Tokenizer.from_file(str(file))
    whole = tok.encode(SAMPLE).ids
    chunks = [SAMPLE[i:i + 50] for i in range(0, len(SAMPLE), 50)]
    assert np.concatenate(list(encode_pieces(chunks, tok, piece_chars=64, pieces_per_call=2))).tolist() == whole
