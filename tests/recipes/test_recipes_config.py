"""RunConfig: YAML + flags merging, TrainingArguments routing, errors that name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorma.plumbing.errors import InputError
from lorma.recipes.config import DEFAULT_TRAINING, RunConfig, build_config, load_yaml
from lorma.recipes.config import normalise_yaml as _normalise_yaml
from lorma.recipes.config import parse_scalar as _scalar


def test_flags_override_yaml_and_training_keys_are_routed(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: m1\nmethod: lora\nr: 4\nlearning_rate: 1.0e-3\ntraining:\n  weight_decay: 0.1\n")
    yaml_values = load_yaml(cfg_file)
    cfg = build_config(yaml_values, {"r": "16", "training": {"weight_decay": 0.2}, "max_steps": 7}, str(cfg_file))
    assert cfg.model == "m1" and cfg.method == "lora" and cfg.r == 16
    assert cfg.training == {"learning_rate": 1e-3, "weight_decay": 0.2, "max_steps": 7}
    merged = cfg.training_arguments()
    assert merged["learning_rate"] == 1e-3 and merged["weight_decay"] == 0.2
    assert merged["per_device_train_batch_size"] == DEFAULT_TRAINING["per_device_train_batch_size"]
    assert merged["seed"] == cfg.seed


def test_warmup_ratio_becomes_a_ratio_in_warmup_steps() -> None:
    cfg = build_config({"warmup_ratio": 0.06}, {})
    assert cfg.training == {"warmup_steps": 0.06}
    cfg = build_config({"training": {"warmup_ratio": 0.1}}, {})
    assert cfg.training == {"warmup_steps": 0.1}


def test_yaml_numbers_written_without_a_dot_are_numbers() -> None:
    # YAML 1.1 reads 4e-4 as a string; users mean a number
    values = _normalise_yaml({"learning_rate": "4e-4", "training": {"adam_epsilon": "1e-8"}, "model": "1e3"})
    assert values["learning_rate"] == pytest.approx(4e-4)
    assert values["training"]["adam_epsilon"] == pytest.approx(1e-8)
    assert values["model"] == "1e3"  # paths stay strings
    assert _scalar("true") is True and _scalar("12") == 12 and _scalar("linear") == "linear"


def test_unknown_key_names_the_key_and_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"c\.yaml: unknown key 'learnig_rate'"):
        build_config({"learnig_rate": 1}, {}, "c.yaml")
    with pytest.raises(InputError, match=r"training\.bogus is not a field"):
        build_config({"training": {"bogus": 1}}, {}, "c.yaml")


def test_wrong_types_and_values_are_errors() -> None:
    with pytest.raises(InputError, match="'r' must be of type int"):
        build_config({"r": "eight"}, {})
    with pytest.raises(InputError, match="'r' must be of type int"):
        build_config({"r": 2.5}, {})
    with pytest.raises(InputError, match="unknown method 'lorma-plux'"):
        build_config({"method": "lorma-plux"}, {})
    with pytest.raises(InputError, match="unknown side"):
        build_config({"side": "middle"}, {})
    with pytest.raises(InputError, match="eval_split"):
        build_config({"eval_split": 1.5}, {})


def test_lists_from_flags_and_yaml() -> None:
    assert build_config({}, {"target_modules": "query, value"}).target_modules == ["query", "value"]
    assert build_config({"target_modules": ["key"]}, {}).target_modules == ["key"]


def test_yaml_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: a\nr: [1,\n")
    with pytest.raises(InputError, match=r"bad\.yaml: line \d+"):
        load_yaml(bad)
    with pytest.raises(InputError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(InputError, match="must be a mapping"):
        load_yaml(listy)


def test_defaults() -> None:
    cfg = RunConfig()
    assert cfg.method == "lorma-plus" and cfg.side == "pre" and cfg.task == "classification"
