"""Third-party messages that tell a user of the ``lorma`` command nothing, silenced one by one.

Each is named in :data:`KNOWN_NOISE` with the logger that emits it, the start of its text and why it is noise;
a :class:`logging.Filter` on exactly that logger drops records whose message starts so. Every other record of
the same logger (and of the library) still shows, so a real warning is never hidden. The filter can be
installed before the library is imported: :func:`logging.getLogger` creates the logger the library's module
will later fetch by the same name.

Installed by :func:`lorma.cli.main` for every command (and by :func:`quiet_libraries` for
callers of the library's training function). Progress bars (tqdm) are not logging and are not touched here.
"""

from __future__ import annotations

import logging
import os
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


class DropKnownNoise(logging.Filter):
    """Drops the records of one logger whose (unformatted) message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def silence_known_noise() -> None:
    """Install the filters of :data:`KNOWN_NOISE` (once per logger; calling again changes nothing)."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for noise in KNOWN_NOISE:
        by_logger[noise.logger] = (*by_logger.get(noise.logger, ()), noise.starts_with)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropKnownNoise) for f in logger.filters):
            logger.addFilter(DropKnownNoise(prefixes))


def quiet_libraries() -> None:
    """Keep transformers' load-time chatter out of the summary (warnings that matter still show).

    Called once the input has been checked: it imports transformers and datasets.
    """
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    silence_known_noise()  # bitsandbytes' notice when Trainer's import brings in peft (lorma.plumbing.quiet)
    # a deprecation inside transformers/peft, raised once per model, says nothing to a user of lorma
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the weight-loading bars; Trainer's own bars stay (disable_tqdm=False)
    import datasets

    datasets.disable_progress_bars()
