"""Step time and peak memory of the LoRMA variants against LoRA (docs/variants.md), by BENCHMARKS.md's method.

The workload of docs/variants.md's runs: all-MiniLM-L6-v2, query and value, a batch of 16 tweets' length (40
tokens). Each round steps every method once in a shuffled order; a method's ratio to LoRA is taken within each
round; the median ratio has a bootstrap 95% interval (``benchmarks.stats``). AdaLoRMA and AdaLoRA are timed as
their forward, backward and AdamW step: the rank budget's own per-step work (importance scores, the orthogonality
penalty, which peft adds only when the model is called with labels) is not in these steps, so their rows are a
lower bound.

    HF_HUB_OFFLINE=1 python -m benchmarks.variants [--threads 1] [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import harness as H
from .device import available_cpus, load_average, pin_threads, step_clock
from .rounds import run_rounds
from .run import peak_measure, timed_measure
from .stats import precise_enough, ratio_estimate

METHODS = ["lora", "lorma-plus-pre", "dora", "dorma-plus", "dorma-pi", "dylorma", "adalora", "adalorma"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.variants", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: every CPU available)")
    parser.add_argument("--rounds", type=int, default=30, help="cap on timed rounds")
    parser.add_argument("--minutes", type=float, default=5.0, help="time budget of the timed rounds")
    parser.add_argument("--seq-len", type=int, default=40)
    args = parser.parse_args(argv)
    threads = pin_threads(args.threads or available_cpus())
    before, start = load_average(), time.monotonic()
    work = H.minilm_workload(batch_size=16, seq_len=args.seq_len)
    steps, models = {}, {}
    for method in METHODS:
        models[method] = H.build_method(work, method)
        steps[method] = H.make_step(work, models[method])
        steps[method]()  # AdamW state, allocator
    others = [m for m in METHODS if m != "lora"]
    clock = step_clock(torch.device("cpu"))
    times = run_rounds({m: timed_measure(clock, s) for m, s in steps.items()}, min_rounds=5, max_rounds=args.rounds,
                       budget_s=60 * args.minutes, warmup_rounds=1,
                       precise=lambda v: precise_enough([ratio_estimate(v, m, "lora") for m in others]))
    peaks = run_rounds({m: peak_measure(torch.device("cpu"), steps[m], models[m]) for m in steps},
                       min_rounds=2, max_rounds=2, seed=1)
    print(f"{work.name}; r = {H.R}; threads {threads['torch.set_num_threads']}; {times.rounds} timed rounds "
          f"({times.stop_reason}); load average before {before[0]:.2f}, after {load_average()[0]:.2f}; "
          f"{(time.monotonic() - start) / 60:.1f} min\n")
    print("| method | trainable params | step (ms, median) | step / LoRA's (95% interval) | peak / LoRA's |")
    print("|---|---:|---:|---:|---:|")
    for m in METHODS:
        params = sum(p.numel() for p in H.trainable(models[m]))
        step_ms = 1000 * statistics.median(r[m] for r in times.values)
        time_ratio = "1" if m == "lora" else ratio_estimate(times.values, m, "lora").format()
        mem_ratio = "1" if m == "lora" else ratio_estimate(peaks.values, m, "lora").format()
        print(f"| {m} | {params:,} | {step_ms:.1f} | {time_ratio} | {mem_ratio} |")


if __name__ == "__main__":
    main()
