"""scripts/corpus/reweight_corpus.py: sources sampled by whole documents, seeded, the rest untouched, clear errors."""
import importlib.util
import json
import lzma
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from oryx_data import TokenShards, build_shards, iter_documents

import clean_corpus  # scripts/corpus is on pytest's pythonpath
import reweight_corpus

SOURCE_SIZES = {"docs-a": 150, "dict-b": 1200, "prose-c": 80}  # documents per source, in archive order
WORDS = ["the", "of", "a", "ship", "sail", "wind", "dictionary", "entry", "noun", "verb", "harbour", "river", "city", "street", "morning", "said"]


def random_text(rng: np.random.Generator, source: str) -> str:
    """A stripped document of random words and line breaks, marked with its source (for checking, not for the script)."""
    words = rng.choice(WORDS, size=rng.integers(4, 30))
    lines = [" ".join(words[i:i + 7]) for i in range(0, len(words), 7)]
    return f"[{source}] " + "\n".join(lines)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(archive, stats, {source: its documents}): written by clean_corpus.py's own writer."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(7)
    docs = {s: [random_text(rng, s) for _ in range(n)] for s, n in SOURCE_SIZES.items()}
    archive = root / "corpus.txt.xz"
    entry = clean_corpus.write_archive(archive, [(s, t) for s, texts in docs.items() for t in texts])
    sources = {s: {"documents_in": len(t), "duplicate_documents": 0, "duplicate_paragraphs": 0,
                   "documents": len(t), "characters": sum(map(len, t))} for s, t in docs.items()}
    stats = root / "corpus.stats.json"
    stats.write_text(json.dumps({"sources": sources, "archives": [entry]}))
    return archive, stats, docs


def run(archive, stats, out, *keep, seed=0, extra=()):
    argv = ["--input", str(archive), "--stats", str(stats), "--seed", str(seed), "--out", str(out)]
    return reweight_corpus.main(argv + [a for k in keep for a in ("--keep", k)] + list(extra))


def documents(path) -> list[str]:
    return [d.text for d in iter_documents([path], strict_utf8=True)]


def by_source(texts: list[str]) -> dict[str, list[str]]:
    return {s: [t for t in texts if t.startswith(f"[{s}] ")] for s in SOURCE_SIZES}


def test_keeps_about_p_of_a_source_and_copies_the_others(corpus, tmp_path, capsys):
    archive, stats, docs = corpus
    out = tmp_path / "out.txt.xz"
    assert run(archive, stats, out, "dict-b=0.3", "docs-a=0.5") == 0
    kept = documents(out)
    got = by_source(kept)
    assert sum(map(len, got.values())) == len(kept)  # nothing but the input's documents
    assert kept == got["docs-a"] + got["dict-b"] + got["prose-c"]  # sources stay in order
    assert got["prose-c"] == docs["prose-c"]
    for source, p in (("dict-b", 0.3), ("docs-a", 0.5)):
        n = SOURCE_SIZES[source]
        assert abs(len(got[source]) - p * n) < 4 * math.sqrt(n * p * (1 - p)), source
        it = iter(docs[source])  # kept documents are whole and in their order: a subsequence
        assert all(any(t == d for d in it) for t in got[source])

    written = json.loads((tmp_path / "out.stats.json").read_text())
    for source, texts in got.items():
        assert written["sources"][source]["documents"] == len(texts)
        assert written["sources"][source]["characters"] == sum(map(len, texts))
        assert written["sources"][source]["documents_in"] == SOURCE_SIZES[source]
    assert written["archives"][0]["file"] == "out.txt.xz"
    assert written["archives"][0]["documents"] == len(kept)
    report = capsys.readouterr().out
    assert f"{len(got['dict-b'])} / 1,200" in report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.stats.json", "out.txt.xz"]  # no temp files left


def test_seeded_deterministic_and_nested(corpus, tmp_path):
    archive, stats, _ = corpus
    for name, keep, seed in (("a", "dict-b=0.4", 0), ("b", "dict-b=0.4", 0), ("c", "dict-b=0.4", 1),
                             ("d", "dict-b=0.1", 0)):
        assert run(archive, stats, tmp_path / f"{name}.txt.xz", keep, seed=seed) == 0
    assert (tmp_path / "a.txt.xz").read_bytes() == (tmp_path / "b.txt.xz").read_bytes()
    kept = {name: set(by_source(documents(tmp_path / f"{name}.txt.xz"))["dict-b"]) for name in "acd"}
    assert kept["a"] != kept["c"]
    assert kept["d"] < kept["a"]  # the same seed: a smaller share keeps a subset


def test_keep_all_rewrites_the_same_bytes_and_zero_drops_the_source(corpus, tmp_path):
    archive, stats, docs = corpus
    assert run(archive, stats, tmp_path / "all.txt.xz", "dict-b=1") == 0
    assert lzma.open(tmp_path / "all.txt.xz").read() == lzma.open(archive).read()
    assert run(archive, stats, tmp_path / "none.txt.xz", "dict-b=0") == 0
    assert documents(tmp_path / "none.txt.xz") == docs["docs-a"] + docs["prose-c"]
    # the output's own stats let it be reweighted again
    assert run(tmp_path / "none.txt.xz", tmp_path / "none.stats.json", tmp_path / "again.txt.xz", "prose-c=1") == 0


def test_val_split_is_the_original_val_minus_dropped_documents(corpus, tmp_path):
    archive, stats, docs = corpus
    assert run(archive, stats, tmp_path / "out.txt.xz", "dict-b=0.2") == 0

    def val_documents(source_archive, name):
        build_shards([source_archive], tmp_path / name, val_fraction=0.2, seed=3)
        val = TokenShards(tmp_path / name, "val")
        ids = np.asarray(val.tokens)
        ends = np.flatnonzero(ids == val.eot_id)
        return [val.tokenizer().decode(ids[a + 1:b].tolist()) for a, b in zip([-1, *ends[:-1]], ends)]

    before, after = val_documents(archive, "shards-in"), val_documents(tmp_path / "out.txt.xz", "shards-out")
    kept = set(documents(tmp_path / "out.txt.xz"))
    assert len(before) > 50 and after == [d for d in before if d in kept]


@pytest.mark.parametrize("keep, message", [
    ("dict-x=0.5", "--keep dict-x=0.5: unknown source 'dict-x'"),
    ("dict-b=1.5", "--keep dict-b=1.5: P must be a number in [0, 1]"),
    ("dict-b=-0.1", "--keep dict-b=-0.1: P must be a number in [0, 1]"),
    ("dict-b=nan", "--keep dict-b=nan: P must be a number in [0, 1]"),
    ("dict-b=half", "--keep dict-b=half: P must be a number in [0, 1]"),
    ("dict-b", "--keep dict-b: expected SOURCE=P"),
])
def test_bad_keep_flags(corpus, tmp_path, capsys, keep, message):
    archive, stats, _ = corpus
    assert run(archive, stats, tmp_path / "out.txt.xz", keep) == 2
    assert_one_line_error(capsys, message, tmp_path)


def test_a_source_given_twice(corpus, tmp_path, capsys):
    archive, stats, _ = corpus
    assert run(archive, stats, tmp_path / "out.txt.xz", "dict-b=0.5", "dict-b=0.2") == 2
    assert_one_line_error(capsys, "--keep dict-b=0.2: source 'dict-b' given twice", tmp_path)


def mismatched_stats(stats: dict, how: str) -> dict:
    sources = stats["sources"]
    if how == "characters":
        sources["dict-b"]["characters"] += 1
    elif how == "documents":  # a document moved from one source to the next: the total still matches
        sources["docs-a"]["documents"] += 1
        sources["dict-b"]["documents"] -= 1
    elif how == "total":
        sources["prose-c"]["documents"] += 1
    elif how == "order":
        stats["sources"] = dict(reversed(sources.items()))
    elif how == "malformed":
        del sources["dict-b"]["characters"]
    return stats


@pytest.mark.parametrize("how, message", [
    ("characters", "source dict-b should be documents 150..1349"),
    ("documents", "source docs-a should be documents 0..150"),
    ("total", "lists 1431 documents"),
    ("order", "source prose-c should be documents 0..79"),
    ("malformed", 'needs "sources" with integer "documents" and "characters"'),
])
def test_stats_that_do_not_match_the_archive(corpus, tmp_path, capsys, how, message):
    archive, stats, _ = corpus
    bad = tmp_path / "bad.stats.json"
    bad.write_text(json.dumps(mismatched_stats(json.loads(stats.read_text()), how)))
    assert run(archive, bad, tmp_path / "out.txt.xz", "dict-b=0.5") == 2
    assert message in assert_one_line_error(capsys, f"--stats {bad}", tmp_path)


@pytest.mark.parametrize("case, message", [
    ("missing stats", "--stats {root}/nothing.json: no such file"),
    ("stats not json", "--stats {root}/broken.json: not valid JSON"),
    ("missing input", "--input {root}/nothing.txt.xz: no such file"),
    ("out suffix", "--out {root}/out.xz: must be a NAME.txt.xz file"),
    ("out is input", "would overwrite the input archive"),
])
def test_file_errors(corpus, tmp_path, capsys, case, message):
    archive, stats, _ = corpus
    out = tmp_path / "out.txt.xz"
    if case == "missing stats":
        stats = tmp_path / "nothing.json"
    elif case == "stats not json":
        stats = tmp_path / "broken.json"
        stats.write_text("{not json")
    elif case == "missing input":
        archive = tmp_path / "nothing.txt.xz"
    elif case == "out suffix":
        out = tmp_path / "out.xz"
    elif case == "out is input":
        out = archive
    assert run(archive, stats, out, "dict-b=0.5") == 2
    assert_one_line_error(capsys, message.format(root=tmp_path), tmp_path, keep={"broken.json"})


def assert_one_line_error(capsys, message: str, out_dir: Path, keep=frozenset()) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert {p.name for p in out_dir.iterdir()} <= {"bad.stats.json", *keep}  # nothing written, no temp files
    return err
