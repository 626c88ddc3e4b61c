"""The reproduction study: every claim of the LoRMA paper put to the test with ordinary ``lorma train`` runs.

``lorma reproduce`` runs it (``--plan`` prints what it would run and its CPU cost, ``--report`` rewrites
REPRODUCTION.md from the committed results). The study is a floor above :mod:`lorma.recipes` (it trains runs) and
:mod:`lorma.analysis` (it measures them), below :mod:`lorma.commands`; nothing below imports it.

- :mod:`lorma.study.profiles`: what runs, at which scale (``cpu``: this machine's 2 cores; ``paper``: the paper's
  own models and settings, for a user with GPUs; ``tiny``: the plumbing, for the tests), as small typed records;
- :mod:`lorma.study.plan`: the profile expanded into the list of runs and measurements, each with its cost;
- :mod:`lorma.study.runner`: executing the plan resumably (a run whose results are saved is never trained again)
  and keeping each run's small result files (metrics, predictions, logs; no weights) under the results folder;
- :mod:`lorma.study.report`: the verdicts per claim, tables and pictures, from the result files alone.
"""
