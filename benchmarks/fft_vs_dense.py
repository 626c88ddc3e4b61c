"""``python -m benchmarks.fft_vs_dense``: is the FFT form of LoRMA_pi faster than the dense one on this CPU?

Times forward + backward of ``s pi(BA) h`` for ``n`` tokens, three ways: the dense ``d x d`` transform on
activations (``PiInflation.transform`` then a matmul), the FFT form (``apply_pi_fft``, ``O(n r d log d)``)
and the bounded, chunked and checkpointed FFT form (``apply_pi_bounded``) that lorma uses above
``LormaConfig.max_dense_bytes``. Writes a markdown table (atomically) and prints it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from lorma import functional as LF
from lorma.inflations import PiInflation
from lorma.plumbing.fileio import atomic_write_text

PI = PiInflation()  # the default bounds of LormaConfig


def _time(fn, rounds: int) -> float:  # noqa: ANN001
    fn()  # warm-up
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure(ds: list[int], n: int, r: int, rounds: int) -> list[tuple[int, float, float, float, float]]:
    rows = []
    for d in ds:
        g = torch.Generator().manual_seed(d)
        h = torch.randn(n, d, generator=g, requires_grad=True)
        A = torch.randn(r, d, generator=g, requires_grad=True)
        B = torch.randn(d, r, generator=g, requires_grad=True)

        def dense(h=h, A=A, B=B) -> None:  # noqa: ANN001
            (h @ PI.transform(A, B, 0.5).T).sum().backward()

        def fft(h=h, A=A, B=B) -> None:  # noqa: ANN001
            LF.apply_pi_fft(h, A, B, 0.5).sum().backward()

        def bounded(h=h, A=A, B=B) -> None:  # noqa: ANN001
            LF.apply_pi_bounded(h, A, B, 0.5, PI.fft_chunk_bytes).sum().backward()

        with torch.no_grad():
            err = ((LF.apply_pi_fft(h, A, B, 0.5) - h @ PI.transform(A, B, 0.5).T).norm()
                   / (h @ PI.transform(A, B, 0.5).T).norm()).item()
        rows.append((d, _time(dense, rounds), _time(fft, rounds), _time(bounded, rounds), err))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fft_vs_dense", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/fft_vs_dense.md"))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--d", type=int, nargs="+", default=[384, 576, 1024, 2048, 4096])
    args = parser.parse_args(argv)
    rows = measure(args.d, args.tokens, args.rank, args.rounds)
    lines = [
        f"# LoRMA_pi: FFT form against the dense transform ({args.tokens} tokens, r = {args.rank}, forward + "
        "backward, median of " f"{args.rounds})",
        "",
        "Command: `" + " ".join(["python -m benchmarks.fft_vs_dense", *(argv or [])]) + "`",
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| d | dense (s) | FFT (s) | FFT bounded (s) | FFT / dense | rel. error FFT vs dense |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for d, t_dense, t_fft, t_bounded, err in rows:
        lines.append(f"| {d} | {t_dense:.3f} | {t_fft:.3f} | {t_bounded:.3f} | {t_fft / t_dense:.2f} | {err:.1e} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
