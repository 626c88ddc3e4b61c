"""``lorma analyze RUN_DIR [--against OTHER] [--base-model DIR] [--out DIR] [--tol RTOL]``.

Prints a table per module and a summary over modules, and writes ``analysis.json``, ``analysis.txt``
and PNG plots to ``--out`` (default ``RUN_DIR/analysis``, or ``RUN_DIR-analysis`` beside an adapter directory,
which a command never writes into). Heavy imports happen inside :func:`run`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from lorma.runs.adapters import MODEL_CLASS_HELP

__all__ = ["register", "run"]


def _smoothing(text: str) -> int | float | None:
    """``none``, an int window (>= 0) or a float EMA weight in [0, 1)."""
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a window (int), EMA weight (float) or 'none': {text!r}") from err
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"a float smoothing is an EMA weight in [0, 1), got {text}")
    return value


def _rtol(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from err
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def default_out(run_dir: Path) -> Path:
    """Where the report goes without ``--out``: ``RUN_DIR/analysis`` for a run directory; beside a saved adapter
    directory (``ADAPTER-analysis``), because a command never writes into its own input."""
    from lorma.runs.layout import ADAPTER_CONFIG_FILE

    if not (run_dir / ADAPTER_CONFIG_FILE).is_file():
        return run_dir / "analysis"
    if run_dir.name in ("", ".", ".."):
        run_dir = run_dir.resolve()
    return run_dir.parent / f"{run_dir.name}-analysis"


def register(subparsers: Any) -> None:
    """Add the ``analyze`` subcommand."""
    p = subparsers.add_parser(
        "analyze",
        help="The paper's measurements on a run: rank of delta W and I(BA), delta W vs another run, convergence.",
        description="Measure a `lorma train` run directory or any saved peft adapter (with --base-model): rank "
        "of delta W = W - W0 per module, rank of I(BA) (final, and over training when the run has "
        "rank_log.jsonl), loss AUC; with --against, delta W against the other run's delta W (Frobenius "
        "distance, cosine, top-r singular values and eigenvalues, first principal angle, random control) "
        "and the convergence comparison. Prints tables; writes analysis.json, analysis.txt and PNG plots.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="A `lorma train` output directory or a saved peft adapter.")
    p.add_argument("--against", metavar="OTHER_RUN_DIR", help="Reference run (e.g. LoRA) to compare against.")
    p.add_argument(
        "--base-model",
        metavar="DIR",
        help="Base model directory (default: from the run's config, else the adapter's base_model_name_or_path).",
    )
    p.add_argument("--against-base-model", metavar="DIR", help="Base model of --against (default: --base-model).")
    p.add_argument("--model-class", metavar="CLASS", help=MODEL_CLASS_HELP + " Applies to --against too.")
    p.add_argument("--out", metavar="DIR", help="Where to write the report and plots (default: RUN_DIR/analysis; "
                   "for a saved adapter directory, RUN_DIR-analysis beside it).")
    p.add_argument(
        "--tol",
        type=_rtol,
        default=None,
        metavar="RTOL",
        help="Relative rank tolerance: singular values > RTOL * sigma_max count (default: max(m, n) * eps of float32).",
    )
    p.add_argument(
        "--smoothing",
        type=_smoothing,
        default=5,
        metavar="S",
        help="Loss smoothing, the same for every run: int = centred moving-average window in logged "
        "points, float in [0, 1) = EMA weight, 'none' (default: 5).",
    )
    p.add_argument("--seed", type=int, default=0, help="Seed of the random control matrices (default: 0).")
    p.add_argument("--no-plots", action="store_true", help="Skip the PNG plots.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing report in --out.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the inputs, measure, print the tables; user errors become :class:`InputError`."""
    from lorma.plumbing.errors import InputError

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise InputError(f"RUN_DIR {run_dir}: no such directory")
    if args.against is not None and not Path(args.against).is_dir():
        raise InputError(f"--against {args.against}: no such directory")
    for flag, value in (("--base-model", args.base_model), ("--against-base-model", args.against_base_model)):
        if value is not None and not Path(value).is_dir():
            raise InputError(f"{flag} {value}: not a local directory")
    from lorma.analysis.report import OUTPUT_NAMES
    from lorma.analysis.runs import read_run
    from lorma.runs.adapters import check_model_class
    from lorma.runs.layout import ADAPTER_CONFIG_FILE, adapter_weights_file, compare_runs, missing_adapter_reason
    from lorma.runs.paths import check_not_input, check_output_location

    check_model_class(args.model_class)
    beside = args.out is None and (run_dir / ADAPTER_CONFIG_FILE).is_file()
    out = Path(args.out) if args.out else default_out(run_dir)

    check_output_location(out, "--out")
    existing = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if existing and not args.overwrite:
        raise InputError(f"{out} already holds {', '.join(existing)}; pass --overwrite or choose --out")

    try:
        # everything on disk is read and checked before torch and transformers are imported
        info = read_run(run_dir)
        if info.adapter_dir is None and info.loss_curve is None and info.rank_log is None:
            runs = compare_runs(run_dir)
            if runs:  # a `lorma compare` output: point at its run directories
                raise InputError(
                    f"{run_dir} is a `lorma compare` output; analyze one of its runs, e.g. "
                    f"{', '.join(map(str, runs[:4]))}" + (" ..." if len(runs) > 4 else "")
                )
            raise InputError(
                f"{run_dir}: nothing to analyze (no adapter_config.json, training-loss log or rank_log.jsonl; "
                f"{missing_adapter_reason(run_dir)})"
            )
        other = read_run(args.against) if args.against is not None else None
        if other is not None and info.adapter_dir is not None and other.adapter_dir is None \
                and other.loss_curve is None:
            raise InputError(f"--against {args.against}: nothing to compare with: "
                                f"{missing_adapter_reason(Path(args.against))}; give the reference run's "
                                "directory or its adapter directory")
        for run in (info, other):
            if run is not None and run.adapter_dir is not None:
                adapter_weights_file(run.adapter_dir)
                check_not_input(out, {"(the adapter)": run.adapter_dir}, replacing=False, flag="--out")
        from lorma.analysis.report import analyze
        from lorma.analysis.report_text import format_report

        result = analyze(
            run_dir,
            against=args.against,
            base_model=args.base_model,
            against_base_model=args.against_base_model,
            out_dir=out,
            rtol=args.tol,
            smoothing=args.smoothing,
            seed=args.seed,
            plots=not args.no_plots,
            model_class=args.model_class,
        )
    except InputError:
        raise
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        raise InputError(str(err)) from err
    print(format_report(result), end="")
    if beside:
        print(f"{run_dir} is an adapter directory, which a command never writes into: the report went beside it, to "
              f"{out} (--out chooses another place)")
    print(f"report: {out / 'analysis.txt'}, {out / 'analysis.json'}")
    return 0
