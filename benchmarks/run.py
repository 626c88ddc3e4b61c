"""``python -m benchmarks.run`` (``make bench``): measure, then write BENCHMARKS.md and a PNG plot.

Training-step time (forward + backward + AdamW step) is the median of several interleaved rounds in one
process, as a ratio to peft's LoRA in the same run; peak memory is the tensor memory of one step (see
:func:`benchmarks.harness.step_peak_bytes`). ``--quick`` is a smoke run (tiny shapes, one round) that
exercises every code path in about a minute.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lorma.fileio import atomic_path, atomic_write_text

from . import harness as H

LAYER_NOTE = (
    "One `nn.Linear(d, d)` with bias; the loss is the mean square of its output and its input needs no gradient "
    "(as for a first layer), so LoRA pays the base forward only and the ratios here are upper bounds of what the "
    "same layer costs inside a model, where every method also pays the input gradient. Steps under ~10 ms are "
    "at the resolution of a shared 2-core machine: read the d >= 1024 rows."
)
NOISE_NOTE = (
    "- Noise: the machine was shared with other jobs during the run (load average above); with 3 rounds, ratios "
    "within about +-0.1 of each other are not distinguishable, and a ratio well below 1.00 for a method that "
    "does strictly more work than LoRA (e.g. `ref-table11-plus`) measures the noise."
)

GOALS = {
    "plus_time": 1.00,
    "plus_mem": 1.05,
    "pi_time": 1.25,
    "merged": 1.02,
    "vs_reference": 1.3,
}


def measure(work: H.Workload, methods: list[str], rounds: int, log: Any) -> dict[str, dict[str, float]]:
    """Step time and peak memory of every method on one workload, ratios to LoRA."""
    steps, models = {}, {}
    for m in methods:
        model = H.build_method(work, m)
        step = H.make_step(work, model)
        step()  # warm-up: allocator, AdamW state, strategy caches
        steps[m], models[m] = step, model
    times = H.interleaved_times(steps, rounds)
    rows: dict[str, dict[str, float]] = {}
    for m in methods:
        rows[m] = {
            "time": H.median(times[m]),
            "peak": float(H.step_peak_bytes(steps[m], models[m])),
            "params": float(sum(p.numel() for p in H.trainable(models[m]))),
        }
    base_t, base_m = rows["lora"]["time"], rows["lora"]["peak"]
    for m in methods:
        rows[m]["time_ratio"] = rows[m]["time"] / base_t
        rows[m]["mem_ratio"] = rows[m]["peak"] / base_m
    log(f"  {work.name}: " + ", ".join(f"{m} {r['time_ratio']:.2f}x" for m, r in rows.items()))
    del steps, models
    gc.collect()
    return rows


def inference_latency(work: H.Workload, rounds: int) -> dict[str, float]:
    """Forward latency of the base model and of LoRMA models merged with ``merge_and_unload``."""
    fns = {"base": H.shared_copy(work.model).eval()}
    for m in ("lorma-plus-pre", "lorma-pi-pre", "lorma-plus-post"):
        model = H.build_method(work, m)
        with torch.no_grad():  # move away from the identity so that the merge changes the weights
            for n, p in model.named_parameters():
                if "lorma_B" in n:
                    p.add_(0.01 * torch.randn_like(p))
        fns[m + " merged"] = model.merge_and_unload().eval()
    calls = {}
    for name, model in fns.items():
        def call(model: torch.nn.Module = model) -> None:
            with torch.no_grad():
                model(**work.batch)
        call()
        calls[name] = call
    times = H.interleaved_times(calls, rounds, seed=1)
    base = H.median(times["base"])
    return {name: H.median(ts) / base for name, ts in times.items()} | {"base_seconds": base}


def fmt_bytes(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def table(rows: dict[str, dict[str, float]]) -> str:
    lines = [
        "| method | trainable params | step (s) | step / LoRA | peak step memory | memory / LoRA |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m, r in rows.items():
        lines.append(
            f"| {m} | {int(r['params']):,} | {r['time']:.3f} | {r['time_ratio']:.2f} | {fmt_bytes(r['peak'])} "
            f"| {r['mem_ratio']:.3f} |"
        )
    return "\n".join(lines)


def goal_lines(model_rows: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """One line per goal and model: met or not, with the measured ratio."""
    out = []
    for name, rows in model_rows.items():
        for m in ("lorma-plus-pre", "lorma-plus-post"):
            if m in rows:
                t, mem = rows[m]["time_ratio"], rows[m]["mem_ratio"]
                ok = t <= GOALS["plus_time"] and mem <= GOALS["plus_mem"]
                out.append(f"- {name}, {m}: step {t:.2f}x, memory {mem:.3f}x: {'met' if ok else 'NOT met'}")
        for m in ("lorma-pi-pre", "lorma-pi-post"):
            if m in rows:
                t = rows[m]["time_ratio"]
                slower_peers = [p for p in ("oft", "boft", "hra") if p in rows and rows[p]["time_ratio"] > 1.0]
                below = all(t < rows[p]["time_ratio"] for p in slower_peers)
                ok = t <= GOALS["pi_time"] and below
                peers = ", ".join(f"{p} {rows[p]['time_ratio']:.2f}x" for p in slower_peers) or "none slower"
                out.append(f"- {name}, {m}: step {t:.2f}x (peers slower than LoRA: {peers}): "
                           f"{'met' if ok else 'NOT met'}")
    return out


def plot(sweep: dict[int, dict[str, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = sorted(sweep)
    methods = [m for m in sweep[ds[0]] if m != "lora"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        pts = [(d, sweep[d][m]) for d in ds if m in sweep[d]]
        style = "--" if m.startswith("ref-") else "-"
        axes[0].plot([d for d, _ in pts], [r["time_ratio"] for _, r in pts], style, marker="o", label=m)
        axes[1].plot([d for d, _ in pts], [r["mem_ratio"] for _, r in pts], style, marker="o", label=m)
    for ax, what in zip(axes, ("training step time / LoRA", "peak step memory / LoRA")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d (square Linear d x d)")
        ax.set_ylabel(what)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Single layer, fixed tokens: cost against peft LoRA (same run)")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}; {os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, Python {platform.python_version()}, load average at the end {load}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, one round")
    parser.add_argument("--out", type=Path, default=None,
                        help="report path (default BENCHMARKS.md; with --quick, runs/bench-quick/BENCHMARKS.md)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "lorma-bench",
                        help="where the plain fp32 copy of SmolLM2 is kept (made once)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick: 1)")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="sections to skip: minilm smollm2 gpt2 layers inference quant compile")
    args = parser.parse_args(argv)
    out = args.out or (Path("runs/bench-quick/BENCHMARKS.md") if args.quick else Path("BENCHMARKS.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    rounds = args.rounds or (1 if args.quick else 3)
    quick = args.quick
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    results: dict[str, Any] = {"models": {}, "sweep": {}}
    if "minilm" not in args.skip:
        log("all-MiniLM-L6-v2")
        work = H.minilm_workload(*((2, 16) if quick else (16, 128)))
        results["models"][work.name] = measure(work, H.method_names("full"), rounds, log)
        if "inference" not in args.skip:
            log("inference: merged against base")
            results["inference"] = (work.name, inference_latency(work, 3 if quick else 9))
        del work
    if "smollm2" not in args.skip and not quick:
        log("SmolLM2-135M")
        for work in H.smollm2_workloads(args.cache_dir, 2, 64):
            results["models"][work.name] = measure(work, H.method_names("lorma"), rounds, log)
        gc.collect()
    if "gpt2" not in args.skip:
        log("GPT-2-medium-shaped")
        work = H.gpt2_medium_workload(1 if quick else 4, *((1, 16) if quick else (4, 128)))
        methods = H.method_names("layer")
        results["models"][work.name] = measure(work, methods, rounds, log)
        del work
    if "layers" not in args.skip:
        tokens = 64 if quick else 512
        for d in ((64, 128) if quick else (256, 512, 1024, 2048, 4096)):
            log(f"layer d={d}")
            methods = H.method_names("layer")
            if d >= 4096:  # the reference orderings build d x d_in products every step: minutes each here
                methods = [m for m in methods if not m.startswith("ref-")]
            results["sweep"][d] = measure(H.layer_workload(d, tokens), methods, rounds, log)
        results["sweep_tokens"] = tokens
    extras: dict[str, str] = {}
    if "quant" not in args.skip and not quick:
        log("QLoRMA memory")
        from .extras import qlorma_memory_section

        extras["quant"] = qlorma_memory_section(args.cache_dir)
    if "compile" not in args.skip:
        log("torch.compile graph breaks")
        from .extras import compile_section

        extras["compile"] = compile_section()
    png = out.with_name("benchmarks-layers.png")
    if results["sweep"]:
        plot(results["sweep"], png)
    text = render(results, extras, argv if argv is not None else sys.argv[1:], rounds, png, time.time() - t_start)
    atomic_write_text(out, text)
    log(f"wrote {out} and {png}")
    return 0


def render(results: dict[str, Any], extras: dict[str, str], argv: list[str], rounds: int, png: Path,
           seconds: float) -> str:
    from .extras import flop_section

    cmd = "make bench  # = HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.run " + " ".join(argv)
    parts = [
        "# LoRMA benchmarks",
        "",
        "Written by `benchmarks/run.py`; every number below is from the run described here.",
        "",
        f"- Command: `{cmd.strip()}`",
        f"- Machine: {machine()}",
        f"- Run time: {seconds / 60:.1f} min; {rounds} interleaved rounds per table after one warm-up step each.",
        "- Step = forward + backward + AdamW step (lr 1e-4), r = 8, alpha = 16 for LoRA and LoRMA; OFT "
        "block size 32, BOFT block size 8 x 2 butterfly factors, HRA r = 8 (peft 0.21 defaults otherwise). "
        "Step time: median over the rounds, each round running every method once in a shuffled order; the "
        "ratio is to peft LoRA's median in the same table.",
        "- Peak memory: the largest total of tensor storage alive during one step (weights, optimizer state, "
        "activations saved for backward, gradients, temporaries), followed op by op with a TorchDispatchMode "
        "and storage finalizers (`benchmarks/harness.py: step_peak_bytes`). It counts tensors only, not the "
        "Python runtime; the frozen base weights are shared by all methods and counted in every row.",
        "- Reference orderings (`benchmarks/reference_orderings.py`, pre side): `ref-table11-*` is the paper's "
        "Table 11 ordering (LoRMA+ computes W0 x twice; LoRMA_pi applies the built s pi(BA) to W0 x); "
        "`ref-released-*` is the released code's ordering (the whole adapted weight I(BA) W0 is built every "
        "forward). Both use a d x d int64 gather index for pi, as the released code does.",
        NOISE_NOTE,
        "",
    ]
    if results["models"]:
        parts += ["## Training step, whole models", ""]
        for name, rows in results["models"].items():
            parts += [f"### {name}", "", table(rows), ""]
        parts += ["### Goals (median ratio to peft LoRA, same run)", "", *goal_lines(results["models"]), ""]
    if results["sweep"]:
        tokens = results.get("sweep_tokens")
        parts += [f"## Single layers, d = {min(results['sweep'])}..{max(results['sweep'])}, {tokens} tokens", "",
                  f"![cost against LoRA]({png.name})", "", LAYER_NOTE, ""]
        for d, rows in results["sweep"].items():
            parts += [f"### Linear {d} x {d}", "", table(rows), ""]
        if 1024 in results["sweep"]:
            rows = results["sweep"][1024]
            parts += ["### Goal: plus and pi at least 1.3x faster per step than both reference orderings (d = 1024)",
                      ""]
            for ours in ("lorma-plus-pre", "lorma-pi-pre"):
                infl = ours.split("-")[1]
                for ref in (f"ref-table11-{infl}", f"ref-released-{infl}"):
                    if ours in rows and ref in rows:
                        speed = rows[ref]["time"] / rows[ours]["time"]
                        parts.append(f"- {ours} vs {ref}: {speed:.2f}x faster: "
                                     f"{'met' if speed >= GOALS['vs_reference'] else 'NOT met'}")
            parts.append("")
    if "inference" in results:
        name, lat = results["inference"]
        parts += [f"## Inference: merged model against base ({name}, forward, no grad)", "",
                  f"Base forward: {lat['base_seconds'] * 1000:.1f} ms (median).", "",
                  "| model | latency / base | goal <= 1.02 |", "|---|---:|---|"]
        for k, v in lat.items():
            if k not in ("base", "base_seconds"):
                parts.append(f"| {k} | {v:.3f} | {'met' if v <= GOALS['merged'] else 'NOT met'} |")
        parts += ["", "merge_and_unload returns the base architecture with new weights, so any difference "
                  "from 1.00 is timing noise on this machine.", ""]
    parts += [flop_section(), ""]
    for key in ("quant", "compile"):
        if key in extras:
            parts += [extras[key], ""]
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
