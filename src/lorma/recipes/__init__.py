"""Recipes: the jobs the ``lorma`` commands run, built from tasks (:mod:`lorma.tasks`), methods and the run
directory (:mod:`lorma.runs`). Beside :mod:`lorma.analysis` on one floor: neither imports the other.

- :mod:`lorma.recipes.config`: :class:`RunConfig`, one run's settings, merged from YAML and flags; the defaults per
  method family.
- :mod:`lorma.recipes.methods`: building the model for a method name (lorma-plus, lora, bitfit, ...).
- :mod:`lorma.recipes.train`: one run through HF Trainer (``lorma train``).
- :mod:`lorma.recipes.tuning`: ``--tune``: settings chosen on the training data (k-fold on small data).
- :mod:`lorma.recipes.learning_rates`: the head's own learning rate and the learning-rate range test.
- :mod:`lorma.recipes.compare`: several methods and seeds, the results table and the loss-curve plot.
- :mod:`lorma.recipes.verdicts`, :mod:`lorma.recipes.collapse`: the comparison's intervals; whether a run collapsed.
- :mod:`lorma.recipes.merge`: folding an adapter into its base model for plain transformers (``lorma merge``).
- :mod:`lorma.recipes.export`: a run's LoRMA adapter written as a peft LoRA adapter (``lorma export``).
- :mod:`lorma.recipes.evaluate`: predictions scored against references, no model (``lorma evaluate``).
- :mod:`lorma.recipes.demo`: the packaged offline comparison (``lorma demo``, ``make demo``).
"""
