"""``lorma export`` runs its modules in parallel, each single-threaded (``lorma.export.threads``).

An SVD on torch's default threads spins at OpenMP barriers when the machine's cores are busy (a pi export of
SmolLM2 went from 20 s to 6 min 54 s on a loaded 2-core machine; docs/serving.md has the measurements). These tests
check the rule that avoids it: every SVD of an export runs on one torch thread while torch has more, the threads
go to modules instead, and torch's setting comes back afterwards; the result is the sequential export's.
"""

from __future__ import annotations

import threading

import pytest
import torch
from peft import get_peft_model

import lorma.export.lora
from lorma import LormaConfig
from lorma.export import lora_export
from lorma.export.threads import EXPORT_WORKING_BYTES, WORKING_COPIES, parallelism
from test_export import far_from_identity


def test_parallelism_prefers_modules_to_threads_within_memory() -> None:
    assert parallelism([576 * 1536] * 120, 2) == (2, 1)  # SmolLM2's MLP: one module per thread
    assert parallelism([576 * 1536] * 120, 1) == (1, 1)
    assert parallelism([576 * 1536] * 3, 16) == (3, 5)  # fewer modules than threads: the rest go to each module
    huge = EXPORT_WORKING_BYTES // (WORKING_COPIES * 8) + 1  # one module alone exceeds the budget
    assert parallelism([huge] * 96, 16) == (1, 16)
    assert parallelism([], 4) == (1, 4)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_pi_export_svds_run_single_threaded_and_match_the_sequential_export(tiny_llama, two_threads,
                                                                            monkeypatch) -> None:
    model = far_from_identity(get_peft_model(tiny_llama, LormaConfig(r=4, alpha=8, inflation="pi",
                                                                     target_modules=["q_proj", "up_proj"])))
    svd = torch.linalg.svd
    seen: list[tuple[int, str]] = []

    def recording_svd(*args, **kwargs):
        seen.append((torch.get_num_threads(), threading.current_thread().name))
        return svd(*args, **kwargs)

    monkeypatch.setattr(lorma.export.lora.torch.linalg, "svd", recording_svd)
    parallel = lora_export(model, rank=3, allow_approximate=True)
    assert len(seen) == 4 and {threads for threads, _ in seen} == {1}  # 2 layers x 2 modules, one thread each
    assert all(name.startswith("lorma-export") for _, name in seen)  # in the export's workers
    assert torch.get_num_threads() == 2

    torch.set_num_threads(1)  # one thread: the modules one after another, in this thread
    seen.clear()
    sequential = lora_export(model, rank=3, allow_approximate=True)
    assert {name for _, name in seen} == {threading.current_thread().name}
    assert parallel.state_dict.keys() == sequential.state_dict.keys()
    for key, value in parallel.state_dict.items():
        assert torch.equal(value, sequential.state_dict[key]), key
    assert [m.relative_error for m in parallel.modules] == [m.relative_error for m in sequential.modules]
