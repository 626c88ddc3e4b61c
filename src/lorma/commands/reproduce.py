"""``lorma reproduce``: the reproduction study (every claim of the paper, tested with ordinary runs).

The parser only; the work is in :mod:`lorma.study`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from lorma.commands.run_options import wrapped

DEFAULT_RESULTS = "docs/reproduction"
DEFAULT_ROOT = "runs/reproduce"
DEFAULT_REPORT = "REPRODUCTION.md"


def _default_nlg_data() -> str | None:
    """The E2E data beside a checkout (``../shared/data/nlg``), or ``LORMA_NLG_DATA``."""
    if os.environ.get("LORMA_NLG_DATA"):
        return os.environ["LORMA_NLG_DATA"]
    guess = Path("..") / "shared" / "data" / "nlg"
    return str(guess) if guess.is_dir() else None


def register(subparsers: Any) -> None:
    """Add the ``reproduce`` subcommand."""
    parser = subparsers.add_parser(
        "reproduce", help="Run the reproduction study of the paper's claims (resumable); --plan, --report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=wrapped(
            "Runs every experiment of the reproduction study as ordinary lorma train runs under ROOT/runs/<key>/ and "
            "keeps each finished run's small result files (metrics, predictions, logs; no weights) under "
            "RESULTS/<key>/. A step whose results exist is never run again: stop it at any time and run the same "
            "command to continue. --plan prints the steps and their estimated CPU cost; --report rewrites the "
            "report (the verdict per claim, tables, pictures) from RESULTS alone."),
    )
    parser.add_argument("--scale", default="cpu", help="The profile: cpu (default: 2 CPU cores, about 8 hours), paper "
                        "(the paper's models and settings, for GPUs) or tiny (the plumbing, minutes).")
    parser.add_argument("--plan", action="store_true", help="Print the plan and its cost; run nothing.")
    parser.add_argument("--list", action="store_true", help="With --plan: every step not done yet, in order, with "
                        "its estimated CPU minutes.")
    parser.add_argument("--report", action="store_true", help="Only (re)write the report from RESULTS.")
    parser.add_argument("--root", default=DEFAULT_ROOT,
                        help=f"Run directories, data, models [default: {DEFAULT_ROOT}].")
    parser.add_argument("--results", default=DEFAULT_RESULTS,
                        help=f"The committed result files [default: {DEFAULT_RESULTS}].")
    parser.add_argument("--report-file", default=DEFAULT_REPORT, help=f"The report [default: {DEFAULT_REPORT}].")
    parser.add_argument("--nlg-data", default=_default_nlg_data(),
                        help="Folder with e2e_devset.csv and e2e_testset_w_refs.csv [default: ../shared/data/nlg, "
                             "or $LORMA_NLG_DATA].")
    parser.add_argument("--glue-dir", default=None, help="The paper profile: folder holding GLUE's task folders "
                        "(CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE).")
    parser.add_argument("--only", default=None, help="Comma-separated key prefixes: run only these steps (e.g. "
                        "nlu/tweets-small,e2e).")
    parser.add_argument("--jobs", type=int, default=2, help="Steps run at once, one process each [default: 2].")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per step [default: 1].")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``lorma reproduce``."""
    from lorma.plumbing.errors import InputError
    from lorma.study.profiles import get_profile

    profile = get_profile(args.scale)
    if args.jobs < 1 or args.threads < 1:
        raise InputError(f"--jobs and --threads must be at least 1, got {args.jobs} and {args.threads}")
    from lorma.study.runner import StudyPaths

    results = Path(args.results) / profile.name if profile.name != "cpu" else Path(args.results)
    paths = StudyPaths(root=Path(args.root) / profile.name, results=results,
                       nlg_data=Path(args.nlg_data) if args.nlg_data else None,
                       glue_data=Path(args.glue_dir) if args.glue_dir else None)
    only = [o.strip() for o in args.only.split(",") if o.strip()] if args.only else None
    if args.plan:
        from lorma.recipes.compare import format_table
        from lorma.study.plan import build_plan, plan_table
        from lorma.study.runner import done_steps

        steps = build_plan(profile)
        done = done_steps(steps, paths)
        header, rows, closing = plan_table(steps, done, args.jobs)
        print(f"lorma reproduce --scale {profile.name}: {profile.description}")
        print(format_table(header, rows))
        print(closing)
        if args.list:
            print(format_table(["step", "learning rate", "needs", "CPU min"],
                               [[s.key, s.rate, ", ".join(s.needs) or "-", f"{s.cost / 60:.1f}"]
                                for s in steps if s.key not in done]))
        return 0
    from lorma.study.report import write_report

    if not args.report:
        from lorma.study.runner import run_study

        outcome = run_study(profile, paths, jobs=args.jobs, only=only, threads=args.threads)
        print(f"lorma reproduce: {outcome['done']} of {outcome['steps']} steps done; results in {paths.results}")
        for key, why in outcome["failed"].items():
            print(f"  failed: {key}: {why}")
    report = write_report(profile, paths.results, Path(args.report_file) if profile.name == "cpu" else
                          paths.results / "REPRODUCTION.md")
    print(f"lorma reproduce: report written to {report}")
    return 0
