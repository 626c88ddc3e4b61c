"""``import lorma`` is cheap (no torch, transformers or peft) yet makes peft know LORMA, whatever is imported next
and in which order; checked in fresh processes, on a saved adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import fresh_python

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft")


def _fresh(code: str, heavy_preloaded: bool = False) -> dict:
    """``code``'s last line of output (JSON) in a new process: a new interpreter, or with ``heavy_preloaded`` a child
    of a zygote that has imported torch and transformers but neither peft nor lorma (:mod:`fresh_python`), where
    the test is about peft and lorma alone."""
    if heavy_preloaded:
        proc = fresh_python.run([sys.executable, "-c", code], timeout=300, preload=fresh_python.WITHOUT_PEFT)
    else:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_lorma_and_the_cli_import_nothing_heavy() -> None:
    result = _fresh(
        "import json, sys\n"
        "import lorma\n"
        "names = dir(lorma)\n"
        "from lorma.cli import build_parser\n"
        "build_parser()\n"
        f"print(json.dumps({{'heavy': [m for m in {HEAVY!r} if m in sys.modules], 'names': names}}))\n"
    )
    assert result["heavy"] == []
    assert {"LormaConfig", "LormaModel", "LormaLayer", "functional", "DEFAULT_TARGET_MODULES"} <= set(result["names"])


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import get_peft_model
    from transformers import BertConfig, BertModel

    from lorma import LormaConfig

    base = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                                vocab_size=30))
    folder = tmp_path_factory.mktemp("registration") / "adapter"
    get_peft_model(base, LormaConfig(r=2, target_modules=["query"])).save_pretrained(folder)
    return folder


ORDERS = {
    "import lorma, then peft": "import lorma\nimport peft",
    "peft first, then lorma": "import peft\nimport lorma",
    "LormaConfig first": "from lorma import LormaConfig",
    "lorma.config directly": "import lorma.config",
    "lorma.model directly": "from lorma.model import LormaModel",
    "lorma.layers.base directly": "import lorma.layers.base",
    "a lorma subpackage": "import lorma.analysis.deltas\nimport peft",
}


@pytest.mark.parametrize("order", list(ORDERS))
def test_peft_knows_lorma_whatever_the_import_order(order: str, saved_adapter: Path) -> None:
    result = _fresh(
        "import json, sys\n"
        "assert not any(m == name or m.startswith(name + '.') for m in sys.modules for name in ('peft', 'lorma'))\n"
        + ORDERS[order] + "\n"
        "from peft import PeftConfig\n"
        "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING\n"
        f"config = PeftConfig.from_pretrained({str(saved_adapter)!r})\n"
        "hooks = [type(f).__name__ for f in sys.meta_path if type(f).__module__ == 'lorma.peft_method.registration']\n"
        "print(json.dumps({'config': type(config).__name__, 'r': config.r, 'tuner': "
        "PEFT_TYPE_TO_TUNER_MAPPING['LORMA'].__name__, 'hooks': hooks}))\n",
        heavy_preloaded=True,
    )
    assert result == {"config": "LormaConfig", "r": 2, "tuner": "LormaModel", "hooks": []}


def test_without_import_lorma_peft_cannot_know_it_and_the_docs_say_so(saved_adapter: Path) -> None:
    """The one case lorma cannot reach: a process that never imports it. The README and the model card saved
    with every LoRMA adapter of `lorma train` say what to do."""
    proc = fresh_python.run([sys.executable, "-c", f"from peft import PeftConfig\n"
                                                   f"PeftConfig.from_pretrained({str(saved_adapter)!r})"],
                            timeout=300, preload=fresh_python.WITHOUT_PEFT)
    assert proc.returncode != 0 and "KeyError: 'LORMA'" in proc.stderr
    readme = (ROOT / "README.md").read_text()
    assert "KeyError: 'LORMA'" in readme and "import lorma" in readme
