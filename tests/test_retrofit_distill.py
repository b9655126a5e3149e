"""experiments/retrofit_smollm2.py's distillation data on a tiny model with SmolLM2's vocabulary: the model's own
texts sampled in batches (as many as asked, openers cycled, one seed per batch), and `refine --distill prose` end to
end at toy size on shards of the Brown non-fiction (read from its xz copy) and the own texts, without the
documentation corpus."""
import json
import lzma
import shutil

import pytest

import retrofit_smollm2 as experiment
from oryx_core.default import SMOLLM2
from oryx_data.pipeline import assign_split
from model_params import tiny_checkpoint_with_smollm2_vocabulary

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint_with_smollm2_vocabulary(tmp_path_factory.mktemp("distill") / "tiny")


def test_own_texts_come_in_batches_with_a_seed_each(tiny):
    from oryx_core.tokenizer import load_tokenizer
    from oryx_torch.model import OryxModel

    model = OryxModel.from_checkpoint(tiny, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(tiny)
    cpu = torch.device("cpu")
    texts = experiment.sample_own_oryx(model, tokenizer, cpu, 5, 4, seed=7, batch=2)
    openers = [experiment.GEN_OPENERS[i % len(experiment.GEN_OPENERS)] for i in range(5)]
    assert len(texts) == 5 and all(t.startswith(o) for t, o in zip(texts, openers))
    assert texts[2:4] == experiment.sample_own_batch(model, tokenizer, cpu, openers[2:4], 4, seed=8)
    assert texts[4:] == experiment.sample_own_batch(model, tokenizer, cpu, openers[4:], 4, seed=9)
    # one batch when it holds them all, as before batches
    assert experiment.sample_own_oryx(model, tokenizer, cpu, 3, 4, seed=7) == \
        experiment.sample_own_batch(model, tokenizer, cpu, openers[:3], 4, seed=7)


def test_refine_distils_on_prose_without_the_documentation(tiny, tmp_path, monkeypatch):
    work, out = tmp_path / "work", tmp_path / "out"
    for folder in (work / "cache" / SMOLLM2, work / "start"):  # the converted base and the default adapter merged
        shutil.copytree(tiny, folder)
    heldout = tmp_path / "fiction.txt"
    heldout.write_text(" ".join(f"The keeper climbed stair number {i} and counted the gulls." for i in range(60)))
    nonfiction = tmp_path / "brown-nonfiction.txt"  # only its xz copy is there, as on a device
    texts = [" ".join(f"Report {d} lists item {i} of the county budget." for i in range(40)) for d in range(11)]
    texts.append(next(t for t in (f"Minutes of meeting {n}: the board approved the school budget." * 20
                                  for n in range(10_000)) if assign_split(t, 0.01, 0) == "val"))  # a validation split
    experiment.xz_copy(nonfiction).write_bytes(lzma.compress(experiment.END_OF_TEXT_JOINT.join(texts).encode()))
    monkeypatch.setattr(experiment, "NONFICTION_TEXT", nonfiction)
    monkeypatch.setattr(experiment, "DOCS_CORPUS", tmp_path / "no-docs-corpus.txt.xz")  # reading it would fail
    monkeypatch.setattr(experiment, "HELDOUT", experiment.HELDOUT)  # refine sets both globals; restored after
    monkeypatch.setattr(experiment, "WINDOW", experiment.WINDOW)
    monkeypatch.setenv("ORYX_CACHE", str(work / "cache"))
    assert experiment.main(["refine", "--work", str(work), "--out", str(out), "--distill", "prose",
                            "--heldout", str(heldout), "--window", "64", "--tokens", "512", "--seq-len", "64",
                            "--batch-size", "4", "--heldout-windows", "2", "--curve-windows", "1",
                            "--own-sequences", "5", "--own-batch", "2", "--own-tokens", "8", "--kv-weight", "0",
                            "--eval-every", "2", "--probe-lengths", "96", "--examples", "1", "--sample-tokens", "2",
                            "--budget-s", "600", "--reserve-s", "5"]) == 0
    results = json.loads((out / "results.json").read_text())
    data = results["distillation_data"]
    assert data["distill"] == "prose" and data["own_texts"] == 5
    assert set(data["sources"]) == {"brown-nonfiction", "own-texts"}
    assert data["sources"]["brown-nonfiction"]["documents"] == 12 and data["sources"]["own-texts"]["documents"] == 5
    assert sum(s["tokens"] for s in data["sources"].values()) == sum(data["tokens"].values())
    assert (work / "data-prose" / "meta.json").is_file() and not (work / "data").exists()
    assert len((work / "own.txt").read_text().split("<|endoftext|>")) == 5
    assert results["after"] and results["attention_bit_identical_fp32"]

