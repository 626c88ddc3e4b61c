"""The LoRMA math, free of peft and of modules: inflations, activation-side application, merge, unmerge.

Notation (the paper's, in PyTorch's weight layout): the frozen weight ``W0`` is in ``nn.Linear`` layout
``(d_out, d_in)``; ``A`` is ``(r, d)``, ``B`` is ``(d, r)``; ``s = alpha / r`` is the scaling. The square
transform ``I(BA)`` is ``d x d`` with ``d = d_out`` on the ``pre`` side (``W = I(BA) W0``) and ``d = d_in``
on the ``post`` side (``W = W0 I(BA)``).

Activations are row vectors (``(..., d)``, as in PyTorch), so "apply ``M`` to ``h``" is ``h @ M.T``.

Everything here works on a single ``(A, B)`` pair; fused projections (GPT-2's ``c_attn``) are handled by the
layer, which calls these functions once per adapted part. Which of them an inflation uses is decided by the
inflation objects of :mod:`lorma.inflations`: nothing here dispatches on an inflation's name or reads a setting
(every bound is an argument).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Side = Literal["pre", "post"]

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


def dense_transform_bytes(d: int, element_size: int = 4) -> int:
    """Bytes of one dense ``d x d`` transform (fp32 by default, peft's default adapter dtype)."""
    return d * d * element_size


def choose_dense_strategy(n_tokens: int, d: int, d_other: int, needs_grad: bool) -> Literal["activation", "weight"]:
    """Pick how a dense ``d x d`` transform ``M`` is applied, by counting multiply-adds.

    ``activation``: ``M`` applied to the ``n x d`` activations: ``n d^2`` forward, ``2 n d^2`` backward.
    ``weight``: ``M`` folded into the ``d x d_other`` weight once per step (``d^2 d_other``), then a
    normal matmul with the folded weight; the backward pays the folded weight's gradient
    (``n d d_other``) and the fold's (``d^2 d_other``). The base matmul itself is paid either way.
    Whether ``M`` may be built at all (its memory bound) is the inflation's decision, not a flop count
    (:meth:`lorma.inflations.Inflation.strategy`).
    """
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
    chunk_bytes: int,
) -> torch.Tensor:
    """:func:`apply_pi_fft` over chunks of tokens, so that working memory stays under ``chunk_bytes``.

    With gradients, each chunk runs under activation checkpointing: only its input is kept for the backward
    and its FFT intermediates (``~ 3 r d`` floats per token) are recomputed, so the memory this module adds to
    a training step is bounded by ``chunk_bytes`` instead of growing with the number of tokens or with ``d^2``.
    """
    d, r = h.shape[-1], A.shape[0]
    lead = h.shape[:-1]
    flat = h.reshape(-1, d)
    per_token = 3 * r * d * flat.element_size() * 2  # complex products and real correlations, with slack
    chunk = max(1, chunk_bytes // per_token)
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or A.requires_grad or B.requires_grad)
    outs = []
    for start in range(0, flat.shape[0], chunk):
        piece = flat[start : start + chunk]
        if needs_grad:
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


def plus_condition_estimate(A: torch.Tensor, B: torch.Tensor, scaling: float) -> float:
    """An upper estimate of the condition number of ``I + sBA``: the factor by which unmerging amplifies rounding.

    ``I + sBA`` has eigenvalue 1 on the complement of ``B``'s columns and the eigenvalues of the ``r x r`` core
    ``I_r + sAB`` on them, so the core's singular values (with 1) bound its conditioning; ``inf`` if singular.
    Computed in float64 on the CPU (an ``r x r`` matrix: no cost worth moving).
    """
    a64, b64 = A.detach().double().cpu(), B.detach().double().cpu()
    core = torch.eye(A.shape[0], dtype=torch.float64) + scaling * (a64 @ b64)
    sv = torch.linalg.svdvals(core)
    if sv.min() <= 0:
        return float("inf")
    return max(1.0, sv.max().item()) / min(1.0, sv.min().item())


# ---------------------------------------------------------------------------------------------- low-rank algebra
# A transform ``I + X Y`` is written as the pair ``(X, Y)``, ``X`` ``(d, k)``, ``Y`` ``(k, d)``, with the scaling
# folded into ``X``: as a LoRMA+ adapter it is ``B = X``, ``A = Y`` at ``alpha = r = k``. LoRMA+'s update is closed
# under products and sums in this form, which is what exact export and adapter arithmetic rest on.

Pair = tuple[torch.Tensor, torch.Tensor]


class _WeightTimesThin(torch.autograd.Function):
    """``W B`` for a weight ``W`` (``d_out x d_in``) and a thin ``B`` (``d_in x r``), both passes written with the
    thin operand on the left: ``(B^T W^T)^T`` and ``dB = (G^T W)^T``.

    Hand-written because autograd's matmul backward computes ``dB = W^T G``, a ``d x d`` by ``d x r`` GEMM, and the
    CPU GEMM kernels run that shape several times slower than the same product as ``r x d`` by ``d x d``: measured
    on this project's CPU, 1 thread, d = 1024, r = 8, forward + backward 8.3-10.2 ms against 1.2-2.0 ms, for a
    Linear weight, a Conv1D (transposed) weight and a fused part's rows alike. Batches of weights (``(E, d_out,
    d_in)``, one per expert: :mod:`lorma.layers.experts`) take the same path, matrix by matrix.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, thin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, thin)
        return (thin.mT @ weight.mT).mT

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        weight, thin = ctx.saved_tensors
        grad_weight = grad @ thin.mT if ctx.needs_input_grad[0] else None
        grad_thin = (grad.mT @ weight).mT if ctx.needs_input_grad[1] else None
        return grad_weight, grad_thin


def weight_times_thin(weight: torch.Tensor, thin: torch.Tensor) -> torch.Tensor:
    """``weight @ thin`` (``thin``: few columns), with gradients, computed in the orientation CPU GEMMs run fast."""
    return _WeightTimesThin.apply(weight, thin)


def plus_weight_update(A: torch.Tensor, B: torch.Tensor, scaling: float, weight: torch.Tensor, side: Side) -> Pair:
    """LoRA factors ``(U, V)`` with ``U V = W - W0`` exactly, for ``W = (I + sBA) W0`` or ``W0 (I + sBA)``.

    ``weight`` is ``W0`` in ``nn.Linear`` layout ``(d_out, d_in)``. ``U`` is ``(d_out, r)`` (LoRA's ``lora_B``
    at scaling 1), ``V`` is ``(r, d_in)`` (``lora_A``): pre side ``U = sB``, ``V = A W0``; post side
    ``U = s W0 B``, ``V = A``. One ``r x d x d_other`` matmul, no ``d x d`` matrix.
    """
    if side == "pre":
        return scaling * B, A @ weight
    if side == "post":
        return scaling * weight_times_thin(weight, B), A
    raise ValueError(f"unknown side {side!r}; expected one of {SIDES}")


def compose(left: Pair, right: Pair) -> Pair:
    """``(I + X1 Y1)(I + X2 Y2) = I + [X1 | X2 + X1 (Y1 X2)] [Y1; Y2]``: rank ``k1 + k2``, no ``d x d`` matrix."""
    x1, y1 = left
    x2, y2 = right
    return torch.cat([x1, x2 + x1 @ (y1 @ x2)], dim=-1), torch.cat([y1, y2], dim=-2)


def product(pairs: Sequence[Pair], side: Side) -> Pair:
    """The transform that activating (or merging, in this order) the given ``I + X Y`` transforms computes.

    Active adapters ``a1, ..., an`` act with ``a1`` nearest to ``W0``: on the pre side the layer computes
    ``I_n ... I_1 W0 x``, on the post side ``W0 I_1 ... I_n x`` (see :mod:`lorma.layers.base`).
    """
    if not pairs:
        raise ValueError("product of no transforms")
    result = pairs[0]
    for pair in pairs[1:]:
        result = compose(pair, result) if side == "pre" else compose(result, pair)
    return result


def weighted_sum(pairs: Sequence[Pair]) -> Pair:
    """``I + sum_i X_i Y_i`` (weights and scalings already folded into each ``X_i``): rank ``sum k_i``, exact."""
    if not pairs:
        raise ValueError("sum of no transforms")
    return torch.cat([x for x, _ in pairs], dim=-1), torch.cat([y for _, y in pairs], dim=-2)


class _DenseRecomputed(torch.autograd.Function):
    """``h @ M.T`` with ``M = build(A, B)``, keeping ``h``, ``A`` and ``B`` for the backward instead of ``M``.

    Autograd's own graph of ``F.linear(h, build(A, B))`` saves the ``d x d`` matrix ``M`` of every adapted module
    until the backward reaches it: on SmolLM2-135M all linear (pi, pre side) that is 694 MB of saved matrices
    against a 538 MB model. Rebuilding ``M`` in the backward costs ``r d^2`` multiply-adds per module and step,
    against the ``3 n d^2`` that applying it costs (about 2 % at r = 8 and n = 128 tokens), and keeps at most
    one module's ``M`` alive at a time.
    """

    @staticmethod
    def forward(ctx, h, A, B, build):  # noqa: ANN001, ANN205  (autograd.Function's signature)
        with torch.no_grad():
            M = build(A, B)
        ctx.build = build
        ctx.save_for_backward(h, A, B)
        return F.linear(h, M)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        h, A, B = ctx.saved_tensors
        with torch.enable_grad():
            A_, B_ = A.detach().requires_grad_(A.requires_grad), B.detach().requires_grad_(B.requires_grad)
            M = ctx.build(A_, B_)
        # Under autocast the forward's F.linear ran in the autocast dtype (bf16 / fp16), so grad_out has that dtype,
        # while M is rebuilt here, where autocast is off, in the adapter's float32: the products below take
        # grad_out's dtype, as autocast's own linear backward would, and each gradient leaves in its input's dtype
        grad_h = (grad_out @ M.detach().to(grad_out.dtype)).to(h.dtype) if ctx.needs_input_grad[0] else None
        grad_A = grad_B = None
        wanted = [t for t, need in ((A_, ctx.needs_input_grad[1]), (B_, ctx.needs_input_grad[2])) if need]
        if wanted:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            grad_M = (g2.T @ h.reshape(-1, h.shape[-1]).to(g2.dtype)).to(M.dtype)  # dL/dM of y = h M^T
            grads = torch.autograd.grad(M, wanted, grad_M)
            it = iter(grads)
            grad_A = next(it) if ctx.needs_input_grad[1] else None
            grad_B = next(it) if ctx.needs_input_grad[2] else None
        return grad_h, grad_A, grad_B, None


def apply_dense_recomputed(
    h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, build: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``build(A, B)`` (a dense ``d x d`` transform) applied to activations ``h``, exact, saving no ``d x d``
    matrix for the backward (:class:`_DenseRecomputed`). Without gradients it is a plain ``F.linear``; so it is
    under ``torch.compile``, which cannot trace the ``autograd.grad`` of the rebuilt transform inside a backward
    (a graph break) and plans what to save or recompute itself."""
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or A.requires_grad or B.requires_grad)
    if not needs_grad or torch.compiler.is_compiling():
        return F.linear(h, build(A, B))
    return _DenseRecomputed.apply(h, A, B, build)
