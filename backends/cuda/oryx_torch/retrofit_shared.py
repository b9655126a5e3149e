"""The shared stage of a retrofit: low-rank deltas on shared projections, trained mixed-mode.

`oryx retrofit` freezes every shared tensor, so the recurrence must make do with keys and values made for
softmax attention. This stage, run on an already retrofitted checkpoint (SRC, whole or an adapter), lets
chosen shared projections move by a low-rank delta W + B @ A (B [out, rank] starts at zero, so step 0 is
SRC exactly) while the recurrent-mode tensors keep training. One loss per batch:

  - the rows under recurrent and mixed plans (one plan per sequence, as stage (b)): KL of their logits to
    the FROZEN source's all-attention logits (SRC with no delta);
  - the first `attention_share` of the rows run all-attention with the deltas: KL of those logits to the
    same source logits, weighted by `attention_weight`, which holds attention mode near SRC. Unless
    `attention_weight_fixed`, each evaluation doubles the weight when the drift (below) is over half the budget
    and halves it (not below its start) when the drift is under a fifth of it, so the run stays near the budget
    instead of spending it early.

Attention mode changes here, so it is measured: every evaluation scores the validation windows in attention
mode with and without the deltas; the drift is (adapted NLL / source NLL - 1). The run keeps the best state
(lowest mean validation NLL over the other plans) among evaluations whose drift is within
`attention_budget`, and the finished model is that state: its deltas merged into the shared tensors
(oryx_core.adapter.merge_lowrank, factors rounded to bfloat16 as an adapter stores them; recurrent
matrices rounded likewise), so the whole checkpoint and its adapter load to the same tensors.

Machinery as retrofit.py's: batches seeded by (seed, step, micro-step, rank), atomic checkpoints holding
the trained tensors, the optimizer, every rank's RNG state and the best state so far, exact `--resume`,
JSONL log, progress bar; under torchrun the trainable gradients are averaged by hand.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call

from oryx_core.adapter import LOWRANK_A, LOWRANK_B, merge_lowrank_params, round_lowrank, stored_form
from oryx_core.atomic import atomic_write_bytes
from oryx_core.safetensors_io import encode, load_file
from oryx_core.spec import RECURRENT, parameter_specs
from oryx_core.weights import load_checkpoint, save_checkpoint

from .model import OryxModel, torch_to_numpy
from .retrofit import (DistillationConfig, check_distillation_config, eval_modes, open_run, optimizer_step,
                       retrofit_start, student_modes)
from .train import (EVAL_STREAM, TRAIN_STREAM, Runtime, batch_rng, bump_parameter_versions, keep_log_until,
                    log_record, lr_at, publish_checkpoint, mean_over_ranks, read_state, restore_rng_state,
                    rng_states_of_all_ranks, start_runtime, step_progress)

# Projection names (the spec's, without layer prefix) a delta may adapt, and the block each lives in.
SHARED_TARGET_BLOCKS = {"q_attn": "mixer", "k_proj": "mixer", "v_proj": "mixer", "g_proj": "mixer",
                        "o_proj": "mixer", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# The keys and values the recurrence reads; the mixer's output projection, which sees every mode's output; and
# attention's own query, which changes nothing in recurrent mode but lets attention re-aim at the moved keys.
DEFAULT_SHARED_TARGETS = ("q_attn", "k_proj", "v_proj", "o_proj")


@dataclass
class SharedStageConfig(DistillationConfig):
    """The opt-in shared stage: low-rank deltas on `targets` (rank `rank`) and SRC's recurrent tensors, trained
    with mixed-mode rows while all-attention rows hold attention mode within `attention_budget`."""
    rank: int = 32
    targets: list = field(default_factory=lambda: list(DEFAULT_SHARED_TARGETS))
    recurrent_lr_scale: float = 0.5  # the recurrent tensors' learning rate relative to the deltas' (lr)
    attention_share: float = 0.25  # rows per micro-batch run all-attention (at least one)
    attention_weight: float = 1.0
    attention_weight_fixed: bool = False
    attention_budget: float = 0.01  # allowed relative rise of attention mode's validation NLL

    def attention_rows(self) -> int:
        return min(self.batch_size - 1, max(1, round(self.batch_size * self.attention_share)))


def check_config(cfg: SharedStageConfig) -> None:
    def need(ok, what):
        if not ok:
            raise ValueError(what)

    need(cfg.rank >= 1, f"--shared-rank must be >= 1, got {cfg.rank}")
    need(len(cfg.targets) > 0, "--shared-targets must name at least one projection")
    for t in cfg.targets:
        need(t in SHARED_TARGET_BLOCKS, f"--shared-targets: unknown projection {t!r} "
                                        f"(one of {', '.join(SHARED_TARGET_BLOCKS)})")
    need(len(set(cfg.targets)) == len(cfg.targets), "--shared-targets names a projection twice")
    need(cfg.tokens > 0, "--tokens must be > 0 (the shared stage's token budget)")
    need(cfg.batch_size >= 2, "--batch-size must be >= 2 (one all-attention row and one under a student plan)")
    need(0 < cfg.attention_share < 1, f"--attention-share must be in (0, 1), got {cfg.attention_share}")
    need(cfg.attention_weight >= 0, f"--attention-weight must be >= 0, got {cfg.attention_weight}")
    need(cfg.attention_budget >= 0, f"--attention-budget must be >= 0, got {cfg.attention_budget}")
    need(cfg.recurrent_lr_scale >= 0, f"--recurrent-lr-scale must be >= 0, got {cfg.recurrent_lr_scale}")
    need("attention" in cfg.eval_plans, "the evaluation plans must include attention (its drift is bounded)")
    check_distillation_config(cfg)


def target_names(model_cfg, targets) -> list[str]:
    """Spec names of the adapted matrices, layer by layer; each must exist and not be recurrent-only."""
    specs = {s.name: s for s in parameter_specs(model_cfg)}
    names = []
    for i in range(model_cfg.n_layers):
        for t in targets:
            name = f"layers.{i}.{SHARED_TARGET_BLOCKS[t]}.{t}.weight"
            if name not in specs:
                raise ValueError(f"--shared-targets: this model has no {t} (no tensor {name!r})")
            if specs[name].mode == RECURRENT:
                raise ValueError(f"--shared-targets: {t} is recurrent-only here; it trains whole already")
            names.append(name)
    return names


class LowRankDeltas(torch.nn.Module):
    """Factor pairs per adapted matrix: delta = b @ a, a [rank, in] ~ N(0, 1/in), b [out, rank] = 0."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.names = list(shapes)
        self.a = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(rank, shapes[n][1], generator=gen)
                                                           / math.sqrt(shapes[n][1])) for n in self.names)
        self.b = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(shapes[n][0], rank)) for n in self.names)

    def overrides(self, model: OryxModel) -> dict[str, torch.Tensor]:
        own = dict(model.named_parameters())
        return {n: own[n] + (b @ a).to(own[n].dtype) for n, a, b in zip(self.names, self.a, self.b)}

    def factors(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {n: (torch_to_numpy(a.detach().float()), torch_to_numpy(b.detach().float()))
                for n, a, b in zip(self.names, self.a, self.b)}

    def flat(self) -> dict[str, np.ndarray]:
        return {n + suffix: f for n, pair in self.factors().items() for suffix, f in zip((LOWRANK_A, LOWRANK_B), pair)}

    def load_flat(self, tensors: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for n, a, b in zip(self.names, self.a, self.b):
                a.copy_(torch.from_numpy(np.asarray(tensors[n + LOWRANK_A], np.float32)))
                b.copy_(torch.from_numpy(np.asarray(tensors[n + LOWRANK_B], np.float32)))


def forget_fused(model: OryxModel) -> None:
    """Drops the cached concatenated projection weights: a no-grad call with overrides must not reuse (or leave
    behind) a concatenation keyed by tensors that no longer exist."""
    for layer in model.layers:
        layer.mixer._fused = None
        if layer.mlp is not None:
            layer.mlp._fused = None


def adapted_forward(model: OryxModel, deltas: LowRankDeltas, tokens, modes):
    if not torch.is_grad_enabled():
        forget_fused(model)
    out = functional_call(model, deltas.overrides(model), (tokens, modes))
    if not torch.is_grad_enabled():
        forget_fused(model)
    return out


def shared_loss(model, deltas, tokens, modes, attention_rows: int, attention_weight: float):
    """(total, mixed-plan KL, attention-mode KL): per-token KL(source attention || adapted) on each group of rows."""
    with torch.no_grad():
        teacher = F.log_softmax(model(tokens, torch.ones_like(modes)).float(), -1)
    student = F.log_softmax(adapted_forward(model, deltas, tokens, modes).float(), -1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)  # [B, T]
    attention, mixed = kl[:attention_rows].mean(), kl[attention_rows:].mean()
    return mixed + attention_weight * attention, mixed.detach(), attention.detach()


@torch.no_grad()
def evaluate(model, deltas, val, cfg: SharedStageConfig, rt: Runtime, autocast) -> dict[str, float]:
    """Validation NLL per plan with the deltas, attention mode's NLL without them ("source/attention"), the
    drift between the two, and the selection score (mean NLL over the plans other than attention)."""
    model.eval()
    sums = {plan: torch.zeros((), device=rt.device) for plan in [*cfg.eval_plans, "source/attention"]}
    for i in range(cfg.eval_batches):
        windows = val.sample_windows(batch_rng(cfg.seed, EVAL_STREAM, i, 0, 0), cfg.batch_size, cfg.seq_len + 1)
        tokens = torch.from_numpy(np.asarray(windows)).to(rt.device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:].flatten()
        for plan in sums:
            modes = torch.from_numpy(eval_modes("attention" if plan == "source/attention" else plan,
                                                cfg.batch_size, cfg.seq_len).copy()).to(rt.device)
            with autocast:
                logits = (model(inputs, modes) if plan == "source/attention"
                          else adapted_forward(model, deltas, inputs, modes))
            sums[plan] += F.cross_entropy(logits.float().flatten(0, 1), targets)
    out = {plan: mean_over_ranks(value / cfg.eval_batches, rt) for plan, value in sums.items()}
    out["attention_drift"] = out["attention"] / out["source/attention"] - 1.0
    others = [p for p in cfg.eval_plans if p != "attention"]
    out["score"] = float(np.mean([out[p] for p in others])) if others else out["attention"]
    model.train()
    return out


# ----- state: the trained tensors, the best of them, checkpoints -----
def trained_tensors(model: OryxModel, deltas: LowRankDeltas, recurrent: list[str]) -> dict[str, np.ndarray]:
    own = dict(model.named_parameters())
    return {**{n: torch_to_numpy(own[n].detach().float()) for n in recurrent}, **deltas.flat()}


def load_trained_tensors(model: OryxModel, deltas: LowRankDeltas, tensors: dict[str, np.ndarray]) -> None:
    own = dict(model.named_parameters())
    with torch.no_grad():
        for n, value in tensors.items():
            if n in own:
                own[n].copy_(torch.from_numpy(np.asarray(value, np.float32)))
    deltas.load_flat(tensors)


def save_stage_checkpoint(out: Path, step: int, skipped: int, tensors: dict, optimizer, best: dict | None,
                          attention_weight: float, cfg: SharedStageConfig, rt: Runtime) -> Path:
    rng_states = rng_states_of_all_ranks(rt)
    if rt.is_main:
        state = {"step": step, "skipped_steps": skipped, "world_size": rt.world, "rng": rng_states,
                 "best": None if best is None else best["record"], "attention_weight": attention_weight,
                 "shared_stage": dataclasses.asdict(cfg)}

        def fill(tmp: Path):
            (tmp / "trained.safetensors").write_bytes(encode(tensors))
            if best is not None:
                (tmp / "best.safetensors").write_bytes(encode(best["tensors"]))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps(state))

    return publish_checkpoint(out, step, fill if rt.is_main else None, cfg.keep_checkpoints, rt)


def finished_params(src: str, model_cfg, tensors: dict[str, np.ndarray], recurrent: list[str], factors: dict):
    """SRC's tensors (its dtype) with the trained recurrent tensors (matrices through bfloat16) and the deltas
    (factors through bfloat16) merged: what the run's adapter loads to."""
    ckpt = load_checkpoint(src)
    dtype = next(iter(ckpt.params.values())).dtype
    params = dict(ckpt.params)
    for n in recurrent:
        params[n] = np.asarray(stored_form(n, tensors[n])).astype(np.float32).astype(dtype)
    return merge_lowrank_params(params, round_lowrank(factors))


def factors_of(tensors: dict[str, np.ndarray], names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {n: (tensors[n + LOWRANK_A], tensors[n + LOWRANK_B]) for n in names}


# ----- the loop -----
def retrofit_shared(cfg: SharedStageConfig, resume: bool = False, stop_after: int | None = None,
                    deadline: float | None = None, on_eval=None) -> dict:
    """Runs the shared stage; the finished model (SRC's dtype, deltas merged) goes to out/model and the factor
    pairs (bfloat16, as an adapter stores them) to out/lowrank.safetensors. `stop_after` ends after that many
    steps with a checkpoint, as a kill would; `deadline` (time.time()) ends the run early the same way but then
    finishes it with the best state so far (logged as such). `on_eval(step, tokens, evaluation, forward)` runs on
    rank 0 after each evaluation; forward(tokens, modes) is the adapted model."""
    check_config(cfg)
    out, train_data, val_data, resume_from = open_run(cfg, resume)

    model_cfg, params, tokenizer_json, src_dtype = retrofit_start(cfg.src, None, None, cfg.seed)
    src_dtype = src_dtype if src_dtype in ("float32", "bfloat16", "float16") else None
    if train_data.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"--data {cfg.data}: vocab_size {train_data.vocab_size} exceeds the model's "
                         f"{model_cfg.vocab_size} (tokenise with SRC's tokenizer)")
    names = target_names(model_cfg, cfg.targets)
    recurrent = [s.name for s in parameter_specs(model_cfg) if s.mode == RECURRENT]
    rt = start_runtime(cfg.device, "--device")
    torch.manual_seed(cfg.seed)
    model = OryxModel(model_cfg, seed=None)
    model.load_params(params)
    own = dict(model.named_parameters())
    deltas = LowRankDeltas({n: tuple(own[n].shape) for n in names}, cfg.rank, cfg.seed)
    model, deltas = model.to(rt.device), deltas.to(rt.device)
    for n, p in model.named_parameters():
        p.requires_grad_(n in recurrent)
    own = dict(model.named_parameters())
    delta_params = [*deltas.a, *deltas.b]
    recurrent_params = [own[n] for n in recurrent]
    trainable = delta_params + recurrent_params
    fused = rt.device.type == "cuda"
    optimizer = torch.optim.AdamW([{"params": delta_params, "scale": 1.0},
                                   {"params": recurrent_params, "scale": cfg.recurrent_lr_scale}],
                                  lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=0.0, fused=fused or None)
    if optimizer.defaults.get("fused"):  # evaluations between steps must read the current projections
        optimizer.register_step_post_hook(bump_parameter_versions)
    total = math.ceil(cfg.tokens / cfg.tokens_per_step(rt.world))
    start, skipped, best, attention_weight = 0, 0, None, cfg.attention_weight
    log_path = out / "log.jsonl"
    if resume:
        state = read_state(resume_from)
        start, skipped = state["step"], state["skipped_steps"]
        attention_weight = float(state.get("attention_weight", cfg.attention_weight))
        load_trained_tensors(model, deltas, load_file(resume_from / "trained.safetensors")[0])
        optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", map_location=rt.device, weights_only=True))
        if state.get("best") is not None:
            best = {"record": state["best"],
                    "tensors": {k: np.asarray(v) for k, v in load_file(resume_from / "best.safetensors")[0].items()}}
        if state["world_size"] == rt.world:
            restore_rng_state(state["rng"][rt.rank], rt)
        if rt.is_main:
            keep_log_until(log_path, start)

    autocast = (torch.autocast(rt.device.type, dtype=torch.bfloat16) if cfg.bf16 and rt.device.type == "cuda"
                else nullcontext())
    tokens_per_step = cfg.tokens_per_step(rt.world)
    attention_rows = cfg.attention_rows()
    log_file = None
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "a")
        log_record(log_file, {"event": "resume" if resume else "start", "stage": "shared", "step": start,
                              "world_size": rt.world, "device": str(rt.device), "steps": total,
                              "adapted_tensors": len(names),
                              "delta_parameters": sum(p.numel() for p in delta_params),
                              "recurrent_parameters": sum(p.numel() for p in recurrent_params),
                              "model": model_cfg.to_dict(), "shared_stage": dataclasses.asdict(cfg)})

    def forward(tokens, modes):
        return adapted_forward(model, deltas, tokens, modes)

    def run_eval(done: int) -> dict:
        nonlocal best, attention_weight
        result = evaluate(model, deltas, val_data, cfg, rt, autocast)
        within = result["attention_drift"] <= cfg.attention_budget
        if not cfg.attention_weight_fixed:
            if result["attention_drift"] > 0.5 * cfg.attention_budget:
                attention_weight *= 2.0
            elif result["attention_drift"] < 0.2 * cfg.attention_budget:
                attention_weight = max(cfg.attention_weight, attention_weight / 2.0)
        improved = within and (best is None or result["score"] < best["record"]["score"])
        if improved:
            best = {"record": {"step": done, "score": result["score"], "attention_drift": result["attention_drift"]},
                    "tensors": trained_tensors(model, deltas, recurrent)}
        log_record(log_file, {"step": done, "stage": "shared", "tokens": done * tokens_per_step, "eval": result,
                              "within_budget": within, "best_step": best["record"]["step"] if best else None,
                              "attention_weight": attention_weight})
        if on_eval is not None and rt.is_main:
            on_eval(done, done * tokens_per_step, result, forward)
        return result

    summary = {"step": start, "loss": None, "eval": None, "best": best and best["record"],
               "checkpoint": str(resume_from) if resume_from else None}
    if start == 0:
        summary["eval"] = run_eval(0)
    bar = step_progress(total, start, rt.is_main and cfg.progress)
    sums = torch.zeros(3, device=rt.device)
    last_time, last_step = time.perf_counter(), start
    stop = min(total, stop_after) if stop_after is not None else total
    cut_short = False
    model.train()
    for step in range(start, stop):
        lr = lr_at(cfg, step, total)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        for micro in range(cfg.grad_accum):
            rng = batch_rng(cfg.seed, TRAIN_STREAM, step, micro, rt.rank)
            windows = train_data.sample_windows(rng, cfg.batch_size, cfg.seq_len)
            tokens = torch.from_numpy(np.asarray(windows)).to(rt.device, non_blocking=True)
            modes = np.concatenate([np.ones((attention_rows, cfg.seq_len), bool),
                                    student_modes(rng, cfg.student_plans, cfg.batch_size - attention_rows,
                                                  cfg.seq_len)])
            with autocast:
                loss, mixed, attention = shared_loss(model, deltas, tokens, torch.from_numpy(modes).to(rt.device),
                                                     attention_rows, attention_weight)
            (loss / cfg.grad_accum).backward()
            sums += torch.stack([loss.detach(), mixed, attention]) / cfg.grad_accum
        done = step + 1
        grad_norm = optimizer_step(trainable, optimizer, cfg.grad_clip, rt, log_file, done)
        skipped += not bool(torch.isfinite(grad_norm))
        bar.update(1)
        out_of_time = deadline is not None and time.time() >= deadline
        if rt.world > 1:  # every rank stops at the same step
            flag = torch.tensor(float(out_of_time), device=rt.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if done % cfg.log_every == 0 or done == stop or out_of_time:
            values = [mean_over_ranks(v / (done - last_step), rt) for v in sums]
            now = time.perf_counter()
            tokens_per_s = tokens_per_step * (done - last_step) / (now - last_time)
            record = {"step": done, "stage": "shared", "loss": values[0], "kl_plans": values[1],
                      "kl_attention": values[2], "lr": lr, "tokens": done * tokens_per_step,
                      "tokens_per_s": tokens_per_s, "grad_norm": grad_norm.item(), "skipped_steps": skipped}
            if rt.device.type == "cuda":
                record["max_memory_gib"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
            log_record(log_file, record)
            bar.set_postfix(loss=f"{values[0]:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            summary["loss"] = values[0]
            sums.zero_()
            last_time, last_step = now, done
        pause = time.perf_counter()
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == total or out_of_time:
            summary["eval"] = run_eval(done)
        if (cfg.save_every and done % cfg.save_every == 0) or done == stop or out_of_time:
            summary["checkpoint"] = str(save_stage_checkpoint(out, done, skipped,
                                                              trained_tensors(model, deltas, recurrent), optimizer,
                                                              best, attention_weight, cfg, rt))
        last_time += time.perf_counter() - pause
        summary["step"] = done
        if out_of_time:
            cut_short = True
            break
    bar.close()
    summary["best"] = best and best["record"]
    if (summary["step"] == total or cut_short) and rt.is_main:
        if best is None:
            raise ValueError(f"--attention-budget {cfg.attention_budget}: no evaluation kept attention mode within "
                             f"it, not even the start; nothing to save")
        log_record(log_file, {"event": "best", "step": summary["step"], "cut_short_by_deadline": cut_short,
                              "attention_budget": cfg.attention_budget, **best["record"]})
        params = finished_params(cfg.src, model_cfg, best["tensors"], recurrent, factors_of(best["tensors"], names))
        summary["model"] = str(save_checkpoint(out / "model", model_cfg, params, dtype=src_dtype,
                                               tokenizer_json=tokenizer_json))
        factors = round_lowrank(factors_of(best["tensors"], names))
        flat = {n + s: stored_form(n + s, f) for n, pair in factors.items()
                for s, f in zip((LOWRANK_A, LOWRANK_B), pair)}
        atomic_write_bytes(out / "lowrank.safetensors", encode(flat))
        summary["lowrank"] = str(out / "lowrank.safetensors")
    if log_file is not None:
        log_file.close()
    if rt.world > 1:
        dist.barrier()
    return summary


def read_lowrank(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The factor pairs of a finished run's lowrank.safetensors."""
    tensors = load_file(Path(path))[0]
    names = sorted(n[:-len(LOWRANK_A)] for n in tensors if n.endswith(LOWRANK_A))
    return {n: (np.asarray(tensors[n + LOWRANK_A]), np.asarray(tensors[n + LOWRANK_B])) for n in names}
