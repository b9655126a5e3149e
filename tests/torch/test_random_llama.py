"""bench/random_llama.py refuses a folder without tokenizer.json and an existing output in one line, exit status 2,
leaving the existing output untouched."""
import pytest
from bench_scripts import load_bench_script

pytest.importorskip("transformers")


def test_bad_paths_end_in_one_line_with_status_2(tmp_path, capsys):
    random_llama = load_bench_script("random_llama")
    out = tmp_path / "out"
    assert random_llama.main(["--tokenizer-from", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"random_llama.py: error: {tmp_path / 'missing'}/tokenizer.json: no such file"
    assert not out.exists()
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert random_llama.main(["--tokenizer-from", str(tmp_path / "tok"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; pass a new directory" in err
    assert (out / "mine.txt").read_text() == "keep"
