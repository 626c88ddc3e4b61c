"""How ``lorma export`` spends its CPU threads: on independent modules, not on threads that wait for each other.

A LoRMA_pi / none export runs one SVD per adapted module (a ``d_out x d_in`` float64 matrix, 576 x 1536 on
SmolLM2-135M). LAPACK's SVD is a long chain of small parallel steps; under torch's default of one OpenMP thread per
core, every step ends at a barrier where a thread spins until its partners arrive. On a machine whose cores are busy
with other work (a training run, a build, other users), a partner is often descheduled, and the spinning thread burns
its time slice waiting: measured on a loaded 2-core machine, 5 such SVDs took 171 s wall and 45 s of CPU on 2 threads
against 14.6 s wall and 2.9 s of CPU on one (docs/serving.md). That is oversubscription, and it made an export of a
pi adapter of SmolLM2 take minutes instead of seconds.

So the export runs the modules themselves in parallel, each single-threaded: independent work has no barriers, so a
descheduled thread delays only its own module. It never uses more threads than torch was given
(``torch.get_num_threads()``, i.e. ``OMP_NUM_THREADS`` or the core count), and when memory allows fewer modules at
once than that (very large layers), the threads left over go to each module's own linear algebra.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

#: working memory the modules in flight may hold together; one module holds about WORKING_COPIES float64 copies of
#: its weight (W0, its update, the SVD's factors and LAPACK's workspace)
EXPORT_WORKING_BYTES = 4 << 30
WORKING_COPIES = 6


def parallelism(weight_sizes: Sequence[int], threads: int) -> tuple[int, int]:
    """``(modules at once, torch threads per module)`` for modules of ``weight_sizes`` elements and ``threads``.

    As many modules at once as there are threads, modules, and room in :data:`EXPORT_WORKING_BYTES` for the largest;
    the threads left over (``threads // modules``) go to each module.
    """
    threads = max(1, int(threads))
    per_module = WORKING_COPIES * 8 * max(weight_sizes, default=1)
    workers = max(1, min(threads, len(weight_sizes), EXPORT_WORKING_BYTES // per_module))
    return workers, max(1, threads // workers)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside the block (process-wide), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def map_modules(work: Callable[[T], R], items: Sequence[T], weight_sizes: Sequence[int]) -> list[R]:
    """``[work(item) for item in items]``, the items run in parallel as :func:`parallelism` allows, in order.

    ``work`` runs under ``torch.no_grad()`` (grad mode is per thread in torch, so it is set in each worker).
    """

    def run(item: T) -> R:
        with torch.no_grad():
            return work(item)

    workers, per_module = parallelism(weight_sizes, torch.get_num_threads())
    with torch_threads(per_module):
        if workers == 1:
            return [run(item) for item in items]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorma-export") as pool:
            return list(pool.map(run, items))
