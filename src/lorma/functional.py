"""The LoRMA math, free of peft and of modules: inflations, activation-side application, merge, unmerge.

Notation (see ``NOTES.md`` of the paper notes): the frozen weight ``W0`` is in ``nn.Linear`` layout
``(d_out, d_in)``; ``A`` is ``(r, d)``, ``B`` is ``(d, r)``; ``s = alpha / r`` is the scaling. The square
transform ``I(BA)`` is ``d x d`` with ``d = d_out`` on the ``pre`` side (``W = I(BA) W0``) and ``d = d_in``
on the ``post`` side (``W = W0 I(BA)``).

Activations are row vectors (``(..., d)``, as in PyTorch), so "apply ``M`` to ``h``" is ``h @ M.T``.

Everything here works on a single ``(A, B)`` pair; fused projections (GPT-2's ``c_attn``) are handled by the
layer, which calls these functions once per adapted part.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Inflation = Literal["plus", "pi", "none"]
Side = Literal["pre", "post"]

INFLATIONS: tuple[str, ...] = ("plus", "pi", "none")
SIDES: tuple[str, ...] = ("pre", "post")


def rotate_rows(m: torch.Tensor) -> torch.Tensor:
    """The permutation inflation ``pi``: row ``i`` of a square matrix rotated cyclically right by ``i``.

    ``pi(M)[i, j] = M[i, (j - i) mod d]`` (paper Fig. 3). Works on ``(..., d, d)``.

    Why a strided view and not a gather: a gather needs a ``d x d`` integer index (8 MB at d = 1024,
    1.6 GB at d = 14336, kept per module by the authors' code). Here ``[M | M]`` is laid out contiguously
    with row stride ``2d``; reading ``d`` elements from offset ``d - i`` of row ``i`` is a view with row
    stride ``2d - 1`` and storage offset ``d`` (the "relative shift" trick). Autograd goes through
    ``as_strided`` (the view does not overlap itself, so its backward is an exact scatter).
    """
    d = m.shape[-1]
    if m.shape[-2] != d:
        raise ValueError(f"rotate_rows needs square matrices, got shape {tuple(m.shape)}")
    doubled = torch.cat([m, m], dim=-1).contiguous()  # (..., d, 2d)
    batch_shape = doubled.shape[:-2]
    batch_strides = doubled.stride()[:-2]
    return doubled.as_strided(
        size=(*batch_shape, d, d),
        stride=(*batch_strides, 2 * d - 1, 1),
        storage_offset=doubled.storage_offset() + d,
    )


def inflate(A: torch.Tensor, B: torch.Tensor, inflation: Inflation, scaling: float) -> torch.Tensor:
    """The dense ``d x d`` transform ``I(BA)``.

    - ``plus``: ``I + s BA`` (LoRMA+, eq. 8)
    - ``pi``: ``s pi(BA)`` (LoRMA_pi, eq. 7)
    - ``none``: ``s BA`` (naive, rank <= r; Table 6's ablation)

    Batched ``A`` ``(..., r, d)`` and ``B`` ``(..., d, r)`` give ``(..., d, d)``.
    """
    ba = B @ A
    if inflation == "plus":
        eye = torch.eye(ba.shape[-1], dtype=ba.dtype, device=ba.device)
        return eye + scaling * ba
    if inflation == "pi":
        return scaling * rotate_rows(ba)
    if inflation == "none":
        return scaling * ba
    raise ValueError(f"unknown inflation {inflation!r}; expected one of {INFLATIONS}")


def apply_plus(
    h: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    adapter_input: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(I + s BA) h`` on activations without building any ``d x d`` matrix: ``h + s B (A h)``.

    ``adapter_input`` is what enters the low-rank path (``h`` after dropout); it defaults to ``h``.
    ``shift`` is a vector subtracted from ``adapter_input`` before ``A`` (the bias on the ``pre`` side,
    where ``h`` carries it but must be transformed without it); it is folded into the r-sized
    intermediate as ``A h - A b``, which costs ``r d`` instead of a pass over ``h``.
    Cost: ``2 n r d``, the same as LoRA's adapter path.
    """
    source = h if adapter_input is None else adapter_input
    u = F.linear(source, A)
    if shift is not None:
        u = u - F.linear(shift, A)
    return h + F.linear(u * scaling, B)


def choose_dense_strategy(n_tokens: int, d: int, d_other: int, needs_grad: bool) -> Literal["activation", "weight"]:
    """Pick where a dense ``d x d`` transform ``M`` is applied, by counting multiply-adds.

    ``activation``: ``M`` applied to the ``n x d`` activations: ``n d^2`` forward, ``2 n d^2`` backward.
    ``weight``: ``M`` folded into the ``d x d_other`` weight once per step (``d^2 d_other``), then a
    normal matmul with the folded weight; the backward pays the folded weight's gradient
    (``n d d_other``) and the fold's (``d^2 d_other``). The base matmul itself is paid either way.
    """
    if needs_grad:
        activation = 3 * n_tokens * d * d
        weight = 2 * d * d * d_other + n_tokens * d * d_other
    else:
        activation = n_tokens * d * d
        weight = d * d * d_other
    return "activation" if activation <= weight else "weight"


def merge_weight(weight: torch.Tensor, transform: torch.Tensor, side: Side) -> torch.Tensor:
    """The merged weight: ``M W0`` (``pre``) or ``W0 M`` (``post``), ``weight`` in ``nn.Linear`` layout."""
    if side == "pre":
        return transform @ weight
    if side == "post":
        return weight @ transform
    raise ValueError(f"unknown side {side!r}; expected one of {SIDES}")


def unmerge_plus(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, side: Side
) -> torch.Tensor:
    """Exact inverse of merging a ``plus`` transform, by Woodbury: ``(I + sBA)^-1 = I - sB (I_r + sAB)^-1 A``.

    Only an ``r x r`` system is solved; no ``d x d`` inverse is formed. Raises if ``I_r + sAB`` is singular
    (then ``I + sBA`` is too, and ``W0`` cannot be recovered from the merged weight).
    """
    r = A.shape[0]
    eye_r = torch.eye(r, dtype=A.dtype, device=A.device)
    core = eye_r + scaling * (A @ B)  # (r, r)
    if side == "pre":  # W0 = W - s B core^-1 A W
        rhs = A @ weight  # (r, d_in)
        return weight - scaling * (B @ torch.linalg.solve(core, rhs))
    if side == "post":  # W0 = W - s W B core^-1 A
        lhs = weight @ B  # (d_out, r)
        return weight - scaling * (torch.linalg.solve(core.T, lhs.T).T @ A)
    raise ValueError(f"unknown side {side!r}; expected one of {SIDES}")


def dense_delta_weight(weight: torch.Tensor, transform: torch.Tensor, side: Side) -> torch.Tensor:
    """``W - W0`` for a dense transform: ``(M - I) W0`` or ``W0 (M - I)``, without cancellation error."""
    eye = torch.eye(transform.shape[-1], dtype=transform.dtype, device=transform.device)
    return merge_weight(weight, transform - eye, side)
