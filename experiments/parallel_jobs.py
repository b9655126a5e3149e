"""Independent training jobs run side by side in worker processes that share one device.

Small models leave most of a GPU idle (kernel launches and host work dominate), so several
processes training at once get through more steps per second in total than one. The workers
live for the whole pool, so each pays the import and kernel-compilation cost once.
"""
from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

# Growable allocator segments keep each process's cached-but-free GPU memory small, so more of them fit on one GPU.
# Set at import, before any worker (which imports its runner, and so this module, first) initialises CUDA.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
OOM_RETRY_WAIT_S = 5.0


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # workers together use the cores once, not once each


def job_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes (CUDA cannot be used in forked children)."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads,))


def _guarded(function, job):
    """The job's result, or {"error": traceback} so that one failed job does not end the others.

    A job that runs out of device memory (other processes' peaks coinciding with its own) is tried once more
    after OOM_RETRY_WAIT_S."""
    for attempt in (1, 2):
        try:
            return function(job)
        except Exception as error:  # noqa: BLE001 -- reported in the results file, the other jobs go on
            if attempt == 1 and type(error).__name__ == "OutOfMemoryError":
                release_device_memory()
                time.sleep(OOM_RETRY_WAIT_S)
                continue
            return {"error": traceback.format_exc(limit=6)}
        finally:
            release_device_memory()


def release_device_memory() -> None:
    """Hands the finished job's cached GPU memory back, for the other processes on the device."""
    import gc
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def run_all(pool: ProcessPoolExecutor | None, function, jobs: list[dict]) -> list:
    """function(job) for every job, each given its "index" in `jobs`, the results in job order: on the pool (a
    failed job's result is {"error": traceback}), or in this process when there is none (a failure raises)."""
    indexed = [{**job, "index": i} for i, job in enumerate(jobs)]
    if pool is None:
        return [function(job) for job in indexed]
    results = [None] * len(jobs)
    run_jobs(pool, function, indexed, lambda job, result: results.__setitem__(job["index"], result))
    return results


def side_by_side(probes: list[dict], workers: int) -> tuple[list[dict], list[str], int]:
    """(the probes that ran, the errors of those that failed, how many jobs fit side by side) from the results of
    `workers` probes run side by side: as many as ran where one ran out of device memory (the others' peaks left
    it none), else all of them. Raises if none ran."""
    failed = [p["error"] for p in probes if "error" in p]
    ran = [p for p in probes if "error" not in p]
    if not ran:
        raise RuntimeError(f"every probe failed: {failed[0]}")
    if any("OutOfMemoryError" in error for error in failed):
        workers = len(ran)
    return ran, failed, workers


def run_jobs(pool: ProcessPoolExecutor | None, function, jobs: list, on_result, max_running: int | None = None) -> None:
    """Runs function(job) for every job on the pool (None: one after the other in this process), in order of
    submission, at most `max_running` at a time (default: as many as the pool has workers); on_result(job, result)
    as each ends, a failed job's result being {"error": its traceback}."""
    if pool is None:
        for job in jobs:
            on_result(job, _guarded(function, job))
        return
    waiting, pending = list(jobs), {}
    while waiting or pending:
        while waiting and (max_running is None or len(pending) < max_running):
            job = waiting.pop(0)
            pending[pool.submit(_guarded, function, job)] = job
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            on_result(pending.pop(future), future.result())
