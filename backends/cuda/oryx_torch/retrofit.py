"""Retrofit: teach a checkpoint's recurrent mode from its own attention mode (self-distillation).

Only the recurrent-mode tensors train (the spec's RECURRENT ones: q_rec, conv_q and the
recurrence's gates); every shared and attention-only tensor is frozen, so attention mode
stays bit-identical to SRC. Two stages, one schedule each, one run:

  (a) layer stage: the attention-mode forward gives every layer's normed input; each mixer's
      recurrent-mode output is fitted to its attention-mode output on those same inputs
      (mean squared error relative to the target's mean square, averaged over layers);
  (b) logit stage: the logits under recurrent and mixed plans (prefill-attention at a random
      prompt length, last:10%, every:4:64, all-recurrent), one plan per sequence, are fitted
      to the all-attention logits of the same tokens (KL(attention || plan), per token); with
      `kv_weight`, also every layer's keys and values (relative squared error, kv_fidelity):
      later layers' shared keys and values read what the recurrent mode left in the stream, and
      a question in attention mode retrieves only what those keys and values still carry.

The loop shares train.py's machinery: batches seeded by (seed, step, micro-step, rank), atomic
checkpoints with optimizer and RNG states, exact `--resume`, JSONL log, progress bar with
tokens/s and loss. Under torchrun every rank computes its own batch and the trainable
gradients are averaged across ranks before each step (they are few: no DDP wrapper needed).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from oryx_core.config import MIXERS
from oryx_core.init import init_params
from oryx_core.plan import ModePlan
from oryx_core.spec import RECURRENT, parameter_specs
from oryx_core.weights import load_checkpoint

from .attention import AttentionPlan
from .model import OryxModel
from .train import (EVAL_STREAM, TRAIN_STREAM, Runtime, batch_rng, keep_log_until, latest_checkpoint, log_record,
                    load_optimizer_state, make_optimizer, mean_over_ranks, read_state, restore_rng_state,
                    save_training_checkpoint, start_runtime, step_progress)

STUDENT_PLANS = ("recurrent", "prefill-attention", "last:10%", "every:4:64")
EVAL_PLANS = ("attention", "recurrent", "prefill-attention", "last:10%", "every:4:64")


@dataclass
class DistillationConfig:
    """What every retrofit stage's run reads: its files, batches, schedule, plans, checkpoints and device."""
    src: str  # the Oryx checkpoint (or adapter) the stage starts from
    out: str  # run directory: log.jsonl, checkpoints/, and what the stage finishes with
    data: str  # token shard directory made with SRC's tokenizer (oryx data build)
    tokens: int = 0  # token budget of the logit-fitting schedule
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4
    warmup: int = 20  # steps, at the start of each schedule
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    bf16: bool = True  # bf16 autocast on CUDA; the trained tensors stay fp32
    student_plans: list = field(default_factory=lambda: list(STUDENT_PLANS))
    eval_plans: list = field(default_factory=lambda: list(EVAL_PLANS))
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def tokens_per_step(self, world: int) -> int:
        return self.seq_len * self.batch_size * self.grad_accum * world


def check_distillation_config(cfg: DistillationConfig) -> None:
    """The checks every stage shares: sizes >= 1, the learning-rate range, plans that parse (at least one each)."""
    for key in ("seq_len", "batch_size", "grad_accum", "eval_batches", "keep_checkpoints", "log_every"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    if not (cfg.lr > 0 and 0 <= cfg.min_lr <= cfg.lr):
        raise ValueError("--lr must be > 0 and --min-lr in [0, lr]")
    for key in ("student_plans", "eval_plans"):
        plans = getattr(cfg, key)
        if not plans:
            raise ValueError(f"--{key.replace('_', '-')} must name at least one plan")
        for plan in plans:
            try:
                ModePlan.parse(plan)
            except ValueError as e:
                raise ValueError(f"--{key.replace('_', '-')}: {e}") from None


@dataclass
class RetrofitConfig(DistillationConfig):
    """The recurrent-only retrofit: stage (a) for `layer_tokens`, then stage (b) for `tokens`."""
    mixer: str | None = None  # None: SRC's; another mixer replaces SRC's recurrent tensors by fresh ones
    recurrent_scale: float | None = 1.0  # GDN readout scale written into the config; None keeps SRC's
    layer_tokens: int = 0  # stage (a) token budget
    # stage (b) adds kv_weight x the keys' and values' relative squared error under the plan against all-attention
    # (kv_fidelity): the shared keys and values of later layers read what the recurrent mode leaves in the stream
    kv_weight: float = 0.0
    # the recurrence gets its own short convolutions on the shared keys and values (sharing "kv" -> "kv-proj"),
    # starting as copies of SRC's (so the recurrent mode starts as SRC's); attention mode keeps SRC's
    recurrent_kv_convs: bool = False
    weight_decay: float = 0.0
    parallel: str = "ddp"  # the only one: trainable gradients are averaged by hand

    def stage_steps(self, world: int) -> tuple[int, int]:
        per = self.tokens_per_step(world)
        return math.ceil(self.layer_tokens / per), math.ceil(self.tokens / per)


def check_config(cfg: RetrofitConfig) -> None:
    def need(ok, what):
        if not ok:
            raise ValueError(what)

    need(cfg.mixer in (None, *MIXERS), f"--mixer must be one of {MIXERS}, got {cfg.mixer!r}")
    need(cfg.layer_tokens >= 0 and cfg.tokens >= 0, "--layer-tokens and --tokens must be >= 0")
    need(cfg.layer_tokens + cfg.tokens > 0, "--layer-tokens or --tokens must be > 0")
    need(cfg.recurrent_scale is None or cfg.recurrent_scale > 0, "--recurrent-scale must be > 0")
    need(math.isfinite(cfg.kv_weight) and cfg.kv_weight >= 0, "--kv-weight must be >= 0")
    check_distillation_config(cfg)


# ----- the model: SRC with fresh-or-kept recurrent tensors, everything else frozen -----
def recurrent_names(model_cfg) -> list[str]:
    return [s.name for s in parameter_specs(model_cfg) if s.mode == RECURRENT]


def with_recurrent_kv_convs(cfg, params: dict) -> tuple:
    """A sharing-"kv" config and params as sharing "kv-proj": the recurrence's own key and value convolutions
    (conv_k_rec, conv_v_rec) start as copies of the attention's, so the model computes what it did."""
    own = {name.replace(".conv_k.", ".conv_k_rec.").replace(".conv_v.", ".conv_v_rec."): value.copy()
           for name, value in params.items() if ".mixer.conv_k." in name or ".mixer.conv_v." in name}
    return cfg.replace(sharing="kv-proj"), {**params, **own}


def retrofit_start(src: str | Path, mixer: str | None, recurrent_scale: float | None, seed: int = 0,
                   recurrent_kv_convs: bool = False):
    """SRC's config, params, tokenizer.json text and stored dtype, ready to train: the mixer switched (recurrent tensors re-initialised:
    q_rec from q_attn, conv_q as the identity tap, gates from oryx_core.init), the readout scale set.

    SRC's own recurrent tensors are kept when its mixer is the one asked for, so a retrofit can
    start from an earlier one.
    """
    ckpt = load_checkpoint(src)
    cfg = ckpt.config
    params = {k: np.asarray(v, dtype=np.float32) for k, v in ckpt.params.items()}
    if mixer is not None and mixer != cfg.mixer:
        cfg = cfg.replace(mixer=mixer)
        fresh = init_params(cfg, seed)
        params = {k: v for k, v in params.items() if k in {s.name for s in parameter_specs(cfg)}}
        for name in recurrent_names(cfg):
            if name.endswith("q_rec.weight"):
                params[name] = params[name.replace("q_rec", "q_attn")].copy()
            elif name.endswith("conv_q.weight"):
                taps = np.zeros_like(fresh[name])
                taps[:, -1] = 1.0
                params[name] = taps
            elif name.endswith("conv_q.bias"):
                params[name] = np.zeros_like(fresh[name])
            else:
                params[name] = fresh[name]
    if recurrent_kv_convs and cfg.sharing != "kv-proj":
        if cfg.sharing != "kv":
            raise ValueError(f"--recurrent-kv-convs: SRC's sharing is {cfg.sharing!r}; the recurrence gets its own "
                             f"key and value convolutions only where both modes share them (sharing 'kv')")
        cfg, params = with_recurrent_kv_convs(cfg, params)
    if recurrent_scale is not None:
        cfg = cfg.replace(recurrent_scale=float(recurrent_scale))
    tokenizer = ckpt.extra_files.get("tokenizer.json")
    return cfg, params, None if tokenizer is None else tokenizer.decode("utf-8"), ckpt.dtype


def freeze_all_but_recurrent(model: OryxModel) -> list[torch.nn.Parameter]:
    """requires_grad only on the recurrent-mode tensors; returns them (in spec order)."""
    trainable = set(recurrent_names(model.cfg))
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
        if name in trainable:
            params.append(p)
    return params


# ----- the two losses -----
def layer_loss(model: OryxModel, tokens: torch.Tensor) -> torch.Tensor:
    """Stage (a): per layer, relative MSE of the recurrent-mode mixer output against the attention-mode
    one, both on the attention-mode forward's own normed inputs; mean over layers."""
    B, T = tokens.shape
    device = tokens.device
    attention = AttentionPlan(torch.ones(B, T, dtype=torch.bool, device=device), 0,
                              torch.ones(B, T, dtype=torch.bool))
    recurrent = AttentionPlan(torch.zeros(B, T, dtype=torch.bool, device=device), 0,
                              torch.zeros(B, T, dtype=torch.bool))
    rope = model._rope(torch.arange(T, device=device))
    inputs, targets = [], []
    with torch.no_grad():
        x = model.embed(tokens)
        for layer in model.layers:
            xn = layer.attn_norm(x)
            y = layer.mixer(xn, attention, rope)
            inputs.append(xn)
            targets.append(y)
            x = layer._mlp(x + y)
    total = 0.0
    for layer, xn, y in zip(model.layers, inputs, targets):
        got = layer.mixer(xn, recurrent, rope).float()
        want = y.float()
        total = total + (got - want).pow(2).mean() / want.pow(2).mean().clamp_min(1e-12)
    return total / len(model.layers)


def student_modes(rng: np.random.Generator, plans: list[str], batch: int, length: int) -> np.ndarray:
    """bool [batch, length]: one plan per sequence, drawn from `plans`; prefill-attention gets a random
    prompt of 1/8 to 1/2 of the window."""
    rows = []
    for _ in range(batch):
        plan = ModePlan.parse(plans[int(rng.integers(len(plans)))])
        prompt = int(rng.integers(length // 8, length // 2 + 1)) if plan.kind == "prefill-attention" else None
        rows.append(plan.resolve(length, prompt))
    return np.stack(rows)


def logit_loss(model: OryxModel, tokens: torch.Tensor, modes: torch.Tensor, kv_weight: float = 0.0) -> torch.Tensor:
    """Stage (b): mean over tokens of KL(all-attention || plan) on the next-token distributions; with kv_weight,
    plus kv_weight x kv_fidelity of the same two forwards."""
    with torch.no_grad(), captured_keys_values(model, kv_weight > 0) as teacher_kv:
        teacher = F.log_softmax(model(tokens, torch.ones_like(modes)).float(), -1)
    with captured_keys_values(model, kv_weight > 0) as student_kv:
        student = F.log_softmax(model(tokens, modes).float(), -1)
    loss = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
    if kv_weight > 0:
        loss = loss + kv_weight * kv_fidelity(student_kv, teacher_kv)
    return loss


@contextlib.contextmanager
def captured_keys_values(model: OryxModel, enabled: bool = True):
    """Inside, every mixer's keys and values after their convolutions (what the KV cache stores, before RoPE) are
    appended to the yielded list, layer by layer, keys then values."""
    out: list = []
    hooks = [conv.register_forward_hook(lambda module, args, result: out.append(result[0]))
             for layer in model.layers for conv in (layer.mixer.conv_k, layer.mixer.conv_v)] if enabled else []
    try:
        yield out
    finally:
        for hook in hooks:
            hook.remove()


def kv_fidelity(student: list, teacher: list) -> torch.Tensor:
    """Mean over layers and over keys and values of ||student - teacher||^2 / ||teacher||^2 (fp32)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"kv_fidelity: {len(student)} student tensors against {len(teacher)} teacher tensors")
    terms = [(s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12)
             for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


def eval_modes(plan: str, batch: int, length: int) -> np.ndarray:
    p = ModePlan.parse(plan)
    prompt = length // 2 if p.kind == "prefill-attention" else None
    return np.broadcast_to(p.resolve(length, prompt), (batch, length))


@torch.no_grad()
def evaluate(model: OryxModel, val, cfg: RetrofitConfig, rt: Runtime, autocast) -> dict[str, float]:
    """Mean next-token loss (nats) per plan over fixed validation windows, and each plan's KL to attention."""
    model.eval()
    out = {}
    for plan in cfg.eval_plans:
        nll = torch.zeros((), device=rt.device)
        kl = torch.zeros((), device=rt.device)
        for i in range(cfg.eval_batches):
            windows = val.sample_windows(batch_rng(cfg.seed, EVAL_STREAM, i, 0, 0), cfg.batch_size, cfg.seq_len + 1)
            tokens = torch.from_numpy(np.asarray(windows)).to(rt.device)
            modes = torch.from_numpy(eval_modes(plan, cfg.batch_size, cfg.seq_len).copy()).to(rt.device)
            with autocast:
                logits = model(tokens[:, :-1], modes).float()
                teacher = model(tokens[:, :-1], torch.ones_like(modes)).float()
            nll += F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            kl += F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), F.log_softmax(teacher, -1).flatten(0, 1),
                           log_target=True, reduction="batchmean")
        out[plan] = mean_over_ranks(nll / cfg.eval_batches, rt)
        out[f"kl/{plan}"] = mean_over_ranks(kl / cfg.eval_batches, rt)
    model.train()
    return out


def stage_lr(cfg: RetrofitConfig, step: int, steps_a: int, steps_b: int) -> tuple[str, float]:
    """The stage of `step` and its learning rate: warm-up then cosine to min_lr, restarted per stage."""
    stage, local, total = ("layer", step, steps_a) if step < steps_a else ("logits", step - steps_a, steps_b)
    if local < cfg.warmup:
        return stage, cfg.lr * (local + 1) / cfg.warmup
    progress = min(1.0, (local - cfg.warmup) / max(1, total - cfg.warmup))
    return stage, cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# ----- the loop -----
def open_run(cfg, resume: bool):
    """(out, train split, val split, latest checkpoint or None) of a retrofit run's config (`out`, `data`,
    `seq_len`), each problem one error naming the flag: data that is not a shard directory or too short for a
    window, --resume without a checkpoint, checkpoints already there without --resume."""
    from oryx_data import TokenShards

    out, data_dir = Path(cfg.out), Path(cfg.data)
    if not (data_dir / "meta.json").exists():
        raise FileNotFoundError(f"--data {data_dir}: not a token shard directory (make one with `oryx data build`)")
    train_data, val_data = TokenShards(data_dir, "train"), TokenShards(data_dir, "val")
    for shards in (train_data, val_data):
        if len(shards) <= cfg.seq_len:
            raise ValueError(f"--data {data_dir}: the {shards.split} split has {len(shards)} tokens, "
                             f"fewer than --seq-len + 1 = {cfg.seq_len + 1}")
    resume_from = latest_checkpoint(out)
    if resume and resume_from is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'} (no latest.json)")
    if not resume and resume_from is not None:
        raise ValueError(f"{out}: already holds checkpoints; pass --resume to continue, or choose another output")
    return out, train_data, val_data, resume_from


def optimizer_step(trainable: list, optimizer, grad_clip: float | None, rt: Runtime, log_file, step: int):
    """One optimizer step over the accumulated gradients of `trainable` (a parameter no micro-batch reached gets
    zeros; averaged over ranks; clipped to grad_clip), skipped and logged as such where the norm is not finite;
    gradients cleared either way. Returns the norm before clipping (a tensor; not finite: skipped)."""
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if rt.world > 1:
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip or float("inf"))
    if torch.isfinite(grad_norm):
        optimizer.step()
    else:
        log_record(log_file, {"step": step, "skipped": "non-finite gradients"})
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def retrofit(cfg: RetrofitConfig, resume: bool = False, stop_after: int | None = None, on_eval=None,
             deadline: float | None = None) -> dict:
    """Runs both stages; the finished model (all tensors, SRC's dtype) goes to out/model.
    `stop_after` ends after that many steps with a checkpoint, as a kill would; `deadline` (time.time()) ends the
    run the same way at the first step that finishes after it (summary["cut_short_by_deadline"]); `resume`
    continues either.
    `on_eval(step, tokens, stage, model)`, if given, runs on rank 0 after each evaluation (e.g. a held-out
    text scored per plan); it must leave the model as it found it."""
    check_config(cfg)
    out, train_data, val_data, resume_from = open_run(cfg, resume)

    model_cfg, params, tokenizer_json, src_dtype = retrofit_start(cfg.src, cfg.mixer, cfg.recurrent_scale, cfg.seed,
                                                                  cfg.recurrent_kv_convs)
    src_dtype = src_dtype if src_dtype in ("float32", "bfloat16", "float16") else None
    if train_data.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"--data {cfg.data}: vocab_size {train_data.vocab_size} exceeds the model's "
                         f"{model_cfg.vocab_size} (tokenise with SRC's tokenizer)")
    rt = start_runtime(cfg.device, "--device")
    torch.manual_seed(cfg.seed)
    if resume:
        model = OryxModel.from_checkpoint(resume_from / "model", dtype=torch.float32)
    else:
        model = OryxModel(model_cfg, seed=None)
        model.load_params(params)
    model = model.to(rt.device)
    trainable = freeze_all_but_recurrent(model)
    optimizer = make_optimizer(model, cfg, rt)
    steps_a, steps_b = cfg.stage_steps(rt.world)
    total = steps_a + steps_b
    start, skipped = 0, 0
    log_path = out / "log.jsonl"
    if resume:
        state = read_state(resume_from)
        start, skipped = state["step"], state["skipped_steps"]
        load_optimizer_state(resume_from, model, optimizer)
        if state["world_size"] == rt.world:
            restore_rng_state(state["rng"][rt.rank], rt)
        if rt.is_main:
            keep_log_until(log_path, start)

    autocast = (torch.autocast(rt.device.type, dtype=torch.bfloat16) if cfg.bf16 and rt.device.type == "cuda"
                else nullcontext())
    tokens_per_step = cfg.tokens_per_step(rt.world)
    log_file = None
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "a")
        log_record(log_file, {"event": "resume" if resume else "start", "step": start, "world_size": rt.world,
                              "device": str(rt.device), "stage_steps": [steps_a, steps_b],
                              "trainable_parameters": sum(p.numel() for p in trainable),
                              "model": model_cfg.to_dict(), "retrofit": dataclasses.asdict(cfg)})

    if start == 0:  # every rank: the evaluation averages over ranks
        start_eval = evaluate(model, val_data, cfg, rt, autocast)
        log_record(log_file, {"step": 0, "tokens": 0, "eval": start_eval})
        if on_eval is not None and rt.is_main:
            on_eval(0, 0, "start", model)
    bar = step_progress(total, start, rt.is_main and cfg.progress)
    summary = {"step": start, "loss": None, "eval": None, "checkpoint": str(resume_from) if resume_from else None}
    loss_sum = torch.zeros((), device=rt.device)
    last_time, last_step = time.perf_counter(), start
    stop = min(total, stop_after) if stop_after is not None else total
    model.train()
    for step in range(start, stop):
        stage, lr = stage_lr(cfg, step, steps_a, steps_b)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):
            rng = batch_rng(cfg.seed, TRAIN_STREAM, step, micro, rt.rank)
            windows = train_data.sample_windows(rng, cfg.batch_size, cfg.seq_len)
            tokens = torch.from_numpy(np.asarray(windows)).to(rt.device, non_blocking=True)
            with autocast:
                if stage == "layer":
                    loss = layer_loss(model, tokens)
                else:
                    modes = student_modes(rng, cfg.student_plans, cfg.batch_size, cfg.seq_len)
                    loss = logit_loss(model, tokens, torch.from_numpy(modes).to(rt.device), cfg.kv_weight)
            if loss.requires_grad:  # a micro-batch whose every sequence drew an all-attention plan has no gradient
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach() / cfg.grad_accum
        done = step + 1
        grad_norm = optimizer_step(trainable, optimizer, cfg.grad_clip, rt, log_file, done)
        skipped += not bool(torch.isfinite(grad_norm))
        bar.update(1)
        if done % cfg.log_every == 0 or done == stop or done == steps_a:
            loss_value = mean_over_ranks(loss_sum / (done - last_step), rt)
            now = time.perf_counter()
            tokens_per_s = tokens_per_step * (done - last_step) / (now - last_time)
            record = {"step": done, "stage": stage, "loss": loss_value, "lr": lr, "tokens": done * tokens_per_step,
                      "tokens_per_s": tokens_per_s, "grad_norm": grad_norm.item(), "skipped_steps": skipped}
            if rt.device.type == "cuda":
                record["max_memory_gib"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
            log_record(log_file, record)
            bar.set_postfix(stage=stage, loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            summary["loss"] = loss_value
            loss_sum.zero_()
            last_time, last_step = now, done
        pause = time.perf_counter()
        if (cfg.eval_every and done % cfg.eval_every == 0) or done in (steps_a, total):
            summary["eval"] = evaluate(model, val_data, cfg, rt, autocast)
            log_record(log_file, {"step": done, "stage": stage, "tokens": done * tokens_per_step,
                                  "eval": summary["eval"]})
            if on_eval is not None and rt.is_main:
                on_eval(done, done * tokens_per_step, stage, model)
        if (cfg.save_every and done % cfg.save_every == 0) or done == stop:
            summary["checkpoint"] = str(save_training_checkpoint(out, done, skipped, model, optimizer, cfg, rt,
                                                                 tokenizer_json))
        last_time += time.perf_counter() - pause
        summary["step"] = done
        out_of_time = deadline is not None and done < stop and time.time() >= deadline
        if rt.world > 1 and deadline is not None:  # every rank stops at the same step
            flag = torch.tensor(float(out_of_time), device=rt.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if out_of_time:
            summary["checkpoint"] = str(save_training_checkpoint(out, done, skipped, model, optimizer, cfg, rt,
                                                                 tokenizer_json))
            summary["cut_short_by_deadline"] = True
            log_record(log_file, {"event": "deadline", "step": done})
            break
    bar.close()
    if summary["step"] == total and rt.is_main:
        summary["model"] = str(model.save(out / "model", dtype=src_dtype, tokenizer_json=tokenizer_json))
    if log_file is not None:
        log_file.close()
    if rt.world > 1:
        dist.barrier()
    return summary
