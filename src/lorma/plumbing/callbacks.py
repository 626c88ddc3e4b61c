"""Trainer callbacks a LoRMA variant needs in a transformers ``Trainer``."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class RankAllocationCallback(TrainerCallback):
    """Calls ``update_and_allocate(step)`` of the model's tuner after every optimizer step, before ``zero_grad``.

    For AdaLoRMA (``LormaConfig(variant="adalorma")``, :meth:`lorma.model.LormaModel.update_and_allocate`) and
    peft's AdaLoRA (``AdaLoraModel.update_and_allocate``) alike: both read the gradients of that step to score the
    rank triplets, and prune to the budget of the step (0-based, as in peft's AdaLoRA example loop). The
    ``Trainer`` calls ``on_optimizer_step`` after ``optimizer.step()`` and before it zeroes the gradients.
    """

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        tuner = getattr(model, "base_model", None)
        if tuner is None or not hasattr(tuner, "update_and_allocate"):
            raise ValueError(
                "RankAllocationCallback: the trained model has no update_and_allocate (it is for AdaLoRMA and "
                f"AdaLoRA adapters), got {type(model).__name__}"
            )
        tuner.update_and_allocate(state.global_step)
