"""Run a function over tasks in worker processes, results in order, memory bounded.

Workers are *spawned* (not forked: mlx and BLAS thread pools don't survive a
fork), each one set up once by ``initializer``. At most ``workers + 1`` tasks
are in flight, so a slow consumer never lets results pile up. With one worker
everything runs in this process, which is simpler to debug and profile.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def available_memory() -> int:
    """Bytes of memory available to new work (Linux: MemAvailable; else physical pages free)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_workers(per_worker_bytes: int, *, requested: int = 0) -> int:
    """``requested`` if positive, else one per core, as many as memory allows (at least one)."""
    if requested > 0:
        return requested
    fit = int(available_memory() * 0.8) // max(per_worker_bytes, 1)
    return max(1, min(os.cpu_count() or 1, fit))


def ordered_map(
    fn: Callable[[T], R],
    tasks: Iterable[T],
    *,
    workers: int,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple = (),
) -> Iterator[R]:
    """Yield ``fn(task)`` for each task, in order."""
    if workers > 1 and mp.get_start_method(allow_none=True) not in (None, "spawn", "fork", "forkserver"):
        # a joblib (loky) sweep job: its children could not start, and the sweep already fills the cores
        log.info("inside a %s worker (a parallel sweep job): tasks run in this process", mp.get_start_method())
        workers = 1
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for task in tasks:
            yield fn(task)
        return
    # one BLAS thread per worker: the workers already fill the cores
    saved = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    os.environ.update({k: threads for k in saved})
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                               initializer=initializer, initargs=initargs)
    try:
        todo = iter(tasks)
        pending = deque(pool.submit(fn, t) for _, t in zip(range(workers + 1), todo))
        while pending:
            result = pending.popleft().result()
            for t in todo:
                pending.append(pool.submit(fn, t))
                break
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
