"""Recipes: the ``lorma train / compare / merge / demo`` commands and the pieces they are built from.

- :mod:`lorma.recipes.config`: :class:`RunConfig`, one run's settings, merged from YAML and flags.
- :mod:`lorma.recipes.methods`: building the model for a method name (lorma-plus, lora, bitfit, ...).
- :mod:`lorma.recipes.train`: one run through HF Trainer, with the output directory's layout.
- :mod:`lorma.recipes.compare`: several methods and seeds, the results table and the loss-curve plot.
- :mod:`lorma.recipes.merge`: folding an adapter into its base model for plain transformers.
"""
