"""The repository reads as a product: no tracker numbers in text, raw-result files named for what they hold,
docs that open with a summary table and point only at files that exist."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {".git", ".venv", "build", "runs", "cache", "node_modules", "__pycache__", ".pytest_cache"}
TEXT_SUFFIXES = {".py", ".md", ".sh", ".json", ".toml"}
TRACKER_NUMBER = re.compile(r"\b[Ii]ssue[ -]?#?\d")
# run tags: _s9_, _s10., session5, _run_g, run2 ... (names must say card, date and subject instead)
RUN_TAG = re.compile(r"(_s\d+[_.])|(session\d*)|(_run_?[a-z0-9]{1,2}[_.])|(\brun\d+[_.])")
SUMMARY_DOCS = ["docs/benchmarks.md", "docs/results.md"]
SCREEN_LINES = 40


def project_files(suffixes):
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in parts):
            continue
        if path.is_file() and path.suffix in suffixes:
            yield path


def test_no_tracker_numbers_in_code_docs_or_configs():
    hits = []
    for path in project_files(TEXT_SUFFIXES):
        if path.stat().st_size > 2_000_000:  # tokenizers and other data, not prose
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if TRACKER_NUMBER.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    assert hits == []


def test_the_tracker_pattern_finds_what_it_should():
    word = "issue"  # spelled apart, so that this file does not match its own search
    assert TRACKER_NUMBER.search(f"the {word} 6 experiments") and TRACKER_NUMBER.search(f"{word.title()}-19")
    assert not TRACKER_NUMBER.search(f"an {word} with the kernel") and not TRACKER_NUMBER.search(f"{word}s 0 of them")


@pytest.mark.parametrize("folder", ["bench/results", "experiments/results"])
def test_raw_result_names_carry_no_run_tags(folder):
    tagged = [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*") if RUN_TAG.search(p.name)]
    assert tagged == []


def test_the_run_tag_pattern_finds_what_it_should():
    for name in ["bench_gdn_2026-11-27_h200_s9_final.log", "pytest_gpu_gdn_session5.log", "train_gpu_run2.json",
                 "bench_layer_2026-11-27_h200_run_g.log", "gdn_tma_variants_2026-11-27_s10.patch"]:
        assert RUN_TAG.search(name), name
    for name in ["bench_gdn_2026-11-27_h100_tma_final.log", "train_gpu_2026-11-27_h200_two_gpus.json",
                 "mqar_gdn-only_seed1_10000.json", "gdn_registers_2026-11-27_state_side.log"]:
        assert not RUN_TAG.search(name), name


@pytest.mark.parametrize("doc", SUMMARY_DOCS)
def test_doc_opens_with_a_summary_table_that_fits_one_screen(doc):
    lines = (ROOT / doc).read_text().splitlines()
    first_section = next(i for i, line in enumerate(lines) if line.startswith("## "))
    table = [i for i, line in enumerate(lines[:first_section]) if line.startswith("|")]
    assert table, f"{doc}: no table before its first section"
    assert table[-1] < SCREEN_LINES, f"{doc}: the summary table ends at line {table[-1] + 1}"
    header = [cell.strip() for cell in lines[table[0]].strip("|").split("|")]
    assert {"card", "date"} <= set(header), f"{doc}: summary columns {header}"


@pytest.mark.parametrize("doc", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_raw_result_paths_named_in_docs_exist(doc):
    text = (ROOT / doc).read_text()
    # a path that continues with a pattern (*, <model>, {a,b}) names several files: not checked here
    named = {m.group(1).rstrip(".,") for m in re.finditer(r"((?:bench|experiments)/results/[\w./-]+)(.?)", text)
             if m.group(2) not in "*<{"}
    missing = [path for path in sorted(named) if not (ROOT / path).exists()]
    assert missing == []


def test_figures_shown_in_docs_exist():
    missing = []
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", doc.read_text()):
            if not (doc.parent / target).exists():
                missing.append(f"{doc.name}: {target}")
    assert missing == []


def test_code_points_only_at_doc_sections_that_exist():
    """A comment's `docs/X.md, "Section"` must name a heading of that doc, so the pointer survives a docs rewrite."""
    # a heading counts without its section number ("5. Retrofit: ..." is "Retrofit: ...")
    headings = {doc.name: {re.sub(r"^\d+[a-z]?\.\s+", "", line.lstrip("#").strip())
                           for line in doc.read_text().splitlines() if line.startswith("#")}
                for doc in (ROOT / "docs").glob("*.md")}
    dangling = []
    for path in project_files({".py"}):
        if path == Path(__file__).resolve():  # its own pattern and docstring are no pointers
            continue
        text = path.read_text(errors="replace")
        for match in re.finditer(r'docs/([\w-]+\.md)[,\s#]*"([^"\n]+)"', text):
            doc, section = match.groups()
            if not any(heading.startswith(section) for heading in headings.get(doc, ())):
                dangling.append(f"{path.relative_to(ROOT)}: {doc}, {section!r}")
    assert dangling == []
