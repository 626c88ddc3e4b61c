"""The reproduction study's plumbing (``lorma reproduce``, issue 28) on the tiny profile: the plan, resumable runs in
child processes, learning rates handed from the first seed to the others, the result files, and a report whose
numbers are recomputed here from those files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from lorma.plumbing.errors import InputError
from lorma.study.plan import build_plan
from lorma.study.profiles import CPU, PAPER, TINY, get_profile
from lorma.study.report import (
    CLOSE_TIE,
    NOTHING_LEARNED,
    outcome,
    parity_verdict,
    read_results,
    superiority_verdict,
    tally,
    write_report,
)
from lorma.study.runner import StudyPaths, done_steps, run_study

NLG_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "nlg"
#: the steps the fixture runs: the main classification runs (4 methods x 2 seeds), one measurement, one E2E run,
#: and the E2E runs at the method's own rate (2 seeds: the second takes the first's)
ONLY = ["nlu/tiny-a", "delta/tiny-a/lorma-pi-vs-lora", "e2e/lorma-plus/seed-0", "e2e/lorma-plus-own-rate"]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudyPaths, list[str]]:
    out = tmp_path_factory.mktemp("study")
    paths = StudyPaths(root=out / "root", results=out / "res" / "tiny", nlg_data=NLG_DATA)
    ran: list[str] = []
    outcome_ = run_study(TINY, paths, jobs=2, only=ONLY, quiet=True, on_done=lambda step, info: ran.append(step.key))
    assert outcome_["failed"] == {}
    return paths, ran


def test_the_plan_covers_every_claim_and_orders_seeds_outermost() -> None:
    steps = build_plan(CPU)
    keys = [s.key for s in steps]
    assert len(keys) == len(set(keys))
    assert set().union(*(s.claims for s in steps)) == set(range(1, 10))
    assert len({s.dataset for s in steps if s.experiment == "nlu"}) == len(CPU.nlu.datasets)
    for group in ([s for s in steps if s.experiment != "rates"], [s for s in steps if s.experiment == "rates"]):
        seeds = [s.seed for s in group]
        assert seeds == sorted(seeds)  # a stopped study has every cell at the same number of seeds
    by_key = {s.key: s for s in steps}
    for s in steps:
        for need in s.needs:  # everything a step needs comes before it
            assert keys.index(need) < keys.index(s.key), (s.key, need)
        if s.experiment == "nlu" and s.seed > 0:
            assert s.rate == f"nlu/{s.dataset}/{s.method}/seed-0"
        if s.experiment == "nlu" and s.seed == 0:
            assert s.rate == "auto"
    # the ablations keep the main run's rate of their method (Table 6: LoRMA+'s for the run without inflation)
    assert by_key["inflation/tweets-small/lorma-none/seed-1"].rate == "nlu/tweets-small/lorma-plus/seed-0"
    assert by_key["side/trec-questions/lorma-pi-post/seed-0"].settings == {"side": "post"}
    target = by_key["targets/tweets-small/lorma-plus-qkvo-r2/seed-0"].settings
    assert target == {"target_modules": ["query", "key", "value", "dense"], "r": 2, "alpha": 2}
    assert "rank/tweets-small/lora-r8/seed-0" not in by_key  # the main run is that point of the sweep
    assert by_key["delta/tweets-small/lorma-pi-vs-lora/seed-0"].needs == (
        "nlu/tweets-small/lorma-pi/seed-0", "nlu/tweets-small/lora/seed-0")
    assert all(s.cost > 0 for s in steps)
    # the learning-rate evidence comes last: defaults, and --tune's k-fold choice reused by the later seeds
    rates = [s for s in steps if s.experiment == "rates"]
    assert keys[-len(rates):] == [s.key for s in rates]
    tuned = by_key["rates/tweets-small/lorma-plus-tuned/seed-0"]
    assert tuned.settings == {"tune": ["learning_rate"], "tune_folds": 3}
    assert by_key["rates/tweets-small/lorma-plus-tuned/seed-2"].rate == tuned.key
    assert by_key["rates/trec-questions/lora-default/seed-1"].rate == "fixed"
    paper = build_plan(PAPER)  # the paper's GLUE tasks from the Table 14 presets, no cost estimate (GPUs)
    assert {s.dataset for s in paper if s.experiment == "nlu"} >= {"mrpc", "stsb", "cola", "rte"}
    assert all(s.cost == 0 for s in paper)


def test_an_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(InputError, match="cpu, paper, tiny"):
        get_profile("gpu")


def test_a_tuning_step_is_configured_as_lorma_train_tune(tmp_path: Path) -> None:
    from lorma.study.runner import step_config

    paths = StudyPaths(root=tmp_path / "root", results=tmp_path / "res", nlg_data=NLG_DATA)
    step = next(s for s in build_plan(CPU) if s.key == "rates/tweets-small/lorma-plus-tuned/seed-0")
    cfg = step_config(step, CPU, paths)
    assert cfg.tune == ["learning_rate"] and cfg.tune_folds == 3 and cfg.method == "lorma-plus"
    assert cfg.output_dir == str(paths.run_dir(step.key)) and cfg.train_file.endswith("tweets-small-train.csv")
    default = step_config(next(s for s in build_plan(CPU) if s.key == "rates/tweets-small/lora-default/seed-0"),
                          CPU, paths)
    assert "learning_rate" not in default.training and not default.tune  # the family's default rate


def test_plan_command_prints_the_cost_without_running(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "lorma.cli", "reproduce", "--plan", "--root", str(tmp_path / "r"),
                          "--results", str(tmp_path / "res")], capture_output=True, text=True, check=True)
    assert "CPU h (left)" in out.stdout and "nlu" in out.stdout and "e2e" in out.stdout
    assert f"{len(build_plan(CPU))} steps, 0 done" in out.stdout
    assert not (tmp_path / "r").exists() and not (tmp_path / "res").exists()


def test_every_step_leaves_its_result_files(study) -> None:
    paths, ran = study
    steps = [s for s in build_plan(TINY) if any(s.key.startswith(o) for o in ONLY)]
    assert sorted(ran) == sorted(s.key for s in steps)
    for s in steps:
        folder = paths.result_dir(s.key)
        if s.kind == "delta":
            analysis = json.loads((folder / "analysis.json").read_text())
            assert set(analysis["comparison"]) and analysis["summary"]["comparison"]["control"]
            continue
        assert {"metrics.json", "config.yaml", "train_log.jsonl"} <= {p.name for p in folder.iterdir()}
        assert not any(p.suffix in (".safetensors", ".bin") for p in folder.rglob("*"))  # no weights
    lorma_pi = paths.result_dir("nlu/tiny-a/lorma-pi/seed-0")
    assert (lorma_pi / "rank" / "rank_log.jsonl").is_file() and (lorma_pi / "lr_range.json").is_file()
    generations = (paths.result_dir("e2e/lorma-plus/seed-0") / "e2e_eval.predictions.txt").read_text().splitlines()
    assert len(generations) == 4  # the 4 test MRs the tiny profile decodes


def test_later_seeds_train_at_the_rate_the_first_seed_chose(study) -> None:
    import yaml

    paths, _ = study
    for method in ("lora", "lorma-plus", "full"):
        chosen = json.loads((paths.result_dir(f"nlu/tiny-a/{method}/seed-0") / "metrics.json").read_text())
        config = yaml.safe_load((paths.result_dir(f"nlu/tiny-a/{method}/seed-1") / "config.yaml").read_text())
        assert "lr_range_test" in chosen
        assert config["training"]["learning_rate"] == pytest.approx(chosen["learning_rate"]["body"])
    # generation at the method's own rate: a range test on seed 0, its rate on seed 1 (no head rate of its own)
    chosen = json.loads((paths.result_dir("e2e/lorma-plus-own-rate/seed-0") / "metrics.json").read_text())
    config = yaml.safe_load((paths.result_dir("e2e/lorma-plus-own-rate/seed-1") / "config.yaml").read_text())
    shared = yaml.safe_load((paths.result_dir("e2e/lorma-plus/seed-0") / "config.yaml").read_text())
    assert "lr_range_test" in chosen and "lr_range_test" not in json.loads(
        (paths.result_dir("e2e/lorma-plus/seed-0") / "metrics.json").read_text())
    assert config["training"]["learning_rate"] == pytest.approx(chosen["learning_rate"]["body"])
    assert shared["training"]["learning_rate"] == pytest.approx(1e-3)


def test_a_finished_step_never_runs_again_and_a_lost_one_does(study) -> None:
    paths, _ = study
    again: list[str] = []
    before = (paths.result_dir("nlu/tiny-a/lora/seed-0") / "metrics.json").stat().st_mtime_ns
    result = run_study(TINY, paths, jobs=1, only=ONLY, quiet=True, on_done=lambda s, i: again.append(s.key))
    assert again == [] and result["failed"] == {}
    assert (paths.result_dir("nlu/tiny-a/lora/seed-0") / "metrics.json").stat().st_mtime_ns == before
    # a step killed half-way leaves a run directory without results: it is run again, from scratch
    import shutil

    key = "nlu/tiny-a/lorma-plus/seed-1"
    shutil.rmtree(paths.result_dir(key))
    shutil.rmtree(paths.run_dir(key) / "adapter")
    (paths.run_dir(key) / "metrics.json").unlink()
    run_study(TINY, paths, jobs=1, only=ONLY, quiet=True, on_done=lambda s, i: again.append(s.key))
    assert again == [key]
    assert (paths.result_dir(key) / "metrics.json").is_file()
    assert done_steps(build_plan(TINY), paths) >= {key, "nlu/tiny-a/lora/seed-0"}


def test_a_step_that_fails_is_recorded_and_the_ones_that_need_it_are_not_run(tmp_path: Path) -> None:
    import dataclasses

    paths = StudyPaths(root=tmp_path / "root", results=tmp_path / "res", nlg_data=NLG_DATA)
    bad = dataclasses.replace(TINY, nlu=dataclasses.replace(TINY.nlu, settings={**TINY.nlu.settings, "r": 0}))
    result = run_study(bad, paths, jobs=1, only=["nlu/tiny-a/lora"], quiet=True)
    assert "r must be a positive integer" in result["failed"]["nlu/tiny-a/lora/seed-0"]
    assert "which failed" in result["failed"]["nlu/tiny-a/lora/seed-1"]  # it needs seed 0's rate
    assert (paths.root / "failures.jsonl").read_text().count("nlu/tiny-a/lora/seed-0") == 1
    assert not paths.results.exists()
    missing = run_study(TINY, paths, jobs=1, only=["nlu/tiny-a/lora/seed-1"], quiet=True)
    assert "not done and not selected" in missing["failed"]["nlu/tiny-a/lora/seed-1"]


def test_missing_generation_data_is_refused_before_any_step(tmp_path: Path) -> None:
    paths = StudyPaths(root=tmp_path / "root", results=tmp_path / "res", nlg_data=tmp_path / "missing")
    with pytest.raises(InputError, match="generation data folder is missing"):
        run_study(TINY, paths, jobs=1, only=["e2e/lora/seed-0"], quiet=True)
    assert not paths.results.exists() and not (paths.root / "runs").exists()


def _tagged_processes(tag: str) -> list[int]:
    """Processes whose environment holds ``tag`` (a study and the children it spawned)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if tag.encode() in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_study_leaves_no_child_behind_and_resumes(tmp_path: Path) -> None:
    import os
    import signal
    import time
    import uuid

    tag = f"LORMA_STUDY_TEST={uuid.uuid4().hex}"
    env = {**os.environ, tag.split("=")[0]: tag.split("=")[1]}
    command = [sys.executable, "-m", "lorma.cli", "reproduce", "--scale", "tiny", "--root", str(tmp_path / "root"),
               "--results", str(tmp_path / "res"), "--only", "nlu/tiny-a/lora/seed-0", "--jobs", "1"]
    study = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "root" / "tiny" / "runs" / "nlu" / "tiny-a" / "lora" / "seed-0"
    deadline = time.monotonic() + 300
    while not run.exists() and time.monotonic() < deadline and study.poll() is None:
        time.sleep(0.5)
    assert run.exists(), "the step never started"
    study.send_signal(signal.SIGKILL)
    study.wait()
    deadline = time.monotonic() + 60
    while _tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _tagged_processes(tag) == []  # the child died with its parent
    assert not (tmp_path / "res" / "tiny" / "nlu" / "tiny-a" / "lora" / "seed-0" / "metrics.json").exists()
    from lorma.cli import main

    assert main(command[3:]) == 0  # resumed in this process (the same command; a second interpreter adds nothing)
    assert (tmp_path / "res" / "tiny" / "nlu" / "tiny-a" / "lora" / "seed-0" / "metrics.json").is_file()


def test_verdict_rules() -> None:
    assert outcome({"difference": 0.1, "low": 0.02, "high": 0.2, "seeds": 3}) == "win"
    assert outcome({"difference": -0.1, "low": -0.2, "high": -0.01, "seeds": 3}) == "loss"
    assert outcome({"difference": 0.0, "low": -0.1, "high": 0.1, "seeds": 3}) == "tie"
    assert outcome({"difference": 0.1, "low": None, "high": None, "seeds": 1}) == "n/a"
    assert outcome({"difference": -5.0, "low": -6.0, "high": -4.0, "seeds": 3}, lower_is_better=True) == "win"
    # parity needs close ties (interval within 2% of the reference's score), not merely ties
    close = outcome({"difference": 0.001, "low": -0.01, "high": 0.012, "seeds": 3}, reference=0.8)
    wide = outcome({"difference": 0.001, "low": -0.02, "high": 0.012, "seeds": 3}, reference=0.8)
    assert (close, wide) == (CLOSE_TIE, "tie") and tally([close, wide])["tie"] == 2
    assert parity_verdict(tally([close, "win", wide])) == "holds"
    assert parity_verdict(tally(["tie", "win", "tie"])).startswith("cannot tell at this scale (2 of 3 intervals")
    assert parity_verdict(tally(["loss", "loss", "win"])) == "does not hold"
    assert parity_verdict(tally(["loss", "win"])) == "mixed"
    assert parity_verdict(tally(["n/a"])).startswith("cannot tell yet")
    assert superiority_verdict(tally(["win", "win", "tie"])) == "holds"
    assert superiority_verdict(tally(["win", "tie", "loss"])) == "does not hold (1 for, 1 against)"
    assert superiority_verdict(tally(["tie", "tie", "loss"])) == "does not hold"
    assert superiority_verdict(tally(["win", "tie", "tie"])) == "cannot tell at this scale"
    # a reversal is not outvoted: wins with a loss beside them are mixed, not "holds"
    assert superiority_verdict(tally(["win", "win", "win", "loss"])) == "mixed (3 for, 1 against)"
    # a study under way: the verdict is provisional and says on how many comparisons it rests
    assert parity_verdict(tally([CLOSE_TIE, CLOSE_TIE, "n/a"])) == "holds so far (2 of 3 with an interval)"
    assert superiority_verdict(tally(["win", "n/a", "n/a"])) == "holds so far (1 of 3 with an interval)"


def test_the_report_numbers_are_the_result_files_numbers(study, tmp_path: Path) -> None:
    paths, _ = study
    report = write_report(TINY, paths.results, tmp_path / "REPRODUCTION.md")
    text = report.read_text()
    assert text.count("\n| ") >= 9 and all(f"\n| {n} |" in text for n in range(1, 10))
    # the NLU table's mean [interval] for LoRMA+, recomputed from the metrics files with scipy
    values, lora = [], []
    for seed in (0, 1):
        for method, into in (("lorma-plus", values), ("lora", lora)):
            m = json.loads((paths.result_dir(f"nlu/tiny-a/{method}/seed-{seed}") / "metrics.json").read_text())
            into.append(m["eval"][m["main_metric"]])
    mean = np.mean(values)
    if np.ptp(values) > 0:
        half = stats.t.ppf(0.975, 1) * np.std(values, ddof=1) / np.sqrt(2)
        assert f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}] (n=2)" in text
    else:
        assert f"{mean:.3f} [{mean:.3f}, {mean:.3f}] (n=2)" in text
    diff = np.subtract(values, lora)
    assert f"{diff.mean():+.3f}" in text
    # the measurement's numbers too
    analysis = json.loads((paths.result_dir("delta/tiny-a/lorma-pi-vs-lora/seed-0") / "analysis.json").read_text())
    assert f"{analysis['summary']['comparison']['run']['cosine']['mean']:.4f}" in text
    assert (paths.results / "loss_curves.png").stat().st_size > 1000
    assert len(read_results(paths.results).cell("nlu", "tiny-a", "lorma-pi")) == 2
    # the E2E row at the method's own rate: its chosen rate and its BLEU over the 2 seeds
    own = [json.loads((paths.result_dir(f"e2e/lorma-plus-own-rate/seed-{s}") / "metrics.json").read_text())
           for s in (0, 1)]
    row = next(line for line in text.splitlines() if line.startswith("| LoRMA+ at its own rate ("))
    assert f"({own[0]['learning_rate']['body']:.2g})" in row and "| 2 |" in row
    assert f"{np.mean([m['eval']['eval_bleu'] for m in own]):.2f}" in row


def test_report_command_rederives_the_same_page_in_a_fresh_process(study, tmp_path: Path) -> None:
    paths, _ = study
    page = paths.results / "REPRODUCTION.md"
    first = write_report(TINY, paths.results, page).read_text()
    page.unlink()
    subprocess.run([sys.executable, "-m", "lorma.cli", "reproduce", "--report", "--scale", "tiny", "--results",
                    str(paths.results.parent), "--root", str(tmp_path / "unused")],
                   capture_output=True, text=True, check=True, cwd=tmp_path)
    # the tiny profile's report goes beside its results
    assert page.read_text() == first


def test_the_verdict_table_names_the_profiles_own_models(tmp_path: Path) -> None:
    """Claims 1 and 2 state the setting of the profile the page is written for, not the cpu profile's models."""
    (tmp_path / "results").mkdir()
    text = write_report(PAPER, tmp_path / "results", tmp_path / "REPRODUCTION.md").read_text()
    rows = {n: next(line for line in text.splitlines() if line.startswith(f"| {n} |")) for n in (1, 2)}
    assert "RoBERTa base" in rows[1] and "GPT-2 M on E2E" in rows[2] and "beam 10" in rows[2]
    assert not any(name in text for name in ("MiniLM", "SmolLM2"))


def test_a_dataset_where_nothing_was_learned_is_left_out_of_the_verdicts(tmp_path: Path) -> None:
    """A flat training loss for every run of every method (the task not learned) makes a tie meaningless: the report
    names the dataset and keeps it out of the counts; a dataset where one run learned stays in."""
    from lorma.study.report import gather, not_learned

    def write(dataset: str, method: str, seed: int, losses: list[float], score: float) -> None:
        folder = tmp_path / "nlu" / dataset / method / f"seed-{seed}"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(
            {"main_metric": "eval_macro_f1", "eval": {"eval_macro_f1": score}, "best_eval": {"eval_macro_f1": score}}))
        (folder / "train_log.jsonl").write_text("".join(json.dumps({"step": 5 * i, "loss": v}) + "\n"
                                                        for i, v in enumerate(losses)))

    flat, falling = [0.693] * 16, [0.693 - 0.02 * i for i in range(16)]
    for seed in (0, 1):
        for method, score in (("lora", 0.50), ("lorma-plus", 0.51 + 0.001 * seed)):
            write("flat-set", method, seed, flat, score)
            # one learning run is enough for the dataset to count
            write("mixed-set", method, seed, falling if (method, seed) == ("lora", 1) else flat, score)
    results = read_results(tmp_path)
    assert not_learned(results) == ["flat-set"]
    sections, facts = gather(TINY, results)
    assert facts["nlu"]["tally"]["lorma-plus"] == {"win": 1, "tie": 0, "loss": 0, "n/a": 0, "close": 0}  # mixed-set
    text = "\n".join(sections["nlu"])
    assert "Nothing was learned on flat-set" in text and NOTHING_LEARNED in text


def _write_rate_run(root: Path, experiment: str, dataset: str, label: str, seed: int, losses: list[float],
                    score: float) -> None:
    """One run's result files as the study leaves them: its metrics (at the default rate under rates/, at a
    range-tested one under nlu/) and its loss log."""
    folder = root / experiment / dataset / label / f"seed-{seed}"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(
        {"main_metric": "eval_macro_f1", "eval": {"eval_macro_f1": score}, "best_eval": {"eval_macro_f1": score},
         "learning_rate": {"body": 1e-3 if experiment == "rates" else 5e-5}}))
    (folder / "train_log.jsonl").write_text("".join(json.dumps({"step": 5 * i, "loss": v}) + "\n"
                                                    for i, v in enumerate(losses)))


def test_the_rates_section_leaves_out_a_pair_of_rates_where_nothing_was_learned(tmp_path: Path) -> None:
    """The default rate against the range test's: where neither run lowered its loss the row is marked and left out
    of the counts; where the default learned and the chosen rate did not, it is a real loss and counted."""
    from lorma.study.report import rates_section

    def write(*args: Any) -> None:
        _write_rate_run(tmp_path, *args)

    assert "No results yet" in "\n".join(rates_section(read_results(tmp_path))[0])
    flat, falling = [0.693] * 16, [0.693 - 0.02 * i for i in range(16)]
    for seed in (0, 1):
        write("nlu", "flat-set", "lora", seed, flat, 0.50 + 0.01 * seed)
        write("rates", "flat-set", "lora-default", seed, flat, 0.40)
        write("nlu", "default-learns", "lora", seed, flat, 0.50 + 0.01 * seed)
        write("rates", "default-learns", "lora-default", seed, falling, 0.80)
    lines, facts = rates_section(read_results(tmp_path))
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and "dataset" not in line}
    assert rows["flat-set"].rstrip(" |").endswith(NOTHING_LEARNED)
    assert rows["default-learns"].rstrip(" |").endswith("loss")
    assert facts["range test"] == {"win": 0, "tie": 0, "loss": 1, "n/a": 0, "close": 0}


def test_the_rates_section_sets_the_methods_side_by_side_at_one_shared_rate(tmp_path: Path) -> None:
    """LoRMA+ against LoRA with both at the default rate, beside the same difference at their own rates: the paired
    differences are the result files' own, seed by seed."""
    from lorma.study.report import rates_section

    falling = [0.693 - 0.02 * i for i in range(16)]
    default_scores = {"lora": [0.60, 0.62, 0.61], "lorma-plus": [0.68, 0.67, 0.69]}
    own_scores = {"lora": [0.64, 0.63, 0.66], "lorma-plus": [0.60, 0.60, 0.61]}
    for method in ("lora", "lorma-plus"):
        for seed in range(3):
            _write_rate_run(tmp_path, "rates", "set", f"{method}-default", seed, falling, default_scores[method][seed])
            _write_rate_run(tmp_path, "nlu", "set", method, seed, falling, own_scores[method][seed])
    lines, facts = rates_section(read_results(tmp_path))
    assert facts["shared rate"] == {"lorma-plus": {"win": 1, "tie": 0, "loss": 0, "n/a": 0, "close": 0}}
    start = next(i for i, line in enumerate(lines) if "at the default rate" in line)
    row = next(line for line in lines[start:] if line.startswith("| set |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    for column, scores in ((2, default_scores), (4, own_scores)):
        diffs = np.subtract(scores["lorma-plus"], scores["lora"])
        low, high = stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
        assert cells[column] == f"{diffs.mean():+.3f} [{low:+.3f}, {high:+.3f}]"
    assert cells[1] == "LoRMA+ - LoRA" and cells[3] == "win" and cells[5] == "loss"
