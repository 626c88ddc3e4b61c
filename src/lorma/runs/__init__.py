"""A run, below the floors that make runs (:mod:`lorma.recipes`) and read them (:mod:`lorma.analysis`).

Both floors and every command need the same facts about a run; they live here once, so that every import between
the upper floors points down (a test fails on any import between recipes and analysis, or from here upwards):

- :mod:`~lorma.runs.layout`: what a run directory holds and where (file names, checkpoints, the adapter, the
  recorded settings), and reading it back.
- :mod:`~lorma.runs.transaction`: writing one as a transaction (lock, ``--overwrite`` beside the old run and a
  swap, resume from the newest complete checkpoint, cleaning up after a kill).
- :mod:`~lorma.runs.paths`: where a command may write (never onto or around its own inputs).
- :mod:`~lorma.runs.fingerprints`: what a run read (size, mtime, SHA-256), so that ``--resume`` refuses changes.
- :mod:`~lorma.runs.method_registry`: the methods by name (how each adapter is built, its label, its family).
- :mod:`~lorma.runs.adapters`: a saved adapter loaded onto its base model (merge, export and analyze).
- what training records: :mod:`~lorma.runs.rank_log` (the rank of every ``I(BA)`` during training, on
  :mod:`~lorma.runs.spectrum`), :mod:`~lorma.runs.loss_curve` (the loss log, its smoothing and AUC) and
  :mod:`~lorma.runs.plots` (the loss curves and the learning-rate range test's plot).

Nothing is re-exported here: importing ``lorma.runs`` costs nothing, each module imports what it needs.
"""
