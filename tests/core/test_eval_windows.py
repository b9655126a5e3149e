"""`oryx eval --text` scores a long text in windows whose context starts empty, but one mode plan spans the
whole text: input token i runs in mode plan.resolve(N)[i] (N = tokens that predict), whichever window holds it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from oryx_core.cli import main
from oryx_core.config import preset
from oryx_core.evaluate import evaluate_text, log_softmax
from oryx_core.init import init_params
from oryx_core.plan import ModePlan
from oryx_core.reference import OryxReference
from oryx_core.tokenizer import byte_level_tokenizer
from oryx_core.weights import save_checkpoint

WINDOW = 48
TEXT = ("The plan spans the whole scored text, so a switch back to attention after the recurrent span "
        "lands in a later window than the first one, and the score says so.")  # byte tokens: four windows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "tiny"
    cfg = preset("tiny", mixer="gdn")
    params = init_params(cfg, seed=3)
    save_checkpoint(path, cfg, params)
    text = path.parent / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    return path, text, OryxReference(cfg, params)


def expected_nll(model: OryxReference, plan: str) -> float:
    """Mean NLL with the plan resolved over the whole text and each window scored from an empty context."""
    tokens = np.array(byte_level_tokenizer().encode(TEXT).ids, dtype=np.int64)
    n = len(tokens) - 1
    modes = ModePlan.parse(plan).resolve(n)
    total = 0.0
    for start in range(0, n, WINDOW):
        inputs, targets = tokens[start:min(start + WINDOW, n)], tokens[start + 1:start + WINDOW + 1]
        logp = log_softmax(model.forward(inputs[None], modes[start:start + len(inputs)])[0][0])
        total -= logp[np.arange(len(targets)), targets].sum()
    return total / n


def cli_nll(path, text, plan, capsys) -> dict:
    assert main(["eval", str(path), "--text", str(text), "--plan", plan, "--window", str(WINDOW), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_plan_switching_back_in_a_later_window_changes_the_score(tiny, capsys):
    path, text, model = tiny
    back = cli_nll(path, text, "A:0-40,R:40-120,A:120-", capsys)
    stay = cli_nll(path, text, "A:0-40,R:40-", capsys)
    assert back["tokens"] == stay["tokens"] == len(TEXT) - 1
    # Both plans agree on the first window (tokens 0-47), so they differ only if windows past it follow the plan.
    assert abs(back["nll"] - stay["nll"]) > 1e-3
    assert back["nll"] == pytest.approx(expected_nll(model, "A:0-40,R:40-120,A:120-"), rel=1e-9, abs=1e-12)
    assert stay["nll"] == pytest.approx(expected_nll(model, "A:0-40,R:40-"), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("plan", ["last:30%", "every:3:20"])
def test_plans_by_length_or_chunk_count_positions_over_the_whole_text(tiny, capsys, plan):
    path, text, model = tiny
    got = cli_nll(path, text, plan, capsys)["nll"]
    assert got == pytest.approx(expected_nll(model, plan), rel=1e-9, abs=1e-12)
    assert evaluate_text(path, TEXT, plan=plan, window=WINDOW)["nll"] == pytest.approx(got, rel=1e-12)
