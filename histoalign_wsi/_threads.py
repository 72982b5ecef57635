"""The CPU thread budget of one stage: ``--threads`` (the Snakemake rule's ``threads``),
by default the CPUs this process may use. The native thread pools (OpenMP, BLAS,
OpenCV) and torch's intra-op threads are held to it, so parallel jobs do not oversubscribe the
machine; ``encode`` splits it further between slide readers and torch."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["apply_thread_budget", "available_cpus"]

log = logging.getLogger(__name__)

_POOLS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "OPENCV_FOR_THREADS_NUM",
)


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def apply_thread_budget(threads: int | None) -> int:
    """Hold this process's native thread pools to ``threads`` (default: the CPUs it may
    use); returns the budget. Libraries read the environment when they load, so this
    runs before a stage imports them; torch and OpenCV, if already loaded, are set
    directly."""
    budget = max(1, threads or available_cpus())
    for var in _POOLS:
        if threads is not None or var not in os.environ:
            os.environ[var] = str(budget)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(budget)
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        cv2.setNumThreads(budget)
    log.debug("thread budget: %d", budget)
    return budget
