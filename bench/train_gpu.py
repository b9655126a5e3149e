"""GPU check of `oryx train`: the 20m preset (GDN, mixed training) learns, and a killed run resumes exactly.

    python3 bench/train_gpu.py [--steps 300] [--kill-at 160] [--save-every 100] [--out DIR]

The main run is eager (the config's default); --compile true compiles it.

1. builds token shards from data/docs-corpus.txt.xz with a trained 8192-token BPE;
2. trains configs/train/20m.json for --steps steps, SIGKILLs the process once the log
   reaches --kill-at, resumes with --resume from the last checkpoint and trains to the end;
3. compares the losses the killed run logged after its last checkpoint with the ones the
   resumed run logged for the same steps, and prints the loss curve, eval losses and tokens/s;
4. short probe runs per plan and compile flag (default: mixed, attention, recurrent, each
   compiled): tokens/s with compile, and which path gives non-finite gradients, if any;
5. with 2+ GPUs, trains a few steps under `torchrun --nproc_per_node=2` (DDP, then FSDP2).
   `--multi-gpu skip` leaves step 5 out, `--multi-gpu only` runs steps 1 and 5 alone (so the
   two-GPU run can wait until another job has freed the second GPU).

Writes train_gpu.json (all numbers) and the logs under $OUT (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from oryx_core.cli import command_line

from oryx_torch.train import read_log

ROOT = Path(__file__).resolve().parents[1]


def train_until_killed(command: list[str], run: Path, kill_at: int, timeout: float) -> int | None:
    """Runs the training command and SIGKILLs it once the run's log holds a loss for step >= kill_at.

    Returns the last logged step, or None if the process failed first.
    """
    process = subprocess.Popen(command, cwd=ROOT)
    deadline = time.time() + timeout
    while process.poll() is None:
        steps = [r["step"] for r in read_log(run, missing_ok=True) if "loss" in r]
        if steps and steps[-1] >= kill_at:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return steps[-1]
        if time.time() > deadline:
            process.kill()
            raise SystemExit(f"training did not reach step {kill_at} within {timeout:.0f} s")
        time.sleep(0.5)
    print(f"training exited with code {process.returncode} before step {kill_at}", flush=True)
    return None


def median_rate(log: list[dict], after_step: int) -> float | None:
    rates = [r["tokens_per_s"] for r in log if "loss" in r and r["step"] > after_step]
    return statistics.median(rates) if rates else None


def kill_and_resume(train_command, work: Path, out: Path, args) -> dict:
    """Trains, SIGKILLs at --kill-at, resumes to the end; compares the steps both processes ran."""
    run = work / "run"
    command = train_command(run, args.compile, args.steps)
    print("$", " ".join(command), flush=True)
    killed_at = train_until_killed(command, run, args.kill_at, args.timeout)
    compile_used = args.compile
    if killed_at is None and args.compile != "false":
        run, compile_used = work / "run-eager", "false (the compiled run failed: see the output above)"
        command = train_command(run, "false", args.steps)
        killed_at = train_until_killed(command, run, args.kill_at, args.timeout)
    if killed_at is None:
        shutil.copy(run / "log.jsonl", out / "log_failed.jsonl")
        return {"compile": compile_used, "main_run": "failed before the kill: see log_failed.jsonl"}
    before_kill = read_log(run)
    shutil.copy(run / "log.jsonl", out / "log_before_kill.jsonl")
    resumed_from = json.loads((run / "checkpoints" / "latest.json").read_text())["step"]
    print(f"killed at step {killed_at}; resuming from the checkpoint of step {resumed_from}", flush=True)
    resumed = subprocess.run([*command, "--resume"], cwd=ROOT)
    after = read_log(run)
    shutil.copy(run / "log.jsonl", out / "log.jsonl")
    killed_losses = {r["step"]: r["loss"] for r in before_kill if "loss" in r and r["step"] > resumed_from}
    resumed_losses = {r["step"]: r["loss"] for r in after if "loss" in r and r["step"] in killed_losses}
    return {
        "compile": compile_used, "main_run": f"resumed run exited with code {resumed.returncode}",
        "killed_at": killed_at, "resumed_from": resumed_from,
        "resume_loss_pairs": [(s, killed_losses[s], resumed_losses.get(s)) for s in sorted(killed_losses)],
        "loss_curve": [(r["step"], r["loss"]) for r in after if "loss" in r],
        "skipped_steps": [r["step"] for r in after if "skipped" in r],
        "eval": [r for r in after if "eval" in r],
        "tokens_per_s_median": median_rate(after, 20), "tokens_per_step": args.batch_size * args.seq_len,
        "max_memory_gib": max((r.get("max_memory_gib", 0) for r in after if "loss" in r), default=None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--kill-at", type=int, default=160)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--compile", default="false", help="for the main run: true | false | auto")
    parser.add_argument("--timeout", type=float, default=170.0, help="seconds for the run up to the kill")
    parser.add_argument("--probes", nargs="*", default=["mixed:true", "attention:true", "recurrent:true"],
                        metavar="PLAN:COMPILE", help="short runs, one per training plan and compile flag")
    parser.add_argument("--probe-steps", type=int, default=100)
    parser.add_argument("--probe-lr", type=float, default=2e-3)
    parser.add_argument("--probe-until-s", type=float, default=220.0, help="start no probe after this many seconds")
    parser.add_argument("--multi-gpu", default="auto", choices=["auto", "skip", "only"],
                        help="the torchrun step: auto (with 2+ GPUs), skip, only (no single-GPU runs)")
    parser.add_argument("--main-run", default="yes", choices=["yes", "no"],
                        help="no: leave out step 2 (the kill-and-resume run), e.g. for probes alone")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/train_gpu"))
    args = parser.parse_args()
    if args.kill_at <= args.save_every or args.kill_at >= args.steps:
        raise SystemExit("--kill-at must fall after the first checkpoint and before the last step")

    import torch

    # a fresh work directory per process, so that runs on other GPUs of the machine can go on beside it
    out, work = Path(args.out), Path(tempfile.mkdtemp(prefix="oryx_train_gpu_"))
    out.mkdir(parents=True, exist_ok=True)
    oryx = command_line()
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = {"card": card, "gpus": torch.cuda.device_count(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}
    print(json.dumps(result), flush=True)

    started = time.time()
    data = work / "shards"
    subprocess.run([*oryx, "data", "build", "--input", str(ROOT / "data" / "docs-corpus.txt.xz"), "--out", str(data),
                    "--train-tokenizer", "--vocab-size", "8192", "--val-fraction", "0.02", "--quiet"], check=True, cwd=ROOT)
    result["data_build_s"] = round(time.time() - started, 1)
    result["data"] = json.loads((data / "meta.json").read_text())["tokens"]

    def train_command(run: Path, compile_flag: str, steps: int) -> list[str]:
        overrides = [f"data={data}", f"out={run}", f"steps={steps}", f"save_every={args.save_every}",
                     f"batch_size={args.batch_size}", f"seq_len={args.seq_len}", f"compile={compile_flag}",
                     "eval_every=50", "eval_batches=4", "log_every=10", "warmup=50"]
        return [*oryx, "train", str(ROOT / "configs" / "train" / "20m.json"),
                *[a for o in overrides for a in ("--set", o)]]

    if args.multi_gpu == "only":
        args.probes = []
        result.update({"compile": args.compile, "main_run": "not run (--multi-gpu only)"})
    elif args.main_run == "no":
        result.update({"compile": args.compile, "main_run": "not run (--main-run no)"})
    else:
        result.update(kill_and_resume(train_command, work, out, args))

    # Short runs per training plan with and without torch.compile: tokens/s of each, and which path
    # (attention, recurrence, both; compiled or not) gives non-finite gradients, if any (run 1 did, compiled).
    result["probes"] = {}
    for name in args.probes:
        plan, _, compile_flag = name.partition(":")
        if time.time() - started > args.probe_until_s:
            result["probes"][name] = "not run: out of time"
            continue
        probe = work / f"probe-{plan}-{compile_flag}"
        command = train_command(probe, compile_flag, args.probe_steps) + ["--set", f"modes={plan}", "--set",
                                                                           f"lr={args.probe_lr}", "--set", "eval_every=0"]
        done = subprocess.run(command, cwd=ROOT)
        log = read_log(probe)
        trained = [r for r in log if "loss" in r]
        result["probes"][name] = {
            "lr": args.probe_lr, "returncode": done.returncode, "steps_logged": len(trained),
            "losses": [(r["step"], r["loss"]) for r in trained], "skipped_steps": [r["step"] for r in log if "skipped" in r],
            "tokens_per_s_median": median_rate(log, 20)}

    if args.multi_gpu == "skip":
        result["torchrun2"] = "not run: --multi-gpu skip"
    elif torch.cuda.device_count() >= 2:
        for parallel in ("ddp", "fsdp"):
            multi = work / f"run-{parallel}"
            multi_cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *oryx[1:], "train",
                         str(ROOT / "configs" / "train" / "20m.json"), "--set", f"data={data}", "--set", f"out={multi}",
                         "--set", "steps=30", "--set", "log_every=10", "--set", "eval_every=30", "--set",
                         f"parallel={parallel}", "--set", f"compile={args.compile}"]
            done = subprocess.run(multi_cmd, cwd=ROOT)
            log = read_log(multi)
            result[f"torchrun2_{parallel}"] = {"returncode": done.returncode,
                                              "losses": [(r["step"], r["loss"]) for r in log if "loss" in r],
                                              "tokens_per_s": [r["tokens_per_s"] for r in log if "loss" in r]}
    else:
        result["torchrun2"] = "not run: this machine has one GPU"

    (out / f"train_gpu{'_multi' if args.multi_gpu == 'only' else ''}.json").write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)  # shards and checkpoints; the logs that matter were copied to out
    print(f"\nmain run (compile {result['compile']}): {result['main_run']}")
    if "loss_curve" in result:
        losses = result["loss_curve"]
        print("step  loss")
        for step, loss in losses[::3] + losses[-1:]:
            print(f"{step:5d} {loss:.4f}")
        for r in result["eval"]:
            print(f"eval @ {r['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in r["eval"].items()))
        print(f"skipped steps: {result['skipped_steps']}")
        print(f"resume: killed at {result['killed_at']}, resumed from {result['resumed_from']}; "
              f"(step, loss before kill, loss after resume): {result['resume_loss_pairs']}")
        print(f"{card}: median {result['tokens_per_s_median']:,.0f} tokens/s ({result['tokens_per_step']} tokens "
              f"per step), max memory {result['max_memory_gib']:.2f} GiB")
    for plan, probe in result["probes"].items():
        if isinstance(probe, str):
            print(f"probe {plan}: {probe}")
            continue
        last = probe["losses"][-1] if probe["losses"] else None
        rate = probe["tokens_per_s_median"]
        print(f"probe {plan} (lr {probe['lr']}): rc {probe['returncode']}, last {last}, "
              f"skipped steps {probe['skipped_steps']}, median "
              + (f"{rate:,.0f} tokens/s" if rate else "n/a"))
    print(f"total {time.time() - started:.0f} s")
    for key in ("torchrun2", "torchrun2_ddp", "torchrun2_fsdp"):
        if key in result:
            print(key, result[key] if isinstance(result[key], str) else result[key]["returncode"])


if __name__ == "__main__":
    main()
