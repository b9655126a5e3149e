"""experiments/retrofit_smollm2.py's GGUF parts: split into N parts and put back together exactly; a missing part or
parts of another file end in one line naming them."""
import hashlib

import pytest

import retrofit_smollm2 as experiment


@pytest.fixture
def parts_in(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "ROOT", tmp_path)
    monkeypatch.setattr(experiment, "GGUF_PARTS", [tmp_path / "runs" / f"gguf_part{i}" / "part" for i in (1, 2, 3)])
    return tmp_path


def test_split_then_reassemble_is_exact(parts_in, monkeypatch):
    data = bytes(range(256)) * 1001
    (parts_in / "model.gguf").write_bytes(data)
    monkeypatch.setattr(experiment, "GGUF_SHA256", hashlib.sha256(data).hexdigest())
    experiment.split_gguf(parts_in / "model.gguf", 3)
    sizes = [p.stat().st_size for p in experiment.GGUF_PARTS]
    assert sum(sizes) == len(data) and max(sizes) - min(sizes) <= 2
    assert experiment.reassemble_gguf(parts_in / "back.gguf").read_bytes() == data


def test_a_missing_or_foreign_part_is_one_line(parts_in, monkeypatch):
    data = b"gguf" * 3000
    (parts_in / "model.gguf").write_bytes(data)
    monkeypatch.setattr(experiment, "GGUF_SHA256", hashlib.sha256(data).hexdigest())
    experiment.split_gguf(parts_in / "model.gguf", 3)
    experiment.GGUF_PARTS[1].unlink()
    with pytest.raises(SystemExit) as e:
        experiment.reassemble_gguf(parts_in / "back.gguf")
    assert "runs/gguf_part2/part" in str(e.value) and "\n" not in str(e.value)
    experiment.GGUF_PARTS[1].write_bytes(b"something else")
    with pytest.raises(SystemExit) as e:
        experiment.reassemble_gguf(parts_in / "back.gguf")
    assert "sha256" in str(e.value) and "\n" not in str(e.value)
    assert not (parts_in / "back.gguf").exists()
