"""RankTrackingCallback records the rank of I(BA) during a tiny Trainer run on a tiny BERT."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from lorma import LormaConfig
from lorma.layers.base import LormaLayer
from lorma.runs.rank_log import RANK_LOG_NAME, RankTrackingCallback, read_rank_log


class _Data(torch.utils.data.Dataset):
    """Random token ids with a label that depends on them, so the loss has something to fit."""

    def __init__(self, n: int = 32, length: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 50, (n, length), generator=g)
        self.labels = (self.ids[:, 0] % 3).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def _tiny_model(inflation: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        max_position_embeddings=16,
    )
    return peft.get_peft_model(
        BertForSequenceClassification(cfg),
        LormaConfig(r=2, alpha=2, inflation=inflation, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )


def _train(model: torch.nn.Module, out: Path, callback: RankTrackingCallback, steps: int = 6) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Data(), callbacks=[callback])
    trainer.train()
    return trainer


@pytest.mark.parametrize("inflation", ["plus", "pi"])
def test_callback_records_rank_during_training(tmp_path: Path, inflation: str) -> None:
    model = _tiny_model(inflation)
    callback = RankTrackingCallback(every_n_steps=2, output_dir=str(tmp_path))
    _train(model, tmp_path, callback, steps=5)
    records = read_rank_log(tmp_path / RANK_LOG_NAME)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LormaLayer)}
    assert len(layers) == 4
    # step 0 (before training), every 2 steps, and the final step 5 which is off the interval
    assert sorted({r["step"] for r in records}) == [0, 2, 4, 5]
    assert all(sum(r["step"] == s for r in records) == 4 for s in (0, 2, 4, 5))
    first = [r for r in records if r["step"] == 0]
    for r in first:  # identity at initialisation: full rank, all singular values 1
        assert r["rank"] == r["d"] == 32
        assert r["sigma_max"] == pytest.approx(1.0, abs=1e-5) and r["sigma_min"] == pytest.approx(1.0, abs=1e-5)
        assert r["inflation"] == inflation and r["side"] == "pre"
    # the last records against an independent computation on the trained transforms
    last = {r["module"]: r for r in records if r["step"] == 5}
    for name, layer in layers.items():
        key = name.removeprefix("base_model.model.")
        t = layer.get_transform("default").double().numpy()
        s = np.linalg.svd(t, compute_uv=False)
        tol = 32 * np.finfo(np.float32).eps * s[0]
        assert last[key]["rank"] == int((s > tol).sum())
        assert last[key]["rtol"] == pytest.approx(32 * np.finfo(np.float32).eps)
        assert last[key]["sigma_max"] == pytest.approx(s[0], rel=1e-6)
        assert last[key]["cond"] == pytest.approx(s[0] / s[-1], rel=1e-5)
    # the transforms did move: the training changed some singular value away from 1
    assert any(abs(r["sigma_max"] - 1) > 1e-4 or abs(r["sigma_min"] - 1) > 1e-4 for r in last.values())


def test_callback_with_given_tolerance_and_refusals(tmp_path: Path) -> None:
    model = _tiny_model("plus")
    # a tolerance above every singular value's ratio: the rank can only be the count of sigma = sigma_max
    _train(model, tmp_path, RankTrackingCallback(every_n_steps=3, output_dir=tmp_path, tol=0.5), steps=3)
    records = read_rank_log(tmp_path / RANK_LOG_NAME)
    assert all(r["rtol"] == 0.5 for r in records)
    layer = next(m for m in model.modules() if isinstance(m, LormaLayer))
    s = np.linalg.svd(layer.get_transform("default").double().numpy(), compute_uv=False)
    name = next(n for n, m in model.named_modules() if m is layer).removeprefix("base_model.model.")
    assert next(r for r in records if r["step"] == 3 and r["module"] == name)["rank"] == int((s > 0.5 * s[0]).sum())

    with pytest.raises(FileExistsError, match=RANK_LOG_NAME):
        RankTrackingCallback(every_n_steps=1, output_dir=tmp_path)
    # resume appends without a step-0 record; overwrite replaces
    n_before = len(records)
    _train(model, tmp_path, RankTrackingCallback(every_n_steps=3, output_dir=tmp_path, resume=True), steps=3)
    lines = (tmp_path / RANK_LOG_NAME).read_text().splitlines()
    assert len(lines) == n_before + 4 and json.loads(lines[-1])["step"] == 3
    assert len(read_rank_log(tmp_path / RANK_LOG_NAME)) == n_before  # step 3 again: the later records win
    _train(model, tmp_path, RankTrackingCallback(every_n_steps=3, output_dir=tmp_path, overwrite=True), steps=3)
    assert sorted({r["step"] for r in read_rank_log(tmp_path / RANK_LOG_NAME)}) == [0, 3]

    with pytest.raises(ValueError, match="every_n_steps"):
        RankTrackingCallback(every_n_steps=0, output_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="tol"):
        RankTrackingCallback(every_n_steps=1, output_dir=tmp_path / "x", tol=-1.0)


def test_callback_refuses_a_model_without_lorma(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=3
    )
    model = peft.get_peft_model(BertForSequenceClassification(cfg), peft.LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="no LoRMA layers"):
        _train(model, tmp_path, RankTrackingCallback(every_n_steps=1, output_dir=tmp_path), steps=1)


def test_read_rank_log_reports_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / RANK_LOG_NAME
    good = json.dumps({"step": 0, "module": "m", "rank": 3, "cond": "inf"})
    path.write_text(good + "\n{not json\n" + good + "\n")
    with pytest.raises(ValueError, match=rf"{RANK_LOG_NAME}:2"):
        read_rank_log(path)
    path.write_text(good + "\n" + good[:10])  # torn last line: skipped
    recs = read_rank_log(path)
    assert len(recs) == 1 and recs[0]["cond"] == float("inf")
    # a resumed run logs a step again: the later record wins
    again = json.dumps({"step": 0, "module": "m", "rank": 2})
    early = json.dumps({"step": 1, "module": "m", "rank": 3})
    path.write_text("\n".join([early, good, again]) + "\n")
    assert [(r["step"], r["rank"]) for r in read_rank_log(path)] == [(0, 2), (1, 3)]
    path.write_text(json.dumps({"step": 0, "module": "m"}) + "\n")
    with pytest.raises(ValueError, match="lacks rank"):
        read_rank_log(path)
