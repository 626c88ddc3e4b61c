"""The study's report: one verdict per claim of the paper, the tables behind them and pictures, computed from the
committed result files alone (``RESULTS/<key>/metrics.json``, ``analysis.json``, ``train_log.jsonl``), so that
``lorma reproduce --report`` re-derives every number without a model or a GPU.

How a verdict is reached (one rule per kind of claim, stated in the report too):

- *A difference between two methods* (LoRMA against LoRA, a setting against the main one) is the paired difference
  seed by seed (the same seed: the same head initialisation, data order and dropout) with its 95% t interval over
  seeds (:func:`lorma.recipes.verdicts.paired_seed_interval`). A *win* is an interval above 0, a *loss* one below 0,
  a *tie* one that holds 0. With one seed there is no interval: "cannot tell yet".
- *Parity* ("competitive", "on par", "comparable") needs more than ties: an interval that holds 0 but reaches past
  :data:`PARITY_MARGIN` (2%) of the score compared against cannot tell parity from a difference users would mind.
  Parity holds when there are no losses and the wins and close ties (interval within the margin) outnumber the wide
  ties; with no losses but mostly wide ties it cannot be told at this scale; it does not hold when the losses
  outnumber the wins; otherwise the evidence is mixed.
- *Superiority* ("ahead", "matters", "grows", "lower AUC") holds when there are no losses and the wins outnumber
  the ties; with no losses but mostly ties it cannot be told at this scale; it does not hold when there are losses
  and at least as many losses as wins; when there are wins and losses, the wins at least as many, it is mixed: the
  claim holds on some tasks and is reversed on others, which a user must know (a reversal is not outvoted).
- While some comparisons still lack an interval (a study under way), a verdict says "so far" and on how many of
  them it rests.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorma.plumbing.fileio import atomic_write_text, read_json, read_jsonl
from lorma.study.plan import ADAPTER_NAMES
from lorma.study.profiles import Profile

__all__ = ["Results", "read_results", "write_report"]

LABELS = {"lora": "LoRA", "lorma-plus": "LoRMA+", "lorma-pi": "LoRMA_pi", "lorma-none": "LoRMA (no inflation)",
          "full": "full fine-tuning"}
NLG_METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")
# the paper's E2E numbers (Table 3, GPT-2 M, beam 10): BLEU, NIST, METEOR, ROUGE-L, CIDEr
PAPER_E2E = {"lora": (69.1, 8.75, 46.4, 71.4, 2.51), "lorma-plus": (69.3, 8.77, 46.2, 70.8, 2.47),
             "lorma-pi": (69.0, 8.72, 46.3, 70.8, 2.46)}


@dataclass
class Results:
    """Every finished step's record, by experiment, dataset, label and seed."""

    runs: dict[str, dict[str, dict[str, dict[int, dict[str, Any]]]]] = field(default_factory=dict)
    folders: dict[str, Path] = field(default_factory=dict)

    def cell(self, experiment: str, dataset: str, label: str) -> dict[int, dict[str, Any]]:
        return self.runs.get(experiment, {}).get(dataset, {}).get(label, {})

    def datasets(self, experiment: str) -> list[str]:
        return list(self.runs.get(experiment, {}))

    def folder(self, experiment: str, dataset: str, label: str, seed: int) -> Path | None:
        """Where a run's files are (a generation run's key has no dataset part: its task is the experiment)."""
        parts = [experiment, label] if dataset == experiment else [experiment, dataset, label]
        return self.folders.get("/".join([*parts, f"seed-{seed}"]))


def read_results(results: Path) -> Results:
    """Every ``metrics.json`` / ``analysis.json`` under ``results``, keyed by the step's key."""
    out = Results()
    for path in sorted([*results.rglob("metrics.json"), *results.rglob("analysis.json")]):
        parts = path.parent.relative_to(results).parts
        if len(parts) == 4:
            experiment, dataset, label, seed = parts
        elif len(parts) == 3:  # generation: <task>/<method>/seed-<n>
            experiment, label, seed = parts
            dataset = experiment
        else:
            continue
        if not seed.startswith("seed-"):
            continue
        record = read_json(path)
        out.runs.setdefault(experiment, {}).setdefault(dataset, {}).setdefault(label, {})[int(seed[5:])] = record
        out.folders["/".join(parts)] = path.parent
    return out


# --- numbers -------------------------------------------------------------------------------------------------------


def main_value(metrics: dict[str, Any], best: bool = False) -> float | None:
    """The main metric of a classification run: the final evaluation's, or the best epoch's (the paper's way)."""
    key = metrics.get("main_metric")
    if not key:
        return None
    source = metrics.get("best_eval" if best else "eval") or {}
    value = source.get(key)
    return float(value) if isinstance(value, (int, float)) else None


#: a run has learned when its training loss fell by at least this fraction (the mean of the last eighth of its loss
#: log against the first eighth). On this study's sets every run falls by 10-99%, except where the task is not
#: learned at all (movie replies: 0.2%, every method at ln 2 from start to end).
LEARNED_DROP = 0.05
#: the outcome cell of a comparison where nothing was learned (no win, tie or loss to count), in every table
NOTHING_LEARNED = "nothing learned"


def loss_drop(folder: Path) -> float | None:
    """How far a run's training loss fell, as a fraction of where it started (None without a loss log)."""
    log = folder / "train_log.jsonl"
    losses = [float(r["loss"]) for r in read_jsonl(log) if isinstance(r.get("loss"), (int, float))] \
        if log.is_file() else []
    if len(losses) < 2:
        return None
    k = max(1, len(losses) // 8)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    return (first - last) / first if first > 0 else None


def not_learned(results: Results, experiment: str = "nlu") -> list[str]:
    """The datasets where no run of any method learned (:data:`LEARNED_DROP`): every method there sits where it
    started, so a tie between them says nothing about the methods, and the verdicts leave them out."""
    out = []
    for d in results.datasets(experiment):
        drops = [_largest_drop(results, experiment, d, lab, cell) for lab, cell in results.runs[experiment][d].items()]
        known = [x for x in drops if x is not None]
        if known and max(known) < LEARNED_DROP:
            out.append(d)
    return out


def _largest_drop(results: Results, experiment: str, dataset: str, label: str,
                  cell: dict[int, Any]) -> float | None:
    """The largest fall of the training loss (:func:`loss_drop`) over a cell's seeds; None without loss logs."""
    drops = [loss_drop(folder) for seed in cell if (folder := results.folder(experiment, dataset, label, seed))]
    known = [x for x in drops if x is not None]
    return max(known) if known else None


def _none_learned(drops: list[float | None]) -> bool:
    """Every one of a comparison's cells has a loss log and none fell by :data:`LEARNED_DROP`: nothing to compare."""
    return all(x is not None and x < LEARNED_DROP for x in drops)


def nlg_value(metrics: dict[str, Any], name: str) -> float | None:
    value = (metrics.get("eval") or {}).get(f"eval_{name}")
    return float(value) if isinstance(value, (int, float)) else None


def t_interval(values: list[float]) -> tuple[float, float, float] | None:
    """Mean and 95% t interval over seeds (None when empty; the interval is the mean itself with one value)."""
    from scipy import stats

    if not values:
        return None
    mean = float(np.mean(values))
    if len(values) < 2 or np.ptp(values) == 0:
        return mean, mean, mean
    half = float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def paired(run: dict[int, dict[str, Any]], reference: dict[int, dict[str, Any]],
           value: Any) -> dict[str, Any] | None:
    """Paired difference ``value(run) - value(reference)`` over the seeds both have, with its 95% interval."""
    from lorma.recipes.verdicts import paired_seed_interval

    seeds = sorted(s for s in set(run) & set(reference) if value(run[s]) is not None and
                   value(reference[s]) is not None)
    if not seeds:
        return None
    a, b = [value(run[s]) for s in seeds], [value(reference[s]) for s in seeds]
    interval = paired_seed_interval(a, b)
    if interval is None:
        return {"difference": float(a[0] - b[0]), "low": None, "high": None, "seeds": len(seeds)}
    return interval


#: A claim of parity needs more than an interval that holds 0: with 2-3 seeds such an interval can be wide enough to
#: hide a difference a user would care about. A tie counts towards parity only when its whole interval lies within
#: this fraction of the reference's mean score (an equivalence margin: 2% of LoRA's macro-F1 of 0.78 is 0.016, of its
#: BLEU of 53 about 1 point; the paper's own parity gaps, Tables 2-3, are under 1%).
PARITY_MARGIN = 0.02
CLOSE_TIE = f"tie within {PARITY_MARGIN:.0%}"


def outcome(diff: dict[str, Any] | None, lower_is_better: bool = False, reference: float | None = None) -> str:
    """win / tie / loss of one paired difference (``"n/a"`` without an interval); given the ``reference``'s mean
    score, a tie whose interval lies within :data:`PARITY_MARGIN` of it is a :data:`CLOSE_TIE`."""
    if diff is None or diff.get("low") is None:
        return "n/a"
    low, high = diff["low"], diff["high"]
    if lower_is_better:
        low, high = -high, -low
    if low > 0:
        return "win"
    if high < 0:
        return "loss"
    if reference is not None and max(-low, high) <= PARITY_MARGIN * abs(reference):
        return CLOSE_TIE
    return "tie"


def tally(outcomes: Iterable[str]) -> dict[str, int]:
    """Counts of each outcome; ``close`` counts the ties that are also :data:`CLOSE_TIE` (they are in ``tie``)."""
    counts = {"win": 0, "tie": 0, "loss": 0, "n/a": 0, "close": 0}
    for o in outcomes:
        if o == CLOSE_TIE:
            counts["close"] += 1
            o = "tie"
        counts[o] += 1
    return counts


def _so_far(counts: dict[str, int]) -> str:
    """A verdict drawn while some comparisons still lack an interval is provisional, and says on how many it rests."""
    decided = counts["win"] + counts["tie"] + counts["loss"]
    return f" so far ({decided} of {decided + counts['n/a']} with an interval)" if counts["n/a"] else ""


def parity_verdict(counts: dict[str, int]) -> str:
    """Parity holds when nothing is lost and the wins and close ties outnumber the wide ties (the rest cannot be told
    apart at this scale); it does not hold when losses outnumber wins; otherwise the evidence is mixed."""
    decided = counts["win"] + counts["tie"] + counts["loss"]
    if decided == 0:
        return "cannot tell yet (fewer than 2 seeds)"
    if counts["loss"] == 0:
        wide = counts["tie"] - counts.get("close", 0)
        if counts["win"] + counts.get("close", 0) > wide:
            return "holds" + _so_far(counts)
        return (f"cannot tell at this scale ({wide} of {decided} intervals reach past {PARITY_MARGIN:.0%} of the "
                "score compared against)") + _so_far(counts)
    if counts["loss"] > counts["win"]:
        return "does not hold" + _so_far(counts)
    return "mixed" + _so_far(counts)


def superiority_verdict(counts: dict[str, int]) -> str:
    decided = counts["win"] + counts["tie"] + counts["loss"]
    if decided == 0:
        return "cannot tell yet (fewer than 2 seeds)"
    if counts["loss"] == 0:
        return ("holds" if counts["win"] > counts["tie"] else "cannot tell at this scale") + _so_far(counts)
    split = f" ({counts['win']} for, {counts['loss']} against)" if counts["win"] else ""
    if counts["loss"] >= counts["win"]:
        return "does not hold" + split + _so_far(counts)
    return "mixed" + split + _so_far(counts)


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fmt_interval(stat: tuple[float, float, float] | None, n: int, digits: int = 3) -> str:
    if stat is None:
        return "-"
    mean, low, high = stat
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}] (n={n})" if n > 1 else \
        f"{mean:.{digits}f} (n=1)"


def fmt_diff(diff: dict[str, Any] | None, digits: int = 3, scale: float = 1.0) -> str:
    if diff is None:
        return "-"
    d = diff["difference"] * scale
    if diff.get("low") is None:
        return f"{d:+.{digits}f} (n={diff['seeds']})"
    return f"{d:+.{digits}f} [{diff['low'] * scale:+.{digits}f}, {diff['high'] * scale:+.{digits}f}]"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def label(method: str) -> str:
    return LABELS.get(method, method)


# --- sections --------------------------------------------------------------------------------------------------------


@dataclass
class Claim:
    number: int
    claim: str
    paper: str
    setting: str
    ours: str
    verdict: str


def _values(cell: dict[int, dict[str, Any]], value: Any) -> list[float]:
    return [v for s in sorted(cell) if (v := value(cell[s])) is not None]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def nlu_section(results: Results, profile: Profile) -> tuple[list[str], dict[str, Any]]:
    """Claim 1: the main table (final and best epoch), paired differences against LoRA, win / tie / loss."""
    nlu = profile.nlu
    lines: list[str] = []
    datasets = [d for d in results.datasets("nlu")]
    facts: dict[str, Any] = {"diffs": {}, "tally": {}, "tally_best": {}, "datasets": len(datasets),
                             "not_learned": not_learned(results)}
    if nlu is None or not datasets:
        return ["No NLU result yet.", ""], facts
    methods = [m for m in nlu.methods if any(results.cell("nlu", d, m) for d in datasets)]
    header = ["dataset", "metric", *[label(m) for m in methods]]
    rows, best_rows = [], []
    for d in datasets:
        metric = next((r.get("main_metric") for m in methods for r in results.cell("nlu", d, m).values()), "")
        metric = (metric or "").replace("eval_", "")
        row, best_row = [d, metric], [d, metric]
        for m in methods:
            cell = results.cell("nlu", d, m)
            row.append(fmt_interval(t_interval(_values(cell, main_value)), len(cell)))
            best_row.append(fmt_interval(t_interval(_values(cell, lambda r: main_value(r, best=True))), len(cell)))
        rows.append(row)
        best_rows.append(best_row)
    lines += ["Final epoch (no selection on the test rows): mean over seeds [95% t interval] (n seeds).", ""]
    lines += md_table(header, rows)
    lines += ["Best epoch (the paper's way: the best of the evaluations after each epoch, on the same rows).", ""]
    lines += md_table(header, best_rows)
    diff_header = ["dataset", *[f"{label(m)} - LoRA" for m in methods if m != "lora"]]
    diff_rows, diff_best_rows = [], []
    for m in methods:
        if m == "lora":
            continue
        facts["diffs"][m] = {}
        outcomes, outcomes_best = [], []
        for d in datasets:
            ref = results.cell("nlu", d, "lora")
            diff = paired(results.cell("nlu", d, m), ref, main_value)
            diff_best = paired(results.cell("nlu", d, m), ref, lambda r: main_value(r, best=True))
            ref_mean = _mean(_values(ref, main_value))
            facts["diffs"][m][d] = {"final": diff, "best": diff_best,
                                    "outcome": outcome(diff, reference=ref_mean),
                                    "outcome_best": outcome(diff_best, reference=_mean(
                                        _values(ref, lambda r: main_value(r, best=True))))}
            if diff is None or d in facts["not_learned"]:  # no run yet, or nothing learned: not a comparison
                continue
            outcomes.append(facts["diffs"][m][d]["outcome"])
            outcomes_best.append(facts["diffs"][m][d]["outcome_best"])
        facts["tally"][m] = tally(outcomes)
        facts["tally_best"][m] = tally(outcomes_best)
    if "lora" in methods:
        for d in datasets:
            diff_rows.append([d, *[f"{fmt_diff(facts['diffs'][m][d]['final'])} "
                                   + (NOTHING_LEARNED if d in facts["not_learned"] else
                                      facts['diffs'][m][d]['outcome']) for m in methods if m != "lora"]])
            diff_best_rows.append([d, *[fmt_diff(facts["diffs"][m][d]["best"]) for m in methods if m != "lora"]])
        lines += ["Paired difference to LoRA, seed by seed, with its 95% t interval over seeds; win / tie / loss: "
                  "the interval above / around / below 0. Final epoch:", ""]
        lines += md_table(diff_header, diff_rows)
        lines += ["Best epoch:", ""]
        lines += md_table(diff_header, diff_best_rows)
        tally_rows = [[label(m), *(str(facts["tally"][m][k]) for k in ("win", "tie", "close", "loss", "n/a")),
                       " / ".join(str(facts["tally_best"][m][k]) for k in ("win", "tie", "loss"))]
                      for m in methods if m != "lora"]
        if facts["not_learned"]:
            lines += [f"Nothing was learned on {', '.join(facts['not_learned'])}: no run of any method lowered its "
                      f"training loss by {LEARNED_DROP:.0%} (the last eighth of the loss log against the first), so "
                      "every method there scores near where it started and a tie says nothing about the methods. It "
                      "is left out of the counts below and of the verdicts. Whether the range test's rate there is the "
                      "cause (a tenth of the rate at the lowest loss of a nearly flat sweep), the learning-rate "
                      "section tests with the default rate.", ""]
        lines += ["Win / tie / loss against LoRA over the datasets:", ""]
        lines += md_table(["method", "wins", "ties", f"of them within {PARITY_MARGIN:.0%}", "losses",
                           "no interval yet", "best epoch: W / T / L"], tally_rows)
    return lines, facts


def _nlg_row(name: str, cell: dict[int, dict[str, Any]]) -> list[str]:
    """One row of the generation table: seeds, trainable parameters, each metric's mean [interval]."""
    params = {r["trainable_params"] for r in cell.values() if isinstance(r.get("trainable_params"), int)}
    return [name, str(len(cell)), ", ".join(f"{p:,}" for p in sorted(params)) or "-",
            *[fmt_interval(t_interval(_values(cell, lambda r, k=k: nlg_value(r, k))), len(cell), 2)
              for k in NLG_METRICS]]


def nlg_section(results: Results, profile: Profile) -> tuple[list[str], dict[str, Any]]:
    """Claim 2: official scores per method (mean over seeds), paired differences to LoRA."""
    facts: dict[str, Any] = {"diffs": {}, "tally": {}}
    lines: list[str] = []
    for setup in profile.nlg:
        task = setup.task
        if task not in results.runs:
            lines += [f"No {task} result yet.", ""]
            continue
        methods = [m for m in setup.methods if results.cell(task, task, m)]
        rows = [_nlg_row(label(m), results.cell(task, task, m)) for m in methods]
        own = [m for m in setup.own_rate_methods if results.cell(task, task, f"{m}-own-rate")]
        for m in own:
            cell = results.cell(task, task, f"{m}-own-rate")
            chosen = sorted({float(r["learning_rate"]["body"]) for r in cell.values()
                             if isinstance(r.get("learning_rate"), dict) and "body" in r["learning_rate"]})
            rows.append(_nlg_row(f"{label(m)} at its own rate ({', '.join(f'{v:.2g}' for v in chosen) or '?'})", cell))
        for m in methods:
            if m in PAPER_E2E and task == "e2e":
                rows.append([f"{label(m)} (paper, GPT-2 M)", "-", "-", *[str(v) for v in PAPER_E2E[m]]])
        lines += [f"**{task.upper()}** ({setup.note or setup.train_file}); official scorer on {setup.eval_inputs} "
                  "inputs; mean over seeds [95% t interval]. The same r gives LoRMA a different number of "
                  "trainable parameters than LoRA: on the pre side A and B span the output dimension twice "
                  "(d_out x r + r x d_out) where LoRA's span input and output (d_in x r + r x d_out). Every method "
                  "trains at one shared rate, as in the paper's Table 16"
                  + (f"; {', '.join(label(m) for m in setup.own_rate_methods)} also at its own rate (a range test "
                     "on the training data on the first seed, reused by the later seeds)" if setup.own_rate_methods
                     else "") + ".", ""]
        lines += md_table(["method", "seeds", "trainable parameters", "BLEU", "NIST", "METEOR", "ROUGE-L", "CIDEr"],
                          rows)
        if "lora" in methods:
            diff_rows = []
            # each method at the shared rate, then the own-rate runs against LoRA at the shared rate (LoRA's rate
            # was chosen for LoRA)
            compared = [(m, m, f"{label(m)} - LoRA", facts) for m in methods if m != "lora"]
            compared += [(f"{m}-own-rate", m, f"{label(m)} at its own rate - LoRA",
                          facts.setdefault("own_rate", {"diffs": {}, "tally": {}})) for m in own]
            lora = results.cell(task, task, "lora")
            lora_means = {k: _mean(_values(lora, lambda r, k=k: nlg_value(r, k))) for k in NLG_METRICS}
            for run_label, m, name, into in compared:
                diffs = {k: paired(results.cell(task, task, run_label), lora, lambda r, k=k: nlg_value(r, k))
                         for k in NLG_METRICS}
                outs = {k: outcome(diffs[k], reference=lora_means[k]) for k in NLG_METRICS}
                into["diffs"][m] = diffs
                into["tally"][m] = tally(outs.values())
                diff_rows.append([name, *[f"{fmt_diff(diffs[k], 2)} {outs[k]}" for k in NLG_METRICS]])
            lines += ["Paired differences to LoRA (same seed), 95% t interval over seeds:", ""]
            lines += md_table(["", "BLEU", "NIST", "METEOR", "ROUGE-L", "CIDEr"], diff_rows)
    return lines, facts


def convergence_section(results: Results, nlu_not_learned: list[str] | None = None) -> tuple[list[str], dict[str, Any]]:
    """Claim 3: training-loss AUC of LoRMA against LoRA, % decrease (Table 5), per dataset."""
    facts: dict[str, Any] = {"tally": {}}
    rows = []
    experiments = [e for e in results.runs if e == "nlu" or e in ("e2e", "webnlg", "dart")]
    per_method: dict[str, list[str]] = defaultdict(list)
    # the classification sets' answer comes from nlu_section when given (each loss log is read once)
    flat = {e: set(nlu_not_learned if e == "nlu" and nlu_not_learned is not None else not_learned(results, e))
            for e in experiments}
    for e in experiments:
        for d in results.datasets(e):
            ref = results.cell(e, d, "lora")
            if not ref:
                continue
            for m in ("lorma-plus", "lorma-pi"):
                cell = results.cell(e, d, m)
                if not cell:
                    continue
                ref_values = _values(ref, lambda r: r.get("loss_auc"))
                if not ref_values:  # no loss log measured (a run without one): no area to compare
                    continue
                pct = paired(cell, ref, lambda r: r.get("loss_auc"))
                ref_mean = float(np.mean(ref_values))
                decrease = None if pct is None else {
                    k: (None if pct.get(k) is None else -100 * pct[k] / ref_mean)
                    for k in ("difference", "low", "high")}
                if decrease is not None:
                    decrease["low"], decrease["high"] = decrease["high"], decrease["low"]
                    decrease["seeds"] = pct["seeds"]
                o = outcome(pct, lower_is_better=True)
                if d in flat[e]:  # a flat loss: no curve lies lower (see nlu_section)
                    o = NOTHING_LEARNED
                else:
                    per_method[m].append(o)
                rows.append([e if d == e else f"{e}: {d}", label(m), fmt(ref_mean, 1),
                             fmt_diff(decrease, 1) if decrease else "-", o])
    for m, outs in per_method.items():
        facts["tally"][m] = tally(outs)
    lines = ["Area under the training-loss curve (the loss log, smoothed as `lorma analyze` does), LoRMA against "
             "LoRA of the same seed: % decrease (positive: LoRMA's curve lies lower), 95% interval over seeds. Each "
             "method trains at the rate of its main runs: on the classification sets its own (chosen by its range "
             "test, as it would be used), on E2E the one rate all methods share (as in the paper's Table 16).", ""]
    lines += md_table(["data", "method", "LoRA AUC", "% AUC decrease", "outcome"], rows)
    return lines, facts


def _ablation_rows(results: Results, experiment: str, reference: Any,
                   parity: bool = False) -> tuple[list[list[str]], list[str]]:
    """Rows of one ablation: each setting's mean and its paired difference to the main run it varies (``parity``:
    a claim of parity, whose close ties are marked)."""
    rows, outcomes = [], []
    for d in results.datasets(experiment):
        for lab, cell in results.runs[experiment][d].items():
            ref_method, ref_exp, ref_label = reference(lab)
            ref = results.cell(ref_exp, d, ref_label)
            diff = paired(cell, ref, main_value)
            o = outcome(diff, reference=_mean(_values(ref, main_value)) if parity else None)
            outcomes.append(o)
            rows.append([d, lab, fmt_interval(t_interval(_values(cell, main_value)), len(cell)),
                         f"{label(ref_method)} ({ref_label})",
                         fmt_interval(t_interval(_values(ref, main_value)), len(ref)), fmt_diff(diff), o])
    return rows, outcomes


def ablation_sections(results: Results, profile: Profile) -> tuple[list[str], dict[str, Any]]:
    """Claims 4-7: the inflation, side, rank and target ablations against the main runs they vary."""
    facts: dict[str, Any] = {}
    lines: list[str] = []
    header = ["dataset", "setting", "score", "against", "its score", "difference", "outcome"]
    nlu = profile.nlu
    main_r = int(nlu.settings.get("r", 8)) if nlu else 8

    # claim 4: no inflation against LoRMA+ (Table 6)
    rows, outs = _ablation_rows(results, "inflation", lambda lab: ("lorma-plus", "nlu", "lorma-plus"))
    facts["inflation"] = tally(outs)
    lines += ["**Claim 4, rank inflation (Table 6):** LoRMA without inflation (`lorma-none`) against LoRMA+ with the "
              "same settings and rate; a loss here means inflation matters.", ""] + md_table(header, rows)

    # claim 5: post against pre (Table 7)
    rows, outs = _ablation_rows(results, "side", lambda lab: (lab[: -len("-post")], "nlu", lab[: -len("-post")]),
                                parity=True)
    facts["side"] = tally(outs)
    lines += ["**Claim 5, pre against post (Table 7):** post-multiplication against the pre-multiplied main run.",
              ""] + md_table(header, rows)

    # claim 6: rank sweep (Table 8, Fig. 5): the sweep's points, and the largest rank against the smallest
    sweep: list[tuple[str, str, dict[int, str], str]] = []
    outs, trend = [], {}
    for d in results.datasets("rank"):
        by_method: dict[str, dict[int, dict[int, dict[str, Any]]]] = defaultdict(dict)
        for lab, cell in results.runs["rank"][d].items():
            method, r = lab.rsplit("-r", 1)
            by_method[method][int(r)] = cell
        for method, points in by_method.items():
            main = results.cell("nlu", d, method)
            if main:
                points.setdefault(main_r, main)
            ranks = sorted(points)
            means = {r: t_interval(_values(points[r], main_value)) for r in ranks}
            change = "-"
            if len(ranks) >= 2:
                diff = paired(points[ranks[-1]], points[ranks[0]], main_value)
                o = outcome(diff)
                outs.append(o)
                trend[(d, method)] = {"ranks": ranks, "means": [m[0] if m else None for m in means.values()],
                                      "diff": diff}
                change = f"r={ranks[-1]} - r={ranks[0]}: {fmt_diff(diff)} {o}"
            sweep.append((d, label(method), {r: fmt_interval(means[r], len(points[r])) for r in ranks}, change))
    facts["rank"] = tally(outs)
    facts["rank_trend"] = trend
    all_ranks = sorted({r for _, _, means, _ in sweep for r in means})
    lines += ["**Claim 6, rank sweep (Table 8, Fig. 5):** mean over seeds at each rank (alpha = r) [95% t interval] "
              "(seeds), and the largest rank against the smallest (paired).", ""]
    lines += md_table(["dataset", "method", *[f"r={r}" for r in all_ranks], "largest - smallest rank"],
                      [[d, m, *[cells.get(r, "-") for r in all_ranks], change]
                       for d, m, cells, change in sweep]) if sweep else ["No result yet.", ""]

    # claims 6-7: target matrices at a fixed budget (Tables 8 and 10)
    rows, outs = [], []
    for d in results.datasets("targets"):
        cells = results.runs["targets"][d]
        single = next((lab for lab in cells if "-q-r" in lab), None)
        for lab, cell in cells.items():
            ref = cells.get(single) if single else None
            diff = paired(cell, ref, main_value) if ref and lab != single else None
            o = outcome(diff) if diff else "-"
            if diff:
                outs.append(o)
            rows.append([d, lab, fmt_interval(t_interval(_values(cell, main_value)), len(cell)),
                         single or "-", fmt_diff(diff) if diff else "-", o])
    facts["targets"] = tally(o for o in outs if o != "-")
    lines += ["**Claims 6-7, target matrices at a fixed budget (Tables 8, 10):** each target set at the rank that "
              "keeps the trainable parameters equal (alpha = r), against W_q alone at the largest rank; the paper "
              "finds spreading the budget over more matrices better.", ""]
    lines += md_table(["dataset", "targets", "score", "against", "difference", "outcome"], rows)
    return lines, facts


def delta_section(results: Results) -> tuple[list[str], dict[str, Any]]:
    """Claims 8-9: delta W of LoRMA against LoRA's with a random control (Table 9), ranks (Table 15, Fig. 7)."""
    facts: dict[str, Any] = {"closer": [], "ranks": []}
    rows, rank_rows = [], []
    for d in results.datasets("delta"):
        for lab, cell in results.runs["delta"][d].items():
            analysis = cell.get(0) or next(iter(cell.values()))
            comparison = (analysis.get("summary") or {}).get("comparison") or {}
            run, control = comparison.get("run", {}), comparison.get("control", {})
            cos_run, cos_ctrl = (run.get("cosine") or {}).get("mean"), (control.get("cosine") or {}).get("mean")
            fro_run = (run.get("frobenius_distance") or {}).get("mean")
            fro_ctrl = (control.get("frobenius_distance") or {}).get("mean")
            ang_run = (run.get("angle_first") or {}).get("mean")
            ang_ctrl = (control.get("angle_first") or {}).get("mean")
            per_module = analysis.get("comparison") or {}
            closer = sum(1 for v in per_module.values()
                         if v.get("run", {}).get("cosine", 0) > v.get("control", {}).get("cosine", 0))
            facts["closer"].append((closer, len(per_module)))
            rows.append([d, lab, fmt(cos_run, 4), fmt(cos_ctrl, 4), fmt(fro_run, 3), fmt(fro_ctrl, 3),
                         fmt(ang_run, 3), fmt(ang_ctrl, 3), f"{closer} of {len(per_module)}"])
            modules = analysis.get("modules") or {}
            ranks = [v.get("delta_rank") for v in modules.values() if v.get("delta_rank") is not None]
            sizes = [v.get("delta_size") for v in modules.values() if v.get("delta_size") is not None]
            against = (analysis.get("against") or {}).get("modules") or {}
            lora_ranks = [v.get("delta_rank") for v in against.values() if v.get("delta_rank") is not None]
            transforms = [t.get("rank") for v in modules.values() for t in (v.get("transform") or {}).values()]
            t_sizes = [t.get("d") for v in modules.values() for t in (v.get("transform") or {}).values()]
            facts["ranks"].append({"dataset": d, "label": lab, "delta": ranks, "size": sizes, "lora": lora_ranks,
                                   "transform": transforms, "d": t_sizes})
            rank_rows.append([d, lab.replace("-vs-lora", ""), _range(ranks), _range(sizes), _range(lora_ranks),
                              _range(transforms), _range(t_sizes)])
    lines = ["**Claim 8 (Table 9):** delta W of each adapted matrix of the LoRMA run against delta W of the LoRA run "
             "(same data, same seed), beside a random matrix of the LoRMA delta's norm compared the same way (the "
             "control). Means over the adapted matrices; the cosine is of the flattened matrices (higher: more "
             "alike), the Frobenius distance (lower: more alike), the first principal angle between the top-r column "
             "spaces (radians, lower: more alike).", ""]
    lines += md_table(["dataset", "run", "cosine", "cosine (random)", "||.-dW_LoRA||_F", "(random)",
                       "angle_1", "(random)", "matrices more alike than random"], rows)
    lines += ["**Claim 9 (Table 15, Fig. 7):** numerical rank of delta W = W - W0 per adapted matrix (min-max over "
              "matrices), of LoRA's, and of the final I(BA) (min-max over the transforms).", ""]
    lines += md_table(["dataset", "run", "rank of dW", "matrix size", "rank of dW (LoRA)", "rank of I(BA)", "d"],
                      rank_rows)
    return lines, facts


def _range(values: list[Any]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return str(min(values)) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def rank_log_section(results: Results) -> tuple[list[str], dict[str, Any]]:
    """Fig. 7: the smallest rank of any I(BA) seen during training, from the runs' rank logs."""
    rows = []
    facts: dict[str, Any] = {"min_fraction": []}
    for d in results.datasets("nlu"):
        for m in ("lorma-plus", "lorma-pi"):
            key = f"nlu/{d}/{m}/seed-0"
            folder = results.folders.get(key)
            log = folder / "rank" / "rank_log.jsonl" if folder else None
            if not log or not log.is_file():
                continue
            records = read_jsonl(log)
            if not records:
                continue
            smallest = min(records, key=lambda rec: rec["rank"] / max(rec.get("d") or 1, 1))
            steps = sorted({rec["step"] for rec in records})
            fraction = smallest["rank"] / max(smallest.get("d") or 1, 1)
            facts["min_fraction"].append(fraction)
            rows.append([d, label(m), f"{steps[0]}-{steps[-1]} ({len(steps)} checks)",
                         f"{smallest['rank']} of {smallest.get('d')}", str(smallest["step"])])
    lines = ["Rank of I(BA) through training (Fig. 7), seed 0: the smallest numerical rank of any adapted module's "
             "transform at any logged step.", ""]
    lines += md_table(["dataset", "method", "steps logged", "smallest rank", "at step"], rows)
    return lines, facts


def rates_section(results: Results) -> tuple[list[str], dict[str, Any]]:
    """The learning rates the study leans on: the range test's (the main runs) and ``--tune``'s (k-fold) against the
    family default, paired by seed on the test rows."""
    rows, outcomes = [], {"range test": [], "k-fold tuned": []}
    for d in results.datasets("rates"):
        cells = results.runs["rates"][d]
        for lab in sorted(cells):
            if not lab.endswith("-default"):
                continue
            method = lab[: -len("-default")]
            default = cells[lab]
            # how the rate was chosen -> where those runs are (experiment, label)
            chosen = {"range test": ("nlu", method), "k-fold tuned": ("rates", f"{method}-tuned")}
            default_drop = _largest_drop(results, "rates", d, lab, default)
            for how, (experiment, run_label) in chosen.items():
                cell = results.cell(experiment, d, run_label)
                if not cell:
                    continue
                diff = paired(cell, default, main_value)
                if _none_learned([default_drop, _largest_drop(results, experiment, d, run_label, cell)]):
                    o = NOTHING_LEARNED  # neither rate moved the loss: the difference says nothing about rates
                else:
                    o = outcome(diff)
                    outcomes[how].append(o)
                rates = _body_rates(cell)
                rows.append([d, label(method), how, ", ".join(f"{x:.2g}" for x in rates)
                             + (" (the default)" if rates == _body_rates(default) else ""),
                             fmt_interval(t_interval(_values(cell, main_value)), len(cell)),
                             fmt_interval(t_interval(_values(default, main_value)), len(default)), fmt_diff(diff), o])
    facts = {how: tally(outs) for how, outs in outcomes.items()}
    lines = ["Each method's rate chosen on the training data only, against the family's default rate (adapters 1e-3, "
             "full fine-tuning 5e-5) on the same seeds: the range test (`--learning-rate auto`, the rate of every main "
             "run above) and `--tune learning_rate` (k-fold cross-validation over the default grid, extended past an "
             "edge that wins). A win means the chosen rate did better on the held-out test rows than the default.",
             ""]
    if not rows:
        return lines + ["No results yet: `lorma reproduce --only rates` runs them.", ""], facts
    lines += md_table(["dataset", "method", "chosen by", "rate(s)", "score", "default's score", "difference",
                       "outcome"], rows)
    if any(r[-1] == NOTHING_LEARNED for r in rows):
        lines += [f"*{NOTHING_LEARNED}*: no run at either rate lowered its training loss by {LEARNED_DROP:.0%}; "
                  "such a row is left out of the counts below.", ""]
    for how, t in facts.items():
        if sum(t.values()):
            lines += [f"- {how} against the default: {_count(t['win'], 'win')}, {_count(t['tie'], 'tie')}, "
                      f"{_count(t['loss'], 'loss')}"
                      + (f", {t['n/a']} without an interval yet" if t["n/a"] else "") + "."]
    shared_lines, facts["shared rate"] = _shared_rate_lines(results)
    return [*lines, "", *shared_lines], facts


def _body_rates(cell: dict[int, dict[str, Any]]) -> list[float]:
    """The body learning rates a cell's runs trained at (one, unless its seeds differ)."""
    return sorted({(r.get("learning_rate") or {}).get("body") for r in cell.values()} - {None})


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


def _shared_rate_lines(results: Results) -> tuple[list[str], dict[str, dict[str, int]]]:
    """The methods against LoRA with both at the default rate, beside the same difference at each one's own
    range-tested rate (the main runs): whether a method's deficit is the method's or its rate's. Also the win / tie /
    loss count at the default rate, per method."""
    flat_main = set(not_learned(results))
    rows, outcomes = [], {}
    for d in results.datasets("rates"):
        cells = results.runs["rates"][d]
        ref = cells.get("lora-default")
        if not ref:
            continue
        ref_drop = _largest_drop(results, "rates", d, "lora-default", ref)
        for lab in sorted(cells):
            if not lab.endswith("-default") or lab == "lora-default":
                continue
            method = lab[: -len("-default")]
            at_default = paired(cells[lab], ref, main_value)
            flat = _none_learned([ref_drop, _largest_drop(results, "rates", d, lab, cells[lab])])
            at_own = paired(results.cell("nlu", d, method), results.cell("nlu", d, "lora"), main_value)
            if not flat:
                outcomes.setdefault(method, []).append(outcome(at_default))
            rows.append([d, f"{label(method)} - LoRA", fmt_diff(at_default),
                         NOTHING_LEARNED if flat else outcome(at_default), fmt_diff(at_own),
                         NOTHING_LEARNED if d in flat_main else outcome(at_own)])
    if not rows:
        return [], {}
    return ["The methods against LoRA at one shared rate (both at the default, as the paper's E2E runs share one "
            "rate, Table 16) and at each one's own range-tested rate (the main runs), paired by seed:", "",
            *md_table(["dataset", "difference", "at the default rate", "outcome", "at their own rates", "outcome"],
                      rows)], {m: tally(o) for m, o in outcomes.items()}


def claims(profile: Profile, facts: dict[str, Any]) -> list[Claim]:
    """The nine claims of the paper, each with our numbers and a verdict (rules: this module's docstring)."""
    nlu, nlg = facts["nlu"], facts["nlg"]
    out: list[Claim] = []

    def counts(t: dict[str, int] | None) -> str:
        return "-" if not t else f"{t['win']} W / {t['tie']} T / {t['loss']} L" + (
            f" ({t['close']} of the ties within {PARITY_MARGIN:.0%})" if t.get("close") else "") + (
            f" ({t['n/a']} without interval)" if t.get("n/a") else "")

    setting = profile.nlu.summary if profile.nlu and profile.nlu.summary else f"profile {profile.name}"
    nlg_setting = "; ".join(s.summary or f"{s.model} on {s.task}" for s in profile.nlg) or "-"
    pi, plus = nlu["tally"].get("lorma-pi"), nlu["tally"].get("lorma-plus")
    out.append(Claim(1, "GLUE: LoRMA_pi competitive with LoRA; LoRMA+ ahead of the other PEFT methods",
                     "Table 2 (RoBERTa base/large, q and v)",
                     f"{setting}, real classification sets with results so far: {nlu.get('datasets', 0)} of "
                     f"{len(profile.nlu.datasets) if profile.nlu else 0}"
                     + (f" ({', '.join(nlu['not_learned'])} left out: nothing learned there)"
                        if nlu.get("not_learned") else "") + "; final epoch",
                     f"LoRMA_pi - LoRA: {counts(pi)}; LoRMA+ - LoRA: {counts(plus)}"
                     # the main runs' rates are each method's own; the rates section also has them at one rate
                     + "".join(f"; at one shared rate (the default, "
                               f"{t['win'] + t['tie'] + t['loss'] + t['n/a']} sets): {label(m)} - LoRA: {counts(t)}"
                               for m, t in facts.get("rates", {}).get("shared rate", {}).items()),
                     f"pi competitive: {parity_verdict(pi) if pi else 'no result yet'}; plus ahead of LoRA: "
                     f"{superiority_verdict(plus) if plus else 'no result yet'}"))
    e2e_pi, e2e_plus = nlg["tally"].get("lorma-pi"), nlg["tally"].get("lorma-plus")
    out.append(Claim(2, "NLG: LoRMA+ and LoRMA_pi on par with LoRA (E2E BLEU 69.3 / 69.0 vs 69.1)",
                     "Table 3 (GPT-2 M, E2E, beam 10)", nlg_setting,
                     f"over the 5 metrics, LoRMA+ - LoRA: {counts(e2e_plus)}; LoRMA_pi - LoRA: {counts(e2e_pi)}"
                     + "".join(f"; {label(m)} at its own rate - LoRA: {counts(t)}"
                               for m, t in nlg.get("own_rate", {}).get("tally", {}).items()),
                     f"plus: {parity_verdict(e2e_plus) if e2e_plus else 'no result yet'}; pi: "
                     f"{parity_verdict(e2e_pi) if e2e_pi else 'no result yet'}"
                     # the paper's verdict is at the shared rate; a method at its own rate is told apart beside it
                     + "".join(f"; {label(m)} at its own rate: {parity_verdict(t)}"
                               for m, t in nlg.get("own_rate", {}).get("tally", {}).items())))
    conv = facts["convergence"]["tally"]
    out.append(Claim(3, "Faster convergence: lower area under the training-loss curve than LoRA",
                     "Table 5, Fig. 6 (CoLA, SST-2: 30-52% lower)", "the main runs' loss logs",
                     f"LoRMA+: {counts(conv.get('lorma-plus'))}; LoRMA_pi: {counts(conv.get('lorma-pi'))}",
                     f"plus: {superiority_verdict(conv['lorma-plus']) if conv.get('lorma-plus') else 'no result yet'}"
                     f"; pi: {superiority_verdict(conv['lorma-pi']) if conv.get('lorma-pi') else 'no result yet'}"))
    abl = facts["ablation"]
    inflation = abl.get("inflation")
    # inflation matters when dropping it loses: count the losses of lorma-none as the claim's wins
    flipped = None if not inflation else {"win": inflation["loss"], "tie": inflation["tie"],
                                          "loss": inflation["win"], "n/a": inflation["n/a"]}
    out.append(Claim(4, "Rank inflation matters: without it results drop", "Table 6 (RoBERTa large)",
                     "lorma-none against LoRMA+ at the same settings", f"none - plus: {counts(inflation)}",
                     superiority_verdict(flipped) if flipped and sum(flipped.values()) else "no result yet"))
    side = abl.get("side")
    out.append(Claim(5, "Pre- and post-multiplication comparable", "Table 7", "side=post against the main (pre) runs",
                     f"post - pre: {counts(side)}", parity_verdict(side) if side and sum(side.values()) else
                     "no result yet"))
    rank = abl.get("rank")
    ablation = profile.ablation
    main_r = int(profile.nlu.settings.get("r", 8)) if profile.nlu else 8
    ranks = sorted({*(ablation.ranks if ablation else ()), main_r})
    out.append(Claim(6, "Performance grows with r, and with more target matrices", "Table 8, Fig. 5",
                     f"r in {{{', '.join(map(str, ranks))}}}, alpha = r", f"largest r - smallest r: {counts(rank)}",
                     superiority_verdict(rank) if rank and sum(rank.values()) else "no result yet"))
    targets = abl.get("targets")
    out.append(Claim(7, "At a fixed budget, spreading it over more matrices is better", "Table 10 (RoBERTa base)",
                     "LoRMA+ on " + ", ".join("{" + ",".join(ADAPTER_NAMES.get(m, m) for m in mods) + f"}} r={r}"
                                              for mods, r in (ablation.target_sets if ablation else ())),
                     f"against {{q}} alone: {counts(targets)}",
                     superiority_verdict(targets) if targets and sum(targets.values()) else "no result yet"))
    closer = facts["delta"]["closer"]
    if closer:
        alike, total = sum(c for c, _ in closer), sum(n for _, n in closer)
        verdict = "holds" if alike > 0.9 * total else "does not hold" if alike < 0.5 * total else "mixed"
        ours = f"{alike} of {total} matrices closer to LoRA's delta W than the random control (cosine)"
    else:
        verdict, ours = "no result yet", "-"
    out.append(Claim(8, "delta W of LoRMA correlates with LoRA's, unlike a random matrix", "Table 9 (RoBERTa large)",
                     "seed 0 of the main runs, every adapted matrix", ours, verdict))
    ranks = facts["delta"]["ranks"]
    pi_ranks = [(min(r["delta"]), min(r["size"])) for r in ranks if "lorma-pi" in r["label"] and r["delta"]]
    plus_ranks = [max(r["delta"]) for r in ranks if "lorma-plus" in r["label"] and r["delta"]]
    fractions = facts["rank_log"]["min_fraction"]
    if pi_ranks:
        pi_full = all(rk >= 0.9 * size for rk, size in pi_ranks)
        plus_low = all(rk <= int(profile.nlu.settings.get("r", 8)) for rk in plus_ranks) if profile.nlu else True
        verdict = "holds" if pi_full and plus_low and (not fractions or min(fractions) >= 0.9) else "does not hold"
        ours = (f"rank of dW: LoRMA_pi >= {min(rk for rk, _ in pi_ranks)} (of {min(s for _, s in pi_ranks)}), "
                f"LoRMA+ <= {max(plus_ranks) if plus_ranks else '-'}; smallest rank of I(BA) during training: "
                f"{min(fractions) * 100:.0f}% of d" if fractions else "")
    else:
        verdict, ours = "no result yet", "-"
    out.append(Claim(9, "dW of LoRMA_pi nearly full rank (LoRA's and LoRMA+'s <= r); I(BA) full rank through "
                     "training", "Table 15 (1021 of 1024), Fig. 7", "seed 0 of the main runs", ours, verdict))
    return out


def gather(profile: Profile, data: Results) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Every section's lines and facts."""
    sections: dict[str, list[str]] = {}
    facts: dict[str, Any] = {}
    sections["nlu"], facts["nlu"] = nlu_section(data, profile)
    sections["nlg"], facts["nlg"] = nlg_section(data, profile)
    sections["convergence"], facts["convergence"] = convergence_section(data, facts["nlu"]["not_learned"])
    sections["ablation"], facts["ablation"] = ablation_sections(data, profile)
    sections["delta"], facts["delta"] = delta_section(data)
    sections["rank_log"], facts["rank_log"] = rank_log_section(data)
    sections["rates"], facts["rates"] = rates_section(data)
    return sections, facts


def write_report(profile: Profile, results: Path, report: Path) -> Path:
    """Rewrite ``report`` (REPRODUCTION.md) and its pictures (in ``results``) from ``results`` alone."""
    from lorma.study.report_text import render

    data = read_results(results)
    sections, facts = gather(profile, data)
    text = render(profile, data, sections, claims(profile, facts), facts, results, report)
    atomic_write_text(report, text)
    return report
