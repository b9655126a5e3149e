"""Training on the PyTorch backend: mixed-mode batches, exact resume, one GPU or many (DDP / FSDP2).

A nanoGPT-style loop: `train(cfg)` reads top to bottom. What makes `--resume` exact:
- every batch (its windows and its per-token modes) comes from an RNG seeded by
  (seed, step, micro-step, rank), so the data sampler's position is the step counter;
- a checkpoint holds the model (Oryx format, through the model's own `save`), the AdamW
  state (safetensors + JSON), the step and every RNG state (python, numpy, torch CPU and
  CUDA) of every rank: no pickle anywhere;
- each checkpoint is a directory written atomically; `checkpoints/latest.json` names the
  newest and is replaced only once that directory is complete, so an interrupted save
  leaves the previous checkpoint in charge.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from oryx_core.config import OryxConfig, preset
from oryx_data import TokenShards
from oryx_core.plan import ModePlan, sample_training_modes
from oryx_core.safetensors_io import encode, load_file
from oryx_core.atomic import atomic_directory, atomic_write_bytes
from oryx_core.files import MAX_JSON_BYTES, FormatError, member, open_regular, parse_json, read_json_object
from oryx_core.weights import read_config

from .metrics import MetricSinks, check_sinks
from . import attention
from .attention import AttentionPlan
from .model import OryxModel

TRAIN_STREAM, EVAL_STREAM = 0, 1  # separate RNG streams for training batches and the fixed eval batches
MAX_NONFINITE_STEPS = 10  # consecutive steps with non-finite gradients before the run is declared diverged
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
MODEL_KEYS = {"preset", "mixer", "config", "checkpoint", "overrides"}
MODEL_DIR = "model"  # inside a training checkpoint: the Oryx checkpoint that load_checkpoint and every oryx command read


class TrainingDiverged(ValueError):
    """Gradients stayed non-finite for MAX_NONFINITE_STEPS steps in a row."""


# ----- the training config -----
@dataclass
class TrainConfig:
    """Everything a run needs; file paths are relative to the working directory."""
    model: dict  # {"preset": "20m", "mixer": "gdn"} | {"config": "config.json"} | {"checkpoint": DIR}; + "overrides"
    data: str  # token shard directory (meta.json + .bin shards)
    out: str  # run directory: log.jsonl and checkpoints/
    seq_len: int = 512
    batch_size: int = 8  # sequences per micro-step on each rank
    grad_accum: int = 1
    steps: int = 0  # optimizer steps; 0: derive from `tokens`
    tokens: int = 0  # token budget, used when steps is 0
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # 0: no clipping
    bf16: bool = True  # bf16 autocast (CUDA); master weights and optimizer stay fp32
    # torch.compile of the model: false | true | "auto" (on for CUDA, where it pays: docs/benchmarks.md,
    # "Training"). Off on CPU, where compiling costs more
    # than a short run gains.
    compile: object = "auto"
    modes: str = "mixed"  # "mixed" (the design's sampler) or a fixed plan: "attention", "recurrent", ...
    # how CUDA computes attention for a sequence that mixes modes (oryx_torch.attention.MIXED_ATTENTION, for the run)
    mixed_attention: str = "packed"
    mode_chunk: int = 64
    pure_share: float = 0.2
    eval_every: int = 100  # 0: evaluate only at the end
    eval_batches: int = 4
    eval_plans: list = field(default_factory=lambda: ["attention", "recurrent", "mixed"])
    eval_seed: int = -1  # seed of the fixed validation windows; -1: `seed` (so runs of several seeds can share them)
    save_every: int = 500  # 0: save only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    parallel: str = "ddp"  # with several processes (torchrun): "ddp" or "fsdp" (FSDP2 fully_shard)
    device: str = "auto"  # "auto" | "cuda" | "cpu"
    progress: bool = True
    log_to: list = field(default_factory=list)  # metric sinks besides log.jsonl: "tensorboard", "wandb" (metrics.py)

    def tokens_per_step(self, world_size: int) -> int:
        return self.seq_len * self.batch_size * self.grad_accum * world_size

    def total_steps(self, world_size: int) -> int:
        if self.steps:
            return self.steps
        return math.ceil(self.tokens / self.tokens_per_step(world_size))


CONFIG_TYPES = {"dict": dict, "str": str, "int": int, "float": (int, float), "bool": bool, "list": list,
                "object": (bool, str)}


def _check_types(raw: dict, source: str) -> None:
    for f in dataclasses.fields(TrainConfig):
        if f.name in raw:
            value, expected = raw[f.name], CONFIG_TYPES[f.type]
            wrong_bool = isinstance(value, bool) and f.type in ("int", "float")
            if wrong_bool or not isinstance(value, expected):
                raise ValueError(f"{source}: {f.name} must be {f.type}, got {value!r}")
            if f.type == "float" and not math.isfinite(value):  # JSON's 1e999 parses to inf
                raise ValueError(f"{source}: {f.name} must be a finite number, got {value!r}")


def _check_values(cfg: TrainConfig, source: str) -> None:
    def need(ok: bool, key: str, what: str):
        if not ok:
            raise ValueError(f"{source}: {key} {what}, got {getattr(cfg, key)!r}")

    for key in ("seq_len", "batch_size", "grad_accum", "eval_batches", "keep_checkpoints", "log_every", "mode_chunk"):
        need(getattr(cfg, key) >= 1, key, "must be >= 1")
    for key in ("steps", "tokens", "warmup", "eval_every", "save_every", "weight_decay", "grad_clip", "seed"):
        need(getattr(cfg, key) >= 0, key, "must be >= 0")
    need(cfg.steps > 0 or cfg.tokens > 0, "steps", "or tokens must be > 0")
    need(cfg.lr > 0, "lr", "must be > 0")
    need(0 <= cfg.min_lr <= cfg.lr, "min_lr", "must be in [0, lr]")
    need(len(cfg.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.betas),
         "betas", "must be two numbers in [0, 1)")
    need(0 <= cfg.pure_share <= 1, "pure_share", "must be in [0, 1]")
    need(cfg.compile in (True, False, "auto"), "compile", "must be true, false or \"auto\"")
    need(cfg.parallel in ("ddp", "fsdp"), "parallel", "must be \"ddp\" or \"fsdp\"")
    need(cfg.mixed_attention in attention.MIXED_ATTENTION_METHODS, "mixed_attention",
         "must be one of " + ", ".join(f'"{m}"' for m in attention.MIXED_ATTENTION_METHODS))
    need(cfg.device in ("auto", "cuda", "cpu"), "device", "must be \"auto\", \"cuda\" or \"cpu\"")
    check_sinks(cfg.log_to, f"{source}: log_to")
    for key, plans in (("modes", [cfg.modes]), ("eval_plans", cfg.eval_plans)):
        need(isinstance(plans, list) and len(plans) > 0, key, "must name at least one plan")
        for plan in plans:
            if plan != "mixed":
                try:
                    ModePlan.parse(plan)
                except ValueError as e:
                    raise ValueError(f"{source}: {key}: {e}") from None
    unknown = sorted(set(cfg.model) - MODEL_KEYS)
    need(not unknown, "model", f"has unknown keys {unknown} (known: {sorted(MODEL_KEYS)})")
    sources = [k for k in ("preset", "config", "checkpoint") if k in cfg.model]
    need(len(sources) == 1, "model", "must name exactly one of preset, config, checkpoint")
    need(isinstance(cfg.model.get("overrides", {}), dict), "model", "overrides must be an object")


def _set_dotted(raw: dict, assignment: str) -> None:
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {assignment!r}: expected KEY=VALUE (e.g. steps=100 or model.preset=20m)")
    try:
        value = parse_json(text, f"--set {key}")
    except FormatError:
        value = text  # a bare string such as a path or a plan
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {assignment!r}: {part} is not an object")
    node[leaf] = value


def _parse_toml(text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:
        raise ValueError("TOML training configs need Python 3.11 or newer; use JSON") from None
    return tomllib.loads(text)


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Reads a .json or .toml training config, applies KEY=VALUE overrides, validates every key."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: cannot read the training config (No such file or directory)")
    with open_regular(path) as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise FormatError(f"{path}: more than the {MAX_JSON_BYTES} bytes a training config may have")
    if path.suffix != ".toml":
        raw = parse_json(data, str(path))
    else:
        try:
            raw = _parse_toml(data.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{path}: not valid toml ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object of training settings")
    for assignment in overrides:
        _set_dotted(raw, assignment)
    return config_from_dict(raw, str(path))


def config_from_dict(raw: dict, source: str = "train config") -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}")
    missing = sorted(k for k in ("model", "data", "out") if k not in raw)
    if missing:
        raise ValueError(f"{source}: missing keys {missing}")
    _check_types(raw, source)
    cfg = TrainConfig(**raw)
    _check_values(cfg, source)
    return cfg


def model_config(spec: dict) -> tuple[OryxConfig, Path | None]:
    """The model's OryxConfig and, for `checkpoint`, the directory whose weights start the run."""
    init_from = None
    if "preset" in spec:
        cfg = preset(spec["preset"], spec.get("mixer", "gdn"))
    elif "config" in spec:
        path = Path(spec["config"])
        cfg = read_config(path)[0] if path.is_dir() else OryxConfig.from_file(path)
    else:
        init_from = Path(spec["checkpoint"])
        cfg = read_config(init_from)[0]
    return cfg.replace(**spec.get("overrides", {})), init_from


# ----- data: random windows of memory-mapped token shards -----
def open_split(data_dir: Path, split: str) -> TokenShards:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data: {data_dir}: no such directory (make one with `oryx data build`)")
    return TokenShards(data_dir, split)


def batch_rng(seed: int, stream: int, index: int, micro: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index, micro, rank])


def batch_modes(plan: str, rng: np.random.Generator, batch: int, length: int, cfg: TrainConfig) -> np.ndarray:
    """bool [batch, length], True = attention: the mixed sampler, or a fixed plan for every sequence."""
    if plan == "mixed":
        return sample_training_modes(rng, batch, length, cfg.mode_chunk, cfg.pure_share)
    return np.broadcast_to(ModePlan.parse(plan).resolve(length), (batch, length))


# ----- processes and devices -----
@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def step_progress(total: int, start: int, show: bool):
    """The bar over optimiser steps: redrawn each second on a terminal, every 30 s into a log file."""
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not show, unit="step",
                mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)


def start_runtime(device: str, setting: str = "device") -> Runtime:
    """One process, or one of WORLD_SIZE processes started by torchrun (NCCL on GPUs, gloo on CPUs).

    device is "auto", "cuda" or "cpu"; setting names where the user chose it, for the error message."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"{setting}: \"cuda\" asked for, but torch sees no CUDA device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(rank, world, torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu"))


def is_sharded(cfg: TrainConfig, rt: Runtime) -> bool:
    return rt.world > 1 and cfg.parallel == "fsdp"


def shard(model: OryxModel) -> None:
    """FSDP2, in place: each layer is one all-gather / reduce-scatter unit, the root holds the rest."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    # The root reshards too, or a no-grad forward (eval) leaves its parameters gathered and
    # the optimizer's sharded parameters no longer match the model's when a checkpoint is taken.
    fully_shard(model, reshard_after_forward=True)


def data_parallel(module: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    # A pure-attention or pure-recurrent batch leaves the other mode's weights without gradients.
    device_ids = [rt.device.index] if rt.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)


def set_grad_sync(forward: torch.nn.Module, model: OryxModel, on: bool) -> None:
    """Gradients are reduced across ranks only on the last micro-step of an accumulation."""
    if isinstance(forward, torch.nn.parallel.DistributedDataParallel):
        forward.require_backward_grad_sync = on
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(on)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, rt: Runtime) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and conv filters only (not on norms, biases, decay rates, step sizes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = rt.device.type == "cuda" and not is_sharded(cfg, rt)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)
    if optimizer.defaults.get("fused"):
        optimizer.register_step_post_hook(bump_parameter_versions)
    return optimizer


def bump_parameter_versions(optimizer: torch.optim.Optimizer, args=(), kwargs=None) -> None:
    """Marks every parameter as modified in place. The fused AdamW kernel writes the parameters without bumping
    their version counters, and the model's caches of weights derived from them (the concatenated projections a
    no-grad call reuses, OryxMixer._fused_weight) are keyed by those counters: without this, an evaluation
    between optimizer steps would read the weights of the first no-grad call of the run."""
    from torch.autograd.graph import increment_version

    for group in optimizer.param_groups:
        for param in group["params"]:
            increment_version(param)


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def cover_both_modes(windows: np.ndarray, modes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Adds one sequence in the missing mode to a micro-batch whose tokens all share one mode.

    FSDP2 reduce-scatters the gradients of the parameters that have one, so every rank must
    give every parameter a gradient; an all-attention micro-batch leaves the recurrent
    weights without one (and vice versa). The extra sequence is left out of the loss, so
    it changes no gradient; with a realistic batch it is almost never needed.
    """
    if modes.any() and not modes.all():
        return windows, modes
    extra = np.full((1, modes.shape[1]), not modes.any())
    return np.concatenate([windows, windows[:1]]), np.concatenate([modes, extra])


def batch_loss(model, windows: np.ndarray, modes: np.ndarray, rt: Runtime, autocast, rows: int) -> torch.Tensor:
    """Mean next-token loss of the first `rows` sequences (those after are only there for cover_both_modes)."""
    tokens = torch.from_numpy(windows).to(rt.device, non_blocking=True)
    host_modes = torch.from_numpy(np.array(modes, dtype=bool))
    # The plan is worked out here, outside a compiled forward, from the host copy of the modes: the compiled
    # graph is then specialised to which modes occur (a plan built inside it would run both everywhere).
    plan = AttentionPlan(host_modes.to(rt.device, non_blocking=True), 0, host_modes).prepare()
    with autocast:
        logits = model(tokens[:, :-1], plan)
    return F.cross_entropy(logits[:rows].float().flatten(0, 1), tokens[:rows, 1:].flatten())


def mean_over_ranks(value: torch.Tensor, rt: Runtime) -> float:
    if rt.world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.AVG)
    return value.item()


@torch.no_grad()
def evaluate(model, val: TokenShards, cfg: TrainConfig, rt: Runtime, autocast) -> dict[str, float]:
    """Mean val loss per plan over the same fixed windows at every evaluation.

    The windows do not depend on the rank: every rank scores the same ones, so that runs on
    different numbers of GPUs report comparable losses (with per-rank windows, two 131k-token
    samples of one 285k-token validation split differed by 0.09 nats for one model)."""
    model.eval()
    losses = {}
    for plan in cfg.eval_plans:
        total = torch.zeros((), device=rt.device)
        for i in range(cfg.eval_batches):
            rng = batch_rng(cfg.seed if cfg.eval_seed < 0 else cfg.eval_seed, EVAL_STREAM, i, 0, 0)
            windows = val.sample_windows(rng, cfg.batch_size, cfg.seq_len + 1)
            modes = batch_modes(plan, rng, cfg.batch_size, cfg.seq_len, cfg)
            total += batch_loss(model, windows, modes, rt, autocast, cfg.batch_size)
        losses[plan] = mean_over_ranks(total / cfg.eval_batches, rt)
    model.train()
    return losses


# ----- checkpoints: model (Oryx format), optimizer (safetensors + JSON), RNG states, step -----
def rng_state(rt: Runtime) -> dict:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch_cpu": torch.get_rng_state().tolist()}
    if rt.device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(rt.device).tolist()
    return state


def restore_rng_state(state: dict, rt: Runtime) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
    if rt.device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["torch_cuda"], dtype=torch.uint8), rt.device)


def rng_states_of_all_ranks(rt: Runtime) -> list[dict]:
    states = [None] * rt.world
    if rt.world > 1:
        dist.all_gather_object(states, rng_state(rt))
    else:
        states[0] = rng_state(rt)
    return states


def split_optimizer_state(state: dict) -> tuple[dict[str, np.ndarray], dict]:
    """Tensors for safetensors ("state/<param>/<key>") and the JSON rest (param groups, non-tensor values)."""
    tensors, scalars = {}, {}
    for name, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state/{name}/{key}"] = value.detach().cpu().numpy()
            else:
                scalars[f"{name}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, np.ndarray], rest: dict) -> dict:
    state: dict[str, dict] = {}
    for full_key, array in tensors.items():
        _, name, key = full_key.split("/")
        state.setdefault(name, {})[key] = torch.from_numpy(array.copy())
    for full_key, value in rest["scalars"].items():
        name, key = full_key.split("/")
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def model_for_saving(model: OryxModel, cfg: TrainConfig, rt: Runtime) -> OryxModel | None:
    """The model to `save` on rank 0: itself, or under FSDP2 an unsharded CPU copy (a collective)."""
    if not is_sharded(cfg, rt):
        return model if rt.is_main else None
    full = get_model_state_dict(model, options=FULL_STATE)
    if not rt.is_main:
        return None
    copy = OryxModel(model.cfg, seed=None)
    copy.load_state_dict(full)
    return copy


def save_training_checkpoint(out: Path, step: int, skipped_steps: int, model: OryxModel, optimizer, cfg: TrainConfig,
                             rt: Runtime, tokenizer_json: str | None) -> Path:
    """Writes out/checkpoints/step-N atomically, then points latest.json at it, then prunes old ones."""
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL_STATE)  # collective under FSDP2
    rng_states = rng_states_of_all_ranks(rt)
    saving = model_for_saving(model, cfg, rt)
    if rt.is_main:
        tensors, rest = split_optimizer_state(optimizer_state)
        state = {"step": step, "skipped_steps": skipped_steps, "world_size": rt.world,
                 "sampler": {"seed": cfg.seed, "next_step": step},
                 "rng": rng_states, "train_config": dataclasses.asdict(cfg)}

        def fill(tmp: Path):
            saving.save(tmp / MODEL_DIR, tokenizer_json=tokenizer_json)
            (tmp / "optimizer.safetensors").write_bytes(encode(tensors))
            (tmp / "optimizer.json").write_text(json.dumps(rest))
            (tmp / "state.json").write_text(json.dumps(state))

    return publish_checkpoint(out, step, fill if rt.is_main else None, cfg.keep_checkpoints, rt)


def publish_checkpoint(out: Path, step: int, fill, keep: int, rt: Runtime) -> Path:
    """out/checkpoints/step-N written by `fill(tmp_dir)` (rank 0 only; other ranks pass None) as one atomic
    directory, then latest.json pointed at it, then all but the newest `keep` pruned; every rank waits for it."""
    root = out / "checkpoints"
    path = root / f"step-{step:08d}"
    if rt.is_main:
        atomic_directory(path, fill)
        atomic_write_bytes(root / "latest.json", json.dumps({"checkpoint": path.name, "step": step}).encode())
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    if rt.world > 1:
        dist.barrier()
    return path


def read_log(out: Path, missing_ok: bool = False) -> list[dict]:
    """The records of a run's log.jsonl; [] for a run that has not written one yet if missing_ok."""
    path = Path(out) / "log.jsonl"
    if missing_ok and not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint directory latest.json names: a plain directory name inside out/checkpoints."""
    root = out / "checkpoints"
    pointer = root / "latest.json"
    if not pointer.exists() and not pointer.is_symlink():
        return None
    name = read_json_object(pointer, max_bytes=1 << 16).get("checkpoint")
    if not isinstance(name, str):
        raise FormatError(f"{pointer}: corrupt (expected {{\"checkpoint\": \"step-N\"}})")
    path = member(root, name, str(pointer), regular=False)
    if not path.is_dir() or not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer}: names {path.name}, which is missing or incomplete")
    return path


def read_state(path: Path) -> dict:
    """A training checkpoint's state.json: step, skipped steps, world size and RNG states, typed."""
    state = read_json_object(member(path, "state.json", str(path)))
    for key in ("step", "skipped_steps", "world_size"):
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise FormatError(f"{path / 'state.json'}: {key} must be an integer >= 0, got {value!r:.40}")
    if not isinstance(state.get("rng"), list) or len(state["rng"]) != state["world_size"]:
        raise FormatError(f"{path / 'state.json'}: rng must be a list of one state per rank ({state['world_size']})")
    return state


def load_optimizer_state(path: Path, model, optimizer) -> None:
    tensors, _ = load_file(member(path, "optimizer.safetensors", str(path)))
    rest = read_json_object(member(path, "optimizer.json", str(path)))
    set_optimizer_state_dict(model, optimizer, optim_state_dict=join_optimizer_state(tensors, rest),
                             options=StateDictOptions(full_state_dict=True))


# ----- the log -----
def keep_log_until(log_path: Path, step: int) -> None:
    """On resume, drop log records written after the checkpoint, so the log reads as one run."""
    if log_path.exists():
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        atomic_write_bytes(log_path, "".join(line + "\n" for line in kept).encode())


def log_record(log_file, record: dict) -> None:
    if log_file is not None:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()


# ----- the loop -----
def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Trains per `cfg`; returns the last step, loss, eval losses and checkpoint path.

    `stop_after` ends the process after that many steps (the schedule still spans all of
    them), as a kill would; `resume=True` continues from the newest checkpoint in cfg.out.
    """
    previous = attention.MIXED_ATTENTION
    attention.MIXED_ATTENTION = cfg.mixed_attention  # for this run only: the process may train or serve again
    try:
        return _train(cfg, resume, stop_after)
    finally:
        attention.MIXED_ATTENTION = previous


def _train(cfg: TrainConfig, resume: bool, stop_after: int | None) -> dict:
    out, data_dir = Path(cfg.out), Path(cfg.data)
    train_data, val_data = open_split(data_dir, "train"), open_split(data_dir, "val")
    for shards in (train_data, val_data):
        if len(shards) <= cfg.seq_len:
            raise ValueError(f"data: the {shards.split} split of {data_dir} has {len(shards)} tokens, "
                             f"fewer than seq_len + 1 = {cfg.seq_len + 1}")
    tokenizer_path = data_dir / "tokenizer.json"
    tokenizer_json = tokenizer_path.read_text() if tokenizer_path.exists() else None

    resume_from = latest_checkpoint(out)
    if resume and resume_from is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'} (no latest.json)")
    if not resume and resume_from is not None:
        raise ValueError(f"out: {out} already holds checkpoints; pass --resume to continue, or choose another out")

    model_cfg, init_from = model_config(cfg.model)
    if resume:
        init_from = resume_from / MODEL_DIR
    if train_data.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"data: vocab_size {train_data.vocab_size} exceeds the model's vocab_size {model_cfg.vocab_size}")
    if cfg.seq_len > model_cfg.max_context:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_context {model_cfg.max_context}")

    rt = start_runtime(cfg.device)
    torch.manual_seed(cfg.seed)
    # fp32 master weights whatever the stored dtype; bf16 comes from autocast
    model = (OryxModel.from_checkpoint(init_from, dtype=torch.float32) if init_from
             else OryxModel(model_cfg, seed=cfg.seed)).to(rt.device)
    if is_sharded(cfg, rt):
        shard(model)
    optimizer = make_optimizer(model, cfg, rt)
    total = cfg.total_steps(rt.world)
    start, skipped, nonfinite_run, rng_restored = 0, 0, 0, None
    log_path = out / "log.jsonl"
    if resume:
        state = read_state(resume_from)
        start, skipped = state["step"], state["skipped_steps"]
        load_optimizer_state(resume_from, model, optimizer)
        rng_restored = state["world_size"] == rt.world  # batches depend on the rank count anyway
        if rng_restored:
            restore_rng_state(state["rng"][rt.rank], rt)
        if rt.is_main:
            keep_log_until(log_path, start)

    use_compile = cfg.compile is True or (cfg.compile == "auto" and rt.device.type == "cuda")
    forward = torch.compile(model) if use_compile else model  # compiled inside DDP, as nanoGPT does
    if rt.world > 1 and not is_sharded(cfg, rt):
        forward = data_parallel(forward, rt)
    autocast = (torch.autocast(rt.device.type, dtype=torch.bfloat16) if cfg.bf16 and rt.device.type == "cuda"
                else nullcontext())
    tokens_per_step = cfg.tokens_per_step(rt.world)
    pad_modes = is_sharded(cfg, rt) and cfg.modes == "mixed"

    log_file, sinks = None, None
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "a")
        sinks = MetricSinks(cfg.log_to, out, dataclasses.asdict(cfg)) if cfg.log_to else None
        log_record(log_file, {"event": "resume" if resume else "start", "step": start, "world_size": rt.world,
                              "device": str(rt.device), "compile": use_compile, "total_steps": total,
                              "rng_restored": rng_restored,
                              "model": model_cfg.to_dict(), "train": dataclasses.asdict(cfg)})
    bar = step_progress(total, start, rt.is_main and cfg.progress)
    summary = {"step": start, "loss": None, "eval": None, "checkpoint": str(resume_from) if resume_from else None}
    loss_sum = torch.zeros((), device=rt.device)
    last_time, last_step = time.perf_counter(), start
    stop = min(total, stop_after) if stop_after is not None else total
    forward.train()
    for step in range(start, stop):
        lr = lr_at(cfg, step, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):
            rng = batch_rng(cfg.seed, TRAIN_STREAM, step, micro, rt.rank)
            windows = train_data.sample_windows(rng, cfg.batch_size, cfg.seq_len + 1)
            modes = batch_modes(cfg.modes, rng, cfg.batch_size, cfg.seq_len, cfg)
            if pad_modes:
                windows, modes = cover_both_modes(windows, modes)
            set_grad_sync(forward, model, micro == cfg.grad_accum - 1)
            loss = batch_loss(forward, windows, modes, rt, autocast, cfg.batch_size) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
        done = step + 1
        if torch.isfinite(grad_norm):  # a host sync, so that no NaN/inf step ever reaches the weights
            optimizer.step()
            nonfinite_run = 0
        else:
            nonfinite_run, skipped = nonfinite_run + 1, skipped + 1
            log_record(log_file, {"step": done, "skipped": "non-finite gradients"})
            if nonfinite_run == MAX_NONFINITE_STEPS:
                raise TrainingDiverged(f"training diverged: gradients non-finite for {nonfinite_run} steps in a row "
                                       f"(steps {done - nonfinite_run + 1}-{done}); lower lr or check the model")
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)

        if done % cfg.log_every == 0 or done == stop:
            loss_value = mean_over_ranks(loss_sum / (done - last_step), rt)
            now = time.perf_counter()
            tokens_per_s = tokens_per_step * (done - last_step) / (now - last_time)
            record = {"step": done, "loss": loss_value, "lr": lr, "tokens": done * tokens_per_step,
                      "tokens_per_s": tokens_per_s, "grad_norm": grad_norm.item(), "skipped_steps": skipped}
            if rt.device.type == "cuda":
                record["max_memory_gib"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
            log_record(log_file, record)
            if sinks is not None:
                sinks.log(record)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            summary["loss"] = loss_value
            loss_sum.zero_()
            last_time, last_step = now, done
        pause_start = time.perf_counter()
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == total:
            # uncompiled: a compiled eval would recompile per plan (no grad, other branches) for little gain
            summary["eval"] = evaluate(model, val_data, cfg, rt, autocast)
            log_record(log_file, {"step": done, "eval": summary["eval"]})
            if sinks is not None:
                sinks.log({"step": done, "eval": summary["eval"]})
        if (cfg.save_every and done % cfg.save_every == 0) or done == stop:
            summary["checkpoint"] = str(save_training_checkpoint(out, done, skipped, model, optimizer, cfg, rt,
                                                                 tokenizer_json))
        last_time += time.perf_counter() - pause_start  # evaluating and saving are not training time
        summary["step"] = done
    bar.close()
    if log_file is not None:
        log_file.close()
    if sinks is not None:
        sinks.close()
    if rt.world > 1:
        dist.destroy_process_group()
    summary["model"] = None if summary["checkpoint"] is None else str(Path(summary["checkpoint"]) / MODEL_DIR)
    return summary
