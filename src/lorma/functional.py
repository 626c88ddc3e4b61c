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

    Why views and not a gather: a gather needs a ``d x d`` integer index (8 MB at d = 1024, 1.6 GB at
    d = 14336, kept per module by the authors' code). Here ``[M | M]`` (``d x 2d``) is flattened; element
    ``(i, j)`` of the result sits at flat offset ``d + i (2d - 1) + j``, so dropping the first ``d``
    elements, reshaping to rows of ``2d - 1`` and keeping the first ``d`` columns is ``pi(M)`` (the
    "relative shift" trick of relative attention). Only ``cat``, slicing and reshapes are used: their
    backward is cheap, and torch.compile traces them without a graph break (``as_strided`` with a
    storage offset breaks the graph).
    """
    d = m.shape[-1]
    if m.shape[-2] != d:
        raise ValueError(f"rotate_rows needs square matrices, got shape {tuple(m.shape)}")
    lead = m.shape[:-2]
    flat = torch.cat([m, m], dim=-1).reshape(*lead, 2 * d * d)
    return flat[..., d : d + d * (2 * d - 1)].reshape(*lead, d, 2 * d - 1)[..., :d]


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


def plus_delta(
    source: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """The adapter path of ``plus``: ``s B A (source - shift)``, so ``(I + s BA) h = h + plus_delta(h)``.

    No ``d x d`` matrix is built. ``shift`` (the bias on the ``pre`` side, where ``h`` carries it but must be
    transformed without it) is folded into the r-sized intermediate as ``A h - A b``, which costs ``r d``
    instead of a pass over ``h``. Cost: ``2 n r d``, the same as LoRA's adapter path.
    """
    u = F.linear(source, A)
    if shift is not None:
        u = u - F.linear(shift, A)
    return F.linear(u * scaling, B)


# Largest dense ``d x d`` fp32 transform a forward may build for one adapted module unless the user raises it:
# 256 MiB (d = 8192). LLaMA-3-8B's up/gate on the pre side (d = 14336, 822 MB) is above it and takes the
# bounded FFT path instead. ``None`` removes the bound. Read at call time, so it can be changed at run time.
DENSE_BYTES_LIMIT: int | None = 256 * 2**20
# Working memory the bounded (FFT) path may use per chunk of tokens, in bytes.
FFT_CHUNK_BYTES: int = 64 * 2**20

Strategy = Literal["activation", "weight", "fft"]


def dense_transform_bytes(d: int, element_size: int = 4) -> int:
    """Bytes of one dense ``d x d`` transform (fp32 by default, peft's default adapter dtype)."""
    return d * d * element_size


def choose_dense_strategy(
    n_tokens: int,
    d: int,
    d_other: int,
    needs_grad: bool,
    max_dense_bytes: int | None | Literal["default"] = "default",
) -> Strategy:
    """Pick how a dense ``d x d`` transform ``M`` (``pi`` or ``none``) is applied, by counting multiply-adds.

    ``activation``: ``M`` applied to the ``n x d`` activations: ``n d^2`` forward, ``2 n d^2`` backward.
    ``weight``: ``M`` folded into the ``d x d_other`` weight once per step (``d^2 d_other``), then a
    normal matmul with the folded weight; the backward pays the folded weight's gradient
    (``n d d_other``) and the fold's (``d^2 d_other``). The base matmul itself is paid either way.
    ``fft``: ``M`` is never built (see :func:`apply_pi_fft`); chosen only when ``M`` would exceed
    ``max_dense_bytes`` (default :data:`DENSE_BYTES_LIMIT`), because on CPU the FFT path is slower than a
    dense GEMM at every size measured in BENCHMARKS.md (its ``O(n r d log d)`` flops run far below GEMM
    speed), but its memory is bounded by :data:`FFT_CHUNK_BYTES` per module whatever ``d`` is.
    """
    limit = DENSE_BYTES_LIMIT if max_dense_bytes == "default" else max_dense_bytes
    if limit is not None and dense_transform_bytes(d) > limit:
        return "fft"
    if needs_grad:
        activation = 3 * n_tokens * d * d
        weight = 2 * d * d * d_other + n_tokens * d * d_other
    else:
        activation = n_tokens * d * d
        weight = d * d * d_other
    return "activation" if activation <= weight else "weight"


def apply_pi_fft(h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s pi(BA) h`` on activations ``h`` (``(..., d)``) without any ``d x d`` matrix.

    Row ``i`` of ``pi(BA)`` is row ``i`` of ``BA`` rotated right by ``i``, so
    ``(pi(BA) h)[i] = sum_k B[i, k] sum_m A[k, m] h[(m + i) mod d]``: for each ``k`` a circular
    cross-correlation of ``A[k]`` with ``h``, read at ``i`` and weighted by ``B[i, k]``. The correlation is
    a product in the Fourier domain (``irfft(conj(rfft(A_k)) rfft(h))``), ``O(r d log d)`` per token and
    ``n r d`` working memory. Exact up to fp32 rounding (tests compare it with the dense formula).
    """
    d = h.shape[-1]
    out_dtype = h.dtype
    # torch's FFTs take no float16 / bfloat16 (adapters kept in the base's half dtype): compute those in float32
    compute = torch.promote_types(out_dtype, torch.float32)
    h, A, B = h.to(compute), A.to(compute), B.to(compute)
    h_hat = torch.fft.rfft(h, dim=-1)  # (..., f)
    a_hat = torch.fft.rfft(A, dim=-1).conj()  # (r, f)
    corr = torch.fft.irfft(h_hat.unsqueeze(-2) * a_hat, n=d, dim=-1)  # (..., r, d)
    # an elementwise product and a sum over r, not an einsum: torch's CPU einsum for this contraction
    # was ~100x slower when measured (it lowers to a badly shaped bmm)
    return (scaling * (corr * B.T).sum(dim=-2)).to(out_dtype)


def apply_pi_bounded(
    h: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """:func:`apply_pi_fft` over chunks of tokens, so that working memory stays under ``chunk_bytes``.

    With gradients, each chunk runs under activation checkpointing: only its input is kept for the backward
    and its FFT intermediates (``~ 3 r d`` floats per token) are recomputed, so the memory this module adds to
    a training step is bounded by ``chunk_bytes`` (default :data:`FFT_CHUNK_BYTES`) instead of growing with
    the number of tokens or with ``d^2``.
    """
    budget = FFT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    d, r = h.shape[-1], A.shape[0]
    lead = h.shape[:-1]
    flat = h.reshape(-1, d)
    per_token = 3 * r * d * flat.element_size() * 2  # complex products and real correlations, with slack
    chunk = max(1, budget // per_token)
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or A.requires_grad or B.requires_grad)
    outs = []
    for start in range(0, flat.shape[0], chunk):
        piece = flat[start : start + chunk]
        if needs_grad:
            from torch.utils.checkpoint import checkpoint

            outs.append(checkpoint(apply_pi_fft, piece, A, B, scaling, use_reentrant=False))
        else:
            outs.append(apply_pi_fft(piece, A, B, scaling))
    return torch.cat(outs, dim=0).reshape(*lead, d)


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
