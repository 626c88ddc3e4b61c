"""Where classification data comes from: ``--train-file`` / ``--eval-file``, a GLUE task folder (``--data`` with
``train.tsv`` and the task's dev files), or a saved HF dataset; and which columns hold the text, pair and label.

The eval data is returned as readers, so that a run evaluating on a validation split never reads it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorma.plumbing.errors import InputError
from lorma.tasks.glue import GlueSpec
from lorma.tasks.readers.tabular import Examples, read_examples

__all__ = ["data_columns", "is_glue_folder", "read_classification_data"]


def data_columns(cfg: Any, glue: GlueSpec | None) -> tuple[str | int, str | int | None, str | int]:
    """The text, text-pair and label columns: as given, else the GLUE task's (its TSV files or its HF dataset), else
    ``text`` and ``label``."""
    if glue is not None and cfg.data is not None and cfg.train_file is None and is_glue_folder(cfg):
        default = (glue.text, glue.pair, glue.label)
    elif glue is not None:
        default = (glue.hf_columns[0], glue.hf_columns[1], "label")
    else:
        default = ("text", None, "label")
    return (
        cfg.text_column if cfg.text_column is not None else default[0],
        cfg.text_pair_column if cfg.text_pair_column is not None else default[1],
        cfg.label_column if cfg.label_column is not None else default[2],
    )

def is_glue_folder(cfg: Any) -> bool:
    """Whether ``--data`` is a GLUE task folder (it has ``train.tsv``)."""
    return cfg.data is not None and (Path(cfg.data) / "train.tsv").is_file()

def read_classification_data(cfg: Any, task: str, glue: GlueSpec | None
                             ) -> tuple[Examples, dict[str, Callable[[], Examples]]]:
    """The training examples, and a reader per eval set: the eval data is read only when asked for, so
    that a run that evaluates on a validation split (``eval_on: validation``) never reads it."""
    text, pair, label = data_columns(cfg, glue)
    if cfg.train_file is not None:
        train = read_examples(cfg.train_file, text, pair, label, cfg.file_encoding)
        if cfg.eval_file is None:
            return train, {}
        eval_file = cfg.eval_file
        return train, {"": lambda: read_examples(eval_file, text, pair, label, cfg.file_encoding)}
    if cfg.data is None:
        raise InputError(
            "no training data: give --train-file (CSV/TSV/JSONL) or --data (GLUE folder / HF dataset)"
        )
    folder = Path(cfg.data)
    if not folder.exists():
        raise InputError(f"data directory not found: {folder}")
    if is_glue_folder(cfg):
        has_header = glue.has_header if glue is not None else True
        train = read_examples(folder / "train.tsv", text, pair, label, cfg.file_encoding, has_header, True)
        dev_files = glue.dev_files if glue is not None else {"": "dev.tsv"}
        evals: dict[str, Callable[[], Examples]] = {}
        for key, name in dev_files.items():
            if not (folder / name).is_file():
                raise InputError(f"{folder}: no {name} (the {task} dev set)")
            evals[key] = functools.partial(read_examples, folder / name, text, pair, label, cfg.file_encoding,
                                           has_header, True)
        return train, evals
    if (folder / "dataset_dict.json").is_file() or (folder / "dataset_info.json").is_file():
        return _read_hf(folder, text, pair, label, glue)
    raise InputError(
        f"{folder}: neither a GLUE task folder (train.tsv) nor a saved HF dataset (dataset_dict.json)"
    )

def _read_hf(
    folder: Path, text: str | int, pair: str | int | None, label: str | int, glue: GlueSpec | None
) -> tuple[Examples, dict[str, Callable[[], Examples]]]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(folder))
    except Exception as err:  # datasets raises several types for a broken folder
        raise InputError(f"{folder}: cannot load the saved HF dataset ({err})") from None
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({"train": loaded})
    if "train" not in loaded:
        raise InputError(f"{folder}: the saved dataset has no 'train' split (splits: {', '.join(loaded)})")
    if glue is not None and all(s in loaded for s in glue.hf_eval_splits.values()):
        eval_splits = dict(glue.hf_eval_splits)
    else:
        found = [s for s in ("validation", "dev", "eval", "test") if s in loaded]
        eval_splits = {"": found[0]} if found else {}

    def convert(split: str) -> Examples:
        ds = loaded[split]
        where = f"{folder} split '{split}'"
        columns = [text] + ([pair] if pair is not None else []) + [label]
        for column in columns:
            if column not in ds.column_names:
                raise InputError(f"{where}: no column '{column}' (columns: {', '.join(ds.column_names)})")
        feature = ds.features[label]
        names = getattr(feature, "names", None)
        raw = ds[label]
        labels = [names[v] if names is not None and isinstance(v, int) and v >= 0 else v for v in raw]
        if names is None and glue is not None and glue.labels is not None:
            labels = [glue.labels[v] if isinstance(v, int) and 0 <= v < len(glue.labels) else v
                      for v in labels]
        out = Examples(where, [str(t) for t in ds[text]], None if pair is None else [str(t) for t in ds[pair]],
                       labels, list(range(len(ds))))
        # GLUE test splits carry label -1: unusable for training or evaluation
        for i, value in enumerate(raw):
            if value is None or (isinstance(value, int) and value < 0):
                raise InputError(f"{where}: row {i} has no label ({value!r})")
        return out

    return convert("train"), {key: functools.partial(convert, split) for key, split in eval_splits.items()}
