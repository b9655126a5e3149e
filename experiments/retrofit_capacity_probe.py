"""What one layer's recurrence could learn if more of it were its own: the default model's mixers, one layer at a
time, fitted to their attention-mode outputs (retrofit stage a's loss) with more tensors trainable (docs/results.md,
"Retrofit capacity per layer").

    python experiments/retrofit_capacity_probe.py [--layers 3 10 18 25] [--steps 150] [--out FILE]

For each chosen layer: the attention-mode forward of the default model (SmolLM2-135M-Instruct retrofitted, fp32) gives
the layer's normed inputs and its mixer's attention-mode output on training windows (the repository's documentation
corpus) and held-out windows (Brown fiction, as in retrofit_smollm2.py). A copy of the mixer is then trained in
recurrent mode for the same steps under each variant, and scored on the held-out windows by the relative squared
error of its recurrent output against the attention output (what stage a minimises):
    recurrent        the tensors the retrofit trains (q_rec, conv_q, the gates): more of the same training
    + kv conv        also the short convolutions on the shared keys and values, which the recurrence reads (a
                     recurrent-only copy of them would leave attention mode exact); a Llama import has identity
                     convolutions there, so the recurrence sees raw keys and values
    + kv proj        also the key and value projections (what separate recurrent keys and values, sharing "none",
                     could learn: an upper bound that gives up the shared keys and values)
    + head gates     the recurrent tensors with GDN's gates (decay and write strength) per query head instead of per
                     key/value head, started as copies of the group's: each query head then keeps a state of its
                     own over the same keys and values (three times the state of SmolLM2's 3 key/value heads), for
                     +2 x (H - Hkv) x D parameters a layer
Only that layer runs, on inputs from the attention mode: this measures a layer's capacity, not how errors compound.
"""
from __future__ import annotations

import argparse
import datetime
import json
import lzma
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
VARIANTS = {"recurrent": (), "+ kv conv": ("conv_k.", "conv_v."),
            "+ kv proj": ("conv_k.", "conv_v.", "k_proj.", "v_proj."), "+ head gates": ()}
PER_HEAD_GATES = {"+ head gates"}


def gates_per_query_head(mixer):
    """Turn a GDN mixer's per-key/value-head gates into per-query-head ones (copies of the group's, so the output is
    unchanged until trained): a_proj, b_proj, A_log and dt_bias widened from Hkv to H rows, and the recurrence's
    inputs built without repeating them."""
    import types

    import torch
    import torch.nn.functional as F

    from oryx_torch import model as model_module

    cfg = mixer.cfg
    if cfg.mixer != "gdn":
        raise SystemExit("retrofit_capacity_probe.py: + head gates is for GDN mixers")
    G, H = cfg.group_size, cfg.n_heads
    for name in ("a_proj", "b_proj"):
        old = getattr(mixer, name)
        new = torch.nn.Linear(old.in_features, H, bias=False)
        with torch.no_grad():
            new.weight.copy_(old.weight.repeat_interleave(G, 0))
        setattr(mixer, name, new)
    for name in ("A_log", "dt_bias"):
        setattr(mixer, name, torch.nn.Parameter(getattr(mixer, name).detach().repeat_interleave(G)))

    def recurrence_inputs(self, proj, k, v, q_raw, l2_normalize_qk=True, grouped=False):
        lead = k.shape[:-1]
        q = None if q_raw is None else q_raw.view(*lead, H, cfg.head_dim)
        k = k.view(*lead, cfg.n_kv_heads, cfg.head_dim)
        log_alpha = -torch.exp(self.A_log.float()) * F.softplus(proj["a_proj"].float() + self.dt_bias.float())
        beta = torch.sigmoid(proj["b_proj"].float())
        if l2_normalize_qk:
            q, k = None if q is None else model_module.l2_normalize(q), model_module.l2_normalize(k)
        return dict(q=q, k=model_module.repeat_heads(k, G, -2),
                    v=model_module.repeat_heads(v.view(*lead, cfg.n_kv_heads, cfg.v_head_dim), G, -2),
                    g=log_alpha, beta=beta)

    # keys repeated to the H query heads, so the recurrence runs per query head even where the grouped (per
    # key/value head) one would apply; the probe's plans are all recurrent, so no state advances alone
    mixer._recurrence_inputs = types.MethodType(recurrence_inputs, mixer)
    return mixer


def windows_of(tokenizer, text: str, n: int, length: int, rng) -> np.ndarray:
    ids = np.asarray(tokenizer.encode(text).ids, dtype=np.int64)
    if len(ids) < length * n:
        raise SystemExit(f"retrofit_capacity_probe.py: the text has {len(ids)} tokens, fewer than {n} x {length}")
    starts = rng.choice(len(ids) - length, n, replace=False)
    return np.stack([ids[s:s + length] for s in starts])


def capture(model, tokens: np.ndarray, layers: list[int], batch: int) -> dict:
    """{layer: (normed inputs [N, T, D], attention-mode mixer outputs [N, T, D])} from the attention-mode forward."""
    import torch

    from oryx_torch.attention import AttentionPlan

    out = {i: ([], []) for i in layers}
    last = max(layers)
    for start in range(0, len(tokens), batch):
        t = torch.from_numpy(tokens[start:start + batch])
        B, T = t.shape
        plan = AttentionPlan(torch.ones(B, T, dtype=torch.bool), 0, torch.ones(B, T, dtype=torch.bool))
        rope = model._rope(torch.arange(T))
        with torch.no_grad():
            x = model.embed(t)
            for i, layer in enumerate(model.layers[:last + 1]):
                xn = layer.attn_norm(x)
                y = layer.mixer(xn, plan, rope)
                if i in out:
                    out[i][0].append(xn)
                    out[i][1].append(y)
                x = layer._mlp(x + y)
    return {i: (torch.cat(a), torch.cat(b)) for i, (a, b) in out.items()}


def relative_error(mixer, xn, target, batch: int) -> float:
    import torch

    from oryx_torch.attention import AttentionPlan

    err = ref = 0.0
    with torch.no_grad():
        for start in range(0, len(xn), batch):
            x, y = xn[start:start + batch], target[start:start + batch]
            B, T = x.shape[:2]
            plan = AttentionPlan(torch.zeros(B, T, dtype=torch.bool), 0, torch.zeros(B, T, dtype=torch.bool))
            got = mixer(x, plan, None)
            err += float((got - y).double().pow(2).sum())
            ref += float(y.double().pow(2).sum())
    return err / ref


def train_variant(mixer, trainable_prefixes, recurrent_names, train, steps: int, batch: int, lr: float, seed: int,
                  per_head_gates: bool = False):
    import torch

    from oryx_torch.attention import AttentionPlan

    fresh = type(mixer)(mixer.cfg)  # a copy without the inference caches (packed weights) the original holds
    fresh.load_state_dict(mixer.state_dict())
    mixer = (gates_per_query_head(fresh) if per_head_gates else fresh).train()
    params = []
    for name, p in mixer.named_parameters():
        full = name
        p.requires_grad_(full in recurrent_names or full.startswith(tuple(trainable_prefixes)))
        if p.requires_grad:
            params.append(p)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    xn, target = train
    gen = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        scale = min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))  # warm-up, cosine to 0
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        pick = torch.from_numpy(gen.choice(len(xn), batch, replace=False))
        x, y = xn[pick], target[pick]
        B, T = x.shape[:2]
        plan = AttentionPlan(torch.zeros(B, T, dtype=torch.bool), 0, torch.zeros(B, T, dtype=torch.bool))
        loss = (mixer(x, plan, None) - y).pow(2).mean() / y.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    return mixer.eval(), sum(p.numel() for p in params), losses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="an Oryx checkpoint or adapter (default: the default model)")
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 10, 18, 25])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--train-windows", type=int, default=96)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--heldout", type=Path, default=REPO / "data" / "cache" / "retrofit" / "brown-fiction.txt")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or min(args.steps, args.batch, args.train_windows, args.eval_windows) < 1:
        ap.error(f"--variants from {list(VARIANTS)}; --steps, --batch and the window counts >= 1")
    if not args.heldout.is_file():
        ap.error(f"--heldout {args.heldout} is missing (experiments/retrofit_smollm2.py prepare makes it)")
    import torch

    from oryx_core.atomic import atomic_write_bytes
    from oryx_core.default import DEFAULT_ADAPTER
    from oryx_core.spec import RECURRENT, parameter_specs
    from oryx_core.tokenizer import load_tokenizer
    from oryx_torch.model import OryxModel

    torch.manual_seed(0)
    path = args.model or DEFAULT_ADAPTER
    model = OryxModel.from_checkpoint(path, dtype="float32").eval()
    if max(args.layers) >= model.cfg.n_layers or min(args.layers) < 0:
        ap.error(f"--layers must lie in [0, {model.cfg.n_layers})")
    tokenizer = load_tokenizer(path)
    rng = np.random.default_rng(0)
    docs = lzma.open(REPO / "data" / "docs-corpus.txt.xz", "rt").read()
    train_tokens = windows_of(tokenizer, docs, args.train_windows, args.seq_len, rng)
    eval_tokens = windows_of(tokenizer, args.heldout.read_text(), args.eval_windows, args.seq_len, rng)
    began = time.time()
    train = capture(model, train_tokens, args.layers, 8)
    held = capture(model, eval_tokens, args.layers, 8)
    print(f"captured {len(args.layers)} layers in {time.time() - began:.0f} s", flush=True)
    recurrent = {s.name for s in parameter_specs(model.cfg) if s.mode == RECURRENT}
    report = dict(model=str(path), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=platform.processor() or platform.machine(),
                  command=" ".join(["retrofit_capacity_probe.py"] + (sys.argv[1:] if argv is None else list(argv))),
                  settings={k: getattr(args, k) for k in ("seq_len", "train_windows", "eval_windows", "steps",
                                                          "batch", "lr")},
                  layers={})
    def save():
        if args.out:
            atomic_write_bytes(args.out, (json.dumps(report, indent=1) + "\n").encode())

    print("| layer | start | " + " | ".join(variants) + " |\n| --- | --- | " + " | ".join("---" for _ in variants)
          + " |", flush=True)
    for i in args.layers:
        mixer = model.layers[i].mixer
        prefix = f"layers.{i}.mixer."
        names = {n[len(prefix):] for n in recurrent if n.startswith(prefix)}
        row = {"start": relative_error(mixer, *held[i], 8)}
        for variant in variants:
            clock = time.time()
            trained, n_params, losses = train_variant(mixer, VARIANTS[variant], names, train[i], args.steps,
                                                      args.batch, args.lr, seed=i,
                                                      per_head_gates=variant in PER_HEAD_GATES)
            row[variant] = {"heldout_relative_error": relative_error(trained, *held[i], 8),
                            "trainable_parameters": n_params, "train_loss_first_last_10": [
                                float(np.mean(losses[:10])), float(np.mean(losses[-10:]))],
                            "seconds": round(time.time() - clock, 1)}
        report["layers"][str(i)] = row
        print(f"| {i} | {row['start']:.4f} | " + " | ".join(f"{row[v]['heldout_relative_error']:.4f}"
                                                          for v in variants) + " |", flush=True)
        save()  # after every layer: a run cut short keeps the layers it finished
    report["seconds"] = round(time.time() - began, 1)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
