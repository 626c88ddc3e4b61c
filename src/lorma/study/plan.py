"""The study's plan: a profile expanded into the runs and measurements it needs, in the order they run, each with
its estimated CPU cost.

Every step has a *key*, a relative path that names it everywhere: the run directory (``ROOT/runs/<key>``), the
folder of its committed result files (``RESULTS/<key>``), the progress line. Keys:

- ``nlu/<dataset>/<method>/seed-<n>``: the main comparison (claims 1, 3, 8, 9);
- ``inflation/<dataset>/<method>/seed-<n>``: LoRMA without rank inflation (claim 4);
- ``side/<dataset>/<method>-post/seed-<n>``: post-multiplication (claim 5);
- ``rank/<dataset>/<method>-r<r>/seed-<n>``: the rank sweep, alpha = r (claim 6);
- ``targets/<dataset>/<method>-<modules>-r<r>/seed-<n>``: target matrices at a fixed budget (claims 6, 7);
- ``<task>/<method>/seed-<n>``: generation (claim 2), e.g. ``e2e/lorma-plus/seed-0``;
- ``delta/<dataset>/<method>-vs-lora/seed-0``: delta W of a LoRMA run against the LoRA run of the same seed
  (claims 8, 9), a measurement of two finished runs;
- ``rates/<dataset>/<method>-default/seed-<n>`` and ``rates/<dataset>/<method>-tuned/seed-<n>``: the learning rate
  the study leans on (the range test's) against the family default and against ``--tune learning_rate`` (k-fold
  cross-validation on the training data); last in the plan, after every seed of the claims.

Order: seeds outermost (a stopped study has every cell at the same number of seeds), and within a seed the main
runs of the ablation datasets first (the ablations take their learning rates from them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lorma.study.profiles import Profile

__all__ = ["Step", "build_plan", "plan_table"]

#: rows (train, eval) of the packaged datasets, for the cost of a plan before the data is written
DATASET_ROWS: dict[str, tuple[int, int]] = {
    "tweets-small": (600, 400), "tweets-imbalanced": (600, 380), "tweets-ambiguous": (600, 380),
    "bbc-imbalanced": (600, 400), "chatterbot-topics": (371, 246), "sms-spam": (1200, 600),
    "trec-questions": (1500, 600), "movie-replies": (2000, 600), "rt-polarity": (2000, 600),
}
DEFAULT_ROWS = (600, 400)
#: range test (``--learning-rate auto``): steps, and the probe batch's rows evaluated after each
RANGE_TEST_STEPS = 60
#: fixed start-up of a run (model load, tokenization), seconds
STARTUP_SECONDS = 10.0
ADAPTER_NAMES = {"query": "q", "key": "k", "value": "v", "dense": "o"}


@dataclass(frozen=True)
class Step:
    """One run (``kind`` ``nlu`` or ``nlg``) or measurement (``delta``) of the study."""

    key: str
    experiment: str
    claims: tuple[int, ...]
    kind: str
    method: str
    seed: int
    dataset: str | None = None
    #: ``lorma train`` settings (YAML keys) of this step, on top of the profile's shared ones
    settings: dict[str, Any] = field(default_factory=dict)
    #: a run's learning rate: ``"auto"`` (its own range test), ``"fixed"`` (the settings' rate) or the key of the
    #: run whose chosen rates (body and head) it takes
    rate: str = "fixed"
    #: steps this one needs finished first (the rate's run; a measurement's two runs)
    needs: tuple[str, ...] = ()
    #: estimated CPU seconds (one process, one thread)
    cost: float = 0.0
    label: str = ""


def _rows(dataset: str) -> tuple[int, int]:
    return DATASET_ROWS.get(dataset, DEFAULT_ROWS)


def _nlu_cost(profile: Profile, method: str, dataset: str, settings: dict[str, Any], range_test: bool) -> float:
    if not profile.seconds:
        return 0.0
    nlu = profile.nlu
    assert nlu is not None
    training = {**nlu.settings.get("training", {}), **settings.get("training", {})}
    steps = int(training.get("max_steps") or 300)
    batch = int(training.get("per_device_train_batch_size") or 16)
    train_rows, eval_rows = _rows(dataset)
    evals = math.ceil(steps * batch / train_rows) if training.get("eval_strategy") == "epoch" else 1
    per_step = profile.seconds.get("nlu-full" if method == "full" else "nlu-adapter", 0.5)
    cost = steps * per_step + evals * eval_rows * profile.seconds.get("nlu-eval", 0.004)
    if range_test:
        cost += RANGE_TEST_STEPS * profile.seconds.get("range-test", per_step)
    return STARTUP_SECONDS + cost * nlu.relative_cost.get(dataset, 1.0)


def _nlg_cost(profile: Profile, setup: Any, method: str) -> float:
    """A generation run's CPU seconds; ``nlg-train:<method>`` overrides ``nlg-train`` for a method that costs more
    a step (LoRMA_pi's dense d x d transform on an LLM's wide MLP)."""
    if not profile.seconds:
        return 0.0
    training = setup.settings.get("training", {})
    options = setup.settings.get("task_options", {})
    steps = int(training.get("max_steps") or 0)
    beams = int(options.get("num_beams", 1))
    # decoding grows with the beams about linearly on a CPU (every beam is a row of the batch)
    decode = profile.seconds.get("nlg-decode", 1.0) * setup.eval_inputs * max(beams, 1)
    loss = profile.seconds.get("nlg-loss", 0.0) * int(options.get("max_loss_samples") or setup.eval_inputs * 7)
    per_step = profile.seconds.get(f"nlg-train:{method}", profile.seconds.get("nlg-train", 1.0))
    return STARTUP_SECONDS * 3 + steps * per_step + decode + loss


def _targets_label(modules: tuple[str, ...]) -> str:
    return "".join(ADAPTER_NAMES.get(m, m) for m in modules)


def build_plan(profile: Profile) -> list[Step]:
    """Every step of ``profile``'s study, in the order they run."""
    steps: list[Step] = []
    nlu, ablation = profile.nlu, profile.ablation
    datasets: tuple[str, ...] = ()
    if nlu is not None:
        first = tuple(d for d in (ablation.datasets if ablation else ()) if d in nlu.datasets)
        datasets = first + tuple(d for d in nlu.datasets if d not in first)

    def main_key(dataset: str, method: str, seed: int) -> str:
        return f"nlu/{dataset}/{method}/seed-{seed}"

    def rate_of(dataset: str, method: str, seed: int) -> tuple[str, tuple[str, ...]]:
        """The learning rate of a main run: its own range test on the first seed, the first seed's after."""
        assert nlu is not None
        if nlu.learning_rate != "auto":
            return nlu.learning_rate, ()
        if seed == 0:
            return "auto", ()
        source = main_key(dataset, method, 0)
        return source, (source,)

    for seed in range(profile.seeds):
        if nlu is not None:
            for dataset in datasets:
                for method in nlu.methods:
                    rate, needs = rate_of(dataset, method, seed)
                    settings: dict[str, Any] = {}
                    if method.startswith("lorma") and nlu.track_rank_every:
                        settings["track_rank"] = nlu.track_rank_every
                    steps.append(Step(
                        key=main_key(dataset, method, seed), experiment="nlu", claims=(1, 3, 9), kind="nlu",
                        method=method, seed=seed, dataset=dataset, settings=settings, rate=rate, needs=needs,
                        cost=_nlu_cost(profile, method, dataset, settings, rate == "auto"), label=method))
        for setup in profile.nlg:
            for method in setup.methods:
                steps.append(Step(key=f"{setup.task}/{method}/seed-{seed}", experiment=setup.task, claims=(2, 3),
                                  kind="nlg", method=method, seed=seed, dataset=setup.task,
                                  cost=_nlg_cost(profile, setup, method), label=method))
            for method in setup.own_rate_methods:  # the same runs at the method's own rate (range test, seed 0)
                first = f"{setup.task}/{method}-own-rate/seed-0"
                range_test = RANGE_TEST_STEPS * profile.seconds.get("nlg-range-test", 1.0) if seed == 0 else 0.0
                steps.append(Step(key=f"{setup.task}/{method}-own-rate/seed-{seed}", experiment=setup.task,
                                  claims=(2, 3), kind="nlg", method=method, seed=seed, dataset=setup.task,
                                  rate="auto" if seed == 0 else first, needs=() if seed == 0 else (first,),
                                  cost=_nlg_cost(profile, setup, method) + range_test, label=f"{method}-own-rate"))
        if nlu is not None and ablation is not None:
            steps += _ablation_steps(profile, seed, main_key)
        if seed == 0 and nlu is not None and ablation is not None and "lora" in nlu.methods:
            for dataset in ablation.datasets:
                for method in nlu.methods:
                    if method.startswith("lorma"):
                        runs = (main_key(dataset, method, 0), main_key(dataset, "lora", 0))
                        steps.append(Step(
                            key=f"delta/{dataset}/{method}-vs-lora/seed-0", experiment="delta", claims=(8, 9),
                            kind="delta", method=method, seed=0, dataset=dataset, needs=runs,
                            cost=profile.seconds.get("analysis", 0.0), label=f"{method} vs lora"))
    if nlu is not None and ablation is not None:
        steps += _rate_steps(profile)
    return steps


def _rate_steps(profile: Profile) -> list[Step]:
    """The learning-rate evidence: family defaults, and k-fold tuning (its first seed tunes, the others reuse)."""
    nlu, ablation = profile.nlu, profile.ablation
    assert nlu is not None and ablation is not None
    out: list[Step] = []
    for seed in range(profile.seeds):
        for dataset in ablation.default_rate_datasets or ablation.datasets:
            for method in ablation.default_rate_methods:
                out.append(Step(key=f"rates/{dataset}/{method}-default/seed-{seed}", experiment="rates", claims=(),
                                kind="nlu", method=method, seed=seed, dataset=dataset, rate="fixed",
                                cost=_nlu_cost(profile, method, dataset, {}, False), label=f"{method}-default"))
        for dataset in ablation.tune_datasets:
            for method in ablation.tune_methods:
                first = f"rates/{dataset}/{method}-tuned/seed-0"
                run = _nlu_cost(profile, method, dataset, {}, False)
                if seed == 0:  # folds x the 4 default candidates (+1 for an edge extension), then the final run
                    settings = {"tune": ["learning_rate"], "tune_folds": ablation.tune_folds}
                    out.append(Step(key=first, experiment="rates", claims=(), kind="nlu", method=method, seed=0,
                                    dataset=dataset, settings=settings, rate="fixed",
                                    cost=run * (1 + ablation.tune_folds * 5), label=f"{method}-tuned"))
                else:
                    out.append(Step(key=f"rates/{dataset}/{method}-tuned/seed-{seed}", experiment="rates",
                                    claims=(), kind="nlu", method=method, seed=seed, dataset=dataset, rate=first,
                                    needs=(first,), cost=run, label=f"{method}-tuned"))
    return out


def _ablation_steps(profile: Profile, seed: int, main_key: Any) -> list[Step]:
    nlu, ablation = profile.nlu, profile.ablation
    assert nlu is not None and ablation is not None
    main_r = int(nlu.settings.get("r", 8))
    main_targets = tuple(nlu.settings.get("target_modules") or ())
    out: list[Step] = []

    def step(experiment: str, claims: tuple[int, ...], dataset: str, method: str, label: str,
             settings: dict[str, Any], rate_method: str) -> Step:
        if nlu.learning_rate == "auto":
            source = main_key(dataset, rate_method, 0)
            rate, needs = source, (source,)
        else:
            rate, needs = nlu.learning_rate, ()
        return Step(key=f"{experiment}/{dataset}/{label}/seed-{seed}", experiment=experiment, claims=claims,
                    kind="nlu", method=method, seed=seed, dataset=dataset, settings=settings, rate=rate,
                    needs=needs, cost=_nlu_cost(profile, method, dataset, settings, False), label=label)

    for dataset in ablation.datasets:
        for method in ablation.inflation_methods:  # Table 6: the same settings as LoRMA+, without inflation
            out.append(step("inflation", (4,), dataset, method, method, {}, "lorma-plus"))
        for method in ablation.side_methods:  # Table 7
            out.append(step("side", (5,), dataset, method, f"{method}-post", {"side": "post"}, method))
        for modules, r in ablation.target_sets:  # Tables 8 and 10
            if tuple(modules) == main_targets and r == main_r:
                continue
            for method in ablation.target_methods:
                label = f"{method}-{_targets_label(tuple(modules))}-r{r}"
                out.append(step("targets", (6, 7), dataset, method, label,
                                {"target_modules": list(modules), "r": r, "alpha": r}, method))
    for dataset in ablation.rank_datasets or ablation.datasets:
        for r in ablation.ranks:
            if r == main_r and float(nlu.settings.get("alpha", r)) == r:
                continue  # the main run is this point of the sweep
            for method in ablation.rank_methods:
                out.append(step("rank", (6,), dataset, method, f"{method}-r{r}", {"r": r, "alpha": r}, method))
    return out


def plan_table(steps: list[Step], done: set[str], jobs: int = 1) -> tuple[list[str], list[list[str]], str]:
    """``--plan``'s table: per experiment, runs (done / all), estimated CPU hours left; and a closing line."""
    rows: dict[str, list[float]] = {}
    for s in steps:
        row = rows.setdefault(s.experiment, [0, 0, 0.0, 0.0])
        row[0] += 1
        row[2] += s.cost
        if s.key in done:
            row[1] += 1
        else:
            row[3] += s.cost
    if not any(s.cost for s in steps):  # a profile without measured costs (paper: GPUs)
        header = ["experiment", "claims", "steps", "done"]
        table = [[name, ",".join(str(c) for c in next(s.claims for s in steps if s.experiment == name)) or "-",
                  str(int(r[0])), str(int(r[1]))] for name, r in rows.items()]
        done_count = sum(1 for s in steps if s.key in done)
        return header, table, f"{len(steps)} steps, {done_count} done; no cost estimate for this profile (GPU)"
    header = ["experiment", "claims", "steps", "done", "CPU h (all)", "CPU h (left)"]
    claims = {s.experiment: ",".join(str(c) for c in s.claims) or "-" for s in steps}
    table = [[name, claims[name], str(int(r[0])), str(int(r[1])), f"{r[2] / 3600:.2f}", f"{r[3] / 3600:.2f}"]
             for name, r in rows.items()]
    left = sum(r[3] for r in rows.values())
    total = sum(r[2] for r in rows.values())
    finished = sum(1 for s in steps if s.key in done)
    closing = f"{len(steps)} steps, {finished} done; estimated {total / 3600:.1f} CPU hours in all, " + (
        f"{left / 3600:.1f} left: about {left / 3600 / max(jobs, 1):.1f} hours of wall time with --jobs {jobs} (one "
        "thread per job) on a machine like the one the costs were measured on" if left else "nothing left")
    return header, table, closing
