"""torch.compile: a LoRMA model traces without graph breaks and gives the eager outputs and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from lorma import LormaConfig


def _model(tiny_bert, inflation: str, side: str):
    model = get_peft_model(copy.deepcopy(tiny_bert), LormaConfig(r=4, alpha=8, inflation=inflation, side=side,
                                                                 target_modules=["query", "value"],
                                                                 init_weights=False))
    model.eval()  # BERT's own dropout would make two runs differ; gradients flow in eval mode all the same
    return model


def _loss_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(input_ids=ids).last_hidden_state
    out.square().mean().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize(("inflation", "side"), [("plus", "pre"), ("plus", "post"), ("pi", "pre"), ("pi", "post")])
def test_no_graph_breaks_and_eager_equal(tiny_bert, inflation: str, side: str) -> None:
    model = _model(tiny_bert, inflation, side)
    ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=ids)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    eager_out, eager_grads = _loss_and_grads(model, ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out, grads = _loss_and_grads(compiled, ids)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys() and len(grads) == 2 * 2 * 2
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("inflation", ["plus", "pi"])
def test_inductor_matches_eager(tiny_bert, inflation: str) -> None:
    """The default backend (inductor: generated C++ kernels) on CPU, forward and backward."""
    model = _model(tiny_bert, inflation, "pre")
    ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(2))
    eager_out, eager_grads = _loss_and_grads(model, ids)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    out, grads = _loss_and_grads(compiled, ids)
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-3, atol=1e-5)
    torch._dynamo.reset()
