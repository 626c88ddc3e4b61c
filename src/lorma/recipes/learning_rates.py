"""Learning rates of a run: the new head's own rate, and ``--learning-rate auto`` (a learning-rate range test).

**The head.** A classification run trains a freshly initialised head (BERT's ``classifier``, Llama's ``score``)
in full beside the adapter (``modules_to_save``) or beside every weight (full fine-tuning). The head starts
from random numbers and has to move further than anything else; at full fine-tuning's 5e-5 it hardly moves in
a few hundred steps. ``head_learning_rate`` gives it a rate of its own: :class:`HeadRateTrainer` puts the head's
parameters in optimizer groups of their own (Trainer's scheduler then scales both groups alike: same warm-up,
same decay).

**The range test** (Smith, "Cyclical Learning Rates for Training Neural Networks", 2017, section 3.3; the "LR
finder" of fastai): from the run's initial weights, train a few dozen steps while the learning rate grows
exponentially from far below to far above the family's default, record after each step the loss of one fixed
batch of training rows (:data:`PROBE_ROWS`), stop once the loss has clearly diverged, and take the rate an order
of magnitude below the one at which the smoothed loss was lowest before the curve turned unstable (the loss
still falls fast there, and there is room before divergence). Then the weights, the optimizer and the random
state are put back, so that the run trains exactly as it would with that rate given by hand.
The head's rate is scaled by the same factor as the body's (the test sweeps one multiplier of every group).

Written here: transformers and peft have no range test (fastai's needs fastai's Learner, torch-lr-finder its
own training loop); this one drives HF Trainer, so the loss, the collator, class weights and several processes
are the run's own.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The range test's sweep, relative to the family's default rate: from 1/100 of it to 1000 times it (adapters:
# 1e-5 to 1), in RANGE_TEST_STEPS steps; it stops early once the smoothed loss exceeds DIVERGED x its minimum.
RANGE_TEST_LOW = 1e-2
RANGE_TEST_HIGH = 1e3
RANGE_TEST_STEPS = 60
DIVERGED = 4.0
SMOOTHING = 0.6  # exponential moving average of the losses (bias-corrected); few steps, so a short memory
UNSTABLE = 1.3  # a loss this many times above the lowest so far ends the part of the curve a rate is chosen from
# The loss recorded after each step is that of one fixed batch of this many training rows: the next training batch's
# loss would mostly measure which examples it holds (on small, skewed data a weighted batch of 16 varies by +-30%).
PROBE_ROWS = 64
LR_RANGE_FILE = "lr_range.json"
LR_RANGE_PLOT = "lr_range.png"


def is_head_parameter(name: str, head_modules: list[str]) -> bool:
    """Whether parameter ``name`` belongs to the task head: peft's trained copy of a ``modules_to_save`` module,
    or (full fine-tuning, BitFit, head-only) a parameter under one of ``head_modules``."""
    if ".modules_to_save." in name:
        return True
    if ".original_module." in name:  # peft's frozen copy beside the trained one
        return False
    parts = name.split(".")
    for start in range(len(parts)):
        tail = ".".join(parts[start:])
        if any(tail == head or tail.startswith(head + ".") for head in head_modules):
            # the head's path begins at the model's top (or below peft's ``base_model.model.``)
            return all(p in ("base_model", "model") for p in parts[:start])
    return False


def split_head_groups(optimizer: Any, head_ids: set[int], head_rate: float) -> None:
    """Move the head's parameters (by ``id``) out of each group of a freshly made optimizer into a group of its
    own with learning rate ``head_rate`` (same other options). Before the first step there is no state to move."""
    groups = list(optimizer.param_groups)
    optimizer.param_groups.clear()
    for group in groups:
        body = [p for p in group["params"] if id(p) not in head_ids]
        head = [p for p in group["params"] if id(p) in head_ids]
        options = {k: v for k, v in group.items() if k != "params"}
        if body:
            optimizer.add_param_group({**options, "params": body})
        if head:
            optimizer.add_param_group({**options, "params": head, "lr": head_rate, "is_head": True})


def head_rate_trainer(head_modules: list[str], head_rate: float | None) -> type:
    """A ``transformers.Trainer`` subclass whose optimizer trains the head at ``head_rate`` (None: Trainer as is)."""
    from transformers import Trainer

    if head_rate is None:
        return Trainer

    class HeadRateTrainer(Trainer):
        """Trainer with the task head in optimizer groups of its own, at the run's head learning rate."""

        def create_optimizer(self, model: Any = None) -> Any:
            optimizer = super().create_optimizer(model)
            target = self.model if model is None else model
            head_ids = {id(p) for n, p in target.named_parameters()
                        if p.requires_grad and is_head_parameter(n, head_modules)}
            if head_ids and not any(g.get("is_head") for g in optimizer.param_groups):
                split_head_groups(optimizer, head_ids, head_rate)
            return optimizer

    return HeadRateTrainer


@dataclass
class RangeTest:
    """The curve of a range test and the rate chosen from it."""

    rates: list[float] = field(default_factory=list)  # the body's learning rate at each step
    losses: list[float] = field(default_factory=list)  # the step's training loss
    smoothed: list[float] = field(default_factory=list)
    chosen: float = math.nan
    lowest_at: float = math.nan  # the rate at which the smoothed loss was lowest
    stopped: str = ""  # why the sweep ended

    def to_dict(self) -> dict[str, Any]:
        return {"rates": self.rates, "losses": self.losses, "smoothed": self.smoothed, "chosen": self.chosen,
                "lowest_at": self.lowest_at, "stopped": self.stopped,
                "rule": "a tenth of the rate at the minimum of the centred smoothed loss", "steps": len(self.rates)}


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction (the first values are not pulled towards 0)."""
    out, average = [], 0.0
    for i, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta**i))
    return out


def smooth_centred(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """The same average run forwards and backwards (``scipy.signal.filtfilt``): no lag. A causal average trails
    the curve by about ``1 / (1 - beta)`` steps, half a decade of rates in a short sweep, which would move the
    minimum, and so the chosen rate, up by a factor of 3. Used once the sweep is over."""
    if len(losses) < 4:
        return list(losses)
    from scipy.signal import filtfilt

    return [float(v) for v in filtfilt([1 - beta], [1.0, -beta], np.asarray(losses, dtype=float), method="gust")]


def choose_rate(rates: list[float], losses: list[float], floor: float) -> tuple[float, float]:
    """``(chosen, lowest_at)``: a tenth of the rate where the (centred) smoothed loss is lowest, not below ``floor``.

    The curve ends at its first non-finite loss (a diverged step: nothing after it counts, and it must not pull
    the centred average). With no finite loss at all, ``floor``.
    """
    return rate_from_curve(rates, smoothed_curve(losses), floor)


def smoothed_curve(losses: list[float]) -> list[float]:
    """The centred average of the losses up to where the curve turns unstable (:func:`usable_length`); NaN after."""
    usable = usable_length(losses)
    return smooth_centred(losses[:usable]) + [math.nan] * (len(losses) - usable)


def rate_from_curve(rates: list[float], smoothed: list[float], floor: float) -> tuple[float, float]:
    """``(chosen, lowest_at)`` from a :func:`smoothed_curve`: a tenth of the rate at its lowest point, not below
    ``floor``; ``(floor, NaN)`` when it has no finite point."""
    if not any(math.isfinite(v) for v in smoothed):
        return floor, math.nan
    best = int(np.nanargmin(smoothed))
    return max(rates[best] / 10.0, floor), rates[best]


def usable_length(losses: list[float]) -> int:
    """How many losses come before the curve turns unstable: the first non-finite loss, or the first that rises
    :data:`UNSTABLE` times above the lowest before it. Past that point the losses jump about (a rate too large
    for the weights); a centred average would carry those jumps back onto the minimum and hide it."""
    lowest = math.inf
    for i, value in enumerate(losses):
        if not math.isfinite(value) or (i >= 3 and value > UNSTABLE * lowest):
            return i
        lowest = min(lowest, value)
    return len(losses)


def probe_batch(dataset: Any, collator: Any, rows: int = PROBE_ROWS) -> dict[str, Any]:
    """The first ``rows`` training examples as one batch: the fixed set the range test scores after each step."""
    return collator([dataset[i] for i in range(min(rows, len(dataset)))])


def probe_loss(model: Any, batch: dict[str, Any], loss_function: Any = None) -> float:
    """The training loss (the run's own: class weights too) of ``batch``, without dropout and without gradients."""
    import torch

    was_training = model.training
    model.eval()
    try:
        device = next(p.device for p in model.parameters())
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        with torch.no_grad():
            outputs = model(**inputs)
            loss = loss_function(outputs, inputs["labels"]) if loss_function is not None else outputs["loss"]
        return float(loss)
    finally:
        model.train(was_training)


def sweep_rates(base: float, steps: int = RANGE_TEST_STEPS) -> list[float]:
    """The rates of the sweep: exponentially spaced from ``base * RANGE_TEST_LOW`` to ``base * RANGE_TEST_HIGH``."""
    return [float(r) for r in np.geomspace(base * RANGE_TEST_LOW, base * RANGE_TEST_HIGH, steps)]


def run_range_test(model: Any, args: Any, base_rate: float, trainer_kwargs: dict[str, Any],
                   head_modules: list[str], head_rate: float | None, steps: int = RANGE_TEST_STEPS) -> RangeTest:
    """Sweep the learning rate on ``model`` with a Trainer made like the run's (``trainer_kwargs``: datasets,
    collator, loss), then restore the model's trainable weights and the random state.

    ``args``: the run's TrainingArguments (copied: ``max_steps`` = the sweep, no evaluation, saving or logging
    beyond the loss). The learning rate of step k is ``rates[k]`` for the body and ``rates[k] * head_rate /
    base_rate`` for the head (one multiplier for every group; ``head_rate`` None: the head trains with the body).
    """
    import dataclasses

    import torch
    from transformers import TrainerCallback

    rates = sweep_rates(base_rate, steps)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    result = RangeTest()

    probe = probe_batch(trainer_kwargs["train_dataset"], trainer_kwargs["data_collator"])
    loss_function = trainer_kwargs.get("compute_loss_func")

    class Record(TrainerCallback):
        """After each step: the loss of the fixed probe batch (the weights' effect alone, not the next batch's)."""

        def on_step_end(self, a: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            loss = probe_loss(model, probe, loss_function)
            result.rates.append(rates[state.global_step - 1])
            result.losses.append(loss)
            averaged = smooth([v for v in result.losses if math.isfinite(v)])
            if not math.isfinite(loss) or (len(averaged) > 5 and averaged[-1] > DIVERGED * min(averaged)):
                result.stopped = f"the loss diverged at learning rate {result.rates[-1]:.3g}"
                control.should_training_stop = True

    sweep_args = dataclasses.replace(
        args, max_steps=steps, learning_rate=rates[0], warmup_steps=0, lr_scheduler_type="constant",
        eval_strategy="no", save_strategy="no", logging_steps=1, report_to=[], disable_tqdm=True,
        load_best_model_at_end=False,
    )
    kwargs = {k: v for k, v in trainer_kwargs.items() if k not in ("eval_dataset", "compute_metrics", "callbacks")}
    trainer_cls = head_rate_trainer(head_modules, None if head_rate is None else head_rate * rates[0] / base_rate)
    trainer = trainer_cls(model=model, args=sweep_args, callbacks=[Record()], **kwargs)
    trainer.create_optimizer()
    factor = (rates[-1] / rates[0]) ** (1.0 / max(steps - 1, 1))
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: factor**step)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.pop_callback(PrinterCallback)
    trainer.pop_callback(ProgressCallback)
    try:
        trainer.train()
    finally:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in saved:
                    param.copy_(saved[name])
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
    if not result.stopped:
        result.stopped = f"the sweep reached its last rate, {rates[-1]:.3g}"
    result.smoothed = smoothed_curve(result.losses)
    result.chosen, result.lowest_at = rate_from_curve(result.rates, result.smoothed, floor=rates[0])
    return result
