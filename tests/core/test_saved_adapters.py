"""Adapters saved by an earlier lorma load unchanged (issue 30: the ground floor regrouped into rooms): the folders
under ``tests/fixtures/saved-0.1.0/`` were written before the move by ``tests/fixtures/saved_adapters.py``, with
their outputs on fixed inputs; loading them now must give those tensors and those outputs."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

import lorma
from fixtures.saved_adapters import ADAPTERS, HERE, base_model


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_an_adapter_saved_before_the_regroup_loads_with_its_tensors_and_outputs(name: str) -> None:
    folder = HERE / name
    model = PeftModel.from_pretrained(base_model(), folder)
    config = model.peft_config["default"]
    assert isinstance(config, lorma.LormaConfig)
    for key, value in ADAPTERS[name].items():
        assert getattr(config, key) == (set(value) if key == "target_modules" else value), key
    adapted = {n for n, m in model.named_modules() if isinstance(m, lorma.LormaLayer)}
    assert adapted == {f"base_model.model.{t}" for t in ADAPTERS[name]["target_modules"]}
    saved = load_file(str(folder / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(saved)
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key
    recorded = load_file(str(folder / "expected.safetensors"))
    with torch.no_grad():
        out = model(recorded["inputs"])
    torch.testing.assert_close(out, recorded["expected"], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, base_model()(recorded["inputs"]), atol=1e-3)  # the adapter changes the output
