"""The classification task: GLUE folders, CSV / JSONL / saved HF datasets, metrics, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lorma.plumbing.errors import InputError
from lorma.recipes.config import build_config
from lorma.scoring.classification import classification_metrics
from lorma.tasks import task_class, task_names
from lorma.tasks.base import get_task
from lorma.tasks.classification import ClassificationTask
from recipe_support import make_tiny_bert, sentiment_rows, write_csv, write_jsonl


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny") / "m"))


def _task(**values: object) -> ClassificationTask:
    task = get_task(build_config(values, {}))
    assert isinstance(task, ClassificationTask)
    return task


def _write_tsv(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_glue_names_and_classification_are_registered() -> None:
    names = task_names()
    for name in ("classification", "cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"):
        assert name in names
        assert task_class(name) is ClassificationTask
    with pytest.raises(InputError, match="unknown task 'nosuch'"):
        task_class("nosuch")


def test_cola_folder_without_header_and_quotes(tmp_path: Path, tiny_model: str) -> None:
    # CoLA: no header; source, label, original label, sentence; quotes are plain characters in GLUE TSVs
    _write_tsv(tmp_path / "train.tsv", [f"src\t{i % 2}\t*\tsentence \"{i}" for i in range(10)])
    _write_tsv(tmp_path / "dev.tsv", ["src\t1\t\tok one", "src\t0\t*\tbad one"])
    task = _task(task="cola", data=str(tmp_path), model=tiny_model)
    task.check_inputs()
    assert task._train is not None and task._eval is not None
    assert task._train.texts[0] == 'sentence "0' and task._train.labels[:2] == ["0", "1"]
    assert task._eval[""].texts == ["ok one", "bad one"]
    assert task.metric_names == ("matthews_correlation",)
    assert task.label_names == ["0", "1"]


def test_mnli_folder_has_matched_and_mismatched(tmp_path: Path, tiny_model: str) -> None:
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tgold_label"
    labels = ["entailment", "neutral", "contradiction"]
    train = [header] + [f"{i}\tp\tq\tg\tpremise {i}\thypothesis {i}\t{labels[i % 3]}" for i in range(9)]
    _write_tsv(tmp_path / "train.tsv", train)
    _write_tsv(tmp_path / "dev_matched.tsv", train[:4])
    _write_tsv(tmp_path / "dev_mismatched.tsv", train[:3])
    task = _task(task="mnli", data=str(tmp_path), model=tiny_model)
    task.check_inputs()
    assert task._eval is not None and set(task._eval) == {"matched", "mismatched"}
    assert task._train is not None and task._train.pairs is not None
    assert task._train.pairs[2] == "hypothesis 2"
    assert task.label_names == labels  # the HF glue order


def test_stsb_is_regression_with_pearson_and_spearman(tmp_path: Path, tiny_model: str) -> None:
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    rows = [header] + [f"{i}\tg\tf\ty\to\ts\ts\tone {i}\ttwo {i}\t{i / 2:.1f}" for i in range(10)]
    _write_tsv(tmp_path / "train.tsv", rows)
    _write_tsv(tmp_path / "dev.tsv", rows[:5])
    task = _task(task="stsb", data=str(tmp_path), model=tiny_model)
    task.check_inputs()
    assert task.regression and task.label_names is None
    assert task.metric_names == ("pearson", "spearmanr")
    model = task.load_model(task.load_tokenizer())
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"


def test_csv_with_pair_and_held_out_split(tmp_path: Path, tiny_model: str) -> None:
    rows = [(f"a {i}", f"b {i}", "yes" if i % 3 else "no") for i in range(60)]
    write_csv(tmp_path / "d.csv", ["q", "p", "y"], rows)
    task = _task(train_file=str(tmp_path / "d.csv"), text_column="q", text_pair_column="p", label_column="y",
                 eval_split=0.25, model=tiny_model)
    task.check_inputs()
    assert task._train is not None and task._eval is not None
    train, held = task._train, task._eval[""]
    assert len(train) + len(held) == 60 and len(held) == 15
    assert not set(train.texts) & set(held.texts)  # disjoint
    # stratified: the held-out class balance follows the data (1/3 "no")
    assert held.labels.count("no") == 5
    assert task.label_names == ["no", "yes"] and task.metric_names == ("accuracy", "macro_f1")
    tok = task.load_tokenizer()
    task.load_model(tok)
    train_ds, eval_ds = task.build_datasets(tok)
    assert len(train_ds) == 45 and len(eval_ds) == 15
    assert set(train_ds.column_names) >= {"input_ids", "attention_mask", "labels"}
    # the pair is encoded as the second segment
    assert 1 in train_ds[0]["token_type_ids"]


def test_jsonl_with_integer_labels(tmp_path: Path, tiny_model: str) -> None:
    records = [{"text": t, "label": int(lab == "pos")} for t, lab in sentiment_rows(20)]
    write_jsonl(tmp_path / "train.jsonl", records)
    write_jsonl(tmp_path / "dev.jsonl", records[:6])
    task = _task(train_file=str(tmp_path / "train.jsonl"), eval_file=str(tmp_path / "dev.jsonl"), model=tiny_model)
    task.check_inputs()
    assert task.label_names == ["0", "1"]
    assert task._eval is not None and len(task._eval[""]) == 6


def test_saved_hf_dataset_with_class_labels(tmp_path: Path, tiny_model: str) -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"sentence1": Value("string"), "sentence2": Value("string"),
                         "label": ClassLabel(names=["entailment", "not_entailment"])})
    split = {"sentence1": ["a", "b", "c", "d"], "sentence2": ["e", "f", "g", "h"], "label": [0, 1, 1, 0]}
    DatasetDict({"train": Dataset.from_dict(split, features=features),
                 "validation": Dataset.from_dict(split, features=features)}).save_to_disk(str(tmp_path / "rte"))
    task = _task(task="rte", data=str(tmp_path / "rte"), model=tiny_model)
    task.check_inputs()
    assert task._train is not None and task._train.labels == ["entailment", "not_entailment", "not_entailment",
                                                             "entailment"]
    assert task._train.pairs == ["e", "f", "g", "h"]


def test_metrics_match_independent_formulas() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    preds = np.where(rng.random(200) < 0.7, labels, 1 - labels)
    tp = float(((preds == 1) & (labels == 1)).sum())
    tn = float(((preds == 0) & (labels == 0)).sum())
    fp = float(((preds == 1) & (labels == 0)).sum())
    fn = float(((preds == 0) & (labels == 1)).sum())
    got = classification_metrics(("accuracy", "f1", "matthews_correlation", "macro_f1"), preds, labels)
    assert got["accuracy"] == pytest.approx((tp + tn) / 200)
    assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert got["matthews_correlation"] == pytest.approx(mcc)
    f1_neg = 2 * tn / (2 * tn + fn + fp)
    assert got["macro_f1"] == pytest.approx((got["f1"] + f1_neg) / 2)
    x = rng.random(50)
    y = 2 * x + rng.normal(0, 0.1, 50)
    reg = classification_metrics(("pearson", "spearmanr"), x, y)
    assert reg["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731 - no ties in continuous data
    assert reg["spearmanr"] == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1])


def test_majority_baseline(tmp_path: Path, tiny_model: str) -> None:
    train = [(f"t{i}", "a" if i < 14 else "b") for i in range(20)]  # majority "a"
    dev = [("x", "a"), ("y", "b"), ("z", "b"), ("w", "b")]
    write_csv(tmp_path / "t.csv", ["text", "label"], train)
    write_csv(tmp_path / "d.csv", ["text", "label"], dev)
    task = _task(train_file=str(tmp_path / "t.csv"), eval_file=str(tmp_path / "d.csv"), model=tiny_model)
    task.check_inputs()
    base = task.baseline_metrics()
    assert base is not None
    assert base["eval_accuracy"] == pytest.approx(0.25)
    assert base["eval_macro_f1"] == pytest.approx((0.4 + 0.0) / 2)  # F1(a) = 2*1/(2+3)


@pytest.mark.parametrize(
    ("header", "rows", "kwargs", "message"),
    [
        (["txt", "label"], [("a", "x")], {}, r"d\.csv: no column 'text' \(columns: txt, label\)"),
        (["text", "lab"], [("a", "x")], {}, r"no column 'label'"),
        (["text", "label"], [("a", "x"), ("", "y")], {}, r"d\.csv:3: empty text"),
        (["text", "label"], [("a", "x"), ("b", "")], {}, r"d\.csv:3: empty label"),
        (["text", "label"], [("a", "x"), ("b",)], {}, r"d\.csv:3: row has 1 fields"),
    ],
)
def test_bad_files_name_file_line_and_column(
    tmp_path: Path, tiny_model: str, header: list[str], rows: list[tuple[str, ...]], kwargs: dict, message: str
) -> None:
    write_csv(tmp_path / "d.csv", header, rows)
    task = _task(train_file=str(tmp_path / "d.csv"), model=tiny_model, **kwargs)
    with pytest.raises(InputError, match=message):
        task.check_inputs()


def test_eval_label_not_in_train_labels(tmp_path: Path, tiny_model: str) -> None:
    write_csv(tmp_path / "t.csv", ["text", "label"], [("a", "x"), ("b", "y")] * 3)
    write_csv(tmp_path / "e.csv", ["text", "label"], [("a", "x"), ("c", "z")])
    task = _task(train_file=str(tmp_path / "t.csv"), eval_file=str(tmp_path / "e.csv"), model=tiny_model)
    with pytest.raises(InputError, match=r"e\.csv:3: label 'z' is not one of the task's labels \(x, y\)"):
        task.check_inputs()


def test_glue_label_outside_the_task_labels(tmp_path: Path, tiny_model: str) -> None:
    _write_tsv(tmp_path / "train.tsv", ["sentence\tlabel", "a\t0", "b\t1", "c\t2"])
    _write_tsv(tmp_path / "dev.tsv", ["sentence\tlabel", "a\t0"])
    with pytest.raises(InputError, match=r"train\.tsv:4: label '2' is not one of the task's labels \(0, 1\)"):
        _task(task="sst2", data=str(tmp_path), model=tiny_model).check_inputs()


def test_labels_that_do_not_fit_the_models_labels(tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "m", id2label={0: "negative", 1: "positive"})
    write_csv(tmp_path / "t.csv", ["text", "label"], [("a", "sad"), ("b", "happy")] * 3)
    with pytest.raises(InputError, match=r"data's labels \(happy, sad\) do not fit the labels of model"):
        _task(train_file=str(tmp_path / "t.csv"), model=str(model)).check_inputs()
    # the same labels in another order: accepted, in the model's order
    write_csv(tmp_path / "ok.csv", ["text", "label"], [("a", "positive"), ("b", "negative")] * 3)
    task = _task(train_file=str(tmp_path / "ok.csv"), model=str(model))
    task.check_inputs()
    assert task.label_names == ["negative", "positive"]


def test_missing_inputs(tmp_path: Path, tiny_model: str) -> None:
    with pytest.raises(InputError, match="data file not found"):
        _task(train_file=str(tmp_path / "nope.csv"), model=tiny_model).check_inputs()
    with pytest.raises(InputError, match="data directory not found"):
        _task(data=str(tmp_path / "nodir"), model=tiny_model).check_inputs()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither a GLUE task folder"):
        _task(data=str(tmp_path / "empty"), model=tiny_model).check_inputs()
    with pytest.raises(InputError, match="no training data"):
        _task(model=tiny_model).check_inputs()
    with pytest.raises(InputError, match="no model"):
        _task(train_file="x.csv").check_inputs()
    _write_tsv(tmp_path / "train.tsv", ["sentence\tlabel", "a\t0"])
    with pytest.raises(InputError, match="no dev.tsv"):
        _task(task="sst2", data=str(tmp_path), model=tiny_model).check_inputs()
