"""Third-party messages that tell a user of lorma nothing, avoided one by one, each around the call that makes it.

Log records: each is named in :data:`KNOWN_NOISE` with the logger that emits it, the start of its text and why it
is noise; a :class:`logging.Filter` on exactly that logger drops records whose message starts so. Every other
record of the same logger (and of the library) still shows, so a real warning is never hidden. The filter can be
installed before the library is imported: :func:`logging.getLogger` creates the logger the library's module will
later fetch by the same name. A library may not change a user's logging for good, so :func:`known_noise_dropped`
installs the filters for one call only: lorma's import hook runs peft's import inside it (the notice comes from
that import, :mod:`lorma.peft_method.registration`), so ``import lorma, peft`` prints nothing. The command line,
which owns its process, installs them for the whole run (:func:`silence_known_noise` in :func:`lorma.cli.main`).

Python warnings: each is named in :data:`KNOWN_WARNINGS`; :func:`known_warnings_ignored` ignores them inside a
``with`` block only (:func:`warnings.catch_warnings`), around the calls into third-party code that raise them, so a
user's own warnings (and the same warning from the user's own calls) still show. Progress bars (tqdm) are not
logging and are not touched here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownNoise:
    """One message of a third-party library that is noise in lorma's output."""

    logger: str
    starts_with: str
    why: str


KNOWN_NOISE: tuple[KnownNoise, ...] = (
    KnownNoise(
        logger="bitsandbytes.backends.cpu.ops",
        starts_with="Failed to load CPU gemm_4bit_forward from kernels-community",
        why="peft.helpers imports bitsandbytes whenever it is installed (every `lorma train` imports peft through "
            "transformers' Trainer); bitsandbytes 0.50, on a CPU with AVX512-BF16, then tries to load an optional "
            "hub kernel (package `kernels`, downloading kernels-community/quantization-bitsandbytes) for a faster "
            "CPU 4-bit matrix product, and warns when it cannot (not installed, or offline). Its own CPU kernel is "
            "used instead, and only a 4-bit model on the CPU would run it at all.",
    ),
)


@dataclass(frozen=True)
class KnownWarning:
    """One Python warning of a third-party library that is noise when lorma's own calls raise it."""

    message: str  # a regular expression matched at the start of the message (warnings.filterwarnings' rule)
    category: type[Warning]
    why: str


KNOWN_WARNINGS: tuple[KnownWarning, ...] = (
    KnownWarning(
        message="`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
        why="peft 0.21's PeftModel.__init__ asks getattr(model, 'is_gradient_checkpointing', True) of the base "
            "model, which transformers 5 deprecated in favour of is_activation_checkpointing: every PeftModel "
            "built or loaded (get_peft_model, PeftModel.from_pretrained) warns once, about peft's code, not ours.",
    ),
)


class DropKnownNoise(logging.Filter):
    """Drops the records of one logger whose (unformatted) message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def silence_known_noise() -> None:
    """Install the filters of :data:`KNOWN_NOISE` for good (once per logger; calling again changes nothing): for
    the command line, which owns its process."""
    for name, prefixes in _filters_by_logger().items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropKnownNoise) for f in logger.filters):
            logger.addFilter(DropKnownNoise(prefixes))


def _filters_by_logger() -> dict[str, tuple[str, ...]]:
    by_logger: dict[str, tuple[str, ...]] = {}
    for noise in KNOWN_NOISE:
        by_logger[noise.logger] = (*by_logger.get(noise.logger, ()), noise.starts_with)
    return by_logger


@contextlib.contextmanager
def known_noise_dropped() -> Iterator[None]:
    """Drop the records of :data:`KNOWN_NOISE` while the ``with`` block runs (the filters are removed after)."""
    added = []
    for name, prefixes in _filters_by_logger().items():
        logger = logging.getLogger(name)
        flt = DropKnownNoise(prefixes)
        logger.addFilter(flt)
        added.append((logger, flt))
    try:
        yield
    finally:
        for logger, flt in added:
            logger.removeFilter(flt)


@contextlib.contextmanager
def known_warnings_ignored() -> Iterator[None]:
    """Ignore the warnings of :data:`KNOWN_WARNINGS` raised inside the ``with`` block, and no others."""
    with warnings.catch_warnings():
        for known in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=known.message, category=known.category)
        yield


def quiet_libraries() -> None:
    """Keep transformers' load-time chatter out of the summary (warnings that matter still show).

    Called once the input has been checked: it imports transformers and datasets. (bitsandbytes' notice is dropped
    around peft's import by lorma's import hook, peft's deprecation warning around the calls that raise it:
    :func:`known_warnings_ignored`; neither is a filter for the whole process.)
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the weight-loading bars; Trainer's own bars stay (disable_tqdm=False)
    import datasets

    datasets.disable_progress_bars()
