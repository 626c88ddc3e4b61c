"""Readers of the tasks' data files, one module per family, with file-and-line errors and ``skip_bad``.

- :mod:`~lorma.tasks.readers.records`: what every reader shares (:class:`ReadResult`, the ``skip_bad``
  collector, JSON records with line numbers, the csv field limit); start here to read a new format.
- :mod:`~lorma.tasks.readers.data_to_text`: E2E, DART, WebNLG.
- :mod:`~lorma.tasks.readers.math_problems`: GSM8K, MATH, MetaMathQA.
- :mod:`~lorma.tasks.readers.chat`: conversations for ``--task chat`` (``messages``, or prompt / response).
- :mod:`~lorma.tasks.readers.plain_text`: predictions, blank-line reference groups, sniffing a file's format.
- :mod:`~lorma.tasks.readers.tabular`: classification examples from CSV / TSV / JSONL (text, pair, label).
- :mod:`~lorma.tasks.readers.packaged_data`: real classification data from installed PyPI data packages, written
  as train / test CSV files (the recipe study's and the demo's data).

The public names of records, data_to_text, math_problems and plain are importable from this package; those of
chat, tabular and packaged_data from their own modules.
"""

from lorma.tasks.readers.data_to_text import (
    DataToTextExample,
    linearize_triples,
    read_dart,
    read_data_to_text,
    read_e2e,
    read_webnlg,
)
from lorma.tasks.readers.math_problems import MathExample, read_gsm8k, read_math, read_math_eval, read_metamathqa
from lorma.tasks.readers.plain_text import read_predictions, read_reference_groups, sniff_format
from lorma.tasks.readers.records import DataFormatError, ReadResult, allow_large_csv_fields

__all__ = [
    "DataFormatError",
    "DataToTextExample",
    "MathExample",
    "ReadResult",
    "allow_large_csv_fields",
    "linearize_triples",
    "read_dart",
    "read_data_to_text",
    "read_e2e",
    "read_gsm8k",
    "read_math",
    "read_math_eval",
    "read_metamathqa",
    "read_predictions",
    "read_reference_groups",
    "read_webnlg",
    "sniff_format",
]
