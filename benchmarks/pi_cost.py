"""``python -m benchmarks.pi_cost``: what LoRMA_pi costs on SmolLM2-135M's linear layers, and why.

Two parts, both written to ``runs/pi-cost/pi_cost.md`` (``--out``):

- **Arithmetic** (:func:`step_macs`): multiply-adds per token of one training step with LoRA and with LoRMA_pi on
  each side, from the model's shapes alone, and the ratios they imply. A dense ``d x d`` transform applied to
  activations costs ``d^2`` per token forward, ``d^2`` for the input's gradient and ``d^2`` for the transform's
  gradient; LoRA's step costs about what the frozen model costs (forward and input gradient). This is the limit of
  every exact dense strategy; only the FFT form, ``O(r d log d)`` per token, has a lower flop count.
- **Measurement** (:func:`measure_module`): each distinct module shape of SmolLM2 with each side, forward and
  backward of one module (input needs its gradient, as inside a model), for every exact strategy: ``activation``
  (autograd through ``F.linear(h, M)``, which saves ``M``), ``recompute`` (:func:`lorma.functional.
  apply_dense_recomputed`: the same flops, ``M`` rebuilt in the backward instead of saved), ``fold`` (``M`` folded
  into the weight), ``fft`` (:func:`lorma.functional.apply_pi_fft`, no ``d x d`` matrix). Timed in rounds in
  shuffled order, each ratio to LoRA on the same module taken within the round (``benchmarks/stats.py``), and
  peak memory by the harness's tracker.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lorma import functional as LF
from lorma.config import cheaper_side
from lorma.inflations.pi import PiInflation
from lorma.plumbing.fileio import atomic_write_text

from . import harness as H
from .device import load_average, pin_threads
from .rounds import run_rounds
from .stats import TARGET_HALF_WIDTH, precise_enough, ratio_estimate

R, ALPHA = H.R, H.ALPHA


@dataclass(frozen=True)
class LlamaShape:
    """The widths that decide the cost of a LLaMA-style decoder's linear layers."""

    hidden: int
    intermediate: int
    kv_width: int  # num_key_value_heads * head_dim
    layers: int
    vocab: int
    tied_embeddings: bool

    def modules(self) -> dict[str, tuple[int, int]]:
        """``name: (d_in, d_out)`` of the seven linear modules of one layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


# SmolLM2-135M's config.json (hidden 576, intermediate 1536, 9 heads of 64 with 3 KV heads, 30 layers, 49,152
# tokens, tied embeddings); read from the real config when the benchmark's fp32 copy exists (:func:`smollm2_shape`)
SMOLLM2 = LlamaShape(hidden=576, intermediate=1536, kv_width=192, layers=30, vocab=49152, tied_embeddings=True)


def smollm2_shape(cache_dir: Path) -> tuple[LlamaShape, str]:
    """The shape from the real config when it is on disk, else :data:`SMOLLM2`; and where it came from."""
    path = cache_dir / "smollm2-135m-fp32" / "config.json"
    if not path.is_file():
        return SMOLLM2, "built-in SmolLM2-135M widths"
    cfg = json.loads(path.read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return LlamaShape(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * head_dim,
                      cfg["num_hidden_layers"], cfg["vocab_size"], bool(cfg.get("tie_word_embeddings"))), str(path)


def transform_size(side: str, d_in: int, d_out: int) -> int:
    """``d`` of the square transform on ``side`` (``auto``: the smaller, as :func:`lorma.config.cheaper_side`)."""
    if side == "auto":
        side = cheaper_side(d_in, d_out)
    return d_out if side == "pre" else d_in


def step_macs(shape: LlamaShape, side: str | None, n_tokens: int, seq_len: int, r: int = R) -> dict[str, float]:
    """Multiply-adds per token of one training step on all seven linear modules of every layer.

    ``side=None`` is LoRA: the frozen model's forward and input gradient (``2 d_in d_out`` per module, no weight
    gradient), the LM head's (``2 hidden vocab``), attention's score and value products (``2 seq hidden``
    forward, twice that backward) and LoRA's adapter (``3 r (d_in + d_out)``). LoRMA_pi pays the same frozen
    model (its rank-r factors' own cost is in ``build``) plus, per module, ``3 d^2`` per token for the dense
    transform (activation strategy) and ``3 r d^2`` per step to build ``s pi(BA)`` and take its gradient to
    ``B`` and ``A``, spread over ``n_tokens``.
    """
    mods = shape.modules()
    base = shape.layers * sum(2 * i * o for i, o in mods.values())
    head = 2 * shape.hidden * shape.vocab
    attention = shape.layers * 3 * 2 * seq_len * shape.hidden
    frozen = base + head + attention
    if side is None:
        adapter = shape.layers * sum(3 * r * (i + o) for i, o in mods.values())
        return {"frozen": frozen, "transform": 0.0, "build": 0.0, "adapter": adapter, "total": frozen + adapter}
    squares = shape.layers * sum(transform_size(side, i, o) ** 2 for i, o in mods.values())
    transform, build = 3.0 * squares, 3.0 * r * squares / n_tokens
    return {"frozen": frozen, "transform": transform, "build": build, "adapter": 0.0,
            "total": frozen + transform + build}


def cheapest_step_macs(shape: LlamaShape, side: str, n_tokens: int, seq_len: int, r: int = R) -> float:
    """Multiply-adds per token of LoRMA_pi's step when each module takes the cheaper exact dense strategy at
    ``n_tokens``: ``3 d^2`` (activation) or ``d d_other + 2 d^2 d_other / n`` (fold: the folded weight's gradient
    GEMM and the fold's two products), as :func:`lorma.functional.choose_dense_strategy` counts them."""
    total = step_macs(shape, None, n_tokens, seq_len)["frozen"]
    for d_in, d_out in shape.modules().values():
        resolved = cheaper_side(d_in, d_out) if side == "auto" else side
        d, other = (d_out, d_in) if resolved == "pre" else (d_in, d_out)
        activation = 3 * d * d
        fold = d * other + 2 * d * d * other / n_tokens
        total += shape.layers * (min(activation, fold) + 3 * r * d * d / n_tokens)
    return total


def fold_break_even(side: str, d_in: int, d_out: int) -> str:
    """Tokens per step above which folding ``M`` into the weight costs fewer multiply-adds than applying it to
    activations with gradients (:func:`lorma.functional.choose_dense_strategy`'s counts)."""
    d = transform_size(side, d_in, d_out)
    other = d_in if side == "pre" else d_out
    if 3 * d <= other:
        return "never"
    return f"{2 * d * other / (3 * d - other):.0f}"


def saved_transform_bytes(shape: LlamaShape, side: str) -> int:
    """fp32 bytes of the ``d x d`` matrices autograd saves for the backward (one per module, all alive at once at
    the end of the forward) under the activation strategy."""
    return 4 * shape.layers * sum(transform_size(side, i, o) ** 2 for i, o in shape.modules().values())


def model_bytes(shape: LlamaShape) -> int:
    """fp32 bytes of the frozen model's parameters (embeddings once when tied; norms ignored)."""
    per_layer = sum(i * o for i, o in shape.modules().values())
    embed = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)
    return 4 * (shape.layers * per_layer + embed)


def arithmetic_section(shape: LlamaShape, source: str, n_tokens: int, seq_len: int) -> str:
    lora = step_macs(shape, None, n_tokens, seq_len)
    lines = [
        f"## Arithmetic: SmolLM2-135M all linear, {n_tokens} tokens per step",
        "",
        f"Shapes from {source}: hidden {shape.hidden}, intermediate {shape.intermediate}, k / v width "
        f"{shape.kv_width}, {shape.layers} layers, vocabulary {shape.vocab:,}. Transform size d per module "
        "(pre: d_out, post: d_in, auto: the smaller):",
        "",
        "| module | d_in x d_out | pre d | post d | auto side (d) | fold cheaper from n > (pre / post) |",
        "|---|---|---:|---:|---|---|",
    ]
    for name, (i, o) in shape.modules().items():
        fold = " / ".join(fold_break_even(side, i, o) for side in ("pre", "post"))
        lines.append(f"| {name} | {i} x {o} | {o} | {i} | {cheaper_side(i, o)} ({transform_size('auto', i, o)}) "
                     f"| {fold} |")
    lines += [
        "",
        "Multiply-adds per token of one training step (forward, backward, no optimizer), activation strategy, "
        "and the ratio to LoRA they imply if every multiply-add ran at the same speed:",
        "",
        "| method | frozen model | d x d transforms (3 d^2) | build s pi(BA) (3 r d^2 / n) | adapter | total "
        "| / LoRA | saved d x d for backward | (model + saved) / model |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| LoRA | {lora['frozen'] / 1e6:.0f} M | - | - | {lora['adapter'] / 1e6:.1f} M | {lora['total'] / 1e6:.0f} M "
        f"| 1.00 | - | {model_bytes(shape) / 2**20:.0f} MiB |",
    ]
    for side in ("pre", "post", "auto"):
        c = step_macs(shape, side, n_tokens, seq_len)
        saved = saved_transform_bytes(shape, side)
        lines.append(f"| LoRMA_pi {side} | {c['frozen'] / 1e6:.0f} M | {c['transform'] / 1e6:.0f} M "
                     f"| {c['build'] / 1e6:.1f} M | - | {c['total'] / 1e6:.0f} M | {c['total'] / lora['total']:.2f} "
                     f"| {saved / 2**20:.0f} MiB | {(saved + model_bytes(shape)) / model_bytes(shape):.2f}x |")
    lines += ["", "With each module on the cheaper of activation and fold (what `choose_dense_strategy` picks), the "
              "limit falls with the token count, because a folded module pays one weight-gradient GEMM (d d_other "
              "per token, as much as its frozen forward) instead of 3 d^2:", "",
              "| tokens per step (sequence 64 / 256) | " + " | ".join(f"pi {s} / LoRA" for s in ("pre", "post", "auto"))
              + " |", "|---|---:|---:|---:|"]
    for n, seq in ((n_tokens, seq_len), (2048, 256), (8192, 256)):
        base = step_macs(shape, None, n, seq)["total"]
        lines.append(f"| {n} ({seq}) | " + " | ".join(f"{cheapest_step_macs(shape, s, n, seq) / base:.2f}"
                                                    for s in ("pre", "post", "auto")) + " |")
    auto = step_macs(shape, "auto", n_tokens, seq_len)
    lines += [
        "",
        f"So at {n_tokens} tokens the limit of any exact dense strategy on the auto side is "
        f"{auto['total'] / lora['total']:.2f}x LoRA's step on the activation strategy: the transforms alone are "
        f"{auto['transform'] / lora['total']:.2f}x LoRA's whole step, and none of the three d^2 terms can be "
        "skipped (the forward applies M; the input needs M^T g; B "
        "and A need the d x d gradient G = sum_t g_t h_t^T, or the FFT form of it). Folding M into the weight "
        "costs 2 d^2 d_other + n d d_other instead of 3 n d^2, fewer only from n > 2 d d_other / (3 d - "
        "d_other) tokens per step (the first table; never when d_other >= 3 d). Only the FFT form has fewer "
        "flops (about 3 x 2.5 (r + 1) d "
        "log2 d per token); see the measured table for what it costs on this machine. The memory limit: the saved "
        "d x d matrices are avoidable (rebuild M in the backward, `apply_dense_recomputed`), leaving one "
        "module's M (and its gradient) alive at a time.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ per-module measurement
STRATEGIES = ("activation", "recompute", "fold", "fft")


def module_forwards(d_in: int, d_out: int, side: str, n_tokens: int, seed: int = 0
                    ) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, torch.Tensor]]:
    """One adapted module's forward per method (LoRA, and LoRMA_pi by each exact strategy) and its tensors.

    The frozen weight and the input are shared; the input needs its gradient (a module inside a model), the
    frozen weight does not. LoRMA_pi's factors are random: the cost does not depend on their values, and the
    identity init would hide a wrong strategy from the exactness test.
    """
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
    x = torch.randn(n_tokens, d_in, generator=g).requires_grad_(True)
    s = ALPHA / R
    lora_A = (torch.randn(R, d_in, generator=g) * 0.01).requires_grad_(True)
    lora_B = (torch.randn(d_out, R, generator=g) * 0.01).requires_grad_(True)
    d = d_out if side == "pre" else d_in
    A = (torch.randn(R, d, generator=g) / math.sqrt(d)).requires_grad_(True)
    B = (torch.randn(d, R, generator=g) / math.sqrt(R)).requires_grad_(True)

    def build(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return PiInflation().transform(a, b, s)

    def around(apply: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """The transform on its side: on the output (pre) or on the input (post)."""
        if side == "pre":
            return lambda: apply(F.linear(x, w0))
        return lambda: F.linear(apply(x), w0)

    forwards = {
        "lora": lambda: F.linear(x, w0) + s * F.linear(F.linear(x, lora_A), lora_B),
        "activation": around(lambda h: F.linear(h, build(A, B))),
        "recompute": around(lambda h: LF.apply_dense_recomputed(h, A, B, build)),
        "fold": lambda: F.linear(x, LF.merge_weight(w0, build(A, B), side)),
        "fft": around(lambda h: LF.apply_pi_fft(h, A, B, s)),
    }
    return forwards, {"x": x, "w0": w0, "lora_A": lora_A, "lora_B": lora_B, "A": A, "B": B}


def module_steps(d_in: int, d_out: int, side: str, n_tokens: int, seed: int = 0) -> dict[str, Callable[[], None]]:
    """:func:`module_forwards` as training steps: forward, backward of a mean-square loss, gradients released."""
    forwards, tensors = module_forwards(d_in, d_out, side, n_tokens, seed)

    def step_of(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            forward().square().mean().backward()
            for t in tensors.values():
                t.grad = None

        return step

    return {name: step_of(f) for name, f in forwards.items()}


def measure_module(d_in: int, d_out: int, side: str, n_tokens: int, min_rounds: int, max_rounds: int,
                   budget_s: float) -> dict[str, object]:
    steps = module_steps(d_in, d_out, side, n_tokens)
    for step in steps.values():
        step()  # allocator, first-call costs
    others = [m for m in steps if m != "lora"]
    log = run_rounds(steps_as_measures(steps), min_rounds=min_rounds, max_rounds=max_rounds, warmup_rounds=1,
                     budget_s=budget_s,
                     precise=lambda v: precise_enough([ratio_estimate(v, m, "lora") for m in others]))
    peaks = {m: H.allocated_peak_bytes(step) for m, step in steps.items()}
    return {"rounds": log.rounds, "stop": log.stop_reason,
            "lora_s": sorted(r["lora"] for r in log.values)[len(log.values) // 2],
            "ratios": {m: ratio_estimate(log.values, m, "lora") for m in others},
            "peaks": peaks}


def steps_as_measures(steps: dict[str, Callable[[], None]]) -> dict[str, Callable[[], float]]:
    def timed(step: Callable[[], None]) -> Callable[[], float]:
        def measure() -> float:
            t0 = time.perf_counter()
            step()
            return time.perf_counter() - t0

        return measure

    return {m: timed(s) for m, s in steps.items()}


def measured_section(shape: LlamaShape, token_counts: list[int], rounds: tuple[int, int], budget_s: float,
                     log: Callable[[str], None]) -> str:
    kinds = {"q_proj / o_proj": "q_proj", "k_proj / v_proj": "k_proj", "gate_proj / up_proj": "gate_proj",
             "down_proj": "down_proj"}
    mods = shape.modules()
    lines = [
        "## Measured: one module's forward + backward, each exact strategy against LoRA on the same module",
        "",
        "Per-round ratios to LoRA (median [95% CI], `benchmarks/stats.py`); peak memory is what one step allocates "
        "on top of the module's weights and input (op-by-op tracker). The cheapest strategy per row is in bold "
        "(by median; ties within the intervals are possible, see them).",
        "",
        "| module | side (d) | tokens | rounds | LoRA step (ms) | activation | recompute | fold | fft "
        "| peak: LoRA / activation / recompute / fold / fft (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, name in kinds.items():
        d_in, d_out = mods[name]
        for side in ("pre", "post"):
            for n in token_counts:
                load = load_average()[0]
                res = measure_module(d_in, d_out, side, n, rounds[0], rounds[1], budget_s)
                ratios = res["ratios"]
                best = min(ratios, key=lambda m: ratios[m].median)
                cells = [f"**{ratios[m].format()}**" if m == best else ratios[m].format() for m in STRATEGIES]
                peaks = " / ".join(f"{res['peaks'][m] / 2**20:.1f}" for m in ("lora", *STRATEGIES))
                d = d_out if side == "pre" else d_in
                auto = " (auto)" if cheaper_side(d_in, d_out) == side else ""
                lines.append(f"| {label} ({d_in} x {d_out}) | {side}{auto} ({d}) | {n} | {res['rounds']} "
                             f"| {res['lora_s'] * 1000:.1f} | {' | '.join(cells)} | {peaks} |")
                log(f"{label} {side} n={n}: best {best} {ratios[best].format()} (load {load:.1f}, "
                    f"{res['rounds']} rounds, {res['stop']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pi_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/pi-cost/pi_cost.md"))
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "lorma-bench")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 2048],
                        help="tokens per step to measure (128: the benchmark's SmolLM2 batch, 2 x 64)")
    parser.add_argument("--arithmetic-tokens", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--min-rounds", type=int, default=5)
    parser.add_argument("--max-rounds", type=int, default=15)
    parser.add_argument("--budget-s", type=float, default=40.0, help="time budget per row")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arithmetic-only", action="store_true")
    args = parser.parse_args(argv)
    threads = pin_threads(args.threads)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    shape, source = smollm2_shape(args.cache_dir)
    before = load_average()
    parts = ["# LoRMA_pi on SmolLM2-135M all linear: the arithmetic and the strategies", "",
             f"Command: `python -m benchmarks.pi_cost {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             arithmetic_section(shape, source, args.arithmetic_tokens, args.seq_len), ""]
    if not args.arithmetic_only:
        parts += [measured_section(shape, args.tokens, (args.min_rounds, args.max_rounds), args.budget_s, log), ""]
        after = load_average()
        parts += [f"Threads: {threads['torch.set_num_threads']}. Load average (1, 5, 15 min) before: "
                  f"{', '.join(f'{v:.2f}' for v in before)}; after: {', '.join(f'{v:.2f}' for v in after)}. "
                  f"Rounds stop when every interval is within +-{TARGET_HALF_WIDTH}, at --max-rounds, or at "
                  f"--budget-s per row. Took {(time.time() - t0) / 60:.1f} min.", ""]
    atomic_write_text(args.out, "\n".join(parts))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
