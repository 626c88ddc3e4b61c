"""Where the benchmark runs and how it reads time and memory there: CPU or CUDA, pinned threads, load average.

On CUDA, kernels run asynchronously: a step's wall time is only its time after ``torch.cuda.synchronize`` on
both sides, and its memory is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On the CPU
the clock is ``time.perf_counter`` and memory comes from the allocation tracker of :mod:`benchmarks.harness`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

DEVICE_CHOICES = ("auto", "cpu", "cuda")
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def select_device(requested: str, cuda_available: bool | None = None) -> torch.device:
    """``auto``: CUDA when present, else the CPU; ``cuda`` without a GPU is an error, not a silent CPU run."""
    if requested not in DEVICE_CHOICES:
        raise ValueError(f"--device must be one of {DEVICE_CHOICES}, got {requested!r}")
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "cuda" and not available:
        raise RuntimeError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    if requested == "cpu" or not available:
        return torch.device("cpu")
    return torch.device("cuda")


def step_clock(device: torch.device, synchronize: Callable[[], None] | None = None) -> Callable[[Callable[[], None]],
                                                                                              float]:
    """A function that runs one step and returns its wall time in seconds, synchronised on CUDA.

    ``synchronize`` defaults to ``torch.cuda.synchronize`` on CUDA (a parameter so that tests can see it called).
    """
    if device.type == "cuda":
        sync = synchronize or torch.cuda.synchronize
    else:
        sync = synchronize

    def timed(step: Callable[[], None]) -> float:
        if sync is not None:
            sync()  # work queued before this step is not its cost
        t0 = time.perf_counter()
        step()
        if sync is not None:
            sync()  # the step's own kernels have finished
        return time.perf_counter() - t0

    return timed


def cuda_step_peak_bytes(step: Callable[[], None], start_bytes: int, cuda: Any = None) -> int:
    """Peak memory of one step on CUDA, on the same footing as the CPU tracker: what the step starts with
    (``start_bytes``: its model's parameters and optimizer state) plus the most it allocated on top.

    ``max_memory_allocated`` counts everything in the process (every other method's copy too), so the
    allocation before the step is subtracted. ``cuda`` is ``torch.cuda`` (a parameter for tests).
    """
    cuda = cuda or torch.cuda
    cuda.synchronize()
    cuda.reset_peak_memory_stats()
    before = cuda.memory_allocated()
    step()
    cuda.synchronize()
    return start_bytes + cuda.max_memory_allocated() - before


def pin_threads(threads: int) -> dict[str, str]:
    """Fix the CPU thread count: ``torch.set_num_threads`` (intra-op pool) and the usual environment variables
    (for BLAS libraries and subprocesses that read them). Returns what was set, for the report."""
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(threads)
    torch.set_num_threads(threads)
    return {"torch.set_num_threads": str(torch.get_num_threads()), **{v: os.environ[v] for v in THREAD_ENV_VARS}}


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), which is what ``os.cpu_count`` overstates in a container."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages (zeros where the platform has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def move_to(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Put a model (in place) and its batch on ``device``; returns the moved batch."""
    model.to(device)
    return {k: v.to(device) for k, v in batch.items()}


def describe(device: torch.device) -> str:
    """The accelerator in words, for the report's machine line."""
    if device.type != "cuda":
        return "CPU"
    props = torch.cuda.get_device_properties(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
            f"fp32 matmuls {'with' if tf32 else 'without'} TF32")
