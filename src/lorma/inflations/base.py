"""What an inflation is: the :class:`Inflation` base class, and the registry that maps names to classes.

An inflation ``I`` turns the rank-``r`` product ``BA`` (``B`` ``(d, r)``, ``A`` ``(r, d)``) into the square
``d x d`` transform of LoRMA, ``W = I(BA) W0`` (pre side) or ``W0 I(BA)`` (post side), and is the identity at step
0 where it can be. Everything that depends on which inflation an adapter has is a method of its class:

- initialisation (:meth:`Inflation.initialize`) and the dense transform (:meth:`Inflation.transform`): the two
  methods every inflation writes;
- how the transform is applied to activations (:meth:`Inflation.strategy`, :meth:`Inflation.apply_delta`): on the
  ``n x d`` activations, folded into the weight once per step, or in a form that never builds ``d x d``;
- merging (:meth:`Inflation.delta_weight`) and unmerging (:meth:`Inflation.unmerges_exactly`,
  :meth:`Inflation.unmerge`);
- the low-rank algebra behind ``lorma export`` and ``add_weighted_adapter`` (:meth:`Inflation.lora_factors`,
  :meth:`Inflation.combine`).

The base class implements all but the first two for a *dense* transform (built as a ``d x d`` matrix, applied
on activations or folded into the weight, whichever costs fewer flops; merged by a matmul; unmerged from the copy
of ``W0`` the layer keeps; exported by truncated SVD; not combinable). A new inflation therefore needs a name, an
initialisation and a transform (docs/extending.md walks through one); it overrides the rest only where it knows
better, as ``plus`` (low rank everywhere) and ``pi`` (a bounded FFT form for large ``d``) do.

An inflation object holds the memory bounds of one adapter (``LormaConfig.max_dense_bytes`` and
``fft_chunk_bytes``, saved with the adapter); the math it calls is in :mod:`lorma.functional`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import nn

from ..functional import (
    Pair,
    Side,
    apply_dense_recomputed,
    choose_dense_strategy,
    dense_delta_weight,
    dense_transform_bytes,
)
from ..plumbing.named_registry import Registry

# Largest dense ``d x d`` fp32 transform a forward may build for one adapted module unless the config raises it:
# 256 MiB (d = 8192). LLaMA-3-8B's up/gate on the pre side (d = 14336, 822 MB) is above it, where pi takes its
# bounded FFT path instead. The defaults of ``LormaConfig.max_dense_bytes`` and ``fft_chunk_bytes``.
DEFAULT_MAX_DENSE_BYTES: int = 256 * 2**20
# Working memory the bounded (FFT) path may use per chunk of tokens, in bytes.
DEFAULT_FFT_CHUNK_BYTES: int = 64 * 2**20

Strategy = Literal["activation", "weight", "fft"]

# One adapter of a combination for add_weighted_adapter: (A, B, scaling, weight)
Term = tuple[torch.Tensor, torch.Tensor, float, float]


class Inflation:
    """One rank inflation ``I(BA)``: how an adapter's ``(A, B)`` pair becomes a ``d x d`` transform and acts.

    Subclasses set :attr:`name` and implement :meth:`initialize` and :meth:`transform`; the other methods have
    defaults for a dense transform. Methods take one ``(A, B)`` pair (``A`` ``(r, d)``, ``B`` ``(d, r)``) and
    the scaling ``s = alpha / r``; :meth:`transform` also takes batches (``(..., r, d)``, ``(..., d, r)``).
    Register a subclass with :func:`register_inflation` to make ``LormaConfig(inflation=name)`` use it.

    Args:
        max_dense_bytes: the largest dense ``d x d`` float32 transform a forward may build (``None``: no bound).
        fft_chunk_bytes: working memory per chunk of tokens of a bounded (FFT) path, where there is one.
    """

    #: the name ``LormaConfig(inflation=...)`` takes and ``adapter_config.json`` records
    name: ClassVar[str] = ""
    #: ``W - W0`` is exactly a rank-``r`` LoRA update (``lora_factors`` gives it): ``lorma export`` is exact
    exact_lora_export: ClassVar[bool] = False
    #: ``add_weighted_adapter`` combination types that stay exact in this inflation (``combine``)
    combination_types: ClassVar[tuple[str, ...]] = ()
    #: ``I(M) = I + s M``: the product is an additive update of the identity, so its rank is the product's and
    #: cutting rank-one terms of it (AdaLoRMA's pruning, DyLoRMA's truncation) keeps the identity at zero
    identity_plus_low_rank: ClassVar[bool] = False
    #: ``I(BA)^T = I(A^T B^T)``: the transpose is this inflation's own transform of the swapped, transposed factors,
    #: so :meth:`apply_transposed_delta` keeps the inflation's activation form (``plus``, ``none``; not ``pi``, whose
    #: row rotation does not commute with the transpose)
    transpose_swaps_factors: ClassVar[bool] = False
    #: ``I(BA)`` depends on ``A``, ``B`` and ``s`` only through the product ``s B A``: an adapter ``(A', B', s')`` is
    #: then the same transform as ``([A'; 0], [B' s'/s, 0], s)`` at any larger rank and scaling ``s``, which is how
    #: :mod:`lorma.export.hotswap` puts an adapter of another rank or alpha into the tensors already loaded
    scaled_product_only: ClassVar[bool] = False

    def __init__(
        self, max_dense_bytes: int | None = DEFAULT_MAX_DENSE_BYTES, fft_chunk_bytes: int = DEFAULT_FFT_CHUNK_BYTES
    ) -> None:
        self.max_dense_bytes = max_dense_bytes
        self.fft_chunk_bytes = fft_chunk_bytes

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_dense_bytes={self.max_dense_bytes}, fft_chunk_bytes={self.fft_chunk_bytes})"

    # ------------------------------------------------------------------ every inflation writes these two
    def initialize(self, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """Fill ``A`` and ``B`` (2-D, float32, no grad) in place so that ``I(BA)`` is the identity, if it can be."""
        raise NotImplementedError(f"{type(self).__name__} must implement initialize")

    def transform(self, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
        """The dense ``d x d`` transform ``I(BA)`` (``(..., d, d)`` for batched pairs), differentiable."""
        raise NotImplementedError(f"{type(self).__name__} must implement transform")

    # ------------------------------------------------------------------ random initialisation (tests, ablations)
    @staticmethod
    def initialize_random(A: torch.Tensor, B: torch.Tensor) -> None:
        """``init_weights=False``: ``A`` and ``B`` both random (LoRA's kaiming-uniform), whatever the inflation."""
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))

    # ------------------------------------------------------------------ activation side
    def dense_fits(self, d: int) -> bool:
        """Whether a dense ``d x d`` float32 transform is within :attr:`max_dense_bytes`."""
        return self.max_dense_bytes is None or dense_transform_bytes(d) <= self.max_dense_bytes

    def check_size(self, d: int, where: str) -> None:
        """Refuse, when the adapter is created, a transform size this inflation cannot apply within its bound.

        The dense default can only build ``d x d``; inflations with a form that never does (``plus``, ``none``
        and ``pi`` all have one) override this to accept any ``d``.
        """
        if not self.dense_fits(d):
            raise ValueError(
                f"{where}: the {self.name!r} inflation applies a dense {d} x {d} transform "
                f"({dense_transform_bytes(d) / 2**20:.0f} MiB in float32), above max_dense_bytes="
                f"{self.max_dense_bytes}; raise LormaConfig.max_dense_bytes (None lifts the bound) or adapt the "
                "other side"
            )

    def strategy(self, n_tokens: int, d: int, d_other: int, needs_grad: bool) -> Strategy:
        """How to apply the transform to ``n_tokens`` activations of a ``d x d_other`` weight this step.

        ``"activation"``: :meth:`apply_delta` on the activations; ``"weight"``: fold :meth:`transform` into the
        weight, then one matmul; ``"fft"``: a form that never builds ``d x d`` (``pi``'s). The dense default
        counts flops (:func:`lorma.functional.choose_dense_strategy`).
        """
        return choose_dense_strategy(n_tokens, d, d_other, needs_grad)

    def apply_delta(
        self, h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(I(BA) - I)(h - shift)`` on activations ``h`` (``(..., d)``): the adapter path of the layer.

        ``shift`` (the base layer's bias, on the pre side) is kept out of the product. The dense default builds
        :meth:`transform` and applies it, keeping ``h``, ``A`` and ``B`` for the backward and rebuilding the
        ``d x d`` transform there instead of saving it (:func:`lorma.functional.apply_dense_recomputed`: about
        ``r d^2`` more multiply-adds per step, and no ``d x d`` matrix per module alive between forward and
        backward; BENCHMARKS.md measures both).
        """
        source = h if shift is None else h - shift

        def build(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.transform(a, b, scaling)

        return apply_dense_recomputed(source, A, B, build) - source

    def transposed_fits(self, d: int) -> bool:
        """Whether :meth:`apply_transposed_delta` can act on ``d``-sized activations within :attr:`max_dense_bytes`."""
        return self.transpose_swaps_factors or self.dense_fits(d)

    def apply_transposed_delta(
        self, h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """``(I(BA)^T - I) h`` on activations ``h`` (``(..., d)``): the transpose of the transform.

        A layer whose weight is tied to an adapted one needs it: when an embedding's rows become ``I(BA) E0[i]``,
        the output layer sharing ``E0`` computes ``E0 I(BA)^T h`` (docs/conv-and-embeddings.md). With
        :attr:`transpose_swaps_factors` it is :meth:`apply_delta` of ``(B^T, A^T)``; otherwise the dense transpose
        is built (and rebuilt in the backward, :func:`lorma.functional.apply_dense_recomputed`).
        """
        if self.transpose_swaps_factors:
            return self.apply_delta(h, B.mT, A.mT, scaling)
        d = h.shape[-1]
        if not self.dense_fits(d):
            raise ValueError(
                f"the {self.name!r} inflation has no form of its transpose that stays under max_dense_bytes="
                f"{self.max_dense_bytes} at d = {d}; raise LormaConfig.max_dense_bytes (None lifts the bound)"
            )

        def build(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.transform(a, b, scaling).mT

        return apply_dense_recomputed(h, A, B, build) - h

    # ------------------------------------------------------------------ merge / unmerge
    def delta_weight(
        self, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, side: Side
    ) -> torch.Tensor:
        """What merging adds to ``weight`` (``nn.Linear`` layout): ``(I(BA) - I) W`` (pre) or ``W (I(BA) - I)``."""
        return dense_delta_weight(weight, self.transform(A, B, scaling), side)

    def unmerges_exactly(self, A: torch.Tensor, B: torch.Tensor, scaling: float) -> bool:
        """Whether :meth:`unmerge` gives ``W0`` back from the merged weight by algebra, to rounding.

        ``False`` (the default) makes the layer keep a copy of the weight at merge time instead: a dense
        transform can be singular or ill-conditioned (the paper's Limitations), and a silently wrong ``W0`` is
        worse than the memory of a copy.
        """
        return False

    def unmerge(
        self, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, side: Side
    ) -> torch.Tensor:
        """``W0`` from the merged ``weight``; called only when :meth:`unmerges_exactly` said so."""
        raise NotImplementedError(f"the {self.name!r} inflation has no exact inverse; the layer keeps a copy")

    # ------------------------------------------------------------------ low-rank algebra (export, arithmetic)
    def lora_factors(
        self, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, side: Side
    ) -> Pair | None:
        """LoRA factors ``(U, V)`` with ``U V = W - W0`` exactly, or ``None`` when the update is not low rank.

        ``None`` (the default) makes ``lorma export`` approximate ``W - W0`` by a truncated SVD, on request.
        """
        return None

    def combine(self, terms: Sequence[Term], combination_type: str, side: Side) -> Pair:
        """One adapter of this inflation equal to a combination of ``terms`` (``(A, B, scaling, weight)`` each).

        Returns ``(B, A)`` of the new adapter at scaling 1 (``alpha = r``). Only the types in
        :attr:`combination_types` are exact; the default has none.
        """
        raise ValueError(f"adapters with the {self.name!r} inflation cannot be combined")


# ---------------------------------------------------------------------------------------------- the registry
# the built-in ``x`` is the module lorma.inflations.x (found on disk, imported on first use)
_REGISTRY: Registry[type[Inflation]] = Registry(
    Inflation, "inflation", package="lorma.inflations", one_module_per_entry=True, skip=("base",),
    first=("plus", "pi", "none"),  # the paper's order in every list
    register_hint="a custom inflation must be registered with lorma.inflations.register_inflation before it is "
                  "used or loaded",
)
_INFLATIONS = _REGISTRY.entries  # name -> class


def register_inflation(cls: type[Inflation]) -> type[Inflation]:
    """Make ``LormaConfig(inflation=cls.name)`` use ``cls`` (a class decorator); names are unique."""
    return _REGISTRY.register(cls)


def inflation_names() -> tuple[str, ...]:
    """The inflations' names: the built-ins (the modules of ``lorma/inflations/``), then those registered."""
    return _REGISTRY.names()


def get_inflation(name: str) -> type[Inflation]:
    """The class registered under ``name``; a ``ValueError`` naming the known ones otherwise."""
    return _REGISTRY.get(name)
