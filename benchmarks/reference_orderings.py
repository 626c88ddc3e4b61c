"""Two reference orderings of LoRMA (pre side), defined here so that the gain of ``lorma`` is shown side by side.

- ``table11``: the paper's Table 11 ordering. LoRMA+ computes ``W0 x`` twice (once for the identity term,
  once for ``B A W0 x``); LoRMA_pi builds ``s pi(BA)`` and applies it to ``W0 x`` on the activations.
- ``released``: the ordering of the authors' released code: the whole adapted weight ``I(BA) W0`` is built in
  every forward and the input goes through it, which adds a full weight-gradient GEMM to every backward.

Both build ``pi(BA)`` with a ``d x d`` int64 gather index kept per module, as the released code does. Written
for the benchmark only (no merge, no dropout, no saving): the cost of the ordering is all that matters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

ORDERINGS = ("table11", "released")


class ReferenceLorma(nn.Module):
    """LoRMA (``plus`` or ``pi``, pre side) around a Linear / Conv1D, in one of the two reference orderings.

    ``parts``: for a fused projection (GPT-2 ``c_attn``), ``(num_parts, [adapted parts])``; each adapted part
    of the output gets its own transform, as in ``lorma``.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        inflation: str,
        ordering: str,
        parts: tuple[int, list[int]] | None = None,
    ) -> None:
        super().__init__()
        if ordering not in ORDERINGS:
            raise ValueError(f"unknown ordering {ordering!r}; expected one of {ORDERINGS}")
        if inflation not in ("plus", "pi"):
            raise ValueError(f"reference orderings cover plus and pi, got {inflation!r}")
        self.base = base
        self.conv1d = isinstance(base, Conv1D)
        d_out = base.weight.shape[1] if self.conv1d else base.weight.shape[0]
        self.parts = parts or (1, [0])
        self.part_size = d_out // self.parts[0]
        d = self.part_size
        self.inflation, self.ordering, self.scaling = inflation, ordering, alpha / r
        n = len(self.parts[1])
        A = torch.empty(n, r, d)
        B = torch.empty(n, d, r)
        for a, b in zip(A, B):  # identity at init, as in lorma
            if inflation == "plus":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                b.zero_()
            else:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
                b[:, 0] = 1.0
                a.zero_()
                a[0, 0] = 1.0
                a.div_(math.sqrt(self.scaling))
                b.div_(math.sqrt(self.scaling))
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        if inflation == "pi":  # the released code's persistent gather index: (i, j) -> (j - i) mod d
            rows = torch.arange(d).unsqueeze(1)
            self.register_buffer("index", (torch.arange(d).unsqueeze(0) - rows) % d, persistent=False)

    def _weight(self) -> torch.Tensor:
        w = self.base.weight
        return w.T if self.conv1d else w

    def _transform(self, i: int) -> torch.Tensor:
        ba = self.B[i] @ self.A[i]
        if self.inflation == "pi":
            return self.scaling * torch.gather(ba, 1, self.index)
        return torch.eye(ba.shape[0], dtype=ba.dtype, device=ba.device) + self.scaling * ba

    def _rows(self, p: int) -> slice:
        return slice(p * self.part_size, (p + 1) * self.part_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, bias = self._weight(), self.base.bias
        if self.ordering == "released":
            blocks = list(w.split(self.part_size, dim=0))
            for i, p in enumerate(self.parts[1]):
                if self.inflation == "plus":
                    blocks[p] = blocks[p] + self.scaling * (self.B[i] @ (self.A[i] @ blocks[p]))
                else:
                    blocks[p] = self._transform(i) @ blocks[p]
            return F.linear(x, torch.cat(blocks, dim=0), bias)
        h0 = F.linear(x, w)  # W0 x
        chunks = list(h0.split(self.part_size, dim=-1))
        for i, p in enumerate(self.parts[1]):
            if self.inflation == "plus":
                again = F.linear(x, w[self._rows(p)])  # Table 11 computes W0 x a second time for B A W0 x
                chunks[p] = chunks[p] + self.scaling * F.linear(F.linear(again, self.A[i]), self.B[i])
            else:
                chunks[p] = F.linear(chunks[p], self._transform(i))
        out = torch.cat(chunks, dim=-1)
        return out if bias is None else out + bias


def apply_reference(
    model: nn.Module,
    target_modules: list[str],
    r: int,
    alpha: float,
    inflation: str,
    ordering: str,
    fused_parts: dict[str, tuple[int, list[int]]] | None = None,
) -> nn.Module:
    """Replace every module whose name ends with a target by a :class:`ReferenceLorma`; freeze the rest."""
    for p in model.parameters():
        p.requires_grad_(False)
    replaced = 0
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in target_modules and isinstance(module, (nn.Linear, Conv1D)):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            parts = (fused_parts or {}).get(leaf)
            setattr(parent, leaf, ReferenceLorma(module, r, alpha, inflation, ordering, parts))
            replaced += 1
    if not replaced:
        raise ValueError(f"no module named like {target_modules} to replace")
    return model
