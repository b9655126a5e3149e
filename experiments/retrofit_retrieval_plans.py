"""Which tokens must run in attention for the retrofitted default model to find a passkey (CPU diagnostic).

    python experiments/retrofit_retrieval_plans.py      (prints one line per plan: per example, exact match of the
                                                          answer, log-probability of the answer, attention share)

Four passkey examples of 512 tokens (experiments/retrofit_smollm2.py's generator and seed), the default model in
float32 on the PyTorch backend, under: all-attention, all-recurrent, attention on the question and answer only
(last:question), attention on the needle sentence and the question, and attention everywhere but the question.
Output of the run quoted in docs/results.md section 5: experiments/results/retrofit/retrieval_plans_cpu.txt.
"""
import sys, numpy as np, torch
sys.path.insert(0, "experiments")
import retrofit_smollm2 as r
from oryx_core.tokenizer import load_tokenizer
from oryx_core.default import DEFAULT_MODEL
from oryx_torch.model import OryxModel
torch.set_num_threads(2)
tok = load_tokenizer(DEFAULT_MODEL)
m = OryxModel.from_checkpoint(DEFAULT_MODEL, dtype=torch.float32).eval()
rng = np.random.default_rng(1000 + 512)
res = {}
for ex in range(4):
    text, answer = r.passkey_example(tok, rng, 512)
    p = tok.encode(text).ids; a = tok.encode(answer).ids; ids = p + a
    qs = text.rfind("\n") + 1
    q = len(ids) - len(tok.encode(text[:qs]).ids)
    needle_at = text.find("The pass key is")
    n0 = len(tok.encode(text[:needle_at]).ids); n1 = len(tok.encode(text[:text.find("is the pass key.") + 16]).ids)
    T = len(ids)
    plans = r.retrieval_plans(T, q)
    m2 = plans["last:question"].copy(); m2[n0:n1] = True
    plans["needle+question"] = m2
    m3 = np.zeros(T, bool); m3[:T - q] = True  # attention everywhere but the question
    plans["all-but-question"] = m3
    for name, modes in plans.items():
        with torch.no_grad():
            lp = torch.log_softmax(m(torch.tensor([ids]), torch.from_numpy(modes))[0].float(), -1)
        pred = lp[len(p) - 1:T - 1].argmax(-1).tolist()
        logp = sum(float(lp[len(p) - 1 + i, t]) for i, t in enumerate(a))
        res.setdefault(name, []).append((pred == a, round(logp, 2), round(float(modes.mean()), 3)))
for k, v in res.items(): print(k, v)
