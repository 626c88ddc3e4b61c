"""docs/extending.md's worked examples, executed: its inflation and variant modules, then the tests it shows.

The doc's python blocks start with ``# file: NAME.py``; each module block is executed as module ``NAME`` (which
registers its inflation or variant), each ``test_*`` block's functions run as tests here. So the doc cannot
describe an extension API that does not work.
"""

from __future__ import annotations

import copy
import re
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from torch import nn

import fresh_python
from inflation_contract import check_inflation_contract
from lorma import LormaConfig
from lorma.inflations import base as inflations_base
from lorma.variants.registry import _VARIANTS

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"
MODULES = ("exp_inflation", "gain_variant")
TESTS = ("test_exp_inflation", "test_gain_variant")


def doc_blocks() -> dict[str, str]:
    """The doc's python blocks by the file name on their first line."""
    blocks: dict[str, str] = {}
    for body in re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S):
        match = re.fullmatch(r"# file: (\w+)\.py", body.splitlines()[0])
        if match:
            blocks[match.group(1)] = body
    return blocks


def load(name: str, source: str) -> types.ModuleType:
    """Execute ``source`` as a module named ``name`` (in ``sys.modules``, as an import would leave it)."""
    module = types.ModuleType(name)
    module.__file__ = f"{DOC}#{name}"
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def doc_extensions() -> Iterator[dict[str, types.ModuleType]]:
    """The doc's extensions, registered for this module's tests and unregistered after them."""
    blocks = doc_blocks()
    modules = {name: load(name, blocks[name]) for name in MODULES}
    yield modules
    for name in MODULES:
        sys.modules.pop(name, None)
    inflations_base._INFLATIONS.pop("exp", None)
    _VARIANTS.pop("gain", None)


def test_the_doc_has_its_blocks() -> None:
    assert set(doc_blocks()) == set(MODULES) | set(TESTS)


def _doc_tests() -> list[tuple[str, str]]:
    blocks = doc_blocks()
    return [
        (block, name)
        for block in TESTS
        for name in re.findall(r"^def (test_\w+)\(", blocks.get(block, ""), flags=re.M)
    ]


@pytest.mark.parametrize(("block", "name"), _doc_tests())
def test_doc_example(doc_extensions: dict[str, types.ModuleType], block: str, name: str) -> None:
    namespace: dict[str, object] = {"__name__": block}
    exec(compile(doc_blocks()[block], f"{DOC}#{block}", "exec"), namespace)
    test: Callable[[], None] = namespace[name]  # type: ignore[assignment]
    test()


def test_the_doc_inflation_keeps_the_contract_every_inflation_keeps(doc_extensions) -> None:
    """The generic checks the built-ins pass (tests/inflation_contract.py), run on the doc's one-file inflation."""
    check_inflation_contract("exp")


def test_a_registered_dense_inflation_above_the_bound_is_refused_not_sent_down_pis_fft_path(doc_extensions) -> None:
    """The old layer sent any dense inflation above the memory bound down pi's FFT path (wrong results for any
    inflation but pi); now the bound belongs to each inflation, and a dense-only one is refused, naming the module."""
    from peft import get_peft_model
    from torch import nn

    from lorma import LormaConfig

    config = LormaConfig(r=2, inflation="exp", target_modules=["0"], max_dense_bytes=20 * 20 * 4 - 1)
    with pytest.raises(ValueError, match=r"module '0'.*'exp' inflation applies a dense 20 x 20.*max_dense_bytes"):
        get_peft_model(nn.Sequential(nn.Linear(12, 20)), config)
    # at the bound it is built and used
    get_peft_model(nn.Sequential(nn.Linear(12, 20)), LormaConfig(r=2, inflation="exp", target_modules=["0"],
                                                                  max_dense_bytes=20 * 20 * 4))


def test_the_doc_extensions_are_refused_where_they_do_not_apply(doc_extensions) -> None:
    import torch
    from peft import get_peft_model
    from torch import nn

    from lorma import LormaConfig
    from lorma.export.lora import ExportError, lora_export

    base = nn.Sequential(nn.Linear(12, 20))
    model = get_peft_model(base, LormaConfig(r=2, inflation="exp", target_modules=["0"], init_weights=False),
                           adapter_name="e1")
    model.add_adapter("e2", LormaConfig(r=2, inflation="exp", target_modules=["0"], init_weights=False))
    with pytest.raises(ValueError, match=r"inflation \{'e1': 'exp', 'e2': 'exp'\} cannot be combined"):
        model.add_weighted_adapter(["e1", "e2"], [1.0, 1.0], "e12")
    with pytest.raises(ExportError, match="full rank"):
        lora_export(model, "e1")
    exported = lora_export(model, "e1", rank=20)  # full rank: exact, as the SVD keeps everything
    assert exported.exact
    gain = get_peft_model(nn.Sequential(nn.Linear(12, 20)),
                          LormaConfig(r=2, variant="gain", target_modules=["0"]), adapter_name="g")
    gain.add_adapter("h", LormaConfig(r=2, variant="gain", target_modules=["0"]))
    with pytest.raises(ValueError, match=r"adapters with a variant \{'g': 'gain', 'h': 'gain'\} cannot be combined"):
        gain.add_weighted_adapter(["g", "h"], [1.0, 1.0], "gh")
    with pytest.raises(ValueError, match=r"module '0'.*gain variant adapts whole layers on the pre side"):
        get_peft_model(nn.Sequential(nn.Linear(12, 20)),
                       LormaConfig(r=2, side="post", variant="gain", target_modules=["0"]))
    # deleting an adapter deletes what its variant added
    layer = gain.base_model.model[0]
    assert set(layer.lorma_gain) == {"g", "h"} and "lorma_gain" in layer.adapter_layer_names
    gain.delete_adapter("h")
    assert set(layer.lorma_gain) == {"g"} and set(layer.lorma_variant) == {"g"}
    assert torch.equal(layer.lorma_gain["g"], torch.ones(20))


def test_variant_registry_and_config() -> None:
    from lorma import LormaConfig
    from lorma.variants import LormaVariant, get_variant, register_variant, variant_names

    assert get_variant(None) is LormaVariant  # plain LoRMA
    assert variant_names()[:3] == ("dorma", "adalorma", "dylorma")  # the built-ins (docs/variants.md)
    with pytest.raises(ValueError, match=r"LormaConfig: unknown variant 'no-such'; expected None or one of"):
        LormaConfig(variant="no-such")
    with pytest.raises(TypeError, match="LormaVariant subclass"):
        register_variant(LormaVariant)

    class Nameless(LormaVariant):
        pass

    with pytest.raises(ValueError, match="Nameless has no name"):
        register_variant(Nameless)

    @register_variant
    class Probe(LormaVariant):
        name = "test-probe"

    class Other(LormaVariant):
        name = "test-probe"

    try:
        assert "test-probe" in variant_names() and get_variant("test-probe") is Probe
        assert LormaConfig(variant="test-probe").variant == "test-probe"
        with pytest.raises(ValueError, match="a variant named 'test-probe' is already registered"):
            register_variant(Other)
    finally:
        _VARIANTS.pop("test-probe")


def test_a_variant_that_changes_pairs_and_scaling_is_followed_by_forward_merge_unmerge_and_export() -> None:
    """The hook a nested-rank variant (DyLoRMA) needs: train ``B[:, :b] A[:b]`` at ``s = alpha / b``. Overriding
    ``pairs`` and ``scaling`` alone must change the forward, the merge, the exact unmerge and the exported factors
    alike (checked against ``I + (alpha / b) B[:, :b] A[:b]`` in float64); a variant with its own ``delta_weight``
    (the doc's gain) gets a kept copy and no exact export factors."""
    from lorma.variants import LormaVariant, register_variant

    @register_variant
    class FirstRank(LormaVariant):
        name = "test-first-rank"

        def pairs(self, layer, adapter):
            return [(rows, A[:1], B[:, :1]) for rows, A, B in super().pairs(layer, adapter)]

        def scaling(self, layer, adapter):
            return layer.alpha[adapter] / 1

    try:
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(12, 20)).double()
        config = LormaConfig(r=3, alpha=0.5, variant="test-first-rank", target_modules=["0"], init_weights=False)
        model = get_peft_model(copy.deepcopy(base), config)
        layer = model.base_model.model[0]
        A, B = layer.lorma_A["default"].detach().double(), layer.lorma_B["default"].detach().double()
        M = torch.eye(20, dtype=torch.float64) + 0.5 * (B[:, :1] @ A[:1])
        W0, bias = base[0].weight.detach().clone(), base[0].bias.detach()
        x = torch.randn(6, 12, dtype=torch.float64)
        expected = x @ (M @ W0).T + bias
        variant = layer.lorma_variant["default"]
        assert variant.unmerges_exactly(layer, "default")  # the plain merge: the inflation's Woodbury inverse
        factors = variant.lora_factors(layer, "default", W0)
        assert factors is not None and factors[0].shape[1] == 1
        assert torch.allclose(factors[0] @ factors[1], (M - torch.eye(20, dtype=torch.float64)) @ W0, atol=1e-12)
        with torch.no_grad():
            assert torch.allclose(model(x), expected, atol=1e-10)
            model.merge_adapter()
            assert torch.allclose(model(x), expected, atol=1e-10)
            model.unmerge_adapter()
        assert "default" not in layer._weights_before_merge
        assert torch.allclose(layer.get_base_layer().weight, W0, atol=1e-12)
    finally:
        _VARIANTS.pop("test-first-rank")


def test_a_variant_with_its_own_merge_keeps_a_copy_and_has_no_exact_factors(doc_extensions) -> None:
    base = nn.Sequential(nn.Linear(12, 20))
    model = get_peft_model(copy.deepcopy(base), LormaConfig(r=3, variant="gain", target_modules=["0"]))
    layer = model.base_model.model[0]
    variant = layer.lorma_variant["default"]
    assert not variant.unmerges_exactly(layer, "default")
    assert variant.lora_factors(layer, "default", base[0].weight.detach()) is None


def test_a_built_in_inflation_is_one_file_that_reaches_lorma_train(tmp_path: Path) -> None:
    """The doc's inflation saved as ``exp.py`` in the inflations' folder (here: a folder added to the package's
    ``__path__``, in a fresh process, so the source tree is not touched) is offered as ``lorma-exp`` by ``lorma
    compare --help`` and trained by ``lorma train``, with no other file edited."""
    import json

    from recipe_support import make_tiny_bert, sentiment_rows, write_csv

    folder = tmp_path / "more_inflations"
    folder.mkdir()
    (folder / "exp.py").write_text(doc_blocks()["exp_inflation"], encoding="utf-8")
    model = make_tiny_bert(tmp_path / "model")
    data = write_csv(tmp_path / "data.csv", ["text", "label"], sentiment_rows(40))
    out = tmp_path / "run"
    script = f"""
import contextlib, io, sys
import lorma.inflations
lorma.inflations.__path__.append({str(folder)!r})
from lorma.cli import main
helped = io.StringIO()
with contextlib.redirect_stdout(helped), contextlib.suppress(SystemExit):
    main(["compare", "--help"])
assert "lorma-exp" in helped.getvalue(), helped.getvalue()
sys.exit(main(["train", "--model", {str(model)!r}, "--train-file", {str(data)!r}, "--output-dir", {str(out)!r},
               "--method", "lorma-exp", "--max-steps", "2", "--per-device-train-batch-size", "8"]))
"""
    done = fresh_python.run([sys.executable, "-c", script], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["inflation"] == "exp" and adapter["peft_type"] == "LORMA"
    assert json.loads((out / "metrics.json").read_text())["method"] == "lorma-exp"
