"""AdaLoRMA: LoRMA+ in SVD form with an adaptive rank budget, after AdaLoRA (Zhang et al., 2023).

Each adapted module's transform is the plus inflation written as a singular value decomposition::

    I(P, lambda, Q) = I_d + s P diag(lambda) Q,   W = I(...) W0 (pre side)  or  W0 I(...) (post side)

with ``P`` (``lorma_B``, ``d x r``), ``lambda`` (``lorma_E``, ``r x 1``, peft's AdaLoRA shape) and ``Q``
(``lorma_A``, ``r x d``), ``s = alpha / r`` with ``r`` the initial rank (peft's AdaLoRA divides by its initial
``ranknum`` too). ``P`` and ``Q`` start at ``N(0, 0.02^2)``, ``lambda`` at 0: the identity, so the base model at
init. Training adds ``orth_reg_weight * mean(||P^T P - I||_F, ||Q Q^T - I||_F)`` to the loss
(:func:`orthogonality_penalty`, AdaLoRA's regulariser) so that ``P`` and ``Q`` stay near orthonormal and
``lambda`` acts as singular values; rank budget is then spent by zeroing ``lambda`` entries.

The budget: every module starts at rank ``r``; from step ``tinit`` to ``total_step - tfinal`` the total number of
non-zero ``lambda`` entries falls on AdaLoRA's cubic schedule to ``target_r`` times the number of modules; every
``deltaT`` steps the entries whose triplet ``(P[:, i], lambda_i, Q[i])`` has the smallest smoothed
sensitivity-times-uncertainty score (``|theta * grad|``, EMAs ``beta1`` / ``beta2``) are zeroed, across all modules.
That bookkeeping is peft's :class:`peft.tuners.adalora.layer.RankAllocator`, used as it is through a view that
names our parameters the way it looks for them (:class:`_AllocatorView`); only the multiplicative layer is ours.
``LormaModel.update_and_allocate(step)`` runs it (call it after ``optimizer.step()``, before ``zero_grad()``, as
peft's AdaLoRA asks; :class:`lorma.plumbing.callbacks.RankAllocationCallback` does it inside a ``Trainer``), and
records the per-module ranks in ``LormaConfig.variant_options["final_ranks"]``, saved with the adapter.

Since ``P diag(lambda) Q`` is the product ``B A`` of LoRMA+ with ``B = P diag(lambda)`` and ``A = Q``, everything
else is LoRMA+'s, exactly: the activation forward ``h + s B(A h)``, the rank-``r`` merge, the Woodbury unmerge,
the exact export as a LoRA adapter. The ``pi`` inflation has no SVD form (``pi`` rotates the rows of the product,
so ``lambda`` would not be singular values of anything), and is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..inflations.base import get_inflation
from .base import AdaptedLayer, LormaVariant, PairSlice
from .options import VariantOptions
from .registry import register_variant

# peft's AdaLoRA initialisation of P and Q
SVD_INIT_STD = 0.02


@dataclass
class AdaLormaOptions(VariantOptions):
    """AdaLoRMA's options (``LormaConfig.variant_options``), peft's AdaLoRA names and meanings (module docstring).

    ``final_ranks`` is not set by the user: the allocation writes each module's rank there after the last budget
    step (``None`` before), so that it is saved with the adapter.
    """

    #: the average rank per module the budget falls to
    target_r: int | None = None
    #: steps at the full budget before pruning
    tinit: int = 0
    #: final steps at the target budget
    tfinal: int = 0
    #: steps between two budget allocations
    deltaT: int = 1
    #: EMA of the sensitivity
    beta1: float = 0.85
    #: EMA of the uncertainty
    beta2: float = 0.85
    #: weight of the orthogonality of P and Q in the training loss
    orth_reg_weight: float = 0.5
    #: the number of training steps
    total_step: int | None = None
    #: per-module ranks after the last allocation (written in training)
    final_ranks: dict[str, int] | None = None

    def check(self, config: Any) -> None:
        """The budget and schedule, checked before any module is built (``ValueError`` naming the option)."""
        where = "LormaConfig (variant='adalorma')"
        if not get_inflation(config.inflation).identity_plus_low_rank:
            raise ValueError(
                f"{where}: AdaLoRMA needs inflation='plus', got {config.inflation!r}: its SVD form "
                "I + s P diag(lambda) Q is an additive low-rank update of I, and the pi inflation rotates the rows of "
                "the product, so lambda would not be singular values of the update and pruning them would not cut "
                "its rank"
            )
        if isinstance(self.total_step, bool) or not isinstance(self.total_step, int) or self.total_step <= 0:
            raise ValueError(f"{where}: total_step (the number of training steps) must be a positive integer, "
                             f"got {self.total_step!r}")
        target = self.target_r
        if isinstance(target, bool) or not isinstance(target, int) or not 0 < target < config.r:
            raise ValueError(
                f"{where}: target_r (the average rank to prune down to) must be an integer in [1, r - 1] = "
                f"[1, {config.r - 1}], got {target!r}"
            )
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}: {name} must be a non-negative integer, got {value!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"{where}: no budget phase: tinit={self.tinit} must be below total_step - tfinal = "
                f"{self.total_step} - {self.tfinal}"
            )
        if isinstance(self.deltaT, bool) or not isinstance(self.deltaT, int) or self.deltaT < 1:
            raise ValueError(f"{where}: deltaT must be a positive integer, got {self.deltaT!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise ValueError(f"{where}: {name} must be in (0, 1), got {getattr(self, name)!r}")
        if float(self.orth_reg_weight) < 0:
            raise ValueError(f"{where}: orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")


@register_variant
class AdaLormaVariant(LormaVariant):
    """``I + s P diag(lambda) Q`` (LoRMA+ in SVD form); the rank budget is the allocator's (module docstring)."""

    name = "adalorma"
    options = AdaLormaOptions

    @classmethod
    def training_loss(cls, model: nn.Module, adapter: str, config: Any) -> torch.Tensor | None:
        """``orth_reg_weight`` times :func:`orthogonality_penalty` (``None`` at weight 0)."""
        weight = cls.options_of(config).orth_reg_weight
        if not weight > 0:
            return None
        penalty = orthogonality_penalty(model, adapter)
        return None if penalty is None else weight * penalty

    @classmethod
    def step_updater(cls, model: nn.Module, adapter: str, config: Any) -> Callable[[int], None]:
        """The rank budget's step (:class:`RankBudget`), for ``LormaModel.update_and_allocate``."""
        return RankBudget(model, config, adapter).step

    def init(self, layer: AdaptedLayer, adapter: str, init_weights: bool) -> None:
        """``P``, ``Q`` from ``N(0, 0.02^2)``, ``lambda = 0`` (``init_weights=False``: ``lambda`` random too)."""
        where = f"module {layer.module_name!r}"
        if not self.inflation.identity_plus_low_rank:
            raise ValueError(f"{where}: AdaLoRMA needs the plus inflation (an SVD form), got {self.inflation.name!r}")
        if layer.fused[adapter] is not None:
            raise ValueError(
                f"{where}: AdaLoRMA adapts whole layers; its rank budget counts one triplet set per module, so fused "
                "parts are not supported (set fused_parts={} and adapt the layer, or use plain LoRMA)"
            )
        A, B = layer.lorma_A[adapter], layer.lorma_B[adapter]
        singular = torch.zeros(A.shape[0], 1)
        with torch.no_grad():
            nn.init.normal_(A, mean=0.0, std=SVD_INIT_STD)
            nn.init.normal_(B, mean=0.0, std=SVD_INIT_STD)
            if not init_weights:
                nn.init.normal_(singular)
        layer.adapter_parameters("lorma_E")[adapter] = nn.Parameter(singular)

    def pairs(self, layer: AdaptedLayer, adapter: str) -> list[PairSlice]:
        """``(None, Q, P diag(lambda))``: the LoRMA+ factors everything else is computed from."""
        left = layer.lorma_B[adapter]
        return [(None, layer.lorma_A[adapter], left * layer.lorma_E[adapter].view(1, -1).to(left.dtype))]

    @staticmethod
    def rank(layer: AdaptedLayer, adapter: str) -> int:
        """The module's current rank: its non-zero ``lambda`` entries."""
        return int(torch.count_nonzero(layer.lorma_E[adapter]).item())


# ---------------------------------------------------------------------------------------------- training
def orthogonality_penalty(model: nn.Module, adapter: str) -> torch.Tensor | None:
    """AdaLoRA's regulariser for ``adapter``: the mean over its ``P`` and ``Q`` of ``||P^T P - I||_F`` and
    ``||Q Q^T - I||_F`` (``None`` when the model has no AdaLoRMA layer for it)."""
    terms = []
    for module in model.modules():
        variant = getattr(module, "lorma_variant", {}).get(adapter)
        if not isinstance(variant, AdaLormaVariant):
            continue
        left, right = module.lorma_B[adapter], module.lorma_A[adapter]
        for gram in (left.T @ left, right @ right.T):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.matrix_norm(gram - eye))
    return torch.stack(terms).mean() if terms else None


class _AllocatorView:
    """The model as peft's ``RankAllocator`` reads it: our ``lorma_A/B/E`` named ``lora_A/B/E``.

    The allocator finds an adapter's triplets by parameter name (``"lora_A.<adapter>"`` ...) and reads ``p.grad``
    and masks ``p`` in place; the parameters handed out are ours, so its masking acts on them.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.model.named_parameters():
            for ours in ("lorma_A.", "lorma_B.", "lorma_E."):
                if ours in name:
                    yield name.replace(ours, ours.replace("lorma_", "lora_")), param
                    break


def _module_ranks(rank_pattern: dict[str, list[bool]], adapter: str) -> dict[str, int]:
    """``{"...lora_E.<adapter>": mask}`` (the allocator's) -> ``{module name: rank}``."""
    suffix = f".lora_E.{adapter}"
    return {name.removesuffix(suffix): int(sum(mask)) for name, mask in rank_pattern.items()}


class RankBudget:
    """AdaLoRA's schedule for one AdaLoRMA adapter of a model: peft's ``RankAllocator`` and the final mask.

    ``step(global_step)`` mirrors ``peft.tuners.adalora.AdaLoraModel.update_and_allocate``: scores and masks
    during the budget phase, the final mask at ``total_step - tfinal``, and that mask held afterwards.
    """

    def __init__(self, model: nn.Module, config: Any, adapter: str) -> None:
        from peft import AdaLoraConfig
        from peft.tuners.adalora.layer import RankAllocator

        self.config, self.adapter = config, adapter
        self.options = options = AdaLormaVariant.options_of(config)
        self.view = _AllocatorView(model)
        schedule = AdaLoraConfig(
            init_r=config.r, target_r=options.target_r, tinit=options.tinit, tfinal=options.tfinal,
            deltaT=options.deltaT, beta1=options.beta1, beta2=options.beta2, orth_reg_weight=options.orth_reg_weight,
            total_step=options.total_step,
        )
        self.allocator = RankAllocator(self.view, schedule, adapter)
        self.final_pattern: dict[str, list[bool]] | None = None

    def step(self, global_step: int) -> None:
        """One call per optimizer step, after ``optimizer.step()`` and before ``zero_grad()``."""
        final_step = self.options.total_step - self.options.tfinal
        if global_step < final_step:
            _, pattern = self.allocator.update_and_allocate(self.view, global_step)
        elif global_step == final_step:
            _, pattern = self.allocator.update_and_allocate(self.view, global_step, force_mask=True)
            self.final_pattern = pattern
            self.allocator.reset_ipt()
        else:
            if self.final_pattern is None:  # resumed after the final allocation: the mask is the zeros it left
                self.final_pattern = {
                    name: (param.detach().view(-1) != 0).tolist()
                    for name, param in self.view.named_parameters()
                    if name.endswith(f"lora_E.{self.adapter}")
                }
            self.allocator.mask_using_rank_pattern(self.view, self.final_pattern)
            pattern = None
        if pattern:  # saved with the adapter, in its options
            self.config.variant_options["final_ranks"] = _module_ranks(pattern, self.adapter)
