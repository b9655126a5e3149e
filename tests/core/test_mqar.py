import json

import numpy as np
import pytest

from oryx_core.cli import main
from oryx_core.mqar import IGNORE, make_mqar, mqar_accuracy


def test_every_query_repeats_a_key_and_asks_for_its_value():
    batch = make_mqar(np.random.default_rng(0), 20, 128, 16, 512)
    for x, y in zip(batch.inputs, batch.targets):
        pairs = dict(zip(x[0:32:2], x[1:32:2]))
        assert len(pairs) == 16 and all(k < 256 for k in pairs) and all(v >= 256 for v in pairs.values())
        asked = np.nonzero(y != IGNORE)[0]
        assert len(asked) == 16 and (asked >= 32).all()
        for t in asked:
            assert y[t] == pairs[x[t]] and x[t + 1] == y[t]


def test_accuracy_counts_only_queries():
    batch = make_mqar(np.random.default_rng(1), 4, 64, 8, 128)
    oracle = np.zeros(batch.inputs.shape + (128,))
    mask = batch.targets != IGNORE
    oracle[mask, batch.targets[mask]] = 1.0
    assert mqar_accuracy(oracle, batch) == 1.0
    oracle[np.nonzero(mask)[0][0], np.nonzero(mask)[1][0]] = 0.0  # one query now argmaxes to token 0
    assert mqar_accuracy(oracle, batch) == pytest.approx(1 - 1 / mask.sum())


def test_bad_sizes_are_clear():
    with pytest.raises(ValueError, match="need seq_len >= 160"):
        make_mqar(np.random.default_rng(0), 1, 64, 40, 512)
    with pytest.raises(ValueError, match="need vocab_size"):
        make_mqar(np.random.default_rng(0), 1, 512, 100, 64)
    for examples, pairs in ((1, 0), (0, 4)):            # an empty batch would score nan
        with pytest.raises(ValueError, match="at least 1 pair and 1 example"):
            make_mqar(np.random.default_rng(0), examples, 64, pairs, 512)


def test_eval_cli_refuses_an_empty_mqar(tmp_path, capsys):
    main(["init", str(tmp_path / "m"), "--preset", "tiny"])
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "m"), "--mqar", "0", "--mqar-length", "32"]) == 2
    assert "needs at least 1 pair and 1 example, got 0 pairs" in capsys.readouterr().err


def test_eval_cli_reports_mqar_accuracy(tmp_path, capsys):
    main(["init", str(tmp_path / "m"), "--preset", "tiny"])
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "m"), "--mqar", "4", "--mqar-length", "32", "--mqar-examples", "8",
                 "--plan", "last:25%", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["attention_share"] == 0.25 and 0.0 <= r["accuracy"] <= 1.0 and r["examples"] == 8
