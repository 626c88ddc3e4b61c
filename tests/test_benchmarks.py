"""The benchmark harness does not rot and its method is right: reference orderings compute LoRMA, memory tracking
is exact, per-round ratios / bootstrap intervals / verdicts match hand computations, the scheduler shuffles and
pairs within rounds, the sanity check fires on an inverted measurement, the device logic picks and synchronises
right, and the quick mode is wired. No test here asserts on wall time."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import reference_inflation

benchmarks = pytest.importorskip("benchmarks.harness", reason="run pytest from the repository root")

from benchmarks import device as D  # noqa: E402
from benchmarks import harness as H  # noqa: E402
from benchmarks import run as R  # noqa: E402
from benchmarks import stats as S  # noqa: E402
from benchmarks.reference_orderings import ReferenceLorma, apply_reference  # noqa: E402
from benchmarks.rounds import STOP_BUDGET, STOP_CAP, STOP_PRECISE, RoundLog, run_rounds  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("ordering", ["table11", "released"])
@pytest.mark.parametrize("inflation", ["plus", "pi"])
def test_reference_orderings_compute_lorma(ordering: str, inflation: str) -> None:
    base = nn.Linear(10, 12)
    ref = ReferenceLorma(base, r=3, alpha=6, inflation=inflation, ordering=ordering)
    with torch.no_grad():
        ref.A.normal_()
        ref.B.normal_()
    x = torch.randn(4, 10)
    M = reference_inflation(ref.A[0].detach(), ref.B[0].detach(), inflation, 2.0)
    expected = x.double() @ (M @ base.weight.detach().double()).T + base.bias.detach().double()
    assert rel_err(ref(x), expected) < 1e-5


def test_reference_ordering_on_fused_gpt2_parts(tiny_gpt2) -> None:
    model = apply_reference(tiny_gpt2, ["c_attn"], 2, 4, "pi", "released", {"c_attn": (3, [0, 2])})
    layer = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.A.normal_()
        layer.B.normal_()
    W0 = layer.base.weight.detach().double().T  # Conv1D stores (d_in, d_out)
    W = W0.clone()
    for i, p in enumerate([0, 2]):
        rows = slice(32 * p, 32 * (p + 1))
        W[rows] = reference_inflation(layer.A[i].detach(), layer.B[i].detach(), "pi", 2.0) @ W0[rows]
    x = torch.randn(3, 32)
    assert rel_err(layer(x), x.double() @ W.T + layer.base.bias.detach().double()) < 1e-5
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"transformer.h.{i}.attn.c_attn.{w}" for i in range(2) for w in ("A", "B")
    }


def test_step_peak_bytes_counts_what_is_alive_together() -> None:
    model = nn.Linear(4, 4)
    start = H.live_bytes(model, None)

    def step() -> None:
        a = torch.ones(262144)  # 1 MiB
        b = torch.ones(524288)  # 2 MiB, while a is alive
        del a, b
        c = torch.ones(524288)  # 2 MiB after both were freed: not a new peak
        del c

    assert H.step_peak_bytes(step, model) - start == 3 * 2**20


# ------------------------------------------------------------------ ratios, intervals, verdicts
def exact_bootstrap_median_quantile(values: list[float], q: float) -> float:
    """The q-quantile of the exact bootstrap distribution of the median of an odd-sized sample, by hand.

    With n values sorted x_(1) <= ... <= x_(n) (distinct) and n draws with replacement, the median is <= x_(j)
    exactly when at least (n + 1) / 2 draws are among the j smallest: a binomial tail with p = j / n.
    """
    xs = sorted(values)
    n = len(xs)
    need = (n + 1) // 2
    for j in range(1, n + 1):
        p = j / n
        cdf = sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(need, n + 1))
        if cdf >= q:
            return xs[j - 1]
    return xs[-1]


def test_bootstrap_interval_of_the_median_matches_the_exact_distribution() -> None:
    values = [float(v) for v in range(1, 10)]  # P(median <= 1) = 0.0013, P(median <= 2) = 0.0304
    est = S.estimate(values)
    assert est.median == 5.0 and est.rounds == 9
    assert (est.low, est.high) == (exact_bootstrap_median_quantile(values, 0.025),
                                   exact_bootstrap_median_quantile(values, 0.975)) == (2.0, 8.0)
    # three values: the median is 1 or 10 with probability 7/27 each, so the 95% interval spans both
    assert (S.estimate([1.0, 2.0, 10.0]).low, S.estimate([1.0, 2.0, 10.0]).high) == (1.0, 10.0)


def test_interval_edge_cases_are_explicit() -> None:
    same = S.estimate([1.045, 1.045, 1.045])
    assert same.degenerate and (same.low, same.median, same.high) == (1.045, 1.045, 1.045)
    assert same.format(3) == "1.045 ="  # memory: the same in every round
    one = S.estimate([1.2])
    assert one.low == -math.inf and one.high == math.inf
    assert S.verdict(one, 1.25) == "inconclusive"  # one round proves nothing
    with pytest.raises(ValueError, match="non-empty"):
        S.estimate([])
    with pytest.raises(ValueError, match="non-finite"):
        S.estimate([1.0, float("nan")])
    assert S.Estimate(1.05, 1.02, 1.09, 7).format() == "1.05 [1.02, 1.09]"


def test_interval_always_contains_the_median() -> None:
    # scipy's percentile interpolation over identical resample medians lands one ulp below this value
    # (found by search, seed 0): the interval must still contain the median it is reported with
    same = [1.7254085871405749] * 3
    est = S.estimate(same)
    assert est.low <= est.median <= est.high and est.degenerate


def test_ratio_is_taken_within_each_round() -> None:
    # the machine's load multiplies everything in a round; the method is always 1.2x LoRA inside a round
    load = [1.0, 3.0, 1.1, 2.5, 1.0]
    rounds = [{"lora": 0.5 * f, "pi": 0.6 * f} for f in load]
    assert S.round_ratios(rounds, "pi", "lora") == pytest.approx([1.2] * 5)
    est = S.ratio_estimate(rounds, "pi", "lora")
    assert est.median == pytest.approx(1.2) and est.half_width == pytest.approx(0.0)
    # a ratio of medians pairs LoRA's and pi's steps from different rounds: 0.66 / 0.55 here happens to agree,
    # but reorder the loads of one method and it does not, while the per-round ratio cannot change
    shuffled = [{"lora": 0.5 * f, "pi": 0.6 * g} for f, g in zip(load, [3.0, 1.0, 2.5, 1.1, 1.0])]
    assert S.round_ratios(shuffled, "pi", "lora")[0] == pytest.approx(3.6)
    with pytest.raises(KeyError, match="round 1"):
        S.round_ratios([{"a": 1.0, "b": 1.0}, {"a": 1.0}], "a", "b")
    with pytest.raises(ValueError, match="cannot divide"):
        S.round_ratios([{"a": 1.0, "b": 0.0}], "a", "b")


@pytest.mark.parametrize(
    ("low", "high", "threshold", "higher_is_better", "expected"),
    [
        (1.01, 1.04, 1.05, False, "met"),
        (1.01, 1.05, 1.05, False, "met"),  # a bound on the threshold counts: the goal is <=
        (1.06, 1.20, 1.05, False, "not met"),
        (1.00, 1.10, 1.05, False, "inconclusive"),
        (1.35, 1.60, 1.30, True, "met"),
        (1.00, 1.29, 1.30, True, "not met"),
        (1.20, 1.40, 1.30, True, "inconclusive"),
    ],
)
def test_verdict_needs_the_whole_interval(low, high, threshold, higher_is_better, expected) -> None:
    est = S.Estimate((low + high) / 2, low, high, 10)
    assert S.verdict(est, threshold, higher_is_better) == expected


def test_combined_verdict_and_stopping_rule() -> None:
    assert S.combine(["met", "met"]) == "met"
    assert S.combine(["met", "inconclusive"]) == "inconclusive"
    assert S.combine(["inconclusive", "not met", "met"]) == "not met"
    with pytest.raises(ValueError, match="at least one verdict"):
        S.combine([])
    assert S.precise_enough([S.Estimate(1.0, 0.96, 1.04, 5), S.Estimate(2.0, 1.95, 2.05, 5)])
    assert not S.precise_enough([S.Estimate(1.0, 0.96, 1.04, 5), S.Estimate(2.0, 1.9, 2.05, 5)])
    assert S.inverted(S.Estimate(0.8, 0.7, 0.95, 5)) and not S.inverted(S.Estimate(0.9, 0.7, 1.01, 5))


# ------------------------------------------------------------------ the round scheduler
def recording_measures(names: list[str], calls: list[str], value: dict[str, float] | None = None) -> dict:
    def make(name: str):
        def measure() -> float:
            calls.append(name)
            return (value or {}).get(name, float(len(calls)))
        return measure
    return {n: make(n) for n in names}


def test_each_round_runs_every_method_once_in_a_fresh_shuffled_order() -> None:
    names = ["lora", "plus", "pi", "oft"]
    calls: list[str] = []
    log = run_rounds(recording_measures(names, calls), min_rounds=30, max_rounds=30, warmup_rounds=2, seed=3)
    assert log.rounds == 30 and log.stop_reason == STOP_CAP
    assert len(calls) == 32 * 4  # two warm-up rounds ran and were discarded
    kept = calls[8:]
    for i, order in enumerate(log.orders):
        assert sorted(order) == sorted(names)  # every method exactly once
        assert kept[4 * i: 4 * i + 4] == order  # the recorded order is the order they ran in
        assert list(log.values[i]) == order
    assert len({tuple(o) for o in log.orders}) > 10  # reshuffled, not one fixed order
    assert {o[0] for o in log.orders} == set(names)  # nobody always runs first
    again = run_rounds(recording_measures(names, []), min_rounds=30, max_rounds=30, warmup_rounds=2, seed=3)
    assert again.orders == log.orders  # reproducible from the seed


def test_values_are_paired_within_the_round_they_were_measured_in() -> None:
    loads = iter([1.0, 4.0, 2.0])  # the load changes between rounds, not inside one
    state = {"calls": 0, "load": 0.0}

    def make(base: float):
        def measure() -> float:
            if state["calls"] % 2 == 0:  # a new round begins
                state["load"] = next(loads)
            state["calls"] += 1
            return base * state["load"]
        return measure

    log = run_rounds({"lora": make(1.0), "pi": make(1.5)}, min_rounds=3, max_rounds=3)
    assert [v["lora"] for v in log.values] == [1.0, 4.0, 2.0]
    assert S.round_ratios(log.values, "pi", "lora") == [1.5, 1.5, 1.5]


def test_rounds_stop_when_precise_at_the_cap_or_at_the_budget() -> None:
    names = ["a", "b"]
    log = run_rounds(recording_measures(names, []), min_rounds=3, max_rounds=20, precise=lambda v: len(v) >= 7)
    assert (log.rounds, log.stop_reason) == (7, STOP_PRECISE)
    log = run_rounds(recording_measures(names, []), min_rounds=5, max_rounds=20, precise=lambda v: True)
    assert (log.rounds, log.stop_reason) == (5, STOP_PRECISE)  # the minimum always runs
    log = run_rounds(recording_measures(names, []), min_rounds=2, max_rounds=6, precise=lambda v: False)
    assert (log.rounds, log.stop_reason) == (6, STOP_CAP)
    ticks = iter(range(100))
    log = run_rounds(recording_measures(names, []), min_rounds=2, max_rounds=50, precise=lambda v: False,
                     budget_s=4.5, clock=lambda: float(next(ticks)))
    assert (log.rounds, log.stop_reason) == (5, STOP_BUDGET)
    with pytest.raises(ValueError, match="min_rounds"):
        run_rounds(recording_measures(names, []), min_rounds=3, max_rounds=2)


# ------------------------------------------------------------------ device selection and timing
def test_device_selection() -> None:
    assert D.select_device("auto", cuda_available=False).type == "cpu"
    assert D.select_device("auto", cuda_available=True).type == "cuda"
    assert D.select_device("cpu", cuda_available=True).type == "cpu"
    assert D.select_device("cuda", cuda_available=True).type == "cuda"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        D.select_device("cuda", cuda_available=False)
    with pytest.raises(ValueError, match="--device"):
        D.select_device("tpu", cuda_available=False)
    assert D.select_device("auto") == D.select_device("auto", torch.cuda.is_available())


def test_cuda_clock_synchronises_around_the_step_and_cpu_clock_does_not(monkeypatch) -> None:
    """A fake clock that each event moves on by its own amount: the time returned is the step and the wait for its
    kernels (the second sync), never the wait for work queued before it (the first)."""
    now = [0.0]
    events: list[str] = []

    def event(name: str, seconds: float) -> Callable[[], None]:
        return lambda: (events.append(name), now.__setitem__(0, now[0] + seconds))

    monkeypatch.setattr(D, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    sync = iter([event("sync", 1.0), event("sync", 100.0)])
    clock = D.step_clock(torch.device("cuda"), synchronize=lambda: next(sync)())
    assert clock(event("step", 10.0)) == 110.0
    assert events == ["sync", "step", "sync"]
    events.clear()
    assert D.step_clock(torch.device("cpu"))(event("step", 10.0)) == 10.0
    assert events == ["step"]


def test_cuda_peak_is_the_step_allocation_on_top_of_what_the_method_starts_with() -> None:
    class FakeCuda:
        def __init__(self) -> None:
            self.allocated, self.peak, self.log = 1000, 5000, []

        def synchronize(self) -> None:
            self.log.append("sync")

        def reset_peak_memory_stats(self) -> None:
            self.peak = self.allocated
            self.log.append("reset")

        def memory_allocated(self) -> int:
            return self.allocated

        def max_memory_allocated(self) -> int:
            return self.peak

    cuda = FakeCuda()

    def step() -> None:  # allocates 300 bytes, then 200 more, frees all
        cuda.log.append("step")
        cuda.peak = max(cuda.peak, cuda.allocated + 500)

    assert D.cuda_step_peak_bytes(step, start_bytes=64, cuda=cuda) == 64 + 500
    assert cuda.log == ["sync", "reset", "step", "sync"]  # the stale peak (5000) was reset before the step


def test_pin_threads_sets_torch_and_the_environment(monkeypatch) -> None:
    before = torch.get_num_threads()
    for var in D.THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    try:
        pinned = D.pin_threads(1)
        assert torch.get_num_threads() == 1
        assert all(os.environ[v] == "1" for v in D.THREAD_ENV_VARS)
        assert pinned["torch.set_num_threads"] == "1"
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="--threads"):
        D.pin_threads(0)


# ------------------------------------------------------------------ goals, sanity checks, quick mode
def fake_work(name: str, targets: list[str], model: object, batch: dict, kind: str = "model") -> H.Workload:
    return H.Workload(name, model, batch, lambda m, b: None, targets, kind=kind)  # type: ignore[arg-type]


def synthetic_session(times: dict[str, float], memory: dict[str, float], work: H.Workload,
                      rounds: int = 8) -> R.Session:
    """A session whose rounds are given (a small, deterministic wobble per round around ``times``)."""
    session = R.Session(work.name, [work], {work.name: list(times)})
    wobble = [1.0, 1.01, 0.99, 1.02, 0.98, 1.0, 1.01, 0.99][:rounds]
    session.time_log = RoundLog(values=[{(work.name, m): t * (w if m != "lora" else 1.0) * (1 + i)
                                         for m, t in times.items()} for i, w in enumerate(wobble)],
                                stop_reason=STOP_PRECISE)
    session.mem_log = RoundLog(values=[{(work.name, m): b for m, b in memory.items()}] * 3)
    R.fill_rows(session, {(work.name, m): 1000 for m in times})
    return session


def test_sanity_check_fires_on_an_inverted_measurement() -> None:
    model, batch = object(), {}
    work = fake_work("toy model (q, v)", ["q", "v"], model, batch)
    honest = synthetic_session({"lora": 1.0, "lorma-plus-pre": 1.02, "lorma-pi-pre": 1.5},
                               {"lora": 100.0, "lorma-plus-pre": 101.0, "lorma-pi-pre": 130.0}, work)
    assert [(p.more[1], p.less[1]) for p in honest.sanity] == [("lorma-pi-pre", "lorma-plus-pre")]
    assert not honest.failed_checks()
    # pi (a full-rank d x d transform) measured 25% faster than plus: the machine, not the code
    inverted = synthetic_session({"lora": 1.0, "lorma-plus-pre": 1.2, "lorma-pi-pre": 0.9},
                                 {"lora": 100.0, "lorma-plus-pre": 101.0, "lorma-pi-pre": 130.0}, work)
    failed = inverted.failed_checks()
    assert len(failed) == 1 and failed[0][1].high < 1.0
    text = "\n".join(R.session_section(inverted, R.FULL_PLAN))
    assert "**SANITY CHECK FAILED**" in text and "lorma-pi-pre (toy model (q, v)) came out faster" in text
    assert all("withheld" in line for line in R.goal_lines([inverted]))
    assert not any("withheld" in line for line in R.goal_lines([honest]))


def test_superset_of_targets_is_a_sanity_pair_only_on_the_same_model_and_batch() -> None:
    model, batch = object(), {}
    qv = fake_work("m (q_proj, v_proj)", ["q_proj", "v_proj"], model, batch)
    all_linear = fake_work("m (all linear)", list(H.LLAMA_ALL_LINEAR), model, batch)
    methods = {qv.name: ["lora", "oft"], all_linear.name: ["lora", "oft"]}
    pairs = {(p.more, p.less) for p in R.sanity_pairs([qv, all_linear], methods)}
    assert pairs == {((all_linear.name, m), (qv.name, m)) for m in ("lora", "oft")}
    other = fake_work("m (all linear)", list(H.LLAMA_ALL_LINEAR), model, {"another": "batch"})
    assert R.sanity_pairs([qv, other], methods) == []
    tiny = H.layer_workload(64, 4)
    assert not tiny.sanity and R.sanity_pairs([tiny], {tiny.name: H.method_names("layer")}) == []
    assert H.layer_workload(1024, 1).sanity


def test_goal_verdicts_from_synthetic_rounds() -> None:
    work = fake_work("toy (q, v)", ["q", "v"], object(), {})
    session = synthetic_session(
        {"lora": 1.0, "oft": 1.6, "hra": 0.9, "lorma-plus-pre": 1.02, "lorma-pi-pre": 1.5},
        {"lora": 100.0, "oft": 100.0, "hra": 100.0, "lorma-plus-pre": 110.0, "lorma-pi-pre": 120.0}, work)
    lines = {m: next(line for line in R.goal_lines([session]) if f", {m}: " in line)
             for m in ("lorma-plus-pre", "lorma-pi-pre")}
    # plus: step 1.02 [<= 1.05] met, memory 1.100 = not met -> not met
    assert "step / LoRA 1.02" in lines["lorma-plus-pre"] and "memory / LoRA 1.100 =" in lines["lorma-plus-pre"]
    assert lines["lorma-plus-pre"].endswith("**not met**")
    # pi: 1.5x LoRA (> 1.25: not met); faster than OFT (slower than LoRA: judged, met); HRA is faster than LoRA:
    # not judged
    assert "step / oft 0.94" in lines["lorma-pi-pre"] and "step / hra not judged" in lines["lorma-pi-pre"]
    assert lines["lorma-pi-pre"].endswith("**not met**")
    all_linear = fake_work("toy (all linear)", list(H.LLAMA_ALL_LINEAR), object(), {})
    goals = R.goals_for(all_linear, ["lora", "lorma-pi-pre"])
    assert [(p.label, p.threshold) for p in goals[0].parts] == [("step / LoRA", 1.5), ("memory / LoRA", 1.3)]
    layer_goals = R.goals_for(H.layer_workload(1024, 1), H.method_names("layer"))
    assert {g.subject for g in layer_goals} == {f"lorma-{i}-pre vs ref-{o}-{i}" for i in ("plus", "pi")
                                               for o in ("table11", "released")}
    assert R.goals_for(H.layer_workload(512, 1), H.method_names("layer")) == []


def test_quick_mode_is_one_model_with_fewer_rounds(tmp_path) -> None:
    quick = R.make_plan(R.parse_args(["--quick"]))
    full = R.make_plan(R.parse_args([]))
    assert quick.quick and quick.sections == ("smollm2",) and quick.threads == 1
    assert quick.max_rounds < full.max_rounds and quick.table_budget_s < full.table_budget_s
    assert H.method_names(quick.smollm2_methods) == ["lora", "lorma-plus-pre", "lorma-pi-pre"]
    assert full.sections == R.SECTIONS and not full.quick
    assert [s for s, _ in R.build_sessions(quick, tmp_path, torch.device("cpu"))] == ["smollm2"]
    assert R.make_plan(R.parse_args(["--quick", "--max-rounds", "20"])).max_rounds == 20
    with pytest.raises(SystemExit, match="unknown section"):
        R.make_plan(R.parse_args(["--skip", "smolm2"]))
    with pytest.raises(SystemExit, match="min-rounds"):
        R.make_plan(R.parse_args(["--min-rounds", "1"]))
    assert quick.smollm2_shape == (2, 64)
    assert R.make_plan(R.parse_args(["--quick", "--smollm2-shape", "4", "512"])).smollm2_shape == (4, 512)
    with pytest.raises(SystemExit, match="smollm2-shape"):
        R.make_plan(R.parse_args(["--smollm2-shape", "0", "64"]))
    # neither run writes the repository's BENCHMARKS.md (put together by hand from the reports under runs/)
    for argv in ([], ["--quick"]):
        args = R.parse_args(argv)
        path = R.report_path(args, R.make_plan(args))
        assert path.parts[0] == "runs" and path.name == "BENCHMARKS.md"
    args = R.parse_args(["--out", "x.md"])
    assert R.report_path(args, R.make_plan(args)) == Path("x.md")
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert re.search(r"^bench-quick:.*\n\t.*-m benchmarks\.run --quick$", makefile, re.M)
    assert re.search(r"^bench:.*\n\t.*-m benchmarks\.run$", makefile, re.M)


def test_methods_option_keeps_lora_and_the_listed_methods(tmp_path) -> None:
    only_layers = ["--skip", "minilm", "smollm2", "gpt2", "inference", "quant", "compile", "--layer-dims", "16",
                   "4096", "--layer-tokens", "2"]
    plan = R.make_plan(R.parse_args([*only_layers, "--methods", "lorma-pi-pre", "ref-table11-pi"]))
    assert plan.methods == {"lorma-pi-pre", "ref-table11-pi"}
    sessions = [build() for _, build in R.build_sessions(plan, tmp_path, torch.device("cpu"))]
    assert [s.methods[s.works[0].name] for s in sessions] == [["lora", "lorma-pi-pre", "ref-table11-pi"],
                                                                ["lora", "lorma-pi-pre"]]  # no refs at d = 4096
    assert [s.title for s in sessions] == ["Linear 16 x 16", "Linear 4096 x 4096"]
    default = R.make_plan(R.parse_args(only_layers))
    assert default.methods is None
    small, big = [b() for _, b in R.build_sessions(default, tmp_path, torch.device("cpu"))]
    assert small.methods[small.works[0].name] == H.method_names("layer")
    # the sanity pairs are decided on the methods measured: at d = 4096 none names a dropped reference ordering
    assert big.sanity and all(key[1] in big.methods[key[0]] for pair in big.sanity for key in (pair.more, pair.less))
    with pytest.raises(SystemExit, match=r"--methods: unknown method\(s\) \['lorma-times-pre'\]"):
        R.make_plan(R.parse_args(["--methods", "lorma-times-pre"]))


def test_a_failed_sanity_check_fails_the_run_after_writing_the_report(tmp_path, monkeypatch) -> None:
    def inverted_session(session: R.Session, plan, device, log) -> R.Session:
        work = session.works[0]
        fake = synthetic_session({m: (0.5 if m == "lorma-pi-pre" else 1.0) for m in session.methods[work.name]},
                                 {m: 1.0 for m in session.methods[work.name]}, work)
        session.time_log, session.mem_log, session.rows = fake.time_log, fake.mem_log, fake.rows
        return session

    monkeypatch.setattr(R, "measure_session", inverted_session)
    out = tmp_path / "B.md"
    code = R.main(["--skip", "minilm", "smollm2", "gpt2", "inference", "quant", "compile", "--layer-dims", "1024",
                   "--threads", "1", "--out", str(out)])
    assert code == 1
    assert "**SANITY CHECK FAILED**" in out.read_text()


def test_small_run_writes_report_with_intervals_and_plot(tmp_path) -> None:
    out = tmp_path / "B.md"
    argv = ["--skip", "minilm", "smollm2", "gpt2", "inference", "quant", "compile", "--layer-dims", "64", "128",
            "--layer-tokens", "16", "--min-rounds", "2", "--max-rounds", "2", "--memory-rounds", "2",
            "--threads", "1", "--out", str(out)]
    assert R.main(argv) == 0
    text = out.read_text()
    assert "python -m benchmarks.run --skip" in text
    for d in (64, 128):
        assert f"### Linear {d} x {d}" in text
    assert "| lora | " in text and "| lorma-pi-pre | " in text and "| ref-released-pi | " in text
    assert text.count("Rounds: 2 timed after 1 warm-up round(s), stopped by") == 2
    assert "Load average (1, 5, 15 min) before: " in text and "torch.set_num_threads=1" in text
    lora_row = next(line for line in text.splitlines() if line.startswith("| lora | "))
    assert lora_row.split("|")[4].strip() == "1.00 ="  # LoRA is its own baseline in every round
    pi_row = next(line for line in text.splitlines() if line.startswith("| lorma-pi-pre | "))
    assert re.fullmatch(r"\d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\]|\d+\.\d\d =", pi_row.split("|")[4].strip())
    png = tmp_path / "benchmarks-layers.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))


# ------------------------------------------------------------------ LoRMA_pi's cost on SmolLM2 (benchmarks/pi_cost.py)
def test_pi_cost_arithmetic_by_hand() -> None:
    from benchmarks import pi_cost as P

    shape = P.SMOLLM2
    # per layer: q, o 576^2; k, v 576 * 192; gate, up, down 576 * 1536
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert sum(i * o for i, o in shape.modules().values()) == per_layer == 3_538_944
    # transform sizes: pre 576, 192, 192, 576, 1536, 1536, 576; post 576 x 6 and 1536; auto the smaller of each
    squares = {"pre": 3 * 576**2 + 2 * 192**2 + 2 * 1536**2, "post": 6 * 576**2 + 1536**2,
               "auto": 5 * 576**2 + 2 * 192**2}
    for side, sq in squares.items():
        c = P.step_macs(shape, side, n_tokens=128, seq_len=64)
        assert c["transform"] == 3 * 30 * sq
        assert c["build"] == pytest.approx(3 * 8 * 30 * sq / 128)
        assert P.saved_transform_bytes(shape, side) == 4 * 30 * sq
    lora = P.step_macs(shape, None, n_tokens=128, seq_len=64)
    frozen = 30 * 2 * per_layer + 2 * 576 * 49152 + 30 * 3 * 2 * 64 * 576
    adapter = 30 * 3 * 8 * (2 * 1152 + 2 * 768 + 3 * 2112)
    assert (lora["frozen"], lora["adapter"], lora["total"]) == (frozen, adapter, frozen + adapter)
    auto = P.step_macs(shape, "auto", 128, 64)
    assert auto["total"] / lora["total"] == pytest.approx((frozen + 3 * 30 * squares["auto"] * (1 + 8 / 128))
                                                          / (frozen + adapter))
    assert 1.5 < auto["total"] / lora["total"] < 1.6  # the arithmetic limit sits just above the 1.5x goal
    # fold against activation: n > 2 d d_other / (3 d - d_other); never when d_other >= 3 d
    assert P.fold_break_even("pre", 576, 1536) == "439" and P.fold_break_even("post", 576, 1536) == "9216"
    assert P.fold_break_even("pre", 576, 192) == "never"
    assert P.model_bytes(shape) == 4 * (30 * per_layer + 49152 * 576)


@pytest.mark.parametrize("side", ["pre", "post"])
def test_pi_cost_strategies_are_exact(side: str) -> None:
    """Every strategy measured computes the same output and the same gradients (against the dense formula)."""
    from benchmarks import pi_cost as P

    forwards, tensors = P.module_forwards(12, 20, side, n_tokens=5)
    x, w0, A, B = tensors["x"], tensors["w0"], tensors["A"], tensors["B"]
    M = reference_inflation(A.detach(), B.detach(), "pi", P.ALPHA / P.R)
    W = M @ w0.double() if side == "pre" else w0.double() @ M
    expected = x.detach().double() @ W.T
    results = {}
    for name in P.STRATEGIES:
        out = forwards[name]()
        assert rel_err(out, expected) < 1e-5, name
        results[name] = torch.autograd.grad(out.square().mean(), (x, A, B))
    for name in P.STRATEGIES[1:]:
        for got, want in zip(results[name], results["activation"]):
            assert rel_err(got, want) < 1e-4, name


def test_gpu_script_asks_for_cuda_and_a_plan_that_parses() -> None:
    script = (Path(__file__).parents[1] / "scripts" / "gpu_bench.sh").read_text()
    line = re.search(r"-m benchmarks\.run (.*?)\\\n\s*(.*?) \"\$@\"", script, re.S)
    assert line is not None
    argv = (line.group(1) + " " + line.group(2)).replace('"${OUT_MD:-BENCHMARKS-gpu.md}"', "B.md").split()
    args = R.parse_args(argv)
    plan = R.make_plan(args)
    assert args.device == "cuda" and plan.table_budget_s == 60.0 and plan.max_rounds == 30
    assert "compile" not in plan.sections and "quant" not in plan.sections and "smollm2" in plan.sections
    assert "timeout 590" in script  # the 10-minute budget is enforced, not hoped for


def test_auto_side_is_measured_only_where_it_differs_from_pre(tiny_llama) -> None:
    core = H.method_names("core")
    all_linear = fake_work("llama (all linear)", list(H.LLAMA_ALL_LINEAR), tiny_llama, {})
    qv = fake_work("llama (q, v)", ["q_proj", "v_proj"], tiny_llama, {})
    assert H.with_auto_side(core, all_linear) == [*core, "lorma-plus-auto", "lorma-pi-auto"]  # gate / up expand
    assert H.with_auto_side(core, qv) == core  # q 32 -> 32, v 32 -> 16: auto is pre
    assert H.with_auto_side(["lora"], all_linear) == ["lora"]


@pytest.mark.parametrize("method", ["dora", "dorma-plus", "dorma-pi", "dylorma", "adalora", "adalorma"])
def test_the_variants_build_and_step_in_the_harness(method: str) -> None:
    """benchmarks/variants.py's methods: built from the registry (a rank budget on a nominal schedule), only the
    adapter trains, and one AdamW step changes it."""
    work = H.layer_workload(16, 8)
    model = H.build_method(work, method)
    trained = H.trainable(model)
    assert trained and all("proj" in n for n, p in model.named_parameters() if p.requires_grad)
    before = [p.detach().clone() for p in trained]
    H.make_step(work, model)()
    assert any(not torch.equal(b, p) for b, p in zip(before, trained))
