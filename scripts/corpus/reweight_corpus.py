"""Writes a copy of a corpus archive in which some sources' documents are sampled less often.

    python3 scripts/corpus/reweight_corpus.py --input data/cache/corpus.txt.xz \
        --stats data/cache/corpus.stats.json --keep dict-gcide=0.25 [--keep SOURCE=P ...] \
        [--seed 0] --out data/cache/corpus-prose.txt.xz

Each document of SOURCE is kept whole with probability P (P=0 drops the source, P=1 keeps all
of it); the other sources' documents are copied unchanged, in their order.

A document's source. The archive itself does not name it: clean_corpus.py writes the sources
one after another, in the order of corpus.stats.json's "sources", each with its "documents"
count. That is checked before anything is written: the archive's documents, read with
`oryx data build`'s own reader, must number what the stats list, and each source's run of
documents must hold exactly the "characters" listed for it; otherwise the stats belong to
another build, or the archive is a sample whose sources are interleaved (corpus-small.txt.xz),
and the run stops with a one-line error.

Which documents are kept: document i of a source is kept when the i-th draw of a generator
seeded with "SEED:SOURCE" is below P. So the choice for a source depends only on the seed, its
P and its own documents; with the same seed a smaller P keeps a subset of a larger P's
documents; and, not depending on the text, it is independent of `oryx data build`'s train/val
hash, which decides per document from its text alone: the output's val split is exactly the
kept documents of the original val split.

Output: OUT in clean_corpus.py's format (documents joined by a line holding only <|endoftext|>,
a final newline, xz -9e) and, beside it, NAME.stats.json for NAME.txt.xz in corpus.stats.json's
schema: per source "documents_in" (before sampling), "keep" (P), "documents" and "characters"
(kept), so the output can itself be reweighted; "archives" describes OUT; "reweighted_from"
records the input, its stats, the seed and the keep shares. Both are written to temp files and
renamed into place.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

from clean_corpus import pack_archive

from oryx_core.atomic import atomic_write_bytes
from oryx_data import iter_documents

ARCHIVE_SUFFIX = ".txt.xz"
STATS_SUFFIX = ".stats.json"


def read_stats(path: Path) -> dict[str, dict]:
    """The "sources" of a corpus.stats.json, in order, each with integer "documents" and "characters"."""
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--stats {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--stats {path}: not valid JSON ({e})") from None
    sources = stats.get("sources") if isinstance(stats, dict) else None
    if not isinstance(sources, dict) or not sources or not all(
            isinstance(s, dict) and all(isinstance(s.get(k), int) and s[k] >= 0 for k in ("documents", "characters"))
            for s in sources.values()):
        raise ValueError(f'--stats {path}: needs "sources" with integer "documents" and "characters" per source '
                         "(the corpus.stats.json that clean_corpus.py writes)")
    return sources


def parse_keep(items: list[str], sources: dict[str, dict]) -> dict[str, float]:
    """{source: P} from the --keep SOURCE=P flags, checked against the stats' sources."""
    keep = {}
    for item in items:
        name, sep, share = item.rpartition("=")
        if not sep or not name:
            raise ValueError(f"--keep {item}: expected SOURCE=P, e.g. dict-gcide=0.25")
        if name not in sources:
            raise ValueError(f"--keep {item}: unknown source {name!r} (the stats list {', '.join(sources)})")
        if name in keep:
            raise ValueError(f"--keep {item}: source {name!r} given twice")
        try:
            p = float(share)
        except ValueError:
            p = math.nan
        if not 0.0 <= p <= 1.0:  # also rejects NaN
            raise ValueError(f"--keep {item}: P must be a number in [0, 1], got {share!r}")
        keep[name] = p
    return keep


def label_documents(texts: list[str], sources: dict[str, dict], archive: Path, stats_path: Path) -> list[str]:
    """Each document's source, from the stats' order and counts, verified by each source's characters."""
    listed = sum(s["documents"] for s in sources.values())
    if len(texts) != listed:
        raise ValueError(f"--stats {stats_path}: lists {listed} documents, --input {archive} holds {len(texts)}; "
                         "not the stats of this archive")
    labels, start = [], 0
    for name, s in sources.items():
        end = start + s["documents"]
        characters = sum(len(t) for t in texts[start:end])
        if characters != s["characters"]:
            raise ValueError(f"--stats {stats_path}: source {name} should be documents {start}..{end - 1} of --input "
                             f"{archive} with {s['characters']} characters, they hold {characters}; not the stats of "
                             "this archive, or its documents are not in source order")
        labels += [name] * s["documents"]
        start = end
    return labels


def kept_mask(labels: list[str], keep: dict[str, float], seed: int) -> list[bool]:
    """Whether each document stays: one seeded draw per document of a reweighted source (see the docstring)."""
    draws = {name: random.Random(f"{seed}:{name}") for name in keep}
    return [name not in keep or draws[name].random() < keep[name] for name in labels]


def stats_path_for(out: Path) -> Path:
    return out.with_name(out.name[:-len(ARCHIVE_SUFFIX)] + STATS_SUFFIX)


def reweight(archive: Path, stats_path: Path, keep_flags: list[str], seed: int, out: Path) -> dict:
    """Writes OUT and its stats (see the module docstring); returns the stats written."""
    if not out.name.endswith(ARCHIVE_SUFFIX) or out.name == ARCHIVE_SUFFIX:
        raise ValueError(f"--out {out}: must be a NAME{ARCHIVE_SUFFIX} file (its stats go to NAME{STATS_SUFFIX})")
    if out.resolve() == archive.resolve() or stats_path_for(out).resolve() == stats_path.resolve():
        raise ValueError(f"--out {out}: would overwrite the input archive or its stats; choose another name")
    sources = read_stats(stats_path)
    keep = parse_keep(keep_flags, sources)
    texts = [d.text for d in iter_documents([archive], strict_utf8=True)]
    labels = label_documents(texts, sources, archive, stats_path)
    kept_docs = [(name, text) for name, text, kept in zip(labels, texts, kept_mask(labels, keep, seed)) if kept]

    per_source = {name: {"documents_in": s["documents"], "keep": keep.get(name, 1.0), "documents": 0, "characters": 0}
                  for name, s in sources.items()}
    for name, text in kept_docs:
        per_source[name]["documents"] += 1
        per_source[name]["characters"] += len(text)
    packed, entry = pack_archive(kept_docs)
    atomic_write_bytes(out, packed)
    report = {"sources": per_source, "archives": [{"file": out.name, **entry}],
              "reweighted_from": {"input": str(archive), "stats": str(stats_path), "seed": seed, "keep": keep}}
    atomic_write_bytes(stats_path_for(out), (json.dumps(report, indent=2) + "\n").encode())
    return report


def summary(report: dict) -> str:
    rows = [f"{'source':<16} {'keep':>5} {'documents kept':>16} {'characters kept':>26}"]
    for name, s in report["sources"].items():
        rows.append(f"{name:<16} {s['keep']:>5.3g} {s['documents']:>7,} / {s['documents_in']:<7,} {s['characters']:>26,}")
    entry = report["archives"][0]
    rows.append(f"wrote {entry['file']}: {entry['documents']:,} documents, {entry['text_bytes']:,} bytes of text, "
                f"{entry['xz_bytes']:,} compressed")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", type=Path, required=True, help="corpus archive written by clean_corpus.py")
    ap.add_argument("--stats", type=Path, required=True, help="its corpus.stats.json")
    ap.add_argument("--keep", action="append", required=True, metavar="SOURCE=P",
                    help="keep each document of SOURCE with probability P in [0, 1] (repeatable)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the keep draws (default 0)")
    ap.add_argument("--out", type=Path, required=True, help=f"NAME{ARCHIVE_SUFFIX} to write (and NAME{STATS_SUFFIX})")
    args = ap.parse_args(argv)
    try:
        report = reweight(args.input, args.stats, args.keep, args.seed, args.out)
    except (ValueError, OSError) as e:
        print(f"reweight_corpus.py: error: {e}", file=sys.stderr)
        return 2
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
