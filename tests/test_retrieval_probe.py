"""experiments/retrieval_probe.py: its plans give attention where their names say, its examples mark the question
and the needle on SmolLM2's tokenizer, and a run on a tiny model with that vocabulary writes every plan's accuracy
and the key drift per layer (none in the first layer, whose keys read the embeddings only)."""
import json

import numpy as np
import pytest

import retrieval_probe as probe
from oryx_core.default import DEFAULT_ADAPTER
from oryx_core.weights import load_checkpoint
from model_params import tiny_checkpoint_with_smollm2_vocabulary

TOKENIZER = DEFAULT_ADAPTER / "tokenizer.json"


def test_plans_attend_where_named():
    L, T, q = 6, 50, 7
    plans = probe.plans_for(L, T, q, needle=(10, 20))
    assert all(m.shape == (L, 1, T) and m.dtype == bool for m in plans.values())
    assert plans["attention"].all() and not plans["recurrent"].any()
    question = np.arange(T) >= T - q
    assert (plans["last:question"][:, 0] == question).all()
    for k in (1, 2, 4):
        m = plans[f"first-{k}+question"][:, 0]
        assert m[:k].all() and (m[k:] == question).all()
        assert m.mean() == pytest.approx((k * T + (L - k) * q) / (L * T))
    assert "first-8+question" not in plans  # not fewer layers than that
    every = plans["every-4th-layer+question"][:, 0]
    assert every[[0, 4]].all() and (every[[1, 2, 3, 5]] == question).all()
    oracle = plans["needle+question"][:, 0]
    assert (oracle == (question | ((np.arange(T) >= 10) & (np.arange(T) < 20)))).all()
    assert "needle+question" not in probe.plans_for(L, T, q, needle=None)


def test_examples_mark_the_question_and_the_needle():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    for task in ("passkey", "kv"):
        for ex in probe.examples(tok, task, 256, 3):
            ids = ex["ids"]
            assert 200 < len(ids) <= 270
            question = tok.decode(ids[len(ids) - ex["question"]:]).strip()  # may hold the newline before it
            answer = tok.decode(ids[ex["answer_start"]:]).strip()
            assert question.startswith("What is the") and question.endswith(answer) and answer.isdigit()
            if task == "passkey":
                a, b = ex["needle"]
                assert tok.decode(ids[a:b]).strip() == f"The pass key is {answer}. Remember it. {answer} is the pass key."
            else:
                assert ex["needle"] is None


def test_a_run_on_a_tiny_model_writes_accuracy_and_key_drift(tmp_path):
    model = tiny_checkpoint_with_smollm2_vocabulary(tmp_path / "tiny")
    cfg = load_checkpoint(model).config
    out = tmp_path / "probe.json"
    assert probe.main(["--model", str(model), "--lengths", "96", "--examples", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    passkey = report["accuracy"]["passkey"]["96"]
    assert set(passkey) == set(probe.plans_for(cfg.n_layers, 100, 10, (1, 2)))
    assert passkey["attention"]["attention_share"] == 1 and passkey["recurrent"]["attention_share"] == 0
    assert all(0 <= v["accuracy"] <= 1 for v in passkey.values())
    assert "needle+question" not in report["accuracy"]["kv"]["96"]
    for drift in report["key_drift"].values():
        assert len(drift) == cfg.n_layers and drift[0] == 0 and all(d > 0 for d in drift[1:])
