"""Scorers: metrics computed from predictions and references, shared by the tasks and ``lorma evaluate``.

Nothing here knows tasks, runs or models (this package imports nothing from :mod:`lorma.tasks`,
:mod:`lorma.recipes` or :mod:`lorma.analysis`; tests/test_package_layout.py checks it), and nothing is imported
by this package's ``__init__``: import the module you need, which imports its heavy libraries only when a score
is computed.

- :mod:`~lorma.scoring.data_to_text`: E2E / WebNLG / DART scores with references grouped by input; picks the
  official scorer (the default) or the approximate Python one, and checks what it needs (Java, WordNet) first.
- :mod:`~lorma.scoring.e2e_official`: the E2E NLG Challenge scorer (``measure_scores.py -p``).
- :mod:`~lorma.scoring.generation_eval`: LoRA's decode step and WebNLG's GenerationEval (WebNLG, DART).
- :mod:`~lorma.scoring.java`: the Java half of the official scorers (METEOR 1.5, the Stanford PTB tokenizer).
- :mod:`~lorma.scoring.wordnet`: WordNet 3.0 for the approximate METEOR, offline.
- :mod:`~lorma.scoring.math_answers`: final answers in math text, their normalisation, GSM8K / MATH accuracy.
- :mod:`~lorma.scoring.classification`: GLUE's metrics and macro-F1 (one at a time, or batched for the
  verdicts' bootstrap), whether an evaluation collapsed, whether labels are skewed.
"""
