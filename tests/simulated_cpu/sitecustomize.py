"""Makes this process's bitsandbytes see a CPU with AVX512-BF16, as on the machines where a new user saw its
"Failed to load CPU gemm_4bit_forward from kernels-community" notice (bitsandbytes 0.50 asks for an optional hub
kernel on such a CPU at import, and logs that notice when it cannot have it).

Put this folder first on ``PYTHONPATH`` of a child process (tests/commands/test_quiet_stderr.py): Python imports
``sitecustomize`` at start-up, which installs an import hook that replaces ``bitsandbytes.functional.has_avx512bf16``
as soon as that module is loaded, before ``bitsandbytes.backends.cpu.ops`` reads it.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any


class _ThenPretendAvx512Bf16(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        module.has_avx512bf16 = lambda: True


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "bitsandbytes.functional":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                spec.loader = _ThenPretendAvx512Bf16(spec.loader)
                return spec
        return None


sys.meta_path.insert(0, _Finder())
