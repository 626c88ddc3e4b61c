"""``lorma analyze``'s work: measure one run (and optionally compare it with another), tables and plots.

:func:`analyze` returns a JSON-ready dict; :func:`lorma.analysis.report_text.format_report` turns it into the
printed tables. The measurements are those of :mod:`lorma.analysis.matrices` and :mod:`lorma.analysis.convergence`:

* per module of the run: rank of delta W (Table 15) with its singular-value summary, and for LoRMA
  layers the rank of the final I(BA);
* with ``against``: delta W of the run against delta W of the other run (Table 9) per module, next
  to a random matrix of the run's delta W norm compared against the same reference (the control);
* with loss logs: loss AUC, % decrease against ``against`` and steps to reach its minimum (Table 5,
  Fig. 6);
* with a ``rank_log.jsonl``: the rank of I(BA) over training (Fig. 7), min / final per module.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

from lorma.analysis.convergence import convergence_table
from lorma.analysis.matrices import compare_matrices, random_control, summarise
from lorma.plumbing.fileio import atomic_write_json, atomic_write_text
from lorma.runs.loss_curve import Smoothing, loss_auc, smooth
from lorma.runs.spectrum import singular_values, sv_summary

from .report_text import COMPARE_METRICS, format_report
from .runs import RunInfo, final_ranks, read_run

__all__ = ["OUTPUT_NAMES", "analyze"]

OUTPUT_NAMES = (
    "analysis.json",
    "analysis.txt",
    "delta_rank.png",
    "delta_spectra.png",
    "rank_over_steps.png",
    "loss_curves.png",
    "comparison_frobenius.png",
    "comparison_cosine.png",
    "comparison_angle.png",
    "final_ranks.png",
)

def _measure_model(run: RunInfo, base_model: str | None, rtol: float | None,
                   model_class: str | None = None) -> tuple[dict[str, Any], str]:
    """Deltas (numpy, for comparisons) and per-module measurements of one run's adapter."""
    from lorma.runs.rank_log import rank_records

    from .deltas import extract_deltas, load_adapter_model, resolve_base_model

    if run.adapter_dir is None:
        raise ValueError(f"{run.path}: no saved adapter (adapter_config.json) found in the run directory")
    base = resolve_base_model(run.adapter_dir, base_model, run.base_model_hint)
    model = load_adapter_model(run.adapter_dir, base, model_class)
    deltas = extract_deltas(model)
    transforms = {}
    for rec in rank_records(model, rtol=rtol):
        key = rec["module"] + (f"[{rec['part']}]" if rec["part"] is not None else "")
        transforms[key] = rec
    del model
    modules: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    for name, md in deltas.items():
        summary = sv_summary(md.delta, rtol=rtol, name=f"delta W of {name}")
        arrays[name] = {"delta": md.delta.double().numpy(), "r": md.r, "svals": singular_values(md.delta)}
        modules[name] = {
            "method": md.method,
            "r": md.r,
            "inflation": md.inflation,
            "side": md.side,
            "shape": list(md.delta.shape),
            "delta_rank": summary.rank,
            "delta_size": summary.size,
            "delta_norm": float(math.sqrt(float((md.delta.double() ** 2).sum()))),
            "delta_sv": summary.as_dict(),
        }
    for key, rec in transforms.items():
        base_key = key.split("[")[0]
        entry = modules.setdefault(base_key, {})
        entry.setdefault("transform", {})[key] = {
            k: rec[k] for k in ("d", "rank", "rtol", "tol", "sigma_max", "sigma_min", "cond")
        }
    return {"modules": modules, "arrays": arrays}, base


def _rank_log_summary(path: Path) -> dict[str, Any]:
    from lorma.runs.rank_log import read_rank_log

    records = read_rank_log(path)
    per: dict[str, dict[str, Any]] = {}
    for rec in records:
        key = rec["module"] + (f"[{rec['part']}]" if rec.get("part") is not None else "")
        entry = per.setdefault(key, {"d": rec.get("d"), "min_rank": rec["rank"], "steps": 0})
        entry["min_rank"] = min(entry["min_rank"], rec["rank"])
        entry["steps"] += 1
        entry["final_rank"] = rec["rank"]
        entry["final_step"] = rec["step"]
        entry["final_cond"] = rec.get("cond")
    return {"records": records, "modules": per}


def analyze(
    run_dir: str | Path,
    against: str | Path | None = None,
    base_model: str | None = None,
    against_base_model: str | None = None,
    out_dir: str | Path | None = None,
    rtol: float | None = None,
    smoothing: Smoothing = 5,
    seed: int = 0,
    plots: bool = True,
    model_class: str | None = None,
) -> dict[str, Any]:
    """Measure ``run_dir`` (and compare with ``against``); write ``analysis.json``/``.txt`` and PNGs to ``out_dir``.

    ``rtol`` is the relative rank tolerance (None: ``max(m, n) * eps(float32)``, the deltas being
    float32). ``against_base_model`` defaults to ``base_model``. ``seed`` seeds the random controls
    (module ``i`` in sorted order uses ``seed`` + a CRC of its name, so controls do not depend on which
    other modules are present). ``model_class`` is the transformers class to rebuild a base model as, for an
    adapter that records none (both runs).
    """
    run = read_run(run_dir)
    other = read_run(against) if against is not None else None
    result: dict[str, Any] = {
        "run": {
            "path": str(run.path),
            "label": run.label,
            "notes": run.notes,
            "loss_log": str(run.loss_source) if run.loss_source else None,
        },
        "tolerance": {
            "rtol": rtol,
            "rule": "rank = #singular values > rtol * sigma_max; rtol default max(m, n) * eps of the matrix's "
            "dtype (float32 here)",
        },
        "smoothing": smoothing,
    }
    measured = None
    if run.adapter_dir is not None:
        measured, base = _measure_model(run, base_model, rtol, model_class)
        result["run"]["base_model"] = base
        result["run"]["adapter_dir"] = str(run.adapter_dir)
        result["modules"] = measured["modules"]
        result["summary"] = {
            "delta_rank": summarise({k: v["delta_rank"] for k, v in measured["modules"].items() if "delta_rank" in v}),
        }
    if run.rank_log is not None:
        result["rank_log"] = _rank_log_summary(run.rank_log)
    budget = final_ranks(run.adapter_config)
    if budget is not None:  # AdaLoRMA / AdaLoRA: the ranks the budget left, as saved with the adapter
        result["final_ranks"] = {"run": budget}
    if other is not None:
        result["against"] = {
            "path": str(other.path),
            "label": other.label,
            "notes": other.notes,
            "loss_log": str(other.loss_source) if other.loss_source else None,
        }
        if measured is not None and other.adapter_dir is None:
            result["against"]["notes"] = [*other.notes, "delta W is not compared (no adapter); convergence is"]
        other_budget = final_ranks(other.adapter_config)
        if other_budget is not None:
            result.setdefault("final_ranks", {})["against"] = other_budget
        if measured is not None and other.adapter_dir is not None:
            ref, ref_base = _measure_model(other, against_base_model or base_model, rtol, model_class)
            result["against"]["base_model"] = ref_base
            result["against"]["modules"] = ref["modules"]
            result["comparison"] = _compare(measured["arrays"], ref["arrays"], seed)
            result["summary"]["comparison"] = {
                series: {
                    m: summarise({k: v[series][m] for k, v in result["comparison"].items()}) for m in COMPARE_METRICS
                }
                for series in ("run", "control")
            }
            result["summary"]["against_delta_rank"] = summarise({k: v["delta_rank"] for k, v in ref["modules"].items()})
        else:
            ref = None
        curves = {}
        if run.loss_curve and other.loss_curve:
            run_key = run.label if run.label != other.label else f"{run.label} (run)"
            curves = {run_key: run.loss_curve, other.label: other.loss_curve}
            result["convergence"] = convergence_table(curves, reference=other.label, smoothing=smoothing)
    else:
        ref = None
        curves = {}
        if run.loss_curve:
            steps, losses = run.loss_curve
            curves = {run.label: run.loss_curve}
            result["convergence"] = {
                run.label: {
                    "auc": loss_auc(steps, losses, smoothing),
                    "min_loss": float(smooth(losses, smoothing).min()),
                    "last_step": steps[-1],
                }
            }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if plots:
            result["plots"] = [str(p) for p in _plots(out, run, other, measured, ref, result, curves, smoothing)]
        atomic_write_text(out / "analysis.txt", format_report(result))
        atomic_write_json(out / "analysis.json", _without_records(result))
    return result


def _without_records(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON written to disk: the rank log's raw records stay in rank_log.jsonl."""
    if "rank_log" not in result:
        return result
    trimmed = dict(result)
    trimmed["rank_log"] = {"modules": result["rank_log"]["modules"]}
    return trimmed


def _compare(run_arrays: dict[str, Any], ref_arrays: dict[str, Any], seed: int) -> dict[str, Any]:
    common = sorted(set(run_arrays) & set(ref_arrays))
    if not common:
        raise ValueError(
            "the two runs adapt no module in common (run: "
            f"{', '.join(sorted(run_arrays)[:3])}...; against: {', '.join(sorted(ref_arrays)[:3])}...)"
        )
    rows: dict[str, Any] = {}
    for name in common:
        x, y = run_arrays[name]["delta"], ref_arrays[name]["delta"]
        if x.shape != y.shape:
            raise ValueError(f"module {name}: delta W shapes differ ({x.shape} vs {y.shape}): different base models?")
        r = int(ref_arrays[name]["r"])  # the reference's rank, as the paper uses LoRA's r for Table 9
        norm = float((x**2).sum() ** 0.5)
        control = random_control(x.shape, norm, seed=seed + zlib.crc32(name.encode()))
        rows[name] = {
            "r": r,
            "run": compare_matrices(x, y, r=r, names=(f"delta W of {name}", "reference delta W")).as_dict(),
            "control": compare_matrices(control, y, r=r, names=("random control", "reference delta W")).as_dict(),
        }
    return rows


def _plots(
    out: Path,
    run: RunInfo,
    other: RunInfo | None,
    measured: dict[str, Any] | None,
    ref: dict[str, Any] | None,
    result: dict[str, Any],
    curves: dict[str, Any],
    smoothing: Smoothing,
) -> list[Path]:
    from lorma.analysis import plots
    from lorma.runs.plots import plot_loss_curves

    written: list[Path] = []
    if measured is not None:
        ranks = {run.label: {k: v.get("delta_rank") for k, v in measured["modules"].items() if "delta_rank" in v}}
        spectra = {run.label: {k: v["svals"] for k, v in measured["arrays"].items()}}
        if ref is not None and other is not None:
            label = other.label if other.label != run.label else f"{other.label} (against)"
            ranks[label] = {k: v.get("delta_rank") for k, v in ref["modules"].items()}
            spectra[label] = {k: v["svals"] for k, v in ref["arrays"].items()}
        written.append(
            plots.plot_module_bars(
                ranks, out / "delta_rank.png", "numerical rank of delta W", "Rank of delta W = W - W0 per module"
            )
        )
        written.append(plots.plot_singular_values(spectra, out / "delta_spectra.png"))
    if "final_ranks" in result:
        budgets = {run.label: result["final_ranks"].get("run", {})}
        if other is not None and "against" in result["final_ranks"]:
            budgets[other.label if other.label != run.label else f"{other.label} (against)"] = result["final_ranks"][
                "against"
            ]
        written.append(
            plots.plot_module_bars(budgets, out / "final_ranks.png", "rank after the budget",
                                   "Final rank per module (rank budget)")
        )
    if "rank_log" in result:
        written.append(
            plots.plot_rank_over_steps(
                result["rank_log"]["records"],
                out / "rank_over_steps.png",
                f"Rank of I(BA) during training: {run.label}",
            )
        )
    if curves:
        written.append(
            plot_loss_curves(
                {name: [curve] for name, curve in curves.items()},
                out / "loss_curves.png",
                result.get("convergence") if other is not None else None,
                smoothing,
            )
        )
    if "comparison" in result:
        comp = result["comparison"]
        for metric, fname, log in (
            ("frobenius_distance", "comparison_frobenius.png", True),
            ("cosine", "comparison_cosine.png", False),
            ("angle_first", "comparison_angle.png", False),
        ):
            values = {series: {m: comp[m][series][metric] for m in comp} for series in ("run", "control")}
            values = {
                f"{run.label} vs {other.label}" if s == "run" else f"random vs {other.label}": v
                for s, v in values.items()
            }
            written.append(plots.plot_module_bars(values, out / fname, metric, f"delta W: {metric}", log=log))
    return written
