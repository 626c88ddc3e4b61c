"""Which process of a run this is: torchrun and ``accelerate launch`` set ``RANK`` and ``WORLD_SIZE``.

Read from the environment, not from ``torch.distributed``, so that it answers before a process group exists (while
the data is read, before the model is built) and without importing torch; tasks and recipes both ask.
"""

from __future__ import annotations

import os

__all__ = ["is_main_process", "world_size"]


def world_size() -> int:
    """Processes in this run (1 when not launched by torchrun / accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that prints, plots and writes the run's shared files."""
    return int(os.environ.get("RANK", "0")) == 0
